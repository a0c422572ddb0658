// latency_histogram: the buckets bound every value within 1/16, percentiles
// follow the nearest-rank rule within that bound, and concurrent records are
// never lost.
#include <algorithm>
#include <cmath>
#include <random>
#include <thread>
#include <vector>

#include <doctest/doctest.h>

#include "dspex/latency_histogram.hpp"

using dspex::latency_histogram;
using namespace std::chrono_literals;

namespace {

// The nearest-rank percentile of sorted `v`, in microseconds.
double exact_us(const std::vector<std::uint64_t>& v, double p) {
  auto rank = static_cast<std::size_t>(std::ceil(p / 100.0 * static_cast<double>(v.size())));
  return static_cast<double>(v[std::max<std::size_t>(rank, 1) - 1]) / 1000.0;
}

} // namespace

TEST_CASE("histogram buckets: exact below 32 ns, within 1/16 above, ordered") {
  std::size_t last = 0;
  for (std::uint64_t v = 0; v < 100000; ++v) {
    auto b = latency_histogram::bucket_of(v);
    REQUIRE(b < latency_histogram::bucket_count);
    REQUIRE(b >= last);  // larger values never land in lower buckets
    last = b;
    auto upper = latency_histogram::upper_bound_of(b);
    REQUIRE(upper >= v);
    if (v < 32)
      REQUIRE(upper == v);
    else
      REQUIRE(upper - v < v / 16 + 1);
  }
  // Bucket edges: the value just past a bucket's upper bound opens the next.
  for (std::size_t b = 0; b + 1 < latency_histogram::bucket_count; ++b)
    REQUIRE(latency_histogram::bucket_of(latency_histogram::upper_bound_of(b) + 1) == b + 1);
  // Beyond 2^40 ns everything is the top bucket.
  CHECK(latency_histogram::bucket_of(std::uint64_t{1} << 40) == latency_histogram::bucket_count - 1);
  CHECK(latency_histogram::bucket_of(~std::uint64_t{0}) == latency_histogram::bucket_count - 1);
}

TEST_CASE("histogram percentiles: never below the nearest-rank value, at most 1/16 above") {
  latency_histogram h;
  std::mt19937_64 rng{42};
  std::lognormal_distribution<double> dist{std::log(80000.0), 0.6};  // ~80 µs, a long tail
  std::vector<std::uint64_t> values;
  for (int i = 0; i < 50000; ++i) {
    auto ns = static_cast<std::uint64_t>(dist(rng));
    values.push_back(ns);
    h.record(std::chrono::nanoseconds{ns});
  }
  std::sort(values.begin(), values.end());
  auto s = h.summary();
  CHECK(s.count == values.size());
  for (auto [p, got] : {std::pair{50.0, s.p50_us}, {90.0, s.p90_us}, {99.0, s.p99_us}}) {
    CAPTURE(p);
    auto want = exact_us(values, p);
    CHECK(got >= want);
    CHECK(got <= want * (1.0 + 1.0 / 16) + 0.001);
  }
  CHECK(s.max_us == doctest::Approx(static_cast<double>(values.back()) / 1000.0));
  double sum = 0;
  for (auto v : values)
    sum += static_cast<double>(v);
  CHECK(s.mean_us == doctest::Approx(sum / static_cast<double>(values.size()) / 1000.0));
}

TEST_CASE("histogram edge values: empty, negative, beyond the top bucket") {
  latency_histogram h;
  auto empty = h.summary();
  CHECK(empty.count == 0);
  CHECK(empty.p99_us == 0);
  CHECK(empty.max_us == 0);
  h.record(std::chrono::nanoseconds{-5});  // a clock step backwards counts as 0
  CHECK(h.summary().p50_us == 0);
  h.record(std::chrono::hours{1});  // past 2^40 ns: top bucket, exact max
  auto s = h.summary();
  CHECK(s.count == 2);
  CHECK(s.max_us == doctest::Approx(3600.0 * 1e6));
  CHECK(s.p99_us <= s.max_us);
  CHECK(s.p99_us >= static_cast<double>(latency_histogram::upper_bound_of(
                      latency_histogram::bucket_count - 2)) / 1000.0);
}

TEST_CASE("histogram records from several threads at once lose nothing") {
  latency_histogram h;
  constexpr int threads = 4;
  constexpr int per_thread = 100000;
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; ++t)
    ts.emplace_back([&h, t] {
      for (int i = 0; i < per_thread; ++i)
        h.record(std::chrono::nanoseconds{1000 * (t + 1) + i % 7});
    });
  for (auto& t : ts)
    t.join();
  auto s = h.summary();
  CHECK(s.count == threads * per_thread);
  CHECK(s.max_us == doctest::Approx((1000.0 * threads + 6) / 1000.0));
  CHECK(s.p50_us >= 2.0);  // half the values are >= 2000 ns
}
