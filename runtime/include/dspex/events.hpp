// The runtime's event stream (issue 4, item 9): every lifecycle transition,
// restart, give-up, circuit change and retry is published here once. Each
// event is logged through spdlog as key=value fields and handed to every
// subscriber, so tests and users react to what happened instead of polling
// logs or status.
//
// Subscribers are plain callbacks, called synchronously on the publishing
// thread (an actor's thread or an I/O thread): they must be quick, must not
// block and must not call back into the runtime synchronously. To deliver
// events to an actor, subscribe a callback that sends to it
// (dspex/actors/events_actor.hpp does exactly that).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <condition_variable>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "dspex/error.hpp"

namespace dspex {

enum class event_kind {
  worker_transition,      ///< a worker's lifecycle state changed (from, to, reason)
  worker_started,         ///< a worker actor was spawned (attempt: consecutive start failures before it)
  worker_ready,           ///< a worker answered its init ping
  worker_start_failed,    ///< a start failed (error: why, e.g. the traceback's last line)
  worker_removed,         ///< a worker left the pool (reason; error when it failed)
  worker_recycled,        ///< a healthy worker was drained and replaced (reason: max_requests, max_age, max_rss)
  restart_scheduled,      ///< the crash-loop guard delays the next start (delay, attempt)
  health_check_failed,    ///< a health ping failed (attempt: failures in a row)
  pool_health_changed,    ///< healthy / degraded / broken (from, to, reason; error: the last start failure)
  circuit_changed,        ///< the circuit breaker changed state (from, to, reason)
  retry_scheduled,        ///< a failed call will be sent again (attempt, delay, error)
  retry_gave_up,          ///< a failed call is not retried (reason, attempt, error)
  supervisor,             ///< a supervisor event (to: its kind, e.g. child_restarted, gave_up)
  node_up,                ///< a remote node was reached (source: "host:port"; fields.pools: what it serves)
  node_down,              ///< a remote node was lost or could not be reached (reason; delay: until the next attempt)
};

/// snake_case name, e.g. "worker_transition".
const char* to_string(event_kind k) noexcept;

struct event {
  event_kind kind = event_kind::worker_transition;
  std::string pool;       ///< the pool it concerns ("default" or a [pools.NAME]); empty for the runtime's own
  std::string source;     ///< who published it: "pool", a worker id, "client", a supervisor's name
  std::string worker_id;  ///< the worker concerned, when there is one
  std::string from;       ///< transitions: the state left
  std::string to;         ///< transitions: the state entered
  std::string reason;     ///< why, in words
  std::size_t attempt = 0;                ///< retries, restarts, health failures: the count
  std::chrono::milliseconds delay{0};     ///< scheduled retries and restarts
  std::optional<dspex::error> err;        ///< the error behind it, when there is one
  nlohmann::json fields = nlohmann::json::object();  ///< anything else worth a field
  std::chrono::steady_clock::time_point at = std::chrono::steady_clock::now();

  /// @returns the event as JSON: kind, source, worker_id, from, to, reason,
  ///          attempt, delay_ms, error and fields (the empty ones left out).
  nlohmann::json to_json() const;
  /// "event=worker_transition source=w1 worker=w1 from=ready to=busy reason=..."
  std::string describe() const;
};

/// Thread-safe fan-out of events. One per runtime (or per pool in tests).
class event_bus {
public:
  using handler = std::function<void(const event&)>;

  /// The runtime's bus: it logs what is published and hands it to its subscribers.
  event_bus() = default;
  /// A pool's bus (issue 13): every event published here carries `pool`
  /// (event::pool), reaches this bus's subscribers and then `parent`'s,
  /// which logs it once.
  /// @param parent the runtime's bus
  /// @param pool the pool's name
  event_bus(std::shared_ptr<event_bus> parent, std::string pool);
  event_bus(const event_bus&) = delete;
  event_bus& operator=(const event_bus&) = delete;

  /// Returns an id for unsubscribe. Handlers run in subscription order.
  std::uint64_t subscribe(handler h);
  /// Removes a subscription. When it returns, its handler is not running on
  /// any other thread and will never run again, so whatever the handler
  /// uses may be destroyed right after.
  /// @note From inside that handler itself it does not wait for its own
  ///       call (it returns at once; the handler is not called again).
  /// @note It waits for a handler running elsewhere as long as that takes:
  ///       handlers must be short (a warning is logged every 5 s of waiting).
  void unsubscribe(std::uint64_t id);

  /// Cheap: lets publishers skip building events nobody reads (ready <-> busy
  /// happens twice per request).
  bool has_subscribers() const noexcept;

  /// Logs the event (debug for ready <-> busy, info or warn otherwise) and
  /// hands it to every subscriber. A handler that throws is logged and skipped.
  void publish(const event& e);

  /// Publishes only when someone listens; logs at trace level otherwise.
  /// For high-frequency events whose construction is itself the cost.
  template <class MakeEvent>
  void publish_lazy(MakeEvent&& make) {
    if (has_subscribers() || trace_enabled())
      publish(make());
  }

private:
  /// @returns true when trace-level events are logged (cheap: check before building one).
  static bool trace_enabled() noexcept;

  struct subscription;

  /// Hands `e` to this bus's own subscribers.
  void deliver(const event& e);

  std::shared_ptr<event_bus> parent_;  ///< a pool's bus: the runtime's
  std::string pool_;                   ///< a pool's bus: the name stamped on its events
  mutable std::mutex mtx_;
  std::condition_variable calls_done_;  ///< a call of a removed subscription returned
  std::vector<std::shared_ptr<subscription>> handlers_;
  std::uint64_t next_id_ = 1;
  std::atomic<std::size_t> count_{0};
};

} // namespace dspex
