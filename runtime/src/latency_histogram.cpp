#include "dspex/latency_histogram.hpp"

#include <algorithm>
#include <cmath>

namespace dspex {

namespace {

constexpr std::uint64_t sub_count = std::uint64_t{1} << latency_histogram::sub_bits;

double to_us(std::uint64_t ns) {
  return static_cast<double>(ns) / 1000.0;
}

} // namespace

nlohmann::json latency_summary::to_json() const {
  return {{"count", count}, {"p50_us", p50_us}, {"p90_us", p90_us},
          {"p99_us", p99_us}, {"max_us", max_us}, {"mean_us", mean_us}};
}

std::size_t latency_histogram::bucket_of(std::uint64_t ns) noexcept {
  if (ns < sub_count)
    return static_cast<std::size_t>(ns);
  auto exponent = 63u - static_cast<unsigned>(__builtin_clzll(ns));
  if (exponent >= top_bit)
    return bucket_count - 1;
  auto shift = exponent - sub_bits;
  auto sub = (ns >> shift) & (sub_count - 1);
  return static_cast<std::size_t>(sub_count + shift * sub_count + sub);
}

std::uint64_t latency_histogram::upper_bound_of(std::size_t b) noexcept {
  if (b < sub_count)
    return b;
  auto shift = (b - sub_count) / sub_count;
  auto sub = (b - sub_count) % sub_count;
  auto lower = (sub_count + sub) << shift;
  return lower + (std::uint64_t{1} << shift) - 1;
}

void latency_histogram::record(std::chrono::nanoseconds d) noexcept {
  auto ns = d.count() > 0 ? static_cast<std::uint64_t>(d.count()) : std::uint64_t{0};
  buckets_[bucket_of(ns)].fetch_add(1, std::memory_order_relaxed);
  count_.fetch_add(1, std::memory_order_relaxed);
  sum_ns_.fetch_add(ns, std::memory_order_relaxed);
  // A new maximum is rare after the first calls: one load, seldom a CAS.
  auto seen = max_ns_.load(std::memory_order_relaxed);
  while (ns > seen && !max_ns_.compare_exchange_weak(seen, ns, std::memory_order_relaxed)) {
  }
}

std::vector<std::uint64_t> latency_histogram::counts_at_or_below(
  const std::vector<std::uint64_t>& bounds_ns) const {
  std::vector<std::uint64_t> out(bounds_ns.size() + 1, 0);
  std::uint64_t total = 0;
  std::size_t next = 0;  // the first bound this bucket may still count toward
  for (std::size_t b = 0; b < bucket_count; ++b) {
    auto n = buckets_[b].load(std::memory_order_relaxed);
    total += n;
    while (next < bounds_ns.size() && upper_bound_of(b) > bounds_ns[next])
      out[next++] = total - n;  // this bucket reaches past the bound: what came before it
  }
  while (next < bounds_ns.size())
    out[next++] = total;
  out.back() = total;
  return out;
}

latency_summary latency_histogram::summary() const {
  // Percentiles come from one copy of the buckets, so they agree with each
  // other even while other threads record.
  std::array<std::uint64_t, bucket_count> copy{};
  std::uint64_t total = 0;
  for (std::size_t b = 0; b < bucket_count; ++b) {
    copy[b] = buckets_[b].load(std::memory_order_relaxed);
    total += copy[b];
  }
  latency_summary s;
  s.count = total;
  if (total == 0)
    return s;
  auto max_ns = max_ns_.load(std::memory_order_relaxed);
  auto at = [&](double p) {
    auto rank = static_cast<std::uint64_t>(std::ceil(p / 100.0 * static_cast<double>(total)));
    rank = std::clamp<std::uint64_t>(rank, 1, total);
    std::uint64_t seen = 0;
    for (std::size_t b = 0; b < bucket_count; ++b) {
      seen += copy[b];
      if (seen >= rank)
        return to_us(std::min(upper_bound_of(b), max_ns));
    }
    return to_us(max_ns);
  };
  s.p50_us = at(50);
  s.p90_us = at(90);
  s.p99_us = at(99);
  s.max_us = to_us(max_ns);
  auto recorded = count_.load(std::memory_order_relaxed);
  s.mean_us = recorded ? to_us(sum_ns_.load(std::memory_order_relaxed)) / static_cast<double>(recorded)
                       : 0.0;
  return s;
}

} // namespace dspex
