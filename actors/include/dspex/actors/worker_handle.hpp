// worker_handle: the pool's half of the pool ↔ worker protocol, as a typed
// actor interface. The pool reaches a worker's actor only with these
// messages (everything else goes through its worker contract), so any actor
// a contract starts as a worker (pool_worker::handle) implements exactly
// them, and a message a worker cannot take does not compile.
//
// The worker's half (what it sends its owner: worker_spawned_atom,
// worker_ready_atom, checkin_atom, worker_gone_atom, retry_atom) is in
// messages.hpp; the bundled worker actor's rules for each message are in
// worker_actor.hpp. Included only by translation units that use CAF.
#pragma once

#include <cstdint>

#include <caf/replies_to.hpp>
#include <caf/typed_actor.hpp>

#include "dspex/actors/messages.hpp"

namespace dspex {

/// What a pool (or whoever owns a worker) may send to a worker actor.
///  - (execute_atom, call) → outcome: a call the owner mediated; the worker
///    checks in with the owner before it answers.
///  - (execute_atom, lease_id, call) → outcome: a call of the lease holder;
///    no check-in.
///  - (health_check_atom) → outcome: a ping through the process.
///  - (lease_atom, lease_id): who may send leased calls (0: nobody).
///  - (revoke_atom, lease_id) → bool: true when no call is in flight.
///  - (process_stopped_atom): the process was seen stopped (SIGSTOP): end it.
///  - (stop_atom): stop the process and quit; also the owner's release of a
///    worker that lost its process (after its last call to it).
using worker_handle = caf::typed_actor<
  caf::replies_to<execute_atom, call>::with<outcome>,
  caf::replies_to<execute_atom, std::uint64_t, call>::with<outcome>,
  caf::replies_to<health_check_atom>::with<outcome>,
  caf::reacts_to<lease_atom, std::uint64_t>,
  caf::replies_to<revoke_atom, std::uint64_t>::with<bool>,
  caf::reacts_to<process_stopped_atom>,
  caf::reacts_to<stop_atom>>;

} // namespace dspex
