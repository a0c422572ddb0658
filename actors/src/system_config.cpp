#include "dspex/actors/system_config.hpp"

#include <algorithm>
#include <thread>

#include <caf/atom.hpp>
#include <caf/config_option_adder.hpp>
#include <caf/settings.hpp>

namespace dspex {

namespace {

template <class Duration>
caf::timespan to_timespan(Duration d) {
  return std::chrono::duration_cast<caf::timespan>(d);
}

settings::ms to_ms(caf::timespan t) {
  return std::chrono::duration_cast<settings::ms>(t);
}

} // namespace

system_config::system_config() {
  bind_options();
  // Our default differs from CAF's: work stealing costs ~70-90 us per round
  // trip on two cores (ARCHITECTURE.md). INI and CLI can still override it.
  set("scheduler.policy", caf::atom("sharing"));
}

system_config::system_config(const settings& s) : values_(s) {
  bind_options();
  set("scheduler.policy", caf::atom_from_string(s.scheduler_policy));
  // CAF 0.17 starts max(4, cores) scheduler threads. Actors here only route
  // messages; the work is in the Python processes and the I/O threads. Half
  // the cores (at least one) measured best: on 2 cores one scheduler thread
  // halved the sequential round trip against four (bench_pool).
  auto threads = s.scheduler_max_threads;
  if (threads == 0)
    threads = std::max<std::size_t>(1, std::thread::hardware_concurrency() / 2);
  set("scheduler.max-threads", threads);
}

void system_config::bind_options() {
  init_timeout_ = to_timespan(values_.pool.init_timeout);
  request_timeout_ = to_timespan(values_.pool.request_timeout);
  shutdown_grace_ = to_timespan(values_.worker.shutdown_grace);
  kill_grace_ = to_timespan(values_.worker.kill_grace);
  overflow_idle_delay_ = to_timespan(values_.pool.overflow_idle_delay);
  opt_group{custom_options_, "pool"}
    .add(values_.pool.size, "size", "worker processes kept running (default 4)")
    .add(init_timeout_, "init_timeout",
         "spawn to init-ping reply and LM configuration (default 10s)")
    .add(request_timeout_, "request_timeout",
         "default deadline of one call, queueing included (default 30s)")
    .add(values_.pool.max_frame_bytes, "max_frame_bytes",
         "largest frame accepted from a worker (default 16777216)")
    .add(values_.pool.max_overflow, "max_overflow",
         "extra workers started on demand beyond size (default 0)")
    .add(overflow_idle_delay_, "overflow_idle_delay",
         "idle time before an overflow worker retires (default 0s)")
    .add(values_.pool.lazy, "lazy", "start workers on demand instead of at start (default false)")
    .add(values_.pool.strategy, "strategy",
         "which idle worker serves next: fifo (round-robin) or lifo (default fifo)")
    .add(values_.pool.max_queue, "max_queue",
         "callers that may wait; beyond it pool_saturated at once (default 10000)")
    .add(values_.pool.failure_threshold, "failure_threshold",
         "consecutive failed checkins that remove a worker (default 3)")
    .add(values_.pool.use_safe_port_connect, "use_safe_port_connect",
         "validate worker and caller before each handover (default true)");
  opt_group{custom_options_, "worker"}
    .add(values_.worker.python, "python", "Python interpreter, looked up in PATH (default python3)")
    .add(values_.worker.script, "script", "worker script (default: the bundled dspex_worker.py)")
    .add(values_.worker.extra_args, "extra_args", "extra worker arguments (default [])")
    .add(values_.worker.test_commands, "test_commands",
         "start workers with --test-commands, for tests only (default false)")
    .add(shutdown_grace_, "shutdown_grace",
         "after shutdown and EOF, wait this long before SIGTERM (default 1s)")
    .add(kill_grace_, "kill_grace", "after SIGTERM, wait this long before SIGKILL (default 1s)");
  opt_group{custom_options_, "lm"}
    .add(values_.lm.provider, "provider",
         "LM applied to every worker before it serves; empty for none (default mock)")
    .add(values_.lm.model, "model", "LM model (default mock)")
    .add(values_.lm.temperature, "temperature", "LM temperature (default 0.7)");
  opt_group{custom_options_, "log"}
    .add(values_.log_level, "level", "trace, debug, info, warn, error, critical, off (default info)");
}

settings system_config::to_settings() const {
  settings s = values_;
  s.pool.init_timeout = to_ms(init_timeout_);
  s.pool.request_timeout = to_ms(request_timeout_);
  s.worker.shutdown_grace = to_ms(shutdown_grace_);
  s.worker.kill_grace = to_ms(kill_grace_);
  s.pool.overflow_idle_delay = to_ms(overflow_idle_delay_);
  s.scheduler_policy = caf::to_string(
    caf::get_or(content, "scheduler.policy", caf::atom("sharing")));
  s.scheduler_max_threads = caf::get_or(content, "scheduler.max-threads", std::size_t{0});
  return s;
}

} // namespace dspex
