#include "dspex/backoff.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>

#include <fmt/format.h>

namespace dspex {

namespace {

using ms = std::chrono::milliseconds;
using rep = ms::rep;

constexpr std::array<const char*, 4> kind_names = {"exponential", "linear", "fibonacci",
                                                   "decorrelated_jitter"};

error bad(const std::string& key, const std::string& what) {
  return make_error(error_category::configuration_error, "invalid_setting",
                    fmt::format("{} {}", key, what), {{"key", key}});
}

/// a * b, saturating at `cap` (a, b >= 0).
rep mul_capped(rep a, rep b, rep cap) {
  if (a == 0 || b == 0)
    return 0;
  if (a > cap / b)
    return cap;
  return std::min(a * b, cap);
}

backoff_config clamp(backoff_config c) {
  if (c.base.count() < 0)
    c.base = ms{0};
  if (c.max_delay < c.base)
    c.max_delay = c.base;
  if (c.factor == 0)
    c.factor = 1;
  if (!(c.jitter >= 0.0))  // also catches NaN
    c.jitter = 0.0;
  if (c.jitter > 1.0)
    c.jitter = 1.0;
  return c;
}

} // namespace

const char* to_string(backoff_kind k) noexcept {
  auto i = static_cast<std::size_t>(k);
  return i < kind_names.size() ? kind_names[i] : "exponential";
}

std::optional<backoff_kind> backoff_kind_from_string(std::string_view name) noexcept {
  for (std::size_t i = 0; i < kind_names.size(); ++i)
    if (name == kind_names[i])
      return static_cast<backoff_kind>(i);
  return std::nullopt;
}

std::optional<error> backoff_config::validate() const {
  if (base.count() < 0)
    return bad("backoff.base", fmt::format("must not be negative (got {} ms)", base.count()));
  if (kind == backoff_kind::decorrelated_jitter && base.count() == 0)
    return bad("backoff.base", "must be positive for decorrelated_jitter (it multiplies the previous delay)");
  if (max_delay < base)
    return bad("backoff.max_delay", fmt::format("must be at least backoff.base ({} ms, got {} ms)",
                                                base.count(), max_delay.count()));
  if (factor < 1)
    return bad("backoff.factor", "must be at least 1 (got 0)");
  if (!(jitter >= 0.0 && jitter <= 1.0))
    return bad("backoff.jitter", fmt::format("must be between 0 and 1 (got {})", jitter));
  return std::nullopt;
}

// ---------------------------------------------------------------------------

backoff::backoff(backoff_config cfg, std::uint64_t seed)
  : cfg_(clamp(cfg)), seed_(seed), rng_(seed), prev_(cfg_.base) {}

void backoff::reset() {
  prev_ = cfg_.base;
}

void backoff::reset(std::uint64_t seed) {
  seed_ = seed;
  rng_.seed(seed);
  prev_ = cfg_.base;
}

std::int64_t backoff::uniform(std::int64_t lo, std::int64_t hi) {
  if (hi <= lo)
    return lo;
  // Modulo mapping: the bias is below 2^-40 for any span of delays in ms.
  auto span = static_cast<std::uint64_t>(hi - lo) + 1;
  return lo + static_cast<std::int64_t>(rng_() % span);
}

backoff::ms backoff::jittered(ms d) {
  if (cfg_.jitter <= 0.0 || d.count() == 0)
    return d;
  // floor(d * jitter) keeps the low end >= d * (1 - jitter).
  auto off = static_cast<rep>(std::floor(static_cast<double>(d.count()) * cfg_.jitter));
  return ms{uniform(d.count() - off, d.count())};
}

backoff::ms backoff::delay(std::size_t retry) {
  if (retry == 0)
    retry = 1;
  const rep base = cfg_.base.count();
  const rep cap = cfg_.max_delay.count();
  switch (cfg_.kind) {
    case backoff_kind::exponential: {
      rep d = base;
      if (cfg_.factor > 1)  // factor 1 is constant; also avoids a long loop for a huge `retry`
        for (std::size_t i = 1; i < retry && d > 0 && d < cap; ++i)
          d = mul_capped(d, static_cast<rep>(cfg_.factor), cap);
      return jittered(ms{std::min(d, cap)});
    }
    case backoff_kind::linear: {
      auto n = retry > static_cast<std::size_t>(std::numeric_limits<rep>::max())
                 ? std::numeric_limits<rep>::max()
                 : static_cast<rep>(retry);
      return jittered(ms{mul_capped(base, n, cap)});
    }
    case backoff_kind::fibonacci: {
      if (base == 0)
        return ms{0};
      // fib(1) = fib(2) = 1; stop as soon as base * fib reaches the cap
      // (at most ~90 steps before fib itself would overflow).
      rep a = 1, b = 1;
      for (std::size_t i = 2; i < retry && mul_capped(base, a, cap) < cap; ++i) {
        rep next = a > std::numeric_limits<rep>::max() - b ? std::numeric_limits<rep>::max() : a + b;
        b = a;
        a = next;
      }
      return jittered(ms{mul_capped(base, a, cap)});
    }
    case backoff_kind::decorrelated_jitter: {
      if (retry <= 1)
        prev_ = cfg_.base;
      rep hi = mul_capped(prev_.count(), 3, std::numeric_limits<rep>::max());
      rep d = std::min(uniform(base, std::max(hi, base)), cap);
      prev_ = ms{d};
      return prev_;
    }
  }
  return cfg_.base;
}

// ---------------------------------------------------------------------------

const char* to_string(retry_class c) noexcept {
  switch (c) {
    case retry_class::never: return "never";
    case retry_class::safe: return "safe";
    case retry_class::idempotent_only: return "idempotent_only";
  }
  return "never";
}

const char* to_string(retry_reason r) noexcept {
  switch (r) {
    case retry_reason::retry_safe: return "retry_safe";
    case retry_reason::retry_idempotent: return "retry_idempotent";
    case retry_reason::not_retryable: return "not_retryable";
    case retry_reason::not_idempotent: return "not_idempotent";
    case retry_reason::attempts_exhausted: return "attempts_exhausted";
    case retry_reason::deadline: return "deadline";
  }
  return "not_retryable";
}

const std::vector<retry_rule>& default_retry_rules() {
  using c = error_category;
  using r = retry_class;
  static const std::vector<retry_rule> rules = {
    // The deadline already passed: another attempt cannot meet it. Listed
    // under both categories: the pool reports timeout_error/checkout_timeout.
    {c::timeout_error, "checkout_timeout", r::never},
    {c::resource_error, "checkout_timeout", r::never},
    {c::timeout_error, "caller_timeout", r::never},
    // Fail-fast answers: the pool or its breaker says "not now"; retrying
    // would only add load to what is already overloaded or broken.
    {c::resource_error, "circuit_open", r::never},
    {c::resource_error, "pool_unavailable", r::never},
    {c::resource_error, "pool_saturated", r::never},
    {c::resource_error, "pool_stopping", r::never},
    // Nothing reached a worker: the write failed, or the worker refused the
    // request before sending it on. Nothing ran, so any command may go again.
    {c::communication_error, "send_failed", r::safe},
    {c::resource_error, "worker_not_ready", r::safe},
    {c::resource_error, "worker_busy", r::safe},
    {c::connection_error, "", r::safe},
    // The worker had the request and then died, broke the protocol or hung:
    // it may have run, so only an idempotent command may run again.
    {c::communication_error, "worker_exited", r::idempotent_only},
    // A worker stopped (pool stop, recycling) with the request already written.
    {c::resource_error, "worker_stopping", r::idempotent_only},
    {c::communication_error, "protocol_violation", r::idempotent_only},
    {c::communication_error, "garbled", r::idempotent_only},
    {c::timeout_error, "request_timeout", r::idempotent_only},
    {c::health_check_error, "process_stopped", r::idempotent_only},
    {c::system_error, "worker_exited", r::idempotent_only},  // the pool's fallback reason for a dead worker actor
    // The worker answered success:false: it is healthy and the same input
    // would fail the same way.
    {c::python_error, "", r::never},
  };
  return rules;
}

bool idempotent_by_default(std::string_view command) noexcept {
  return command == "ping" || command == "list_programs" || command == "get_stats"
         || command == "get_program_info";
}

std::optional<error> retry_settings::validate() const {
  if (max_attempts < 1)
    return bad("retry.max_attempts", "must be at least 1 (got 0)");
  if (min_attempt_budget.count() < 0)
    return bad("retry.min_attempt_budget",
               fmt::format("must not be negative (got {} ms)", min_attempt_budget.count()));
  return backoff.validate();
}

retry_policy::retry_policy(retry_settings s, std::uint64_t seed)
  : settings_(std::move(s)), backoff_(settings_.backoff, seed) {
  if (settings_.max_attempts == 0)
    settings_.max_attempts = 1;
  if (settings_.min_attempt_budget.count() < 0)
    settings_.min_attempt_budget = ms{0};
}

retry_class retry_policy::classify(const error& e) const {
  for (const auto& rule : settings_.rules)
    if (rule.category == e.category && (rule.type.empty() || rule.type == e.type))
      return rule.cls;
  return retry_class::never;
}

retry_decision retry_policy::decide(const error& last, std::size_t attempt, time_point now,
                                    time_point deadline, bool idempotent) {
  if (attempt == 0)
    attempt = 1;
  retry_decision d;
  const auto what = std::string(to_string(last.category)) + '/' + last.type;
  const auto cls = classify(last);
  if (cls == retry_class::never) {
    d.why = retry_reason::not_retryable;
    d.reason = fmt::format("{} is not retryable", what);
    return d;
  }
  if (cls == retry_class::idempotent_only && !idempotent) {
    d.why = retry_reason::not_idempotent;
    d.reason = fmt::format("{} may have run on the worker and the command is not idempotent", what);
    return d;
  }
  if (attempt >= settings_.max_attempts) {
    d.why = retry_reason::attempts_exhausted;
    d.reason = fmt::format("{} after attempt {} of {}", what, attempt, settings_.max_attempts);
    return d;
  }
  const auto delay = backoff_.delay(attempt);
  // Compared in whole ms (remaining time rounded down, so the test errs on the
  // side of not retrying), saturating so that huge settings cannot overflow.
  // Strict: an attempt that would start exactly at the deadline has no time.
  const auto left = now >= deadline ? ms{0} : std::chrono::duration_cast<ms>(deadline - now);
  const rep budget = settings_.min_attempt_budget.count();
  const rep needed = delay.count() > std::numeric_limits<rep>::max() - budget
                       ? std::numeric_limits<rep>::max()
                       : delay.count() + budget;
  if (left.count() <= needed) {
    d.why = retry_reason::deadline;
    d.reason = fmt::format("{}: a retry after {} ms would not run before the deadline ({} ms left)",
                           what, delay.count(), left.count());
    return d;
  }
  d.retry = true;
  d.delay = delay;
  d.why = cls == retry_class::safe ? retry_reason::retry_safe : retry_reason::retry_idempotent;
  d.reason = fmt::format("{}: attempt {} of {} in {} ms ({})", what, attempt + 1,
                         settings_.max_attempts, delay.count(),
                         cls == retry_class::safe ? "the request never reached a worker"
                                                  : "idempotent command");
  return d;
}

} // namespace dspex
