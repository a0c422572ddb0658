// The embedding API: start a pool of Python workers, call them, stop it.
//
//   auto rt = dspex::runtime::start(dspex::load_settings_or_exit(argc, argv));
//   dspex::outcome r = rt->execute_anonymous("ping", {});
//   if (r) use(r.value()); else log(r.error().describe());
//   rt->stop();   // also done by the destructor
//
// This header pulls in neither CAF nor Boost.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <future>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <variant>
#include <vector>

#include <nlohmann/json.hpp>

#include "dspex/checkout.hpp"
#include "dspex/error.hpp"
#include "dspex/events.hpp"
#include "dspex/prometheus.hpp"
#include "dspex/settings.hpp"
#include "dspex/status.hpp"

namespace dspex {

/// Per-call options. (Every member has an initializer, so `{timeout}`
/// aggregates stay free of -Wmissing-field-initializers.)
struct call_options {
  /// Deadline for this call, queueing included; default pool.request_timeout.
  /// It bounds all attempts together (retries included).
  std::optional<std::chrono::milliseconds> timeout;
  /// The caller's word on whether running the command twice is harmless.
  /// Only idempotent calls are retried after a worker failed mid-request
  /// (worker_exited, protocol_violation, request_timeout). Default:
  /// idempotent_by_default(command): ping, list_programs, get_stats,
  /// get_program_info.
  std::optional<bool> idempotent = std::nullopt;
  /// Attempts in all for this call, the first included; default
  /// retry.max_attempts. 1 disables retries.
  std::optional<std::size_t> max_attempts = std::nullopt;
  /// The pool that runs the call (settings::pools); "" = "default". A name
  /// the runtime does not know fails with system_error/invalid_request
  /// (reason unknown_pool).
  std::string pool = {};
};

/// Per-call options of a session call (execute_in_session).
struct session_call_options {
  /// Deadline for this call, the wait behind the session's earlier calls and
  /// the pool's queue included; default pool.request_timeout.
  std::optional<std::chrono::milliseconds> timeout;
  /// How strictly this call sticks to the session's worker; default
  /// session.affinity (see affinity_mode in dspex/checkout.hpp).
  std::optional<affinity_mode> affinity = std::nullopt;
  /// As call_options::idempotent and max_attempts (retries through the pool client).
  std::optional<bool> idempotent = std::nullopt;
  std::optional<std::size_t> max_attempts = std::nullopt;
  /// The pool whose session this is; "" = "default". Sessions belong to one
  /// pool: the same id on two pools names two sessions.
  std::string pool = {};
};

/// Options of an explicit checkout.
struct checkout_options {
  /// How long to wait for a worker; default pool.request_timeout.
  std::optional<std::chrono::milliseconds> timeout;
  /// false: fail at once with resource_error/full when no worker is idle.
  bool block = true;
  /// The pool to check a worker out of; "" = "default".
  std::string pool = {};
};

/// One worker checked out by one caller (the lease holder): only requests
/// sent through this lease reach that worker until checkin. Destroying a
/// lease that was not checked in is the holder's death: the pool revokes it
/// and takes the worker back only if no request is in flight, else replaces
/// it. A lease must not outlive its runtime.
class lease {
public:
  ~lease();
  lease(const lease&) = delete;
  lease& operator=(const lease&) = delete;

  /// Runs `command` on the leased worker (one request at a time).
  outcome execute(const std::string& command, nlohmann::json args = nullptr,
                  call_options options = {});

  /// Ends the lease: `ok`, `failed(error)` (counts toward the worker's
  /// failure threshold) or `close` (the worker is not reused). Returns false
  /// when the pool no longer knew the lease (revoked, worker gone, stopped).
  bool checkin(checkin_status status = checkin_status::ok());

  /// @returns the id of the leased worker (e.g. "w3").
  const std::string& worker_id() const noexcept;
  /// @returns true once checkin was called (the lease is over).
  bool checked_in() const noexcept;

  struct impl;
  explicit lease(std::unique_ptr<impl> p);

private:
  std::unique_ptr<impl> impl_;
};

/// Thrown by runtime::start: the configuration was rejected or the pool could
/// not start. `details()` is the structured error.
class start_error : public std::runtime_error {
public:
  explicit start_error(error e) : std::runtime_error(e.describe()), err_(std::move(e)) {
  }
  const error& details() const noexcept { return err_; }

private:
  error err_;
};

class runtime {
public:
  /// Validates `config`, starts the actor system and the pool, and returns
  /// once every initial worker answered its init ping. Throws start_error.
  static std::unique_ptr<runtime> start(settings config);

  ~runtime();  ///< stop()
  runtime(const runtime&) = delete;
  runtime& operator=(const runtime&) = delete;

  /// Runs `command` on the next free worker and blocks for its outcome. `args`
  /// must be a JSON object (or null); `args.session_id` defaults to "anonymous".
  /// Never throws: every failure is a structured error in the outcome.
  outcome execute_anonymous(const std::string& command, nlohmann::json args = nullptr,
                            call_options options = {});

  /// Asynchronous form: `done` runs once, on a runtime thread, with the outcome.
  void execute_anonymous_async(const std::string& command, nlohmann::json args,
                               call_options options, std::function<void(outcome)> done);

  /// Asynchronous form with a future.
  std::future<outcome> execute_anonymous_async(const std::string& command,
                                               nlohmann::json args = nullptr,
                                               call_options options = {});

  // -- sessions (README "Sessions") -------------------------------------------------

  /// Runs `command` in session `session_id` (created on first use; beyond
  /// session.max_sessions: session_error/too_many_sessions). A session's calls
  /// run one at a time in the order they were made; sessions run in parallel.
  /// `args.session_id` is set to `session_id`. create_program stores the
  /// program's definition in the session; execute_program carries it
  /// (`program_data`), so any worker can serve it (programs survive worker
  /// death); list_programs, get_program_info and delete_program are answered
  /// by the session from its own state. Never throws.
  outcome execute_in_session(const std::string& session_id, const std::string& command,
                             nlohmann::json args = nullptr, session_call_options options = {});

  /// Asynchronous forms (the callback runs once, on a runtime thread).
  std::future<outcome> execute_in_session_async(const std::string& session_id,
                                                const std::string& command,
                                                nlohmann::json args = nullptr,
                                                session_call_options options = {});
  void execute_in_session_async(const std::string& session_id, const std::string& command,
                                nlohmann::json args, session_call_options options,
                                std::function<void(outcome)> done);

  /// Ends a session: waits for its call in flight, fails its queued calls
  /// (session_error/session_ended), sends cleanup_session to every worker that
  /// served it, and answers {"session_id","status":"ended","operations",
  /// "workers_cleaned":[...],...}. Unknown id: session_error/session_not_found.
  /// @param pool the session's pool ("" = "default")
  outcome end_session(const std::string& session_id, const std::string& pool = {});

  /// {"session_id","created_at","last_accessed","expires_at" (epoch seconds),
  /// "operations","preferred_worker","workers","programs","program_count",
  /// "pending","affinity"}; unknown id: session_error/session_not_found.
  /// @param pool the session's pool ("" = "default")
  outcome get_session_info(const std::string& session_id, const std::string& pool = {});

  /// {"sessions":[info...],"total_count":N}, sorted by session id.
  /// @param pool the pool whose sessions are listed ("" = "default")
  outcome list_sessions(const std::string& pool = {});

  /// Checks a worker out for a sequence of requests (see `lease`).
  std::variant<std::unique_ptr<lease>, error> checkout(
    checkout_type type = checkout_type::anonymous(), checkout_options options = {});

  /// The pool's live status; `circuit` is the breaker's state ("closed",
  /// "open", "half_open"). While the pool restarts it is empty but for
  /// `circuit` and `health` ("restarting", or "unavailable" once the root
  /// supervisor gave up).
  /// @param pool the pool's name ("" = "default")
  /// @returns its status, `pool` naming it; for a name the runtime does not
  ///          know, an empty status whose `pool` is empty
  pool_status status(const std::string& pool = {});

  /// @returns the names of the runtime's pools: "default", then the
  ///          `[pools.NAME]` ones (settings::pools), then those only the
  ///          nodes in remote.nodes serve
  std::vector<std::string> pools() const;

  /// Everything the Prometheus exposition shows, read now: the status's
  /// gauges and counters, calls by command and outcome, the supervisor's
  /// restarts of the pool, live sessions and the three latency histograms
  /// in fixed buckets. Render it with dspex::render_prometheus.
  /// @param pool the pool's name ("" = "default")
  /// @returns a snapshot labelled with the pool's name (empty for a name
  ///          the runtime does not know)
  metrics_snapshot metrics(const std::string& pool = {});

  /// The runtime's event stream: worker lifecycle, pool health, restarts,
  /// circuit changes, retries, supervisor events (see dspex/events.hpp).
  /// `handler` runs synchronously on the publishing runtime thread: keep it
  /// short, never block and never call the runtime synchronously from it.
  /// Returns the id for unsubscribe. To deliver events to an actor, see
  /// dspex/actors/events_actor.hpp (subscribe_actor).
  std::uint64_t subscribe(std::function<void(const event&)> handler);
  /// Removes the handler `id` (from subscribe). Once it returns, the handler
  /// runs no more, except a call already running on this very thread.
  void unsubscribe(std::uint64_t id);
  /// The bus itself (it outlives stop(), and the runtime object).
  event_bus& events() noexcept;

  /// Graceful, bounded stop: queued callers fail with resource_error, every
  /// worker gets `shutdown`, EOF, then SIGTERM and SIGKILL after the graces;
  /// all children are reaped and the actor system is shut down. Idempotent:
  /// a second caller waits for the first one's stop to finish. Safe against
  /// calls racing it from other threads (they fail with pool_stopping).
  /// @note On a runtime thread (an asynchronous callback, an event handler,
  ///       an actor) it cannot wait for the actors it stops: there it begins
  ///       the stop on a thread of its own and returns at once (the runtime
  ///       object may even be destroyed there). Calls made after it fail
  ///       with resource_error/pool_stopping.
  void stop();

  /// @returns the TCP port this runtime serves its pools on as a node
  ///          (node.publish), 0 when it is not a node
  std::uint16_t node_port() const noexcept;

  /// @returns the settings the runtime was started with (validated).
  const settings& config() const noexcept;

  struct impl;

private:
  friend struct runtime_access;  // the CAF side: dspex/actors/runtime_access.hpp
  explicit runtime(std::shared_ptr<impl> p);
  std::shared_ptr<impl> impl_;  // shared with a stop running on its own thread
};

} // namespace dspex
