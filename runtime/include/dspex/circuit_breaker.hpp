// A per-pool circuit breaker that only *answers*: allow() before a call,
// record_success()/record_failure()/release() after it. It never runs the
// protected call (the original serialised every call through the breaker),
// never sleeps and reads time only through an injected clock, so an actor can
// own one and a test can drive it with a fake clock.
//
//   closed    -> open       N counted failures in a row, within failure_window
//   open      -> half_open  open_timeout has passed (seen by allow() or update())
//   half_open -> closed     M probe successes
//   half_open -> open       any counted probe failure
//   open/half_open -> closed  reset()
//
// Counting rule (chosen: consecutive, with a window): the breaker opens after
// `failure_threshold` counted failures with no success between them, the
// oldest of them at most `failure_window` old. Consecutive, because a pool that
// still answers calls between failures is working (one bad worker out of
// eight should be replaced by supervision, not cut the whole pool off);
// windowed, so that one failure an hour never adds up to an open circuit. failure_window == 0 disables the window (pure consecutive count).
//
// Permits: every allowed call carries a permit, which the caller must hand
// back exactly once (record_success, record_failure or release). A permit
// remembers the state epoch it was issued in; an outcome reported after the
// breaker has changed state since (a slow call from before it opened) is
// ignored, so late results cannot close or reopen the circuit by accident.
// In half_open at most `half_open_max_probes` permits are out at once.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <optional>
#include <string>
#include <unordered_set>

#include "dspex/error.hpp"

namespace dspex {

enum class circuit_state { closed, open, half_open };

/// "closed", "open", "half_open".
const char* to_string(circuit_state s) noexcept;

/// The default rule of which errors count against the pool: all but
/// python_error (the worker answered: the pool works), session_error and
/// configuration_error (the caller's problem), resource_error/circuit_open
/// (the breaker's own rejection) and caller_lost (a call whose caller was
/// lost, refused before it reached a process). A non-counting error is
/// recorded as a success: the pool served the call.
bool circuit_counts_failure(const error& e) noexcept;

struct circuit_breaker_config {
  using duration = std::chrono::steady_clock::duration;

  std::string name = "pool";                   ///< named in rejections and events
  std::size_t failure_threshold = 5;           ///< N: counted failures in a row that open the circuit
  duration failure_window = std::chrono::seconds(60);  ///< ... all within this span; 0 = no window
  duration open_timeout = std::chrono::seconds(30);    ///< open -> half_open after this long
  std::size_t half_open_max_probes = 1;        ///< K: permits out at once in half_open
  std::size_t success_threshold = 2;           ///< M: probe successes that close the circuit
  std::function<bool(const error&)> counts = circuit_counts_failure;  ///< empty = the default rule

  /// configuration_error/invalid_setting naming the field: thresholds and
  /// probes >= 1, durations >= 0.
  std::optional<error> validate() const;
};

struct circuit_permit {
  std::uint64_t epoch = 0;  ///< the state epoch it was issued in
  std::uint64_t id = 0;     ///< unique per breaker
  bool probe = false;       ///< issued in half_open
};

/// allow()'s answer: a permit, or a structured rejection
/// (resource_error/circuit_open; context: circuit, state, last_failure, and
/// retry_after_ms when open or probes_in_flight when half_open).
struct circuit_admission {
  std::optional<circuit_permit> permit;
  std::optional<error> rejection;

  explicit operator bool() const noexcept { return permit.has_value(); }
};

/// One state change, for the observer (and later the event stream).
struct circuit_transition {
  circuit_state from;
  circuit_state to;
  std::string reason;
  std::chrono::steady_clock::time_point at;
};

class circuit_breaker {
public:
  using time_point = std::chrono::steady_clock::time_point;
  using clock_fn = std::function<time_point()>;
  /// Called synchronously, after the change, from inside the call that caused
  /// it. It must not call back into this breaker.
  using observer_fn = std::function<void(const circuit_transition&)>;

  /// An invalid config is clamped (never throws): zero thresholds/probes -> 1,
  /// negative durations -> 0. An empty clock means steady_clock::now.
  explicit circuit_breaker(circuit_breaker_config cfg = {}, clock_fn clock = {},
                           observer_fn observer = {});

  void set_observer(observer_fn observer) { observer_ = std::move(observer); }

  /// Before a call: a permit, or the rejection to return to the caller at
  /// once. Applies the open -> half_open timeout first.
  circuit_admission allow();

  /// After a call with a permit. Stale permits (from an earlier epoch) and
  /// repeated reports of a probe are ignored.
  void record_success(const circuit_permit& p);
  /// After a failed call with a permit: `e` counts toward opening only when
  /// its class says something about the pool (the config's `counts`).
  void record_failure(const circuit_permit& p, const error& e);
  /// The call ended without an outcome that says anything about the pool
  /// (cancelled, caller gone): frees a probe slot, counts nothing.
  void release(const circuit_permit& p);

  /// Applies the open -> half_open timeout without a call, e.g. from an
  /// actor's timer at half_open_at(), so the event is not delayed until the
  /// next request.
  void update();

  /// Back to closed, whatever the state (an operator's or a supervisor's reset).
  void reset(std::string reason = "reset");

  /// The recorded state (open stays open until update()/allow() sees the timeout).
  circuit_state state() const noexcept { return state_; }
  /// When an open circuit becomes half_open; nothing unless open.
  std::optional<time_point> half_open_at() const;
  std::size_t consecutive_failures() const noexcept { return failures_.size(); }
  std::size_t probes_in_flight() const noexcept { return probes_.size(); }
  std::size_t probe_successes() const noexcept { return probe_successes_; }
  /// The counted failure that last opened the circuit.
  const std::optional<error>& last_failure() const noexcept { return last_failure_; }
  const circuit_breaker_config& config() const noexcept { return cfg_; }

private:
  void change(circuit_state to, std::string reason, time_point now);
  bool counts(const error& e) const;
  error rejection(time_point now) const;

  circuit_breaker_config cfg_;
  clock_fn clock_;
  observer_fn observer_;
  circuit_state state_ = circuit_state::closed;
  std::uint64_t epoch_ = 1;
  std::uint64_t next_permit_ = 1;
  std::deque<time_point> failures_;       // the current run of counted failures (closed)
  time_point opened_at_{};
  std::unordered_set<std::uint64_t> probes_;  // ids of probe permits out (half_open)
  std::size_t probe_successes_ = 0;
  std::optional<error> last_failure_;
};

} // namespace dspex
