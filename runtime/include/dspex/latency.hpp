// Latency samples and their percentiles, for the CLI summary and benchmarks.
#pragma once

#include <chrono>
#include <cstddef>
#include <vector>

namespace dspex {

class latency_recorder {
public:
  void record(std::chrono::nanoseconds d) {
    samples_.push_back(d.count());
    sorted_ = false;
  }
  /// Adds every sample of `other` to this one.
  void merge(const latency_recorder& other);
  std::size_t count() const noexcept { return samples_.size(); }
  /// Nearest-rank percentile in microseconds, p in [0, 100]; 0 when empty.
  double percentile_us(double p) const;
  /// @returns the mean of the samples in microseconds (0 when empty).
  double mean_us() const;

private:
  mutable std::vector<long long> samples_;
  mutable bool sorted_ = false;
};

} // namespace dspex
