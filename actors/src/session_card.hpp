// session_card: the part of a session that its callers may run themselves,
// so that a session's call costs about what an anonymous one costs (issue
// 11: a session actor on every call was two messages through the scheduler
// thread, 1.5x an anonymous call).
//
// Who may touch the session's state (its adapter, preferred worker, workers,
// use counts) is decided here, one holder at a time:
//  - a caller: when the card is free and no call is on its way to the session
//    actor, the caller takes the card and starts its call on the lane itself
//    (try_fast_call); when another caller's call holds it, the call waits on
//    the card (`waiting`, one call in flight per session as before), and the
//    call that finishes passes the card to the next one and starts it, on
//    the thread that got the reply (the way the pool's lane hands a worker to
//    the next caller). The session actor sees no message at all;
//  - the session actor: for everything else (queued calls, calls its adapter
//    answers itself, repairs, sweeps, info, the end). It takes the card when
//    it has work and gives it back when it has none; when a caller holds it,
//    the actor waits: the caller hands the card to it on return (and pokes it),
//    so no later caller overtakes the work the actor waits with.
//
// Order: every call sent to the session actor is counted (via_actor) until
// the actor has taken it in; while any is, callers do not take the card, so
// a caller's calls keep their order whichever way each one goes.
//
// Internal to actors/ (CAF: a translation unit that sends to actors).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <set>
#include <string>

#include <caf/actor_addr.hpp>

#include "command_adapter.hpp"
#include "dspex/actors/session_actor.hpp"
#include "pool_client.hpp"

namespace dspex::detail {

class session_card {
public:
  enum class holder { none, caller, actor };

  // -- fixed before the card is published (the registry fills them) --------
  std::string id;
  std::shared_ptr<const settings> config;
  runtime_detail::pool_client_handle client;  ///< the pool client: calls the lane does not take
  session_lane lane;         ///< the direct lane (empty: every call through the client)
  caf::actor_addr actor;     ///< the session actor

  // -- the session's state: only its holder touches it ----------------------
  std::unique_ptr<session_adapter> adapter;  ///< what the session knows of its commands
  std::string preferred_worker;
  std::set<std::string> workers;  ///< every worker that served this session
  std::chrono::steady_clock::time_point last_used = std::chrono::steady_clock::now();

  // -- who holds it: under mtx ----------------------------------------------
  std::mutex mtx;
  holder held = holder::none;
  std::size_t via_actor = 0;  ///< calls sent to the session actor, not yet taken in
  bool actor_waits = false;   ///< a caller holds it and the actor wants it next
  std::uint64_t operations = 0;  ///< calls its callers took without the actor
  /// The session actor is gone: no caller takes the card any more, and the
  /// calls it had (running or waiting) were answered sessions_unavailable.
  bool gone = false;
  /// The caller's call running now (held == caller), for the actor's death.
  std::weak_ptr<session_handover> current;
  /// A caller's call behind the holder's (held == caller).
  struct waiting_call {
    call c;
    client_call_options opts;
    completion done;
  };
  std::deque<waiting_call> waiting;  ///< in order; handed to the actor with the card
  /// The holder's call's deadline (held == caller): a waiting call due
  /// earlier is watched by the actor's timer (session_watch_atom).
  std::chrono::steady_clock::time_point flight_deadline;

  /// A call is on its way to the session actor (the directory, the registry).
  void count_call_to_actor() {
    std::lock_guard<std::mutex> lk{mtx};
    ++via_actor;
  }
};

/// Runs session call `c` without the session actor when it may: when the
/// card is free, on the caller's thread (takes it, makes the call whole with
/// the adapter, starts it on the lane, else sends it to the pool client);
/// when another caller's call holds it, behind that call (`waiting`). The
/// card passes on when the call is answered, before `done` is called. A
/// reply that needs a repair hands the call, the card and the waiting calls
/// to the session actor instead.
/// @returns true when the call was taken; false: nothing happened (`c`,
///          `opts` and `done` untouched): the call goes to the session actor
///          (the actor holds the card or waits for it, a call is on its way to
///          it, or its adapter may answer the command itself)
/// @note Never blocks; never called with a lock held that `done` might take.
bool try_fast_call(const std::shared_ptr<session_card>& card, call& c,
                   client_call_options& opts, completion& done);

/// Runs session call `c` for the card's holder, a caller's call (held ==
/// caller, with flight_deadline set): makes it whole with the
/// adapter and starts it; its answer passes the card on (to the next waiting
/// call, or to the actor when it waits, or back to free).
void run_held_call(const std::shared_ptr<session_card>& card, call c, client_call_options opts,
                   completion done);

} // namespace dspex::detail
