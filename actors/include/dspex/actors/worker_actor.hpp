// worker_actor: one per Python process. It owns the child (spawn, framed
// pipes, stop sequence), runs the initialisation handshake, serves one request
// at a time and quits with a reason that says what happened to the process.
//
// Contract with its owner (the pool actor, or a test); its messages are
// worker_handle's (worker_handle.hpp), plus lifecycle_atom:
//  - sends (worker_ready_atom, id, pid) once the init ping succeeded within
//    init_timeout (the pool then applies its setting, e.g. the LM, with a
//    call like any other: see worker_contract::initial_pool_setting);
//  - answers (execute_atom, call) — a call mediated by the owner — with an
//    outcome, after sending (checkin_atom, id, checkin_status) to the owner;
//  - leases: after (lease_atom, lease_id) from the owner, answers
//    (execute_atom, lease_id, call) from the lease holder, and only with that
//    id (else resource_error/not_lease_holder); no checkin (the holder checks
//    in with the pool). (revoke_atom, lease_id) → bool: in sync, i.e. no
//    request in flight, so the worker can go back to the pool;
//  - on (stop_atom): fails a request in flight with resource_error/worker_stopping,
//    sends `shutdown`, runs the stop sequence and quits normally when reaped;
//  - otherwise quits with make_exit_reason(...): spawn_failed, init_failed,
//    init_timeout, process_exited, protocol_violation or request_timeout. A
//    request in flight always gets its error before the actor quits, and a
//    timed-out request kills the child, so a late reply reaches nobody.
//  - a worker that was ready when it lost its process does not quit at once:
//    calls the owner handed it before learning of the loss are still on their
//    way. It sends (worker_gone_atom, id), hands every call that arrives back
//    to the owner unserved as (retry_atom, call) with the caller's promise,
//    and quits with its reason on (stop_atom), which the owner sends after
//    its last call to this worker (its release: lifecycle reason "released"). So no caller is failed by a worker it
//    never reached: it is served by the next one. (Same for a degraded
//    worker: the owner knows it.)
//  - (health_check_atom) → outcome, see messages.hpp: only in ready, or in
//    degraded to recover, and only with no request in flight; sends `ping`
//    (deadline now + pool.health_timeout) and answers with its reply: ok
//    (lifecycle busy → ready, or degraded → ready; no checkin), health_check_error/
//    ping_failed (success:false; lifecycle → degraded, which takes no work:
//    execute answers resource_error/worker_not_ready), health_check_error/
//    health_timeout (no reply in time: the child is killed and the worker
//    quits with worker_exit::health_timeout, via worker_gone/release as
//    above). Any other error (e.g. communication_error/worker_exited) means
//    the process was lost during the ping; the worker is going. In any other
//    phase (starting, busy, a ping already running, stopping, gone):
//    resource_error/worker_busy, nothing sent.
//  - (lifecycle_atom) → lifecycle_history: its recorded transitions, oldest
//    first (the last 32), each with reason, time and time spent in `from`.
//
// Lifecycle (worker_lifecycle.hpp) is the worker's state; every accepted
// transition is published on cfg.events as event_kind::worker_transition
// {source = worker_id = id, from, to, reason, err (the cause of a failure),
// fields {"time_in_from_ms": integer}}; ready <-> busy only when the bus has
// subscribers. Map: spawn → initializing; init ping
// answered → ready ("initialized"); request sent → busy ("request"); reply →
// ready ("reply"); health ping → busy ("health_check") → ready
// ("health_check_passed") or degraded ("health_check_failed"); degraded →
// ready ("health_check_passed"); stop → terminating ("stop"); failure →
// terminating (the error's type, e.g. "worker_exited", "health_timeout");
// quitting → terminated ("stopped", "released", the failure's type, or
// "exit: <reason>" for an exit message). A transition the table refuses is
// logged as an error and published as a worker_transition with an empty
// `to`, `err` = system_error/invalid_transition and fields {"rejected_to"};
// it changes nothing (and never crashes the actor).
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include <caf/actor.hpp>
#include <caf/allowed_unsafe_message_type.hpp>
#include <caf/atom.hpp>
#include <caf/fwd.hpp>
#include <caf/replies_to.hpp>
#include <caf/typed_actor.hpp>

#include "dspex/actors/worker_handle.hpp"
#include "dspex/events.hpp"
#include "dspex/settings.hpp"
#include "dspex/worker_lifecycle.hpp"

namespace dspex {

namespace detail {
class worker_channel;
} // namespace detail

/// What the pool can check about a worker without asking it (seed Fix 2,
/// validate_port): written by the worker actor and its I/O thread, read by
/// the pool's checkout validation.
struct worker_health {
  std::atomic<bool> process_alive{false};  ///< spawned and not yet exited
  std::atomic<bool> pipes_open{false};     ///< stdin writable, stdout framing intact
  std::atomic<bool> actor_alive{true};     ///< the worker actor has not terminated
  /// The direct lane to its process (set before the worker actor starts).
  std::shared_ptr<detail::worker_channel> channel;
};

struct worker_config {
  std::string id;                               ///< e.g. "w3"
  std::shared_ptr<const settings> config;
  caf::actor owner;                             ///< receives wready / checkin / wgone
  std::shared_ptr<worker_health> health = std::make_shared<worker_health>();
  std::string mode = "pool-worker";             ///< --mode: pool-worker, or standalone (the bridge)
  /// Receives the worker's lifecycle transitions (event_kind::worker_transition).
  std::shared_ptr<event_bus> events = std::make_shared<event_bus>();
};

/// A worker's recorded lifecycle transitions, oldest first.
using lifecycle_history = std::vector<lifecycle_record>;

/// anyone → worker: () → lifecycle_history (local only).
using lifecycle_atom = caf::atom_constant<caf::atom("lifecycle")>;

} // namespace dspex

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(dspex::lifecycle_history)

namespace dspex {

/// The bundled worker actor: a worker (worker_handle) that also tells its
/// lifecycle.
using worker_actor_handle
  = worker_handle::extend<caf::replies_to<lifecycle_atom>::with<lifecycle_history>>;

/// Spawns a worker actor linked to nothing (the pool monitors its workers:
/// see python_worker_contract::init_worker).
worker_actor_handle spawn_worker(caf::actor_system& sys, worker_config cfg);

/// Same, linked to `parent` (exits travel both ways, as in OTP).
worker_actor_handle spawn_linked_worker(caf::local_actor* parent, worker_config cfg);

} // namespace dspex
