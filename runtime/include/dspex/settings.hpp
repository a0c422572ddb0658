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

#include <nlohmann/json.hpp>

#include "dspex/error.hpp"
#include "dspex/framing.hpp"
#include "dspex/json_limits.hpp"
#include "dspex/resource_paths.hpp"

namespace dspex {

struct settings {
  using ms = std::chrono::milliseconds;

  struct pool_settings {
    std::size_t size = 4;              ///< pool.size: workers kept running
    ms init_timeout{10'000};           ///< pool.init_timeout: spawn → init ping reply (and LM configuration)
    ms request_timeout{30'000};        ///< pool.request_timeout: default per-call deadline, queue wait included
    std::size_t max_frame_bytes = default_max_frame_bytes;  ///< pool.max_frame_bytes: both directions (the worker gets it too)
    std::size_t max_json_depth = default_max_json_depth;    ///< pool.max_json_depth: nesting of replies and of a caller's args
    std::size_t max_overflow = 0;      ///< pool.max_overflow: extra workers started on demand
    ms overflow_idle_delay{0};         ///< pool.overflow_idle_delay: idle time before an overflow worker retires
    bool lazy = false;                 ///< pool.lazy: start workers on demand instead of at start
    std::string strategy = "fifo";     ///< pool.strategy: fifo (round-robin) or lifo (hottest worker first)
    std::size_t max_queue = 10'000;    ///< pool.max_queue: waiting callers; beyond it pool_saturated at once
    std::uint32_t failure_threshold = 3;  ///< pool.failure_threshold: consecutive failed checkins that remove a worker
    bool use_safe_port_connect = true; ///< pool.use_safe_port_connect: validate worker and caller before handover (seed Fix 2 rollback switch)

    // Crash-loop guard: a worker that fails to start or dies before serving
    // anyone is restarted after a delay growing from restart_backoff_base to
    // restart_backoff_max (with jitter); after broken_after consecutive start
    // failures the pool is `broken` and callers fail fast with
    // resource_error/pool_unavailable until a start succeeds again.
    ms restart_backoff_base{200};      ///< pool.restart_backoff_base
    ms restart_backoff_max{5'000};     ///< pool.restart_backoff_max
    std::uint32_t broken_after = 3;    ///< pool.broken_after: consecutive start failures that make the pool broken

    // Health checks of idle workers (never of busy ones).
    ms health_interval{30'000};        ///< pool.health_interval: ping a worker idle this long; 0 = off
    ms health_timeout{5'000};          ///< pool.health_timeout: a ping unanswered this long: the worker is hung and killed
    std::uint32_t health_max_failures = 3;  ///< pool.health_max_failures: failed pings in a row that remove a worker

    // Recycling: a healthy worker over a limit is drained and replaced; 0 = off.
    std::uint64_t max_requests = 0;    ///< pool.max_requests: requests served before recycling
    double max_requests_jitter = 0.1;  ///< pool.max_requests_jitter: each worker's limit is drawn from [max*(1-j), max]
    ms max_age{0};                     ///< pool.max_age: worker age before recycling
    std::uint64_t max_rss_mb = 0;      ///< pool.max_rss_mb: resident memory (from /proc) before recycling
  } pool;

  /// Retries of execute_anonymous (blocking and async): only where safe, see backoff.hpp.
  struct retry_settings_t {
    std::size_t max_attempts = 3;      ///< retry.max_attempts: attempts in all; 1 = no retries
    std::string strategy = "exponential";  ///< retry.strategy: exponential, linear, fibonacci, decorrelated_jitter
    ms base_delay{50};                 ///< retry.base_delay
    ms max_delay{2'000};               ///< retry.max_delay
    double jitter = 0.2;               ///< retry.jitter: fraction of each delay that is random
  } retry;

  /// The per-pool circuit breaker in front of execute_anonymous.
  struct circuit_settings {
    bool enabled = true;               ///< circuit.enabled
    std::size_t failure_threshold = 20;  ///< circuit.failure_threshold: counted failures in a row that open it
    ms failure_window{10'000};         ///< circuit.failure_window: ... all within this span
    ms open_timeout{2'000};            ///< circuit.open_timeout: open -> half_open after this long
    std::size_t half_open_probes = 1;  ///< circuit.half_open_probes: calls let through at once in half_open
    std::size_t success_threshold = 2; ///< circuit.success_threshold: probe successes that close it
  } circuit;

  /// Sessions (execute_in_session): one actor per session, see README "Sessions".
  struct session_settings {
    ms ttl{3'600'000};                 ///< session.ttl: idle time after which a session expires (sliding)
    ms sweep_interval{60'000};         ///< session.sweep_interval: how often expired sessions are swept
    std::size_t max_sessions = 10'000; ///< session.max_sessions: live sessions; beyond it session_error/too_many_sessions
    std::string affinity = "hint";     ///< session.affinity: hint, strict_queue or strict_fail_fast (per call overridable)
    std::size_t max_anonymous_programs = 10'000;  ///< session.max_anonymous_programs: definitions of anonymous programs kept (least recently used dropped)
  } session;

  struct worker_settings {
    std::string python = "python3";    ///< worker.python: interpreter, looked up in PATH
    std::string script = bundled_worker_script();  ///< worker.script
    std::vector<std::string> extra_args;  ///< worker.extra_args: appended to the command line
    bool test_commands = false;        ///< worker.test_commands: pass --test-commands (tests only)
    ms shutdown_grace{1'000};          ///< worker.shutdown_grace: after `shutdown` + EOF, before SIGTERM
    ms kill_grace{1'000};              ///< worker.kill_grace: after SIGTERM, before SIGKILL
  } worker;

  struct lm_settings {
    std::string provider = "mock";     ///< lm.provider: applied to every worker before it serves; "" = none
    std::string model = "mock";        ///< lm.model
    double temperature = 0.7;          ///< lm.temperature
    /// lm.api_key_env: the name of the environment variable that holds the
    /// LM's API key (e.g. GEMINI_API_KEY); "" = no key. Only the name is
    /// configured, sent (in configure_lm, as `api_key_env`) and shown: each
    /// worker reads the key from the environment it inherits, so the key is
    /// never in a file, a log, a status, a reply or a message of the runtime.
    std::string api_key_env;
  } lm;

  // -- named pools (issue 13) -------------------------------------------------------

  /// The pool these settings configure: "default" for the top-level keys, NAME
  /// for a `[pools.NAME]` section. Not an option: the loader sets it.
  std::string pool_name = "default";
  /// The runtime's further pools, one per `[pools.NAME]` section: each a copy
  /// of these settings with its own pool, worker, retry, circuit, session and
  /// lm keys overridden (log and scheduler are the runtime's, left as here).
  /// Each has a distinct pool_name and no pools of its own.
  std::vector<settings> pools;

  /// @param name a pool's name; "" means "default"
  /// @returns the settings of that pool (this object for the default pool),
  ///          or nullptr when the runtime has no pool of that name
  const settings* find_pool(const std::string& name) const noexcept;
  /// @returns "default", then the named pools (the loader sorts them by name)
  std::vector<std::string> pool_names() const;

  // -- nodes (issue 13) --------------------------------------------------------------
  //
  // A runtime may publish its pools to other runtimes through CAF's
  // middleman (`dspex node`), and may use the pools of the nodes it lists.

  struct node_settings {
    bool publish = false;              ///< node.publish: serve this runtime's pools to other runtimes (`dspex node` sets it)
    std::string bind = "127.0.0.1";    ///< node.bind: the address published on; plaintext only on loopback
    std::uint16_t port = 0;            ///< node.port: the TCP port; 0 = any free one (runtime::node_port tells which)
    /// TLS with mutual certificates (libcaf_openssl), for every connection
    /// of this runtime to or from a node: all three set, or none.
    struct tls_settings {
      std::string certificate;         ///< node.tls.certificate: this runtime's certificate (PEM)
      std::string key;                 ///< node.tls.key: its private key (PEM, unencrypted)
      std::string ca_file;             ///< node.tls.ca_file: the CA a peer's certificate must be signed by
    } tls;
    /// @returns true when TLS is configured
    bool tls_enabled() const noexcept { return !tls.certificate.empty(); }
  } node;

  struct remote_settings {
    std::vector<std::string> nodes;    ///< remote.nodes: "host:port" of the nodes whose pools this runtime uses
    ms status_interval{500};           ///< remote.status_interval: how often each node's load is read (for least-loaded routing)
    ms connect_timeout{5'000};         ///< remote.connect_timeout: the longest wait for one connection attempt; start waits this long for the first round
    ms reconnect_base{200};            ///< remote.reconnect_base: first delay before connecting to a lost node again
    ms reconnect_max{5'000};           ///< remote.reconnect_max: longest such delay (exponential, with jitter)
    /// remote.heartbeat_interval: how often this runtime tells each peer of
    /// its middleman (the nodes it uses and, as a node, its callers) that it
    /// is alive; 0 = no heartbeats, and so no partition_timeout
    ms heartbeat_interval{1'000};
    /// remote.partition_timeout: a peer silent this long is lost: its
    /// connection is closed, which is a down message (node_down on a
    /// caller); 0 = never (a partition then shows only in call deadlines)
    ms partition_timeout{5'000};
  } remote;

  /// topology.nodes: configuration files of nodes that `dspex run
  /// --topology=FILE` starts on this machine as `dspex node` processes
  /// (relative to FILE); their addresses join remote.nodes. The runtime
  /// itself does not read it.
  std::vector<std::string> topology_nodes;

  /// @returns true when `host` is a loopback address (127.0.0.0/8, ::1 or
  ///          "localhost"): the only addresses that may carry plaintext.
  static bool is_loopback(const std::string& host) noexcept;

  std::string log_level = "info";      ///< log.level: trace, debug, info, warn, error, critical, off
  std::string log_format = "text";     ///< log.format: text (key=value pairs) or json (one object per line)
  std::string log_worker_level = "info";  ///< log.worker_level: the level of the workers' stderr lines
  std::string log_file;                ///< log.file: also write the log to this file, rotated; "" = stderr only
  std::size_t log_file_max_bytes = 10 * 1024 * 1024;  ///< log.file_max_bytes: size at which the file rotates
  std::size_t log_file_count = 3;      ///< log.file_count: rotated files kept (FILE.1 .. FILE.N)
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

/// Every key and its value, grouped as in the INI file; durations as "<n>ms".
/// What `dspex config` prints.
nlohmann::json to_json(const settings& s);

/// @returns true when `name` may name a pool: 1 to 64 ASCII letters, digits,
///          '_' or '-' (it appears in metric labels, log lines and URLs).
bool valid_pool_name(const std::string& name) noexcept;

/// Finds `program` in PATH (or checks it when it contains '/'); empty when not
/// found or not executable.
std::string find_executable(const std::string& program);

} // namespace dspex
