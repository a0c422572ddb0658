// A crash storm: real SIGKILLs (and some SIGSTOPs) to a running pool's
// workers, on a thread of its own, while something else uses the pool. Shared by `dspex run --storm`
// and tests/actors/test_crash_storm.cpp (library dspex_workload).
//
//   dspex::crash_storm storm{*rt, {}};   // 40 cycles, every 25 ms, 3 hits each
//   storm.start();
//   ... use the pool ...
//   storm.wait();                        // or storm.stop() to end it early
//   for (auto& k : storm.kills()) ...    // cycle, pid, worker id, when
//
// Each cycle reads the pool's real status right before killing (a pid is
// reused only after its process was reaped, and the pool reaps only dead
// workers), keeps the workers with a live process (pid != 0, not removing or
// stopping, /proc shows it running the worker script, not a zombie) in any
// other state: starting, configuring its LM, idle, busy, leased; and sends
// SIGKILL with ::kill to `kills_per_cycle` distinct ones chosen at random,
// SIGSTOP instead to a `stop_fraction` of them (the pool must find and
// replace stopped processes itself): the first hit, then every
// 1/stop_fraction-th, so any storm that hits at all stops some (a random
// share would stop none in 11% of 21-hit storms). A cycle with fewer
// candidates hits what there is.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

namespace dspex {

class runtime;

struct crash_storm_options {
  std::size_t cycles = 40;
  std::chrono::milliseconds interval{25};  ///< from the start of one cycle to the next
  std::size_t kills_per_cycle = 3;
  double stop_fraction = 0.1;  ///< share of the hits that are SIGSTOP instead of SIGKILL (the first one among them)
  /// Only processes whose /proc/<pid>/cmdline contains this are killed
  /// (guards against a pid that changed hands); empty = the runtime's
  /// worker.script.
  std::string worker_script;
  std::optional<std::uint64_t> seed;  ///< for the random choice; default random_device
};

struct crash_storm_kill {
  std::size_t cycle = 0;
  int pid = 0;
  std::string worker_id;
  std::string state;  ///< the worker's state in the status read before the kill
  int signal = 0;     ///< SIGKILL or SIGSTOP
  std::chrono::steady_clock::time_point at;
};

/// start, stop and wait belong to the thread that owns the storm; the
/// accessors may be called from any thread, also while the storm runs.
class crash_storm {
public:
  using clock_type = std::chrono::steady_clock;

  crash_storm(runtime& rt, crash_storm_options opts = {});
  ~crash_storm();  ///< stop()
  crash_storm(const crash_storm&) = delete;
  crash_storm& operator=(const crash_storm&) = delete;

  /// Starts the storm thread (once).
  void start();
  /// Ends the storm early (the current cycle completes) and joins. Idempotent.
  void stop();
  /// Waits until every cycle ran (or stop()); false on timeout.
  bool wait_for(std::chrono::milliseconds timeout);
  /// Waits until the storm is over and joins its thread.
  void wait();

  bool finished() const;
  std::vector<crash_storm_kill> kills() const;
  std::size_t cycles_run() const;
  /// Cycles that found fewer live workers than kills_per_cycle.
  std::size_t short_cycles() const;
  /// Per cycle run: how many live worker processes it found.
  std::vector<std::size_t> live_per_cycle() const;
  /// Kills that ::kill refused (errno other than success), e.g. ESRCH.
  std::size_t failed_kills() const;
  std::optional<clock_type::time_point> started_at() const;
  std::optional<clock_type::time_point> ended_at() const;
  /// Every worker pid seen in a status read, for checks after stop.
  std::set<int> pids_seen() const;
  const crash_storm_options& options() const noexcept { return opts_; }

private:
  void run();

  runtime& rt_;
  crash_storm_options opts_;
  std::mt19937_64 rng_;
  std::size_t hits_ = 0;   ///< signals sent
  std::size_t stops_ = 0;  ///< of them SIGSTOP: 1 + floor(hits × stop_fraction) before each hit
  std::thread thread_;
  mutable std::mutex mtx_;
  std::condition_variable cv_;
  bool stop_requested_ = false;
  bool finished_ = false;
  std::vector<crash_storm_kill> kills_;
  std::size_t cycles_run_ = 0;
  std::size_t short_cycles_ = 0;
  std::vector<std::size_t> live_per_cycle_;
  std::size_t failed_kills_ = 0;
  std::set<int> pids_seen_;
  std::optional<clock_type::time_point> started_at_;
  std::optional<clock_type::time_point> ended_at_;
};

/// True when `/proc/<pid>` is a live (not zombie) process whose command line
/// contains `needle` (any argument).
bool process_runs(pid_t pid, const std::string& needle);

/// Python processes left behind: direct children of this process (zombies
/// included) plus any of `known_pids` still alive with `worker_script` in its
/// command line. (Known pids only: other programs on the machine may run the
/// same script.)
std::vector<pid_t> python_processes_left(const std::string& worker_script,
                                         const std::set<int>& known_pids);

} // namespace dspex
