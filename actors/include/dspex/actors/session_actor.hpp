// The session layer (issue 5): one actor per session, created on first use by
// the session registry, which is the root supervisor's second child
// ("sessions", after "pool"). Included only by translation units that use CAF.
//
// Path of a session call:
//   runtime::execute_in_session → pool client (session_op_atom) → registry
//   → session actor (one call in flight per session, a FIFO of the others)
//   → pool client (execute_atom: retries, circuit breaker, the CURRENT pool)
//   → pool → worker; the outcome comes back the same way.
//
// Registry messages:
//  - (session_op_atom, session_request) → outcome (execute / end / info / list).
// Session actor messages (from the registry):
//  - (session_call_atom, call, client_call_options) → outcome;
//  - (session_info_atom) → outcome (the session's info JSON);
//  - (session_end_atom) → outcome: waits for the call in flight, fails the
//    queued ones (session_error/session_ended), sends cleanup_session to every
//    worker that served the session (through the pool, preferred_worker =
//    that worker, strict_queue; failures ignored), answers and quits.
#pragma once

#include <chrono>
#include <cstddef>
#include <memory>
#include <optional>
#include <string>

#include <caf/actor.hpp>
#include <caf/allowed_unsafe_message_type.hpp>
#include <caf/atom.hpp>
#include <caf/fwd.hpp>

#include "dspex/actors/messages.hpp"
#include "dspex/events.hpp"
#include "dspex/settings.hpp"

namespace dspex {

namespace detail {

/// What the pool client needs to know of a call beyond the call itself
/// (shared by runtime.cpp and the session actors, which send their calls
/// through the pool client as (execute_atom, call, completion, client_call_options)).
struct client_call_options {
  std::optional<bool> idempotent;
  std::optional<std::size_t> max_attempts;
};

} // namespace detail

enum class session_op { execute, end, info, list };

/// One request to the session layer.
struct session_request {
  session_op op = session_op::execute;
  std::string session_id;
  call c;  ///< op == execute: command, args, deadline, affinity (type/preferred_worker set by the session)
  detail::client_call_options opts;
};

using session_op_atom = caf::atom_constant<caf::atom("sessop")>;     // (session_request) → outcome
using session_call_atom = caf::atom_constant<caf::atom("sesscall")>; // registry → session: (call, opts) → outcome
using session_info_atom = caf::atom_constant<caf::atom("sessinfo")>; // registry → session: () → outcome
using session_end_atom = caf::atom_constant<caf::atom("sessend")>;   // registry → session: () → outcome

/// Spawns the session registry linked to `supervisor` (a child_spec's start
/// function). `client` is the runtime's pool client: every session call goes
/// through it, so sessions always use the current pool.
caf::actor spawn_linked_session_registry(caf::event_based_actor* supervisor,
                                         std::shared_ptr<const settings> config,
                                         caf::actor client);

} // namespace dspex

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(dspex::detail::client_call_options)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(dspex::session_request)
