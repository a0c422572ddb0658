#include "dspex/latency.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace dspex {

void latency_recorder::merge(const latency_recorder& other) {
  samples_.insert(samples_.end(), other.samples_.begin(), other.samples_.end());
  sorted_ = false;
}

double latency_recorder::percentile_us(double p) const {
  if (samples_.empty())
    return 0.0;
  // Sorting once per read burst keeps record() at one push_back on the hot path.
  if (!sorted_) {
    std::sort(samples_.begin(), samples_.end());
    sorted_ = true;
  }
  p = std::clamp(p, 0.0, 100.0);
  auto rank = static_cast<std::size_t>(std::ceil(p / 100.0 * samples_.size()));
  auto idx = rank == 0 ? 0 : rank - 1;
  return samples_[std::min(idx, samples_.size() - 1)] / 1000.0;
}

double latency_recorder::mean_us() const {
  if (samples_.empty())
    return 0.0;
  long double sum = std::accumulate(samples_.begin(), samples_.end(), 0.0L);
  return static_cast<double>(sum / samples_.size() / 1000.0L);
}

} // namespace dspex
