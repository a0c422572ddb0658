#include "dspex/actors/system_config.hpp"

#include <algorithm>
#include <thread>

#include <caf/atom.hpp>
#include <caf/io/middleman.hpp>
#include <caf/openssl/manager.hpp>
#include <caf/config_option_adder.hpp>
#include <caf/settings.hpp>
#include <caf/thread_hook.hpp>

#include "dspex/actors/runtime_thread.hpp"
#include "openssl_error_queue.hpp"

namespace dspex {

namespace {

thread_local bool runtime_thread = false;

/// Marks every thread the actor system starts (see runtime_thread.hpp).
class runtime_thread_marker final : public caf::thread_hook {
public:
  void init(caf::actor_system&) override {
  }
  void thread_started() override {
    runtime_thread = true;
  }
  void thread_terminates() override {
    runtime_thread = false;
  }
};

template <class Duration>
caf::timespan to_timespan(Duration d) {
  return std::chrono::duration_cast<caf::timespan>(d);
}

settings::ms to_ms(caf::timespan t) {
  return std::chrono::duration_cast<settings::ms>(t);
}

} // namespace

bool on_runtime_thread() noexcept {
  return runtime_thread;
}

system_config::system_config() {
  bind_options();
  add_thread_hook<runtime_thread_marker>();
  // Our default differs from CAF's: work stealing costs ~70-90 us per round
  // trip on two cores (ARCHITECTURE.md). INI and CLI can still override it.
  set("scheduler.policy", caf::atom("sharing"));
}

system_config::system_config(const settings& s) : values_(s) {
  bind_options();
  // The middleman (CAF's network layer, one more thread) only for a runtime
  // that is a node or uses nodes (issue 13).
  if (s.node.publish || !s.remote.nodes.empty()) {
    load<caf::io::middleman>();
    // A partition (a peer that is stopped, or a cable cut) sends nothing, so
    // TCP alone would keep the link for hours: the middleman's heartbeats,
    // and closing a connection silent for partition_timeout, make it a down
    // message like a death.
    set("middleman.heartbeat-interval", caf::timespan{s.remote.heartbeat_interval});
    set("middleman.connection-timeout", caf::timespan{s.remote.partition_timeout});
    // TLS (libcaf_openssl): with a certificate, CAF requires the peer's,
    // signed by the CA, on every connection (mutual authentication).
    if (s.node.tls_enabled()) {
      detail::openssl_error_queue_guarded();
      load<caf::openssl::manager>();
      openssl_certificate = s.node.tls.certificate;
      openssl_key = s.node.tls.key;
      openssl_cafile = s.node.tls.ca_file;
    }
  }
  add_thread_hook<runtime_thread_marker>();
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

template <class Field>
void system_config::add_duration(caf::config_option_adder& group, Field field, const char* name,
                                 const char* description) {
  auto& span = spans_.emplace_back(to_timespan(field(values_)));
  group.add(span, name, description);
  apply_spans_.emplace_back([&span, field](settings& s) { field(s) = to_ms(span); });
}

void system_config::bind_options() {
  using s_t = settings;
  caf::config_option_adder pool{custom_options_, "pool"};
  pool.add(values_.pool.size, "size", "worker processes kept running (default 4)");
  add_duration(pool, [](s_t& s) -> auto& { return s.pool.init_timeout; }, "init_timeout",
               "spawn to init-ping reply and LM configuration (default 10s)");
  add_duration(pool, [](s_t& s) -> auto& { return s.pool.request_timeout; }, "request_timeout",
               "default deadline of one call, queueing included (default 30s)");
  pool.add(values_.pool.max_frame_bytes, "max_frame_bytes",
           "largest frame in either direction (default 16777216)")
    .add(values_.pool.max_json_depth, "max_json_depth",
         "deepest JSON nesting of a reply or of a caller's args (default 128)")
    .add(values_.pool.max_overflow, "max_overflow",
         "extra workers started on demand beyond size (default 0)");
  add_duration(pool, [](s_t& s) -> auto& { return s.pool.overflow_idle_delay; },
               "overflow_idle_delay", "idle time before an overflow worker retires (default 0s)");
  pool.add(values_.pool.lazy, "lazy", "start workers on demand instead of at start (default false)")
    .add(values_.pool.strategy, "strategy",
         "which idle worker serves next: fifo (round-robin) or lifo (default fifo)")
    .add(values_.pool.max_queue, "max_queue",
         "callers that may wait; beyond it pool_saturated at once (default 10000)")
    .add(values_.pool.failure_threshold, "failure_threshold",
         "consecutive failed checkins that remove a worker (default 3)")
    .add(values_.pool.use_safe_port_connect, "use_safe_port_connect",
         "validate worker and caller before each handover (default true)");
  add_duration(pool, [](s_t& s) -> auto& { return s.pool.restart_backoff_base; },
               "restart_backoff_base", "first delay of the crash-loop guard (default 200ms)");
  add_duration(pool, [](s_t& s) -> auto& { return s.pool.restart_backoff_max; },
               "restart_backoff_max", "longest delay of the crash-loop guard (default 5s)");
  pool.add(values_.pool.broken_after, "broken_after",
           "consecutive start failures after which the pool is broken and fails fast (default 3)");
  add_duration(pool, [](s_t& s) -> auto& { return s.pool.health_interval; }, "health_interval",
               "ping workers idle this long; 0s turns health checks off (default 30s)");
  add_duration(pool, [](s_t& s) -> auto& { return s.pool.health_timeout; }, "health_timeout",
               "a health ping unanswered this long: the worker is hung and killed (default 5s)");
  pool.add(values_.pool.health_max_failures, "health_max_failures",
           "failed health pings in a row that remove a worker (default 3)")
    .add(values_.pool.max_requests, "max_requests",
         "requests a worker serves before it is recycled; 0 = never (default 0)")
    .add(values_.pool.max_requests_jitter, "max_requests_jitter",
         "each worker's max_requests is drawn from [max*(1-j), max] (default 0.1)");
  add_duration(pool, [](s_t& s) -> auto& { return s.pool.max_age; }, "max_age",
               "worker age before it is recycled; 0s = never (default 0s)");
  pool.add(values_.pool.max_rss_mb, "max_rss_mb",
           "resident memory in MiB before a worker is recycled; 0 = never (default 0)");

  caf::config_option_adder worker{custom_options_, "worker"};
  worker.add(values_.worker.python, "python", "Python interpreter, looked up in PATH (default python3)")
    .add(values_.worker.script, "script", "worker script (default: the bundled dspex_worker.py)")
    .add(values_.worker.extra_args, "extra_args", "extra worker arguments (default [])")
    .add(values_.worker.test_commands, "test_commands",
         "start workers with --test-commands, for tests only (default false)");
  add_duration(worker, [](s_t& s) -> auto& { return s.worker.shutdown_grace; }, "shutdown_grace",
               "after shutdown and EOF, wait this long before SIGTERM (default 1s)");
  add_duration(worker, [](s_t& s) -> auto& { return s.worker.kill_grace; }, "kill_grace",
               "after SIGTERM, wait this long before SIGKILL (default 1s)");

  caf::config_option_adder retry{custom_options_, "retry"};
  retry.add(values_.retry.max_attempts, "max_attempts",
            "attempts per call in all; 1 = no retries (default 3)")
    .add(values_.retry.strategy, "strategy",
         "exponential, linear, fibonacci or decorrelated_jitter (default exponential)");
  add_duration(retry, [](s_t& s) -> auto& { return s.retry.base_delay; }, "base_delay",
               "first retry delay (default 50ms)");
  add_duration(retry, [](s_t& s) -> auto& { return s.retry.max_delay; }, "max_delay",
               "longest retry delay (default 2s)");
  retry.add(values_.retry.jitter, "jitter", "random fraction of each delay, 0 to 1 (default 0.2)");

  caf::config_option_adder circuit{custom_options_, "circuit"};
  circuit.add(values_.circuit.enabled, "enabled", "the per-pool circuit breaker (default true)")
    .add(values_.circuit.failure_threshold, "failure_threshold",
         "counted failures in a row that open the circuit (default 20)");
  add_duration(circuit, [](s_t& s) -> auto& { return s.circuit.failure_window; }, "failure_window",
               "those failures all within this span; 0s = no window (default 10s)");
  add_duration(circuit, [](s_t& s) -> auto& { return s.circuit.open_timeout; }, "open_timeout",
               "open -> half_open after this long (default 2s)");
  circuit.add(values_.circuit.half_open_probes, "half_open_probes",
              "calls let through at once while half open (default 1)")
    .add(values_.circuit.success_threshold, "success_threshold",
         "probe successes that close the circuit (default 2)");

  caf::config_option_adder session{custom_options_, "session"};
  add_duration(session, [](s_t& s) -> auto& { return s.session.ttl; }, "ttl",
               "idle time after which a session expires; every call refreshes it (default 3600s)");
  add_duration(session, [](s_t& s) -> auto& { return s.session.sweep_interval; }, "sweep_interval",
               "how often expired sessions are swept (default 60s)");
  session.add(values_.session.max_sessions, "max_sessions",
              "live sessions; beyond it a new session fails with too_many_sessions (default 10000)")
    .add(values_.session.affinity, "affinity",
         "hint, strict_queue or strict_fail_fast: how a session sticks to its worker (default hint)")
    .add(values_.session.max_anonymous_programs, "max_anonymous_programs",
         "anonymous program definitions kept; the least recently used go first (default 10000)");

  caf::config_option_adder lm{custom_options_, "lm"};
  lm.add(values_.lm.provider, "provider",
         "LM applied to every worker before it serves; empty for none (default mock)")
    .add(values_.lm.model, "model", "LM model (default mock)")
    .add(values_.lm.temperature, "temperature", "LM temperature (default 0.7)")
    .add(values_.lm.api_key_env, "api_key_env",
         "name of the environment variable holding the LM's API key, e.g. GEMINI_API_KEY; "
         "the key itself is never configured, logged or shown (default none)");
  caf::config_option_adder node{custom_options_, "node"};
  node.add(values_.node.publish, "publish",
           "serve this runtime's pools to other runtimes; dspex node sets it (default false)")
    .add(values_.node.bind, "bind", "the address a node listens on; loopback only (default 127.0.0.1)")
    .add(values_.node.port, "port", "the TCP port a node listens on; 0 = any free one (default 0)");
  caf::config_option_adder{custom_options_, "node.tls"}
    .add(values_.node.tls.certificate, "certificate",
         "TLS: this runtime's certificate (PEM); with key and ca_file, every node connection "
         "is TLS with mutual certificates (default none)")
    .add(values_.node.tls.key, "key", "TLS: the certificate's private key (PEM) (default none)")
    .add(values_.node.tls.ca_file, "ca_file",
         "TLS: the CA that must have signed a peer's certificate (default none)");
  caf::config_option_adder remote{custom_options_, "remote"};
  remote.add(values_.remote.nodes, "nodes",
             "\"host:port\" of the nodes whose pools this runtime uses (default [])");
  add_duration(remote, [](s_t& s) -> auto& { return s.remote.status_interval; }, "status_interval",
               "how often each node's load is read, for least-loaded routing (default 500ms)");
  add_duration(remote, [](s_t& s) -> auto& { return s.remote.connect_timeout; }, "connect_timeout",
               "the longest wait for one connection attempt to a node (default 5s)");
  add_duration(remote, [](s_t& s) -> auto& { return s.remote.reconnect_base; }, "reconnect_base",
               "first delay before connecting to a lost node again (default 200ms)");
  add_duration(remote, [](s_t& s) -> auto& { return s.remote.reconnect_max; }, "reconnect_max",
               "longest delay between attempts to reach a lost node (default 5s)");
  add_duration(remote, [](s_t& s) -> auto& { return s.remote.heartbeat_interval; },
               "heartbeat_interval",
               "how often this runtime tells each peer (nodes, and a node's callers) it is alive; "
               "0 = never (default 1s)");
  add_duration(remote, [](s_t& s) -> auto& { return s.remote.partition_timeout; },
               "partition_timeout",
               "a peer silent this long is lost (node_down); at least twice heartbeat_interval; "
               "0 = never (default 5s)");
  caf::config_option_adder{custom_options_, "topology"}.add(
    values_.topology_nodes, "nodes",
    "node configuration files `dspex run --topology` starts on this machine (default [])");
  caf::config_option_adder{custom_options_, "log"}
    .add(values_.log_level, "level", "trace, debug, info, warn, error, critical, off (default info)")
    .add(values_.log_format, "format",
         "text (key=value pairs) or json (one object per line) (default text)")
    .add(values_.log_worker_level, "worker_level",
         "the level of the workers' stderr lines in the log (default info)")
    .add(values_.log_file, "file", "also write the log to this file, rotated (default none)")
    .add(values_.log_file_max_bytes, "file_max_bytes",
         "size at which log.file rotates (default 10485760)")
    .add(values_.log_file_count, "file_count", "rotated files of log.file kept (default 3)");
}

settings system_config::to_settings() const {
  settings s = values_;
  for (auto& apply : apply_spans_)
    apply(s);
  s.scheduler_policy = caf::to_string(
    caf::get_or(content, "scheduler.policy", caf::atom("sharing")));
  s.scheduler_max_threads = caf::get_or(content, "scheduler.max-threads", std::size_t{0});
  return s;
}

} // namespace dspex
