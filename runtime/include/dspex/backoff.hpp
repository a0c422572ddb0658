// Backoff delays and the retry policy built on them. Both are pure values: they
// never sleep and never read a clock. They *return* a delay and a decision, and
// the caller (an actor) schedules the next attempt itself, e.g. with a delayed
// message. That keeps them unit-testable and keeps actors non-blocking.
//
// Users: retries around execute_* (issue 4, item 7) and the crash-loop guard of
// worker restarts (item 2: exponential 200 ms doubling to 5 s, with jitter).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "dspex/error.hpp"

namespace dspex {

// ---------------------------------------------------------------------------
// Backoff strategies
// ---------------------------------------------------------------------------

enum class backoff_kind {
  exponential,          ///< base * factor^(n-1): 100, 200, 400, 800, ...
  linear,               ///< base * n:            100, 200, 300, 400, ...
  fibonacci,            ///< base * fib(n):       100, 100, 200, 300, 500, ...
  decorrelated_jitter,  ///< AWS style: min(max_delay, random_between(base, prev * 3)), prev starts at base
};

/// "exponential", "linear", "fibonacci", "decorrelated_jitter".
const char* to_string(backoff_kind k) noexcept;
/// @returns the strategy named `name` (exponential, linear, fibonacci,
///          decorrelated_jitter), or nullopt.
std::optional<backoff_kind> backoff_kind_from_string(std::string_view name) noexcept;

struct backoff_config {
  using ms = std::chrono::milliseconds;

  backoff_kind kind = backoff_kind::exponential;
  ms base{100};             ///< the first delay (and the floor of decorrelated jitter)
  ms max_delay{5'000};      ///< no delay is ever longer than this
  std::uint32_t factor = 2; ///< exponential only: growth per retry
  /// Fraction in [0, 1] of each delay that is random: the delay d becomes a
  /// value in [d * (1 - jitter), d]. 0 = exact delays, 1 = "full jitter".
  /// Jitter only ever shortens a delay, so max_delay stays a hard upper bound.
  /// Ignored by decorrelated_jitter, which is random by construction.
  double jitter = 0.0;

  /// configuration_error/invalid_setting naming the field, or nothing when
  /// valid: base >= 0, max_delay >= base, factor >= 1, jitter in [0, 1].
  /// @returns configuration_error/invalid_setting naming the retry.* key out
  ///          of range, or nullopt
  std::optional<error> validate() const;
};

/// One sequence of delays (one retried call, one restarting worker slot).
/// Deterministic for a given seed: the random numbers come from a
/// std::mt19937_64 (whose output the standard fixes) mapped to ranges by our
/// own arithmetic (not std::uniform_*_distribution, whose results differ
/// between standard libraries), so a seed gives the same delays everywhere.
/// Give concurrent sequences different seeds (e.g. the request id), or their
/// jitter is correlated, which is what jitter is meant to avoid.
///
/// An invalid config is clamped (never throws): negative base -> 0,
/// max_delay < base -> base, factor 0 -> 1, jitter into [0, 1].
class backoff {
public:
  using ms = std::chrono::milliseconds;

  /// @param cfg the strategy and its numbers (clamped, see above)
  /// @param seed the jitter's seed: give concurrent sequences different ones
  explicit backoff(backoff_config cfg = {}, std::uint64_t seed = 0x5eed);

  /// The delay before retry number `retry` (1 = the first retry). The
  /// deterministic strategies are a function of `retry` (plus a jitter draw);
  /// decorrelated jitter walks from the previous delay it returned, so it
  /// expects calls in order; `retry` <= 1 restarts its walk at `base`.
  ms delay(std::size_t retry);

  /// Restarts the decorrelated walk (and re-seeds when a seed is given).
  void reset();
  /// Restarts the walk with the jitter seeded by `seed`.
  void reset(std::uint64_t seed);

  const backoff_config& config() const noexcept { return cfg_; }

private:
  std::int64_t uniform(std::int64_t lo, std::int64_t hi);  // inclusive
  ms jittered(ms d);

  backoff_config cfg_;
  std::uint64_t seed_;
  std::mt19937_64 rng_;
  ms prev_;
};

// ---------------------------------------------------------------------------
// Retry policy
// ---------------------------------------------------------------------------

/// Whether a failed call may be sent again, decided by its error alone.
enum class retry_class {
  never,            ///< the call may have had effects, or retrying cannot help
  safe,             ///< the request never reached a worker: nothing ran
  idempotent_only,  ///< the worker may have run it (it died / hung mid-request)
};

/// @returns the snake_case name of `c`.
const char* to_string(retry_class c) noexcept;

/// One row of the classification table: `type` empty matches every type of
/// the category. The first matching row wins; no match means `never`.
struct retry_rule {
  error_category category;
  std::string type;
  retry_class cls;
};

/// The default table, every row named explicitly (see backoff.cpp for why each):
///   safe:            communication_error/send_failed, resource_error/worker_not_ready,
///                    resource_error/worker_busy, resource_error/worker_stopping,
///                    connection_error/* (the worker was never reached)
///   idempotent_only: communication_error/worker_exited, communication_error/protocol_violation,
///                    communication_error/garbled, timeout_error/request_timeout,
///                    system_error/worker_exited
///   never:           checkout_timeout and caller_timeout (the deadline passed),
///                    resource_error/circuit_open, pool_unavailable, pool_saturated,
///                    pool_stopping (fail fast; retries would only add load),
///                    python_error/* (the worker answered), and everything unlisted.
const std::vector<retry_rule>& default_retry_rules();

/// Commands that are idempotent unless the caller says otherwise:
/// ping, list_programs, get_stats, get_program_info.
bool idempotent_by_default(std::string_view command) noexcept;

/// The caller's word wins; without one, the default list decides.
inline bool resolve_idempotent(std::string_view command, std::optional<bool> caller_says) noexcept {
  return caller_says ? *caller_says : idempotent_by_default(command);
}

struct retry_settings {
  std::size_t max_attempts = 3;  ///< attempts in all, the first included; 1 = no retries
  backoff_config backoff;        ///< delay before each retry
  /// A retry is scheduled only when at least this much time remains before
  /// the deadline after the delay: an attempt with no time left can only fail.
  std::chrono::milliseconds min_attempt_budget{0};
  std::vector<retry_rule> rules = default_retry_rules();

  /// @returns configuration_error/invalid_setting naming the retry.* key out
  ///          of range, or nullopt
  std::optional<error> validate() const;
};

/// Why decide() answered as it did (stable, for events and tests).
enum class retry_reason {
  retry_safe,             ///< retrying: the failure happened before a worker got the request
  retry_idempotent,       ///< retrying: a worker failed mid-request, and the call is idempotent
  not_retryable,          ///< the error's class is `never`
  not_idempotent,         ///< a worker failed mid-request and the call is not idempotent
  attempts_exhausted,     ///< max_attempts reached
  deadline,               ///< the delay (plus min_attempt_budget) would pass the deadline
};

/// @returns the snake_case name of `r`.
const char* to_string(retry_reason r) noexcept;

struct retry_decision {
  bool retry = false;
  std::chrono::milliseconds delay{0};  ///< wait this long before the next attempt (0 when !retry)
  retry_reason why = retry_reason::not_retryable;
  std::string reason;                  ///< human-readable, names the error and the numbers
};

/// The retry state of ONE call: build one per call from shared retry_settings
/// and a per-call seed. It holds the backoff walk, hence decide() is non-const.
class retry_policy {
public:
  using time_point = std::chrono::steady_clock::time_point;

  /// @param s the shared settings (max_attempts, backoff, rules)
  /// @param seed this call's jitter seed (e.g. from its id)
  explicit retry_policy(retry_settings s = {}, std::uint64_t seed = 0x5eed);

  /// `last`: the error of attempt number `attempt` (1 = the first attempt).
  /// `deadline` is the caller's, for all attempts together: no retry is
  /// proposed whose delay would end at or after it. Never blocks.
  retry_decision decide(const error& last, std::size_t attempt, time_point now,
                        time_point deadline, bool idempotent);

  /// The class of an error under this policy's rules.
  retry_class classify(const error& e) const;

  const retry_settings& settings() const noexcept { return settings_; }

private:
  retry_settings settings_;
  dspex::backoff backoff_;
};

} // namespace dspex
