// Always-on latency accounting: a fixed set of log-linear buckets (HDR
// style) that any thread records into with relaxed atomic increments, and
// that a status query reads as percentiles at any time.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <vector>

#include <nlohmann/json.hpp>

namespace dspex {

/// Percentiles of one histogram, in microseconds. Each percentile is the
/// upper bound of the bucket that holds it, capped by the largest value
/// seen: never below the true value, at most 1/16 (6.25%) above it.
struct latency_summary {
  std::uint64_t count = 0;
  double p50_us = 0;
  double p90_us = 0;
  double p99_us = 0;
  double max_us = 0;
  double mean_us = 0;

  /// {"count","p50_us","p90_us","p99_us","max_us","mean_us"}
  nlohmann::json to_json() const;
};

/// A histogram of durations from 0 to about 18 minutes (2^40 ns; longer ones
/// count in the top bucket, and max_us stays exact), with 16 linear
/// sub-buckets per power of two.
/// @note record() allocates nothing, takes no lock and is safe from any
///       thread: a few relaxed atomic additions (bench_pool prints its cost).
///       A summary read while others record may miss the records in progress,
///       never more.
class latency_histogram {
public:
  static constexpr unsigned sub_bits = 4;  ///< 16 sub-buckets per power of two
  static constexpr unsigned top_bit = 40;  ///< 2^40 ns, about 18 minutes
  static constexpr std::size_t bucket_count =
    (std::size_t{1} << sub_bits) + (top_bit - sub_bits) * (std::size_t{1} << sub_bits);

  /// Counts one duration (negative ones count as 0).
  void record(std::chrono::nanoseconds d) noexcept;

  /// @returns the percentiles of everything recorded so far.
  latency_summary summary() const;

  /// @returns how many values were counted at or below each of `bounds_ns`
  ///          (ascending), then all of them (the +Inf bucket), from one copy
  ///          of the buckets, for formats with fixed buckets (Prometheus). A
  ///          log bucket counts below a bound only when all of it is, so a
  ///          count never includes a value above its bound (it may miss
  ///          values within 1/16 below it).
  std::vector<std::uint64_t> counts_at_or_below(const std::vector<std::uint64_t>& bounds_ns) const;
  /// @returns the number of values counted.
  std::uint64_t count() const noexcept { return count_.load(std::memory_order_relaxed); }
  /// @returns the sum of the values counted, in nanoseconds.
  std::uint64_t sum_ns() const noexcept { return sum_ns_.load(std::memory_order_relaxed); }

  /// @returns the bucket a value of `ns` nanoseconds is counted in.
  static std::size_t bucket_of(std::uint64_t ns) noexcept;
  /// @returns the largest value, in nanoseconds, counted in bucket `b`.
  static std::uint64_t upper_bound_of(std::size_t b) noexcept;

private:
  std::array<std::atomic<std::uint64_t>, bucket_count> buckets_{};
  std::atomic<std::uint64_t> count_{0};
  std::atomic<std::uint64_t> sum_ns_{0};
  std::atomic<std::uint64_t> max_ns_{0};
};

} // namespace dspex
