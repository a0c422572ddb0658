// One pool's always-on latency accounting, shared by the threads that serve
// its calls: the caller's side records whole calls, the pool records queue
// waits and worker run times. It lives as long as the runtime, so a pool
// restarted by its supervisor keeps counting.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>

#include <nlohmann/json.hpp>

#include "dspex/call_counts.hpp"
#include "dspex/latency_histogram.hpp"

namespace dspex {

/// What pool_metrics reports at one moment (pool_status::metrics).
struct pool_metrics_summary {
  latency_summary queue_wait;  ///< a call reaching the pool → a worker taking it
  latency_summary run;         ///< a worker taking a call → the worker free again
  latency_summary total;       ///< the whole call as its caller sees it, retries included
  std::int64_t in_flight = 0;  ///< calls made and not yet answered
  /// Worker time spent running calls / (pool.size × time since the pool's
  /// metrics began): the share of the configured capacity in use. Overflow
  /// workers can take it above 1.
  double utilisation = 0;
  /// Replies read by their blocking caller's own thread (the direct lane:
  /// no thread hand-off), out of all calls counted in `run`.
  std::uint64_t read_by_caller = 0;

  /// {"queue_wait":{...},"run":{...},"total":{...},"in_flight","utilisation","read_by_caller"}
  nlohmann::json to_json() const;
};

class pool_metrics {
public:
  using clock_type = std::chrono::steady_clock;

  /// @param capacity pool.size, the denominator of utilisation (at least 1).
  explicit pool_metrics(std::size_t capacity);

  latency_histogram queue_wait;
  latency_histogram run;
  latency_histogram total;
  call_counts calls;  ///< every call the API answered, by command and outcome

  /// A call was made (whole-call accounting starts).
  void call_started() noexcept { in_flight_.fetch_add(1, std::memory_order_relaxed); }
  /// The call made at `started` was answered: counts its whole time.
  void call_finished(clock_type::time_point started) noexcept;
  /// A worker ran a call for `d`: counts it in `run` and in utilisation.
  void worker_ran(std::chrono::nanoseconds d) noexcept;
  /// A reply was read by its caller's thread (pool_metrics_summary::read_by_caller).
  void read_by_caller() noexcept { read_by_caller_.fetch_add(1, std::memory_order_relaxed); }

  /// @returns every figure as of now.
  pool_metrics_summary summary() const;

private:
  std::size_t capacity_;
  clock_type::time_point since_ = clock_type::now();
  std::atomic<std::int64_t> in_flight_{0};
  std::atomic<std::uint64_t> busy_ns_{0};
  std::atomic<std::uint64_t> read_by_caller_{0};
};

} // namespace dspex
