// `dspex run --storm`: the workload under a crash storm, then the checks of
// issue 4's "done when": every request succeeded or failed with a structured
// error, the pool back at full size within a limit after the storm, and no
// Python process left after stop. The test (tests/actors/test_crash_storm.cpp)
// runs the same code.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <iosfwd>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "crash_storm.hpp"
#include "dspex/status.hpp"
#include "workload.hpp"

namespace dspex {

struct storm_run_options {
  workload_options workload;
  crash_storm_options storm;
  /// The workload runs at least the storm's duration plus this.
  std::chrono::milliseconds workload_margin{500};
  /// Full size must be back within this long after the storm's last kill.
  std::chrono::milliseconds full_size_limit{1000};
  /// How long to keep measuring when full size is late (to report the figure).
  std::chrono::milliseconds recovery_watch{10'000};
  std::chrono::milliseconds poll_interval{2};  ///< status polling while recovering
};

struct storm_run_report {
  workload_result workload;
  std::vector<crash_storm_kill> kills;
  std::size_t cycles_run = 0;
  std::size_t short_cycles = 0;  ///< cycles with fewer live workers than kills_per_cycle
  std::size_t failed_kills = 0;
  std::vector<std::size_t> live_per_cycle;  ///< live worker processes each cycle found
  double storm_ms = 0;           ///< first cycle to the end of the last one
  /// Time from the end of the storm until the pool was at full size (every
  /// configured worker idle or busy, each with a running process, none
  /// starting or removing); nullopt when not within recovery_watch.
  std::optional<double> full_size_ms;
  /// The same, from the last kill (nullopt also when nothing was killed).
  std::optional<double> full_size_after_last_kill_ms;
  std::size_t status_polls = 0;
  pool_status status_at_end;  ///< at full size, or the last read when it never came
  std::set<int> worker_pids;  ///< every worker pid seen (for the check after stop)
  // What the event stream said.
  std::map<std::string, std::size_t> event_counts;  ///< kind → count
  std::size_t restarts_after_storm = 0;             ///< restart_scheduled after the last kill
  std::chrono::milliseconds longest_restart_delay{0};
  std::vector<std::string> health_changes;  ///< "healthy->degraded at +12 ms" (from storm start)
  std::vector<std::string> circuit_changes;
};

/// Full size: `size` workers idle or busy (leases are busy in pool_status),
/// none starting or removing, and each one's process running the worker
/// script and not among `killed`.
bool at_full_size(const pool_status& st, const std::string& worker_script,
                  const std::set<int>& killed);

/// Runs the workload (`out`/`progress` as run_workload) while a crash storm
/// hits the pool, then measures the time to full size.
storm_run_report run_storm(runtime& rt, const storm_run_options& opts, std::ostream& out,
                           std::ostream& progress);

/// The checks; each violation in words, empty when the storm passed.
/// `python_left`: python_processes_left() after runtime::stop().
std::vector<std::string> storm_violations(const storm_run_report& r,
                                          const storm_run_options& opts,
                                          const std::vector<pid_t>& python_left);

/// The storm section of the summary, verdict included.
void print_storm_summary(const storm_run_report& r, const storm_run_options& opts,
                         const std::vector<pid_t>& python_left, std::ostream& out);

} // namespace dspex
