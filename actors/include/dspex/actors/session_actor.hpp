// The session layer (issue 5): one actor per session, created on first use by
// the session registry, which is the root supervisor's second child
// ("sessions", after "pool"). Included only by translation units that use CAF.
//
// Path of a session call (issue 11: one way, caller → session → worker):
//   runtime::execute_in_session → the session's actor, found in the
//   session directory (a new session: → pool client → registry, which
//   creates it and forwards the call) → one call in flight per session, a
//   FIFO of the others → the direct lane when the call may take it (the
//   affinity hint: its worker when idle), else the pool client (retries,
//   circuit breaker, the CURRENT pool) → pool → worker. The outcome goes
//   from the worker's I/O thread to the session actor, which answers the
//   caller's completion. A failed lane attempt goes to the pool client
//   (retry policy, breaker), whose outcome comes back the same way.
//   When the session is idle, its caller runs the call itself instead
//   (session_card.hpp: the same steps, without the actor), and the outcome
//   goes from the worker's I/O thread straight to the caller.
//
// Registry messages:
//  - (session_exec_atom, session_request, completion): op execute, answered
//    through the completion;
//  - (session_op_atom, session_request) → outcome (end / info / list).
// Session actor messages (typed: session_actor_handle):
//  - (session_call_atom, call, client_call_options, completion): from a
//    caller (through the directory) or the registry;
//  - (session_reply_atom, tag, outcome), (session_qtmo_atom, generation): its
//    own calls' answers and its queue's timer;
//  - from callers holding the session's card (actors/src/session_card.hpp):
//    (session_card_atom) the card is the actor's now; (session_adopt_atom,
//    handover) a call whose reply asks for a repair, with the card;
//    (session_watch_atom) a call waits on the card, due before the running
//    one ends;
//  - (session_info_atom) → outcome (the session's info JSON);
//  - (session_idle_atom) → bool: idle past session.ttl (the registry's sweep);
//  - (session_end_atom) → outcome: waits for the call in flight, fails the
//    queued ones (session_error/session_ended), sends its adapter's end
//    command (DSPy: cleanup_session) to every worker that served the session
//    (through the pool, preferred_worker = that worker, strict_queue;
//    failures ignored), answers and quits.
//
// What a session knows of its commands is its adapter's
// (actors/src/command_adapter.hpp; DSPy's programs and LM: dspy_adapter.hpp):
// the session actor itself is generic.
#pragma once

#include <chrono>
#include <cstddef>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include <caf/actor.hpp>
#include <caf/allowed_unsafe_message_type.hpp>
#include <caf/atom.hpp>
#include <caf/fwd.hpp>
#include <caf/replies_to.hpp>
#include <caf/typed_actor.hpp>

#include "dspex/actors/messages.hpp"
#include "dspex/events.hpp"
#include "dspex/settings.hpp"

namespace dspex {

namespace detail {

/// What the pool client needs to know of a call beyond the call itself
/// (the pool client, the direct lane and the session actors, which send
/// their calls to the pool client as (execute_atom, call, completion,
/// client_call_options)).
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
  /// op == execute through the registry: its session directory token
  /// (session_directory::in_transit), given back once it is passed on.
  std::uint64_t transit = 0;
};

using session_op_atom = caf::atom_constant<caf::atom("sessop")>;     // (session_request) → outcome
using session_exec_atom = caf::atom_constant<caf::atom("sessexec")>; // (session_request, completion)
using session_call_atom = caf::atom_constant<caf::atom("sesscall")>; // → session: (call, opts, completion)
using session_info_atom = caf::atom_constant<caf::atom("sessinfo")>; // registry → session: () → outcome
using session_idle_atom = caf::atom_constant<caf::atom("sessidle")>; // registry → session: () → bool
using session_end_atom = caf::atom_constant<caf::atom("sessend")>;   // registry → session: () → outcome
using session_reply_atom = caf::atom_constant<caf::atom("sessreply")>;  // (tag, outcome): its own call's answer
using session_qtmo_atom = caf::atom_constant<caf::atom("sessqtmo")>;    // (timer generation): the earliest queued call's deadline
using session_card_atom = caf::atom_constant<caf::atom("sesscard")>;    // a caller gave the card back to the waiting actor
using session_adopt_atom = caf::atom_constant<caf::atom("sessadopt")>;  // (handover): a caller's call, with the card, for a repair
using session_watch_atom = caf::atom_constant<caf::atom("sesswatch")>;  // a call waits on the card, due before the one in flight

namespace detail {
/// A call its caller ran (session_card.hpp) whose reply asks for a repair:
/// the session actor takes it over, with the card.
struct session_handover;
} // namespace detail

/// A session actor's message interface: what callers, the registry and the
/// session itself (its calls' answers, its queue's timer) may send it.
using session_actor_handle = caf::typed_actor<
  caf::reacts_to<session_call_atom, call, detail::client_call_options, completion>,
  caf::replies_to<session_info_atom>::with<outcome>,
  caf::replies_to<session_idle_atom>::with<bool>,
  caf::replies_to<session_end_atom>::with<outcome>,
  caf::reacts_to<session_reply_atom, std::uint64_t, outcome>,
  caf::reacts_to<session_qtmo_atom, std::uint64_t>,
  caf::reacts_to<session_card_atom>,
  caf::reacts_to<session_watch_atom>,
  caf::reacts_to<session_adopt_atom, std::shared_ptr<detail::session_handover>>>;

namespace detail {
class session_directory;
class session_adapter;
/// Makes the adapter of a new session (actors/src/command_adapter.hpp).
using session_adapter_factory
  = std::function<std::unique_ptr<session_adapter>(const std::string& session_id)>;
} // namespace detail

/// Starts a session's call on the direct lane. Returns true when the lane
/// took it: `done` gets its outcome (from a worker's I/O thread, or from the
/// pool client after a failed attempt); false: nothing happened, `c` is
/// untouched and goes to the pool client. Set by the runtime.
using session_lane
  = std::function<bool(call& c, const detail::client_call_options& opts, const completion& done)>;

/// What a session call's completion answers when the session's actor went
/// away with it unanswered (resource_error/sessions_unavailable: the actor
/// or its registry failed; an end answers every call itself): wrap the
/// completion with runtime_detail::answer_once(done, session_lost_error(...)) before it is sent.
error session_lost_error(const std::string& session_id, const std::string& command);

/// Spawns the session registry linked to `supervisor` (a child_spec's start
/// function).
/// @param client the runtime's pool client: the sessions' calls that do not
///        take the direct lane go through it, so they always use the current pool.
/// @param directory filled and emptied by the registry (see session_directory.hpp).
/// @param lane how a session's call takes the direct lane (may be empty).
/// @param make_adapter what each session knows of its commands (DSPy:
///        detail::make_dspy_session).
caf::actor spawn_linked_session_registry(caf::event_based_actor* supervisor,
                                         std::shared_ptr<const settings> config,
                                         caf::actor client,
                                         std::shared_ptr<detail::session_directory> directory,
                                         session_lane lane,
                                         detail::session_adapter_factory make_adapter);

} // namespace dspex

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(dspex::detail::client_call_options)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(dspex::session_request)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(std::shared_ptr<dspex::detail::session_handover>)
