// The message vocabulary between callers, the pool actor and worker actors.
// Included only by translation units that use CAF.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include <caf/allowed_unsafe_message_type.hpp>
#include <caf/actor.hpp>
#include <caf/atom.hpp>
#include <caf/error.hpp>
#include <nlohmann/json.hpp>

#include "dspex/checkout.hpp"
#include "dspex/error.hpp"
#include "dspex/status.hpp"

namespace dspex {

/// One command for one worker: what the caller asked and until when it waits.
/// The deadline bounds queueing and execution together.
struct call {
  std::string command;
  nlohmann::json args = nlohmann::json::object();
  std::chrono::steady_clock::time_point deadline;
  checkout_type type = checkout_type::anonymous();
  bool block = true;  ///< false: resource_error/full at once when no worker is idle
  /// Sessions: the worker that served the session last (empty: none yet),
  /// and how strictly to stick to it (see affinity_mode).
  std::string preferred_worker{};
  affinity_mode affinity = affinity_mode::hint;
  /// Set once nobody waits for the outcome any more (a node's caller was
  /// lost): a call not yet written to its process never is, and fails with
  /// communication_error/caller_lost (see caller_lost_error); one already
  /// running ends as it would. Null: the caller always waits.
  std::shared_ptr<const std::atomic<bool>> abandoned{};

  /// @returns true when `abandoned` is set
  bool is_abandoned() const noexcept { return abandoned && abandoned->load(std::memory_order_acquire); }
};

/// The outcome of a call that was abandoned before it ran (call::abandoned).
/// @param command the call's command
/// @param worker_id the worker that would have run it (context), or empty
/// @returns communication_error/caller_lost; never retried, and no sign of
///          the pool's health for the circuit breaker
dspex::error caller_lost_error(const std::string& command, const std::string& worker_id);

/// The continuation of an asynchronous call (local only).
struct completion {
  std::function<void(outcome)> fn;
};

/// A caller's request for a lease (explicit checkout).
struct checkout_request {
  checkout_type type = checkout_type::anonymous();
  std::uint64_t token = 0;  ///< chosen by the caller; names this request in cancel_atom
  std::chrono::steady_clock::time_point deadline;
  bool block = true;        ///< false: resource_error/full at once when no worker is idle
};

/// A granted lease: send (execute_atom, lease_id, call) to `worker`, then
/// (checkin_atom, lease_id, checkin_status) to the pool.
struct lease_grant {
  std::uint64_t lease_id = 0;
  caf::actor worker;
  std::string worker_id;
};

/// The answer to a checkout_request: a grant or a structured error.
struct checkout_reply {
  std::optional<lease_grant> grant;
  dspex::error err;
};

// -- caller → pool / pool → worker ------------------------------------------
using execute_atom = caf::atom_constant<caf::atom("execute")>;      // (call) → outcome
using status_atom = caf::atom_constant<caf::atom("status")>;        // () → pool_status
using await_ready_atom = caf::atom_constant<caf::atom("awaitready")>;  // () → outcome (ok once all initial workers are ready)
using stop_atom = caf::atom_constant<caf::atom("stop")>;            // pool: () → bool (graceful, bounded); worker: see worker_handle
using checkout_atom = caf::atom_constant<caf::atom("checkout")>;    // (checkout_request) → checkout_reply
using cancel_atom = caf::atom_constant<caf::atom("cancel")>;        // (token): the caller gave up on that checkout
using ping_idle_atom = caf::atom_constant<caf::atom("pingidle")>;   // () → number of idle workers removed by handle_ping

// -- worker → owner (the pool, or a test) -------------------------------------
using worker_spawned_atom = caf::atom_constant<caf::atom("wspawned")>;  // (worker_id, pid): the process exists, the start goes on
using worker_ready_atom = caf::atom_constant<caf::atom("wready")>;  // (worker_id, pid)
using checkin_atom = caf::atom_constant<caf::atom("checkin")>;      // (worker_id, checkin_status)
using worker_gone_atom = caf::atom_constant<caf::atom("wgone")>;    // (worker_id, error): process lost (why: exit, protocol violation, timeout), awaiting release
using retry_atom = caf::atom_constant<caf::atom("retry")>;          // (call) → outcome: a checkout handed back unserved
/// owner → worker: () → outcome. A health ping of an idle worker, bounded by
/// pool.health_timeout. ok: the ping's reply (worker stays ready);
/// health_check_error/ping_failed: the worker answered badly (it is now
/// degraded and takes no work until a ping passes); health_check_error/
/// health_timeout: no answer in time: the worker killed its process and
/// quits with worker_exit::health_timeout. A worker that is not ready (busy,
/// starting, stopping) answers resource_error/worker_busy and pings nothing.
using health_check_atom = caf::atom_constant<caf::atom("hcheck")>;
/// owner → worker: () the worker's process was seen stopped (SIGSTOP, state
/// T in /proc) on two maintenance ticks in a row: it can answer nothing, so
/// the worker kills it and quits with worker_exit::health_timeout
/// (health_check_error/process_stopped; a request in flight gets that error).
using process_stopped_atom = caf::atom_constant<caf::atom("pstopped")>;

// -- owner → worker -------------------------------------------------------------
using lease_atom = caf::atom_constant<caf::atom("lease")>;          // (lease_id): who may send requests; 0 = nobody
using revoke_atom = caf::atom_constant<caf::atom("revoke")>;        // (lease_id) → bool in sync

// -- child I/O thread → worker, and worker timers (internal) -------------------
using child_frame_atom = caf::atom_constant<caf::atom("cframe")>;   // (payload)
using child_broken_atom = caf::atom_constant<caf::atom("cbroken")>; // (protocol errc name, message)
using child_stderr_atom = caf::atom_constant<caf::atom("cstderr")>; // (line)
using child_exit_atom = caf::atom_constant<caf::atom("cexit")>;     // (signaled, code)
using init_timeout_atom = caf::atom_constant<caf::atom("inittmo")>;
using request_timeout_atom = caf::atom_constant<caf::atom("reqtmo")>;  // (timer generation)

// -- pool timers (internal) ------------------------------------------------------
using queue_timeout_atom = caf::atom_constant<caf::atom("queuetmo")>;  // (timer generation)
using restart_atom = caf::atom_constant<caf::atom("restart")>;
using retire_atom = caf::atom_constant<caf::atom("retire")>;        // (worker_id): overflow idle delay over
using maintenance_atom = caf::atom_constant<caf::atom("maintain")>; // health checks and recycling of idle workers


// -- exit reasons of a worker actor ------------------------------------------------

/// Category atom of the caf::error a worker actor quits with. Its code is a
/// worker_exit, its context one string: the structured error's JSON text.
constexpr caf::atom_value worker_exit_category = caf::atom("dspexwrk");

enum class worker_exit : std::uint8_t {
  spawn_failed = 1,     ///< the interpreter could not be started
  init_failed,          ///< the child exited or refused the init ping
  init_timeout,         ///< no init reply within init_timeout
  process_exited,       ///< the child exited while serving
  protocol_violation,   ///< the child broke the wire contract
  request_timeout,      ///< a request passed its deadline: the child was killed
  health_timeout,       ///< a health ping went unanswered: the child was hung and was killed
  killed_at_start,      ///< a signal from outside ended the child during its start (not a start failure)
};

/// The reason a worker actor quits with: `code` (what happened to its
/// process) and `detail` (the structured error), as decode_exit_reason reads it.
/// @param code the worker_exit that names the end
/// @param detail the error callers of that worker got
/// @returns a caf::error of the worker_exit category
caf::error make_exit_reason(worker_exit code, const error& detail);

/// The structured error a worker actor quit with; nullopt for any other reason
/// (normal, kill, another category).
std::optional<error> decode_exit_reason(const caf::error& reason);

/// True for the exit reasons that mean the worker never became ready.
bool is_start_failure(const caf::error& reason);

} // namespace dspex

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(dspex::call)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(dspex::outcome)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(dspex::error)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(dspex::completion)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(dspex::checkout_type)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(dspex::checkout_request)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(dspex::checkout_reply)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(dspex::pool_status)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(dspex::checkin_status)
