// Every setting of the runtime, with its default. The INI file in config/ and
// the command line (--pool.size=8) fill this through CAF's config machinery
// (actors/include/dspex/config.hpp); the runtime itself only sees this struct.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "dspex/error.hpp"
#include "dspex/framing.hpp"

namespace dspex {

struct settings {
  using ms = std::chrono::milliseconds;

  struct pool_settings {
    std::size_t size = 4;              ///< pool.size: workers kept running
    ms init_timeout{10'000};           ///< pool.init_timeout: spawn → init ping reply (and LM configuration)
    ms request_timeout{30'000};        ///< pool.request_timeout: default per-call deadline, queue wait included
    std::size_t max_frame_bytes = default_max_frame_bytes;  ///< pool.max_frame_bytes
    std::size_t max_overflow = 0;      ///< pool.max_overflow: extra workers started on demand
    ms overflow_idle_delay{0};         ///< pool.overflow_idle_delay: idle time before an overflow worker retires
    bool lazy = false;                 ///< pool.lazy: start workers on demand instead of at start
    std::string strategy = "fifo";     ///< pool.strategy: fifo (round-robin) or lifo (hottest worker first)
    std::size_t max_queue = 10'000;    ///< pool.max_queue: waiting callers; beyond it pool_saturated at once
    std::uint32_t failure_threshold = 3;  ///< pool.failure_threshold: consecutive failed checkins that remove a worker
    bool use_safe_port_connect = true; ///< pool.use_safe_port_connect: validate worker and caller before handover (seed Fix 2 rollback switch)
  } pool;

  struct worker_settings {
    std::string python = "python3";    ///< worker.python: interpreter, looked up in PATH
    std::string script = DSPEX_DEFAULT_WORKER_SCRIPT;  ///< worker.script
    std::vector<std::string> extra_args;  ///< worker.extra_args: appended to the command line
    bool test_commands = false;        ///< worker.test_commands: pass --test-commands (tests only)
    ms shutdown_grace{1'000};          ///< worker.shutdown_grace: after `shutdown` + EOF, before SIGTERM
    ms kill_grace{1'000};              ///< worker.kill_grace: after SIGTERM, before SIGKILL
  } worker;

  struct lm_settings {
    std::string provider = "mock";     ///< lm.provider: applied to every worker before it serves; "" = none
    std::string model = "mock";        ///< lm.model
    double temperature = 0.7;          ///< lm.temperature
  } lm;

  std::string log_level = "info";      ///< log.level: trace, debug, info, warn, error, critical, off
  std::string scheduler_policy = "sharing";  ///< scheduler.policy: sharing or stealing (CAF's own key)
  std::size_t scheduler_max_threads = 0;     ///< scheduler.max-threads: 0 = half the cores, at least 1 (CAF's own default is max(4, cores))

  /// Checks every value; the error (configuration_error) names the key, the
  /// value and what is allowed, e.g. "pool.size must be between 1 and 1024 (got 0)".
  std::optional<error> validate() const;

  /// The worker's command line after the interpreter:
  /// <script> --mode <mode> --worker-id <id> [--test-commands] <extra_args...>
  /// `mode`: pool-worker (a pool's workers) or standalone (the bridge's one worker).
  std::vector<std::string> worker_args(const std::string& worker_id,
                                       const std::string& mode = "pool-worker") const;
};

/// Finds `program` in PATH (or checks it when it contains '/'); empty when not
/// found or not executable.
std::string find_executable(const std::string& program);

} // namespace dspex
