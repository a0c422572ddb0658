// The worker contract: the callbacks a pool drives for each of its workers,
// and the only results they can give. Modelled on NimblePool's worker
// behaviour; the seed document's Fix 1 exists because the original returned
// {:error, reason} from handle_checkout, a result the contract did not allow,
// and crashed the pool with every queued caller. Here a wrong result cannot
// be written: each callback returns a type with exactly the allowed cases.
//
//   init_worker(w, pool)          → ready | async | failed(error)
//       Start one worker. `async`: it reports (worker_ready_atom, id, pid) to
//       the pool later, or exits (the pool monitors every worker it gets:
//       its end is a down message, however it ends). `pool` is the pool
//       actor: the owner a worker reports to, and the parent to spawn from.
//   handle_checkout(type, caller, w) → ok(client) | remove(reason) | skip(error)
//       Called before a worker is handed to a caller. ok: hand it over;
//       `client` is the actor the caller's requests go to. remove: the worker
//       is terminated and replaced and the SAME checkout is retried on the
//       next worker. skip: that caller fails with `error`, the worker stays.
//   handle_checkin(status, w)     → ok | remove(reason)
//       Called when a checkout ends with status ok, error(reason) or close.
//   handle_info(message, w)       → ok | remove(reason)
//       A message about an idle worker (e.g. its process exited).
//   handle_ping(w)                → ok | remove(reason)
//       An idle check without the process's help, on a worker idle for
//       pool.health_interval (before the pool pings it through its process)
//       and on (ping_idle_atom).
//   terminate_worker(reason, w)
//       The worker leaves the pool: stop it. Its exit still reaches the pool.
//
// An exception thrown by a callback counts as remove(connect_error(...)) for
// handle_checkout and remove(callback_failed) for the others.
//
// What blocks the pool: every callback runs on the pool actor, in the middle
// of its work, so while one runs the pool serves nobody (no checkout, no
// checkin, no deadline, no replacement). A callback must return at once:
// no waiting on a process, a socket or a lock held elsewhere. Starting a
// process is init_worker's `async` (the worker reports when it is ready);
// stopping one is terminate_worker's message to the worker (its exit comes
// back as a down message). A slow handle_checkout delays every queued
// caller behind it, as in NimblePool.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include <caf/actor.hpp>
#include <caf/actor_cast.hpp>
#include <caf/actor_addr.hpp>
#include <caf/fwd.hpp>
#include <nlohmann/json.hpp>

#include "dspex/actors/worker_handle.hpp"
#include "dspex/checkout.hpp"
#include "dspex/error.hpp"
#include "dspex/status.hpp"

namespace dspex {

namespace detail {
class worker_channel;
} // namespace detail

/// The pool's record of one worker, handed to every callback. The pool owns it;
/// `state` belongs to the contract implementation.
struct pool_worker {
  std::string id;
  worker_handle handle;              ///< set by init_worker; the pool monitors it
  int pid = 0;                       ///< reported with worker_ready
  bool overflow = false;             ///< started beyond pool.size, retired when idle
  worker_stats stats;                ///< changed only by update_worker_stats (Fix 6)
  std::uint32_t consecutive_failures = 0;
  std::optional<std::string> current_session;  ///< set at a session checkout, cleared at checkin
  std::shared_ptr<void> state;       ///< the contract's own per-worker state
};

/// The caller of a checkout, as the pool sees it (it monitors every caller).
struct caller_info {
  caf::actor_addr addr;
  bool alive = true;
};

/// ready | async | failed(error)
class init_result {
public:
  enum class kind { ready, async, failed };
  static init_result ready() { return init_result{kind::ready, {}}; }
  static init_result async() { return init_result{kind::async, {}}; }
  static init_result failed(error e) { return init_result{kind::failed, std::move(e)}; }
  kind what() const noexcept { return kind_; }
  const error& reason() const noexcept { return reason_; }

private:
  init_result(kind k, error e) : kind_(k), reason_(std::move(e)) {
  }
  kind kind_;
  error reason_;
};

/// ok(client) | remove(reason) | skip(error)
class checkout_result {
public:
  enum class kind { ok, remove, skip };
  static checkout_result ok(caf::actor client) {
    return checkout_result{kind::ok, std::move(client), {}};
  }
  /// The worker itself is the client (the usual case).
  static checkout_result ok(const worker_handle& worker) {
    return ok(caf::actor_cast<caf::actor>(worker));
  }
  static checkout_result remove(error reason) {
    return checkout_result{kind::remove, nullptr, std::move(reason)};
  }
  static checkout_result skip(error err) {
    return checkout_result{kind::skip, nullptr, std::move(err)};
  }
  kind what() const noexcept { return kind_; }
  const caf::actor& client() const noexcept { return client_; }
  const error& reason() const noexcept { return reason_; }

private:
  checkout_result(kind k, caf::actor c, error e)
    : kind_(k), client_(std::move(c)), reason_(std::move(e)) {
  }
  kind kind_;
  caf::actor client_;
  error reason_;
};

/// ok | remove(reason): the result of handle_checkin, handle_info and handle_ping.
class keep_or_remove {
public:
  enum class kind { ok, remove };
  static keep_or_remove ok() { return keep_or_remove{kind::ok, {}}; }
  static keep_or_remove remove(error reason) {
    return keep_or_remove{kind::remove, std::move(reason)};
  }
  kind what() const noexcept { return kind_; }
  const error& reason() const noexcept { return reason_; }

private:
  keep_or_remove(kind k, error e) : kind_(k), reason_(std::move(e)) {
  }
  kind kind_;
  error reason_;
};

class worker_contract {
public:
  virtual ~worker_contract();

  /// Starts one worker: sets `w.handle` (and `w.state`, the contract's own).
  /// @param w the pool's record of the new worker (its id is set)
  /// @param pool the pool actor: the owner the worker reports to, and the
  ///        parent to spawn it from
  /// @returns ready (serves now), async (reports worker_ready_atom later; a
  ///          worker that exits first is a failed start), or failed(error)
  ///          (no worker: counted by the crash-loop guard)
  /// @note Runs on the pool actor: must not wait for the worker.
  virtual init_result init_worker(pool_worker& w, caf::local_actor* pool) = 0;

  /// Decides whether worker `w` may serve a caller, just before it does.
  /// @param type the checkout's type (anonymous, session(id), any_worker)
  /// @param caller the caller as the pool sees it (`alive` false: it is gone)
  /// @param w the idle worker the pool chose
  /// @returns ok(client): the caller's requests go to `client` (usually the
  ///          worker); remove(reason): the worker is terminated and
  ///          replaced, and the same caller is tried on the next worker;
  ///          skip(error): that caller fails with `error`, the worker stays
  /// @note Runs on the pool actor, once per handover: every queued caller
  ///       waits for it.
  virtual checkout_result handle_checkout(const checkout_type& type, const caller_info& caller,
                                          pool_worker& w) = 0;

  /// A checkout of `w` ended.
  /// @param status ok, error(reason) (the call failed) or close (the holder
  ///        wants the worker gone)
  /// @returns ok (the worker is idle again) or remove(reason)
  /// @note Runs on the pool actor.
  virtual keep_or_remove handle_checkin(const checkin_status& status, pool_worker& w) = 0;

  /// A message about idle worker `w` that the pool does not know (e.g.
  /// worker_gone_atom: its process exited).
  /// @returns ok or remove(reason)
  /// @note Runs on the pool actor.
  virtual keep_or_remove handle_info(const caf::message& msg, pool_worker& w) = 0;

  /// An idle check without the process's help: on a worker idle for
  /// pool.health_interval, before the pool pings it through its process,
  /// and on ping_idle_atom.
  /// @returns ok or remove(reason) (category health_check_error)
  /// @note Runs on the pool actor, for every idle worker at a tick.
  virtual keep_or_remove handle_ping(pool_worker& w) = 0;

  /// Worker `w` leaves the pool: stop it. Its exit still reaches the pool
  /// (a down message); the pool kills what is left when it ends itself.
  /// @param reason why it leaves (a removal's reason, or the pool's stop)
  /// @note Runs on the pool actor: send the stop, do not wait for it.
  virtual void terminate_worker(const error& reason, pool_worker& w) = 0;
  /// The worker's direct lane, or null (the default): with one, a caller
  /// may take the worker while it is idle and run an anonymous call on it
  /// without the pool actor (the request path of issue 11), and the pool
  /// calls neither handle_checkout nor handle_checkin for such a call. A
  /// contract that offers a lane promises that for an idle worker whose
  /// process takes the frame both would answer ok; the lane checks that on
  /// every call and hands the worker back to the pool when it cannot.
  virtual std::shared_ptr<detail::worker_channel> direct_channel(pool_worker& w);
  /// The command whose success on one worker, in an anonymous call, is the
  /// pool's setting from then on (the Python workers: configure_lm, the
  /// pool's LM): every other worker, and every replacement, runs it with the
  /// same arguments before it serves again, and no call is served with the
  /// old setting after the caller had its answer. Empty (the default): none.
  virtual std::string pool_setting_command() const;
  /// The arguments of pool_setting_command that the pool starts with (the
  /// Python workers: the configured `lm.*`), or null (the default): none.
  /// Every worker applies them before it serves, as it would a caller's;
  /// one that refuses them failed to start (initialization_error,
  /// setting_failed), and counts against the crash-loop guard.
  virtual nlohmann::json initial_pool_setting() const;
};

// -- Fix 1: the error terms of a failed checkout, each a `remove` reason ------

/// connection_error/checkout_failed: the worker cannot be handed over (logged).
/// @param reason what is wrong, e.g. "worker has no actor"
error checkout_failed(std::string reason, const std::string& worker_id);
/// connection_error/connect_failed: its process is gone or its pipes closed.
/// @param reason process_not_alive or port_closed
error connect_failed(std::string reason, const std::string& worker_id);
/// connection_error/connect_exited: its worker actor has exited.
error connect_exited(std::string reason, const std::string& worker_id);
/// connection_error/connect_error: anything else, e.g. kind "exception" for a
/// handle_checkout that threw.
/// @param kind what failed
/// @param reason why
error connect_error(std::string kind, std::string reason, const std::string& worker_id);

} // namespace dspex
