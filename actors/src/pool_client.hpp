// pool_client: what the rest of the runtime needs of the pool client
// (pool_client.cpp): the state it shares with the runtime object, the
// failed direct-lane attempt it takes over, the messages other files send
// it, and its spawn. The client's own bookkeeping stays in its file: only
// its actor touches it.
//
// Internal to actors/ (CAF included).
#pragma once

#include <atomic>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include <caf/actor.hpp>
#include <caf/allowed_unsafe_message_type.hpp>
#include <caf/atom.hpp>
#include <caf/fwd.hpp>

#include "dspex/actors/events_actor.hpp"  // sup_event_atom carries an event
#include "dspex/actors/messages.hpp"
#include "dspex/actors/pool_actor.hpp"
#include "dspex/actors/session_actor.hpp"
#include "dspex/circuit_breaker.hpp"
#include "dspex/error.hpp"
#include "dspex/events.hpp"
#include "dspex/settings.hpp"

namespace dspex::detail {

class idle_workers;
class anonymous_adapter;

/// Shared by a runtime object and its pool client: what runtime::status and
/// runtime::checkout read without a round trip through the client.
struct client_shared {
  std::mutex mtx;
  pool_handle pool;              ///< the current pool; none while it restarts
  /// Times the supervisor restarted the pool (dspex_pool_restarts_total).
  std::atomic<std::uint64_t> pool_restarts{0};
  std::optional<error> gave_up;  ///< set once the root supervisor gave up
  /// The current pool's idle workers, which the direct lane takes from
  /// (set by the root's pool child before the pool starts).
  std::shared_ptr<idle_workers> idle;
  std::atomic<circuit_state> circuit{circuit_state::closed};

  /// The pool's circuit breaker, used by the pool client and, for calls in
  /// the closed state, by the direct lane. Its observer only records the
  /// transitions (under breaker_mtx); the pool client publishes them.
  std::mutex breaker_mtx;
  std::optional<circuit_breaker> breaker;
  std::vector<circuit_transition> transitions;

  pool_handle current_pool() {
    std::lock_guard<std::mutex> guard{mtx};
    return pool;
  }
  std::shared_ptr<idle_workers> current_idle() {
    std::lock_guard<std::mutex> guard{mtx};
    return idle;
  }
  std::optional<error> gave_up_error() {
    std::lock_guard<std::mutex> guard{mtx};
    return gave_up;
  }
};

/// A call of the direct lane whose attempt failed: the pool client takes it
/// over from there (retry policy, circuit breaker), as if it had sent it.
struct direct_failure {
  call c;
  completion done;
  client_call_options options;
  std::optional<circuit_permit> permit;
  outcome result;  ///< a failure, served_by set when a worker answered
};

} // namespace dspex::detail

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(dspex::detail::direct_failure)

namespace dspex::runtime_detail {

// The pool client's messages that other files send it (its own timers and
// the direct lane's answers to it stay in pool_client.cpp).
using sup_event_atom = caf::atom_constant<caf::atom("supevent")>;       // (event, child actor)
using closing_atom = caf::atom_constant<caf::atom("closing")>;          // runtime::stop began
using watch_root_atom = caf::atom_constant<caf::atom("watchroot")>;     // (root supervisor)

/// The pool client's message interface:
///  - (execute_atom, call, completion, client_call_options): an anonymous
///    call, or a session's call (from a session's card or actor);
///  - detail::direct_failure: a direct-lane call whose attempt failed;
///  - (session_op_atom, session_request, completion): a session request;
///  - (await_ready_atom) → outcome: ok once the current pool is ready;
///  - (sup_event_atom, event, child), (watch_root_atom, root): from the
///    supervision tree;
///  - closing_atom, then stop_atom: runtime::stop.
/// Every call's completion is run on the client's thread (run_callback).
using pool_client_handle = caf::typed_actor<
  caf::reacts_to<execute_atom, call, completion, detail::client_call_options>,
  caf::reacts_to<detail::direct_failure>,
  caf::reacts_to<session_op_atom, session_request, completion>,
  caf::replies_to<await_ready_atom>::with<outcome>,
  caf::reacts_to<sup_event_atom, event, caf::actor>,
  caf::reacts_to<watch_root_atom, caf::actor>,
  caf::reacts_to<closing_atom>,
  caf::reacts_to<stop_atom>>;

/// Spawns the runtime's pool client (pool_client_handle).
/// @param sys the runtime's actor system
/// @param config the runtime's settings (retry.*, circuit.*, session.*)
/// @param events where the client publishes retries, circuit transitions and
///        the supervisor's events
/// @param shared what the client shares with the runtime object; the client
///        sets its breaker when circuit.enabled
/// @param anonymous what the client knows of anonymous calls' commands
///        (DSPy: detail::make_dspy_anonymous)
/// @returns the pool client
pool_client_handle spawn_pool_client(caf::actor_system& sys, std::shared_ptr<const settings> config,
                             std::shared_ptr<event_bus> events,
                             std::shared_ptr<detail::client_shared> shared,
                             std::shared_ptr<detail::anonymous_adapter> anonymous);

} // namespace dspex::runtime_detail
