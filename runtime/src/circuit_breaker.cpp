#include "dspex/circuit_breaker.hpp"

#include <fmt/format.h>

namespace dspex {

namespace {

using std::chrono::milliseconds;
using std::chrono::duration_cast;

error bad(const std::string& key, const std::string& what) {
  return make_error(error_category::configuration_error, "invalid_setting",
                    fmt::format("{} {}", key, what), {{"key", key}});
}

circuit_breaker_config clamp(circuit_breaker_config c) {
  using d = circuit_breaker_config::duration;
  if (c.failure_threshold == 0)
    c.failure_threshold = 1;
  if (c.half_open_max_probes == 0)
    c.half_open_max_probes = 1;
  if (c.success_threshold == 0)
    c.success_threshold = 1;
  if (c.failure_window < d::zero())
    c.failure_window = d::zero();
  if (c.open_timeout < d::zero())
    c.open_timeout = d::zero();
  return c;
}

long long ms_count(std::chrono::steady_clock::duration d) {
  return duration_cast<milliseconds>(d).count();
}

} // namespace

const char* to_string(circuit_state s) noexcept {
  switch (s) {
    case circuit_state::closed: return "closed";
    case circuit_state::open: return "open";
    case circuit_state::half_open: return "half_open";
  }
  return "closed";
}

bool circuit_counts_failure(const error& e) noexcept {
  // A call abandoned by its lost caller never reached a worker.
  if (e.type == "caller_lost")
    return false;
  switch (e.category) {
    case error_category::python_error:
    case error_category::session_error:
    case error_category::configuration_error:
      return false;
    case error_category::resource_error:
      return e.type != "circuit_open";
    default:
      return true;
  }
}

std::optional<error> circuit_breaker_config::validate() const {
  if (failure_threshold < 1)
    return bad("circuit.failure_threshold", "must be at least 1 (got 0)");
  if (half_open_max_probes < 1)
    return bad("circuit.half_open_max_probes", "must be at least 1 (got 0)");
  if (success_threshold < 1)
    return bad("circuit.success_threshold", "must be at least 1 (got 0)");
  if (failure_window < duration::zero())
    return bad("circuit.failure_window",
               fmt::format("must not be negative (got {} ms)", ms_count(failure_window)));
  if (open_timeout < duration::zero())
    return bad("circuit.open_timeout",
               fmt::format("must not be negative (got {} ms)", ms_count(open_timeout)));
  return std::nullopt;
}

circuit_breaker::circuit_breaker(circuit_breaker_config cfg, clock_fn clock, observer_fn observer)
  : cfg_(clamp(std::move(cfg))), clock_(std::move(clock)), observer_(std::move(observer)) {
  if (!clock_)
    clock_ = [] { return std::chrono::steady_clock::now(); };
}

bool circuit_breaker::counts(const error& e) const {
  return cfg_.counts ? cfg_.counts(e) : circuit_counts_failure(e);
}

void circuit_breaker::change(circuit_state to, std::string reason, time_point now) {
  const auto from = state_;
  state_ = to;
  ++epoch_;  // outstanding permits are now stale
  failures_.clear();
  probes_.clear();
  probe_successes_ = 0;
  if (to == circuit_state::open)
    opened_at_ = now;
  if (observer_)
    observer_(circuit_transition{from, to, std::move(reason), now});
}

std::optional<circuit_breaker::time_point> circuit_breaker::half_open_at() const {
  if (state_ != circuit_state::open)
    return std::nullopt;
  return opened_at_ + cfg_.open_timeout;
}

void circuit_breaker::update() {
  if (state_ != circuit_state::open)
    return;
  const auto now = clock_();
  if (now >= opened_at_ + cfg_.open_timeout)
    change(circuit_state::half_open,
           fmt::format("open_timeout of {} ms passed", ms_count(cfg_.open_timeout)), now);
}

error circuit_breaker::rejection(time_point now) const {
  nlohmann::json ctx = {{"circuit", cfg_.name}, {"state", to_string(state_)}};
  if (last_failure_)
    ctx["last_failure"] = last_failure_->describe();
  std::string msg;
  if (state_ == circuit_state::open) {
    const auto at = opened_at_ + cfg_.open_timeout;
    const auto after = at > now ? ms_count(at - now) : 0;
    ctx["retry_after_ms"] = after;
    msg = fmt::format("circuit '{}' is open; it half-opens in {} ms", cfg_.name, after);
    if (last_failure_)
      msg += fmt::format(" (last failure: {})", last_failure_->describe());
  } else {
    ctx["probes_in_flight"] = probes_.size();
    msg = fmt::format("circuit '{}' is half-open and all {} probe(s) are in flight", cfg_.name,
                      probes_.size());
  }
  return make_error(error_category::resource_error, "circuit_open", std::move(msg),
                    std::move(ctx));
}

circuit_admission circuit_breaker::allow() {
  update();
  const auto now = clock_();
  circuit_admission a;
  switch (state_) {
    case circuit_state::closed:
      a.permit = circuit_permit{epoch_, next_permit_++, false};
      break;
    case circuit_state::half_open:
      if (probes_.size() < cfg_.half_open_max_probes) {
        a.permit = circuit_permit{epoch_, next_permit_++, true};
        probes_.insert(a.permit->id);
      } else {
        a.rejection = rejection(now);
      }
      break;
    case circuit_state::open:
      a.rejection = rejection(now);
      break;
  }
  return a;
}

void circuit_breaker::record_success(const circuit_permit& p) {
  if (p.epoch != epoch_)
    return;
  if (state_ == circuit_state::closed) {
    failures_.clear();
    return;
  }
  if (state_ != circuit_state::half_open || probes_.erase(p.id) == 0)
    return;
  if (++probe_successes_ >= cfg_.success_threshold)
    change(circuit_state::closed,
           fmt::format("{} probe(s) succeeded in half_open", probe_successes_), clock_());
}

void circuit_breaker::record_failure(const circuit_permit& p, const error& e) {
  if (!counts(e)) {
    record_success(p);
    return;
  }
  if (p.epoch != epoch_)
    return;
  const auto now = clock_();
  if (state_ == circuit_state::closed) {
    failures_.push_back(now);
    if (cfg_.failure_window > circuit_breaker_config::duration::zero())
      while (!failures_.empty() && now - failures_.front() > cfg_.failure_window)
        failures_.pop_front();
    if (failures_.size() >= cfg_.failure_threshold) {
      const auto n = failures_.size();
      last_failure_ = e;
      change(circuit_state::open,
             fmt::format("{} consecutive failures (last: {})", n, e.describe()), now);
    }
    return;
  }
  if (state_ != circuit_state::half_open || probes_.erase(p.id) == 0)
    return;
  last_failure_ = e;
  change(circuit_state::open, fmt::format("probe failed in half_open: {}", e.describe()), now);
}

void circuit_breaker::release(const circuit_permit& p) {
  if (p.epoch == epoch_ && state_ == circuit_state::half_open)
    probes_.erase(p.id);
}

void circuit_breaker::reset(std::string reason) {
  if (state_ == circuit_state::closed) {
    failures_.clear();
    return;
  }
  change(circuit_state::closed, std::move(reason), clock_());
}

} // namespace dspex
