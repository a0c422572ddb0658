// session_directory: which actor serves each live session, so that a
// session's call goes from its caller straight to its session actor (issue
// 11: caller → session → worker), not through the pool client and the
// registry on every call. The registry stays the authority: only it adds a
// session (on its first call, within session.max_sessions) and removes one
// (end_session, expiry, a failure); a caller that finds no entry goes
// through the registry, which creates the session.
//
// Order: calls of one caller reach the session in the order they were
// made (those its caller runs itself included: session_card.hpp). A call that goes through the registry is counted in transit until
// the registry has passed it on; while any is, the session's later calls
// take the same way (behind it), not the direct one. A call is sent under
// the directory's lock, and the registry removes a session under it before
// it tells the session to end: a call sent before the removal is in the
// session's mailbox ahead of the end, and served; one after it reaches the
// registry and a new session.
//
// Internal to actors/ (CAF: a translation unit that sends to actors).
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <unordered_map>
#include <utility>

#include <caf/actor.hpp>
#include <caf/send.hpp>

#include "dspex/actors/messages.hpp"
#include "dspex/actors/session_actor.hpp"
#include "session_card.hpp"

namespace dspex::detail {

class session_directory {
public:
  /// Sends a session's call to its actor when it may go directly, counted
  /// on the session's card until the actor takes it in.
  /// @returns false when the session is not in the directory, or a call of
  ///          it is on its way through the registry (nothing sent: the call
  ///          goes there too, counted with in_transit()).
  /// @note `c` and `done` are moved from only when sent: on false the
  ///       caller still has them, for the registry.
  bool send_call(const std::string& id, call& c, const client_call_options& opts,
                 completion& done) {
    std::shared_lock<std::shared_mutex> lk{mtx_};
    auto it = sessions_.find(id);
    if (it == sessions_.end() || !it->second.actor || it->second.in_transit > 0)
      return false;
    it->second.card->count_call_to_actor();
    caf::anon_send(it->second.actor, session_call_atom::value, std::move(c), opts,
                   std::move(done));
    return true;
  }

  /// The card of session `id` when its calls may go directly (none on the
  /// way through the registry), else null.
  std::shared_ptr<session_card> card_of(const std::string& id) {
    std::shared_lock<std::shared_mutex> lk{mtx_};
    auto it = sessions_.find(id);
    if (it == sessions_.end() || !it->second.actor || it->second.in_transit > 0)
      return nullptr;
    return it->second.card;
  }

  /// Runs a session's call: by its caller when the session is idle
  /// (try_fast_call: no message at all), else directly to its actor when it
  /// may, else by `via` (the way to the registry: via(session_request,
  /// completion)), counted in transit; the registry gives the count back
  /// (arrived()). The caller's own run happens outside the directory's
  /// lock: its completion may run at once, and call again.
  template <class Via>
  void route(session_request r, completion done, Via&& via) {
    if (auto card = card_of(r.session_id); card && try_fast_call(card, r.c, r.opts, done))
      return;
    if (send_call(r.session_id, r.c, r.opts, done))
      return;
    r.transit = in_transit(r.session_id);
    via(std::move(r), std::move(done));
  }

  /// A call of session `id` goes through the registry.
  /// @returns the token the registry gives back to arrived().
  std::uint64_t in_transit(const std::string& id) {
    std::unique_lock<std::shared_mutex> lk{mtx_};
    ++sessions_[id].in_transit;
    return generation_;
  }

  /// The registry passed on (or answered) a call counted by in_transit(),
  /// with its token.
  void arrived(const std::string& id, std::uint64_t token) {
    std::unique_lock<std::shared_mutex> lk{mtx_};
    auto it = sessions_.find(id);
    if (token != generation_ || it == sessions_.end() || it->second.in_transit == 0)
      return;  // counted before a clear(): forgotten with it
    if (--it->second.in_transit == 0 && !it->second.actor)
      sessions_.erase(it);
  }

  /// The registry: session `id` is served by `actor` (with `card`) from now on.
  void add(const std::string& id, session_actor_handle actor, std::shared_ptr<session_card> card) {
    std::unique_lock<std::shared_mutex> lk{mtx_};
    auto& e = sessions_[id];
    e.actor = std::move(actor);
    e.card = std::move(card);
  }

  /// The registry: session `id` is no longer served by `actor` (a newer
  /// session of the same id stays).
  void remove(const std::string& id, const caf::actor_addr& actor) {
    std::unique_lock<std::shared_mutex> lk{mtx_};
    auto it = sessions_.find(id);
    if (it == sessions_.end() || it->second.actor.address() != actor)
      return;
    if (it->second.in_transit > 0) {
      it->second.actor = nullptr;  // calls on their way: the registry makes a new one
      it->second.card = nullptr;
    }
    else
      sessions_.erase(it);
  }

  /// The registry starts or stops: none of its sessions is served any more,
  /// and calls counted before are forgotten (their registry is gone).
  /// @returns the sessions with a live actor (dspex_sessions).
  std::size_t live() {
    std::shared_lock<std::shared_mutex> lk{mtx_};
    std::size_t n = 0;
    for (auto& kv : sessions_)
      n += kv.second.actor ? 1 : 0;
    return n;
  }

  void clear() {
    std::unique_lock<std::shared_mutex> lk{mtx_};
    sessions_.clear();
    ++generation_;
  }

private:
  struct entry {
    session_actor_handle actor;  ///< none while the registry has not made it
    std::shared_ptr<session_card> card;  ///< its card (session_card.hpp)
    std::size_t in_transit = 0;  ///< calls on their way through the registry
  };
  std::shared_mutex mtx_;
  std::unordered_map<std::string, entry> sessions_;
  std::uint64_t generation_ = 1;
};

} // namespace dspex::detail
