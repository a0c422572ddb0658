// The lifecycle state machine of one worker (issue 4, item 3). Pure: the
// worker actor owns one, asks it before changing what it does, and passes the
// time in. A transition the table forbids is returned as an error value, never
// thrown and never asserted, so a race between, say, a health check and a stop
// shows up as a loggable error instead of a crashed actor.
#pragma once

#include <chrono>
#include <cstddef>
#include <deque>
#include <optional>
#include <string>
#include <string_view>

#include "dspex/error.hpp"

namespace dspex {

enum class lifecycle_state {
  initializing,  ///< spawned, init ping not yet answered
  ready,         ///< idle and healthy: the only state that takes work
  busy,          ///< one request in flight
  degraded,      ///< a health check failed; no work until it recovers
  terminating,   ///< stopping: shutdown sent, waiting for the process to exit
  terminated,    ///< gone; terminal
};

/// "initializing", "ready", "busy", "degraded", "terminating", "terminated";
/// "unknown" for a value outside the enum.
const char* to_string(lifecycle_state s) noexcept;
/// @returns the state named `name` (initializing, ready, ...), or nullopt.
std::optional<lifecycle_state> lifecycle_state_from_string(std::string_view name) noexcept;

/// The whole transition table; every pair not listed is invalid, including
/// staying in the same state (a second stop request is an error the caller
/// may ignore, not a silent no-op that hides a race):
///
///   initializing -> ready         init ping answered
///   ready        -> busy          a request was sent
///   busy         -> ready         the reply came
///   ready        -> degraded      a health check failed while idle
///   busy         -> degraded      the request ended badly but the process lives
///   degraded     -> ready         a health check passed again
///   initializing, ready, busy, degraded -> terminating   stop, recycle, kill
///   terminating  -> terminated    the process is reaped
constexpr bool lifecycle_allows(lifecycle_state from, lifecycle_state to) noexcept {
  using s = lifecycle_state;
  switch (from) {
    case s::initializing: return to == s::ready || to == s::terminating;
    case s::ready: return to == s::busy || to == s::degraded || to == s::terminating;
    case s::busy: return to == s::ready || to == s::degraded || to == s::terminating;
    case s::degraded: return to == s::ready || to == s::terminating;
    case s::terminating: return to == s::terminated;
    case s::terminated: return false;
  }
  return false;
}

/// One accepted transition.
struct lifecycle_record {
  lifecycle_state from;
  lifecycle_state to;
  std::string reason;
  std::chrono::steady_clock::time_point at;           ///< when it happened
  std::chrono::steady_clock::duration time_in_from;   ///< how long the worker was in `from`
};

class worker_lifecycle {
public:
  using time_point = std::chrono::steady_clock::time_point;
  using duration = std::chrono::steady_clock::duration;

  /// Starts in initializing at `now`. The history keeps the last
  /// `history_capacity` transitions (a worker that lives for days makes
  /// millions of ready <-> busy moves; the totals below still count them all).
  explicit worker_lifecycle(std::string worker_id, time_point now,
                            std::size_t history_capacity = 32);

  /// Moves to `to` when the table allows it and records (from, to, reason,
  /// time in from). Otherwise changes nothing and returns
  /// system_error/invalid_transition naming the worker, both states and the
  /// reason. A `now` earlier than the last transition counts as zero time.
  [[nodiscard]] std::optional<error> transition(lifecycle_state to, std::string reason,
                                                time_point now);

  lifecycle_state state() const noexcept { return state_; }
  /// True only in ready: initializing, busy, degraded and stopping workers take no work.
  bool accepts_work() const noexcept { return state_ == lifecycle_state::ready; }
  bool terminated() const noexcept { return state_ == lifecycle_state::terminated; }
  time_point entered_at() const noexcept { return entered_at_; }
  /// @returns how long the worker has been in its current state at `now`.
  duration time_in_state(time_point now) const noexcept;

  /// Oldest first; at most history_capacity entries.
  const std::deque<lifecycle_record>& history() const noexcept { return history_; }
  std::size_t transitions_total() const noexcept { return accepted_; }
  std::size_t rejected_total() const noexcept { return rejected_; }
  const std::string& worker_id() const noexcept { return worker_id_; }

private:
  std::string worker_id_;
  lifecycle_state state_ = lifecycle_state::initializing;
  time_point entered_at_;
  std::size_t capacity_;
  std::deque<lifecycle_record> history_;
  std::size_t accepted_ = 0;
  std::size_t rejected_ = 0;
};

} // namespace dspex
