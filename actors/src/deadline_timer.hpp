// One pending wake-up for the earliest of an actor's deadlines, sent so that
// it does not keep the actor alive.
//
// Why not delayed_send: CAF holds a strong reference to the receiver of a
// delayed message until the delay has passed. A worker actor arms a timer
// at its request's deadline (30 s by default); recycled at 30 workers a
// second, ~900 terminated workers (mailbox, behavior, ~2 KB each) stayed in
// memory at any time, and a busy session armed one such timer per queued
// call. Here the clock holds the system's timer relay instead, the relay
// holds only the receiver's address, and an actor keeps at most one wake-up
// that counts: arming an earlier deadline makes the pending one stale.
//
// Internal to actors/ (CAF included): pool_actor, worker_actor, session_actor.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <optional>

#include <caf/actor_addr.hpp>
#include <caf/atom.hpp>
#include <caf/message.hpp>
#include <caf/scheduled_actor.hpp>

namespace dspex::detail {

/// Sends `msg` to `self` after `delay` unless `self` has terminated by then.
/// The pending message holds `self`'s address only (weak).
void send_later(caf::scheduled_actor* self, caf::timespan delay, caf::message msg);

/// The earliest-deadline wake-up of one actor. The wake-up message is
/// (Atom, generation): the handler passes the generation to fired(), which
/// says whether it is the current one, then handles every deadline that
/// passed and arms the next.
class deadline_timer {
public:
  /// Schedules a wake-up at `due` unless one at or before `due` is pending.
  /// @param wake the atom of the wake-up message (followed by the generation)
  template <class Atom>
  void arm(caf::scheduled_actor* self, std::chrono::steady_clock::time_point due, Atom wake) {
    if (due_ && *due_ <= due)
      return; // the pending one fires first and re-arms for the rest
    due_ = due;
    ++generation_;
    auto delay = std::max(due - std::chrono::steady_clock::now(), std::chrono::steady_clock::duration::zero());
    send_later(self, std::chrono::duration_cast<caf::timespan>(delay),
               caf::make_message(wake, generation_));
  }

  /// Marks the wake-up of `generation` as arrived.
  /// @returns false when it is stale (an earlier arm() replaced it): ignore it.
  bool fired(std::uint64_t generation) {
    if (generation != generation_ || !due_)
      return false;
    due_.reset();
    return true;
  }

private:
  std::optional<std::chrono::steady_clock::time_point> due_;
  std::uint64_t generation_ = 0;
};

/// What a wake-up handler does with its queue: every entry whose deadline has
/// passed is handed to `expire`, then erased.
/// @param deadline_of the deadline of an entry (a steady_clock time point)
/// @returns the earliest deadline left, to arm the next wake-up at
template <class Queue, class DeadlineOf, class Expire>
std::optional<std::chrono::steady_clock::time_point>
expire_passed(Queue& queue, DeadlineOf&& deadline_of, Expire&& expire) {
  const auto now = std::chrono::steady_clock::now();
  std::optional<std::chrono::steady_clock::time_point> next;
  for (auto it = queue.begin(); it != queue.end();) {
    const auto due = deadline_of(*it);
    if (due > now) {
      next = next ? std::min(*next, due) : due;
      ++it;
      continue;
    }
    expire(*it);
    it = queue.erase(it);
  }
  return next;
}

} // namespace dspex::detail
