#include "dspex/pool_metrics.hpp"

#include <algorithm>

namespace dspex {

nlohmann::json pool_metrics_summary::to_json() const {
  return {{"queue_wait", queue_wait.to_json()}, {"run", run.to_json()},
          {"total", total.to_json()},           {"in_flight", in_flight},
          {"utilisation", utilisation},         {"read_by_caller", read_by_caller}};
}

pool_metrics::pool_metrics(std::size_t capacity) : capacity_(std::max<std::size_t>(capacity, 1)) {
}

void pool_metrics::call_finished(clock_type::time_point started) noexcept {
  total.record(clock_type::now() - started);
  in_flight_.fetch_sub(1, std::memory_order_relaxed);
}

void pool_metrics::worker_ran(std::chrono::nanoseconds d) noexcept {
  run.record(d);
  if (d.count() > 0)
    busy_ns_.fetch_add(static_cast<std::uint64_t>(d.count()), std::memory_order_relaxed);
}

pool_metrics_summary pool_metrics::summary() const {
  pool_metrics_summary s;
  s.queue_wait = queue_wait.summary();
  s.run = run.summary();
  s.total = total.summary();
  s.in_flight = in_flight_.load(std::memory_order_relaxed);
  s.read_by_caller = read_by_caller_.load(std::memory_order_relaxed);
  auto elapsed = std::chrono::duration<double, std::nano>(clock_type::now() - since_).count();
  if (elapsed > 0)
    s.utilisation = static_cast<double>(busy_ns_.load(std::memory_order_relaxed))
                    / (elapsed * static_cast<double>(capacity_));
  return s;
}

} // namespace dspex
