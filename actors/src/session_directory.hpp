// session_directory: which actor serves each live session, so that a
// session's call goes from its caller straight to its session actor (issue
// 11: caller → session → worker), not through the pool client and the
// registry on every call. The registry stays the authority: only it adds a
// session (on its first call, within session.max_sessions) and removes one
// (end_session, expiry, a failure); a caller that finds no entry goes
// through the registry, which creates the session.
//
// A call is sent under the directory's lock, and the registry removes a
// session under it before it tells the session to end: a call sent before
// the removal is in the session's mailbox ahead of the end, and served; one
// after it reaches the registry and a new session.
//
// Internal to actors/ (CAF: a translation unit that sends to actors).
#pragma once

#include <mutex>
#include <shared_mutex>
#include <string>
#include <unordered_map>
#include <utility>

#include <caf/actor.hpp>
#include <caf/send.hpp>

namespace dspex::detail {

class session_directory {
public:
  /// Sends `xs` to the actor of session `id`.
  /// @returns false when the session is not in the directory (nothing sent).
  /// @note `xs` are forwarded (moved from) only when sent: on false the
  ///       caller still has them, for the registry.
  template <class... Ts>
  bool send(const std::string& id, Ts&&... xs) {
    std::shared_lock<std::shared_mutex> lk{mtx_};
    auto it = sessions_.find(id);
    if (it == sessions_.end())
      return false;
    caf::anon_send(it->second, std::forward<Ts>(xs)...);
    return true;
  }

  /// The registry: session `id` is served by `actor` from now on.
  void add(const std::string& id, caf::actor actor) {
    std::unique_lock<std::shared_mutex> lk{mtx_};
    sessions_[id] = std::move(actor);
  }

  /// The registry: session `id` is no longer served by `actor` (a newer
  /// session of the same id stays).
  void remove(const std::string& id, const caf::actor_addr& actor) {
    std::unique_lock<std::shared_mutex> lk{mtx_};
    auto it = sessions_.find(id);
    if (it != sessions_.end() && it->second.address() == actor)
      sessions_.erase(it);
  }

  /// The registry starts or stops: none of its sessions is served any more.
  void clear() {
    std::unique_lock<std::shared_mutex> lk{mtx_};
    sessions_.clear();
  }

private:
  std::shared_mutex mtx_;
  std::unordered_map<std::string, caf::actor> sessions_;
};

} // namespace dspex::detail
