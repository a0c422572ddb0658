// Layer 1: the pure failure-handling policies (no actors, no Python, no
// sleeps): backoff strategies, retry decisions, the circuit breaker driven by
// a fake clock, and the worker lifecycle transition table.
#include <doctest/doctest.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <set>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "dspex/backoff.hpp"
#include "dspex/circuit_breaker.hpp"
#include "dspex/error.hpp"
#include "dspex/worker_lifecycle.hpp"

using namespace std::chrono_literals;
using dspex::error_category;
using dspex::make_error;
using ms = std::chrono::milliseconds;
using time_point = std::chrono::steady_clock::time_point;

namespace {

/// A point far from the clock's epoch, so "earlier" times stay representable.
const time_point t0 = time_point{} + 24h;

std::vector<long long> delays(dspex::backoff& b, std::size_t n) {
  std::vector<long long> out;
  for (std::size_t i = 1; i <= n; ++i)
    out.push_back(b.delay(i).count());
  return out;
}

dspex::backoff_config cfg(dspex::backoff_kind kind, ms base, ms max_delay, double jitter = 0.0) {
  dspex::backoff_config c;
  c.kind = kind;
  c.base = base;
  c.max_delay = max_delay;
  c.jitter = jitter;
  return c;
}

dspex::error err(error_category c, const char* type) {
  return make_error(c, type, std::string("test ") + type);
}

} // namespace

// ===========================================================================
// Backoff strategies
// ===========================================================================

TEST_CASE("exponential: base * 2^(n-1), capped at max_delay") {
  dspex::backoff b(cfg(dspex::backoff_kind::exponential, 100ms, 5000ms));
  CHECK(delays(b, 9) == std::vector<long long>{100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000});
  CHECK(b.delay(0).count() == 100);  // retry 0 is treated as the first
  CHECK(b.delay(63).count() == 5000);
  CHECK(b.delay(std::numeric_limits<std::size_t>::max()).count() == 5000);  // no overflow, no long loop
}

TEST_CASE("exponential: the crash-loop guard's 200 ms doubling to 5 s, and other factors") {
  dspex::backoff guard(cfg(dspex::backoff_kind::exponential, 200ms, 5000ms));
  CHECK(delays(guard, 7) == std::vector<long long>{200, 400, 800, 1600, 3200, 5000, 5000});

  auto c3 = cfg(dspex::backoff_kind::exponential, 100ms, 5000ms);
  c3.factor = 3;
  dspex::backoff triple(c3);
  CHECK(delays(triple, 6) == std::vector<long long>{100, 300, 900, 2700, 5000, 5000});

  auto c1 = cfg(dspex::backoff_kind::exponential, 250ms, 5000ms);
  c1.factor = 1;
  dspex::backoff constant(c1);
  CHECK(delays(constant, 4) == std::vector<long long>{250, 250, 250, 250});
  CHECK(constant.delay(std::numeric_limits<std::size_t>::max()).count() == 250);

  dspex::backoff huge_cap(cfg(dspex::backoff_kind::exponential, 1ms, ms::max()));
  CHECK(huge_cap.delay(10).count() == 512);
  CHECK(huge_cap.delay(200).count() == ms::max().count());  // saturates instead of overflowing
}

TEST_CASE("linear: base * n, capped at max_delay") {
  dspex::backoff b(cfg(dspex::backoff_kind::linear, 100ms, 450ms));
  CHECK(delays(b, 6) == std::vector<long long>{100, 200, 300, 400, 450, 450});
  CHECK(b.delay(std::numeric_limits<std::size_t>::max()).count() == 450);
}

TEST_CASE("fibonacci: base * fib(n) with fib(1) = fib(2) = 1, capped at max_delay") {
  dspex::backoff b(cfg(dspex::backoff_kind::fibonacci, 100ms, 1000ms));
  CHECK(delays(b, 9) == std::vector<long long>{100, 100, 200, 300, 500, 800, 1000, 1000, 1000});
  CHECK(b.delay(std::numeric_limits<std::size_t>::max()).count() == 1000);

  dspex::backoff uncapped(cfg(dspex::backoff_kind::fibonacci, 1ms, ms::max()));
  CHECK(uncapped.delay(10).count() == 55);
  CHECK(uncapped.delay(100000).count() == ms::max().count());  // fib saturates

  dspex::backoff zero(cfg(dspex::backoff_kind::fibonacci, 0ms, 1000ms));
  CHECK(delays(zero, 3) == std::vector<long long>{0, 0, 0});
}

TEST_CASE("decorrelated jitter: min(cap, random_between(base, prev * 3)), deterministic per seed") {
  const auto c = cfg(dspex::backoff_kind::decorrelated_jitter, 100ms, 2000ms);
  dspex::backoff b(c, 42);
  long long prev = 100;
  bool hit_cap = false;
  std::vector<long long> seq;
  for (std::size_t i = 1; i <= 60; ++i) {
    auto d = b.delay(i).count();
    CAPTURE(i);
    CHECK(d >= 100);
    CHECK(d <= std::min<long long>(2000, prev * 3));
    hit_cap = hit_cap || d == 2000;
    prev = d;
    seq.push_back(d);
  }
  CHECK(hit_cap);  // the walk reaches max_delay and is held there
  CHECK(std::set<long long>(seq.begin(), seq.end()).size() > 5);  // it is random

  dspex::backoff same(c, 42);
  CHECK(delays(same, 60) == seq);
  dspex::backoff other(c, 43);
  CHECK(delays(other, 60) != seq);

  // retry 1 restarts the walk at base: the first delay is in [base, 3 * base].
  auto first = b.delay(1).count();
  CHECK(first >= 100);
  CHECK(first <= 300);

  // reset(seed) replays the same sequence.
  b.reset(42);
  CHECK(delays(b, 60) == seq);

  // The jitter fraction does not apply (it is random by construction).
  auto cj = c;
  cj.jitter = 1.0;
  dspex::backoff with_jitter(cj, 42);
  CHECK(delays(with_jitter, 60) == seq);
}

TEST_CASE("jitter: each delay lies in [d * (1 - jitter), d], deterministic per seed, max_delay holds") {
  using k = dspex::backoff_kind;
  const std::vector<std::pair<k, std::vector<long long>>> nominal = {
    {k::exponential, {100, 200, 400, 800, 1000, 1000}},
    {k::linear, {100, 200, 300, 400, 500, 600}},
    {k::fibonacci, {100, 100, 200, 300, 500, 800}},
  };
  for (double jitter : {0.25, 0.5, 1.0}) {
    for (const auto& [kind, exact] : nominal) {
      CAPTURE(jitter);
      CAPTURE(dspex::to_string(kind));
      std::set<long long> seen;
      for (std::uint64_t seed = 1; seed <= 50; ++seed) {
        dspex::backoff b(cfg(kind, 100ms, 1000ms, jitter), seed);
        auto got = delays(b, exact.size());
        for (std::size_t i = 0; i < exact.size(); ++i) {
          CHECK(got[i] <= exact[i]);
          CHECK(got[i] <= 1000);
          CHECK(static_cast<double>(got[i]) >= static_cast<double>(exact[i]) * (1.0 - jitter));
        }
        seen.insert(got[3]);
        dspex::backoff again(cfg(kind, 100ms, 1000ms, jitter), seed);
        CHECK(delays(again, exact.size()) == got);
      }
      CHECK(seen.size() > 10);  // the jitter actually varies between seeds
    }
  }
}

TEST_CASE("backoff config: validate names the field, the backoff clamps bad values") {
  using k = dspex::backoff_kind;
  CHECK_FALSE(dspex::backoff_config{}.validate());

  auto check_bad = [](dspex::backoff_config c, const char* key) {
    auto e = c.validate();
    REQUIRE(e);
    CHECK(e->category == error_category::configuration_error);
    CHECK(e->type == "invalid_setting");
    CHECK(e->context.at("key") == key);
  };
  check_bad(cfg(k::exponential, -1ms, 100ms), "backoff.base");
  check_bad(cfg(k::decorrelated_jitter, 0ms, 100ms), "backoff.base");
  check_bad(cfg(k::linear, 200ms, 100ms), "backoff.max_delay");
  check_bad(cfg(k::linear, 100ms, 200ms, 1.5), "backoff.jitter");
  check_bad(cfg(k::linear, 100ms, 200ms, -0.1), "backoff.jitter");
  check_bad(cfg(k::linear, 100ms, 200ms, std::nan("")), "backoff.jitter");
  auto zero_factor = cfg(k::exponential, 100ms, 200ms);
  zero_factor.factor = 0;
  check_bad(zero_factor, "backoff.factor");

  // Clamped instead of trusted: max_delay below base becomes base.
  dspex::backoff clamped(cfg(k::exponential, 300ms, 100ms));
  CHECK(delays(clamped, 3) == std::vector<long long>{300, 300, 300});
  dspex::backoff nan_jitter(cfg(k::linear, 100ms, 1000ms, std::nan("")));
  CHECK(delays(nan_jitter, 3) == std::vector<long long>{100, 200, 300});
}

TEST_CASE("backoff kinds have stable names") {
  for (auto kind : {dspex::backoff_kind::exponential, dspex::backoff_kind::linear,
                    dspex::backoff_kind::fibonacci, dspex::backoff_kind::decorrelated_jitter}) {
    auto back = dspex::backoff_kind_from_string(dspex::to_string(kind));
    REQUIRE(back);
    CHECK(*back == kind);
  }
  CHECK(std::string(dspex::to_string(dspex::backoff_kind::decorrelated_jitter)) == "decorrelated_jitter");
  CHECK_FALSE(dspex::backoff_kind_from_string("quadratic"));
}

// ===========================================================================
// Retry policy
// ===========================================================================

namespace {

dspex::retry_settings exact_settings(std::size_t max_attempts = 4) {
  dspex::retry_settings s;
  s.max_attempts = max_attempts;
  s.backoff = cfg(dspex::backoff_kind::exponential, 100ms, 1000ms);
  return s;
}

} // namespace

TEST_CASE("retry: a failure before the request reached a worker is retried for any command") {
  dspex::retry_policy p(exact_settings(4));
  const auto e = err(error_category::communication_error, "send_failed");
  const auto deadline = t0 + 60s;
  auto d1 = p.decide(e, 1, t0, deadline, false);
  CHECK(d1.retry);
  CHECK(d1.delay == 100ms);
  CHECK(d1.why == dspex::retry_reason::retry_safe);
  CHECK(d1.reason.find("communication_error/send_failed") != std::string::npos);
  auto d2 = p.decide(e, 2, t0, deadline, false);
  CHECK(d2.retry);
  CHECK(d2.delay == 200ms);
  auto d3 = p.decide(e, 3, t0, deadline, false);
  CHECK(d3.retry);
  CHECK(d3.delay == 400ms);
  auto d4 = p.decide(e, 4, t0, deadline, false);
  CHECK_FALSE(d4.retry);
  CHECK(d4.delay == 0ms);
  CHECK(d4.why == dspex::retry_reason::attempts_exhausted);

  for (const char* type : {"worker_not_ready", "worker_busy"}) {
    CAPTURE(type);
    dspex::retry_policy q(exact_settings());
    auto d = q.decide(err(error_category::resource_error, type), 1, t0, deadline, false);
    CHECK(d.retry);
    CHECK(d.why == dspex::retry_reason::retry_safe);
  }
  dspex::retry_policy q(exact_settings());
  CHECK(q.decide(err(error_category::connection_error, "service_unavailable"), 1, t0, deadline, false)
          .retry);
}

TEST_CASE("retry: worker deaths are retried only for idempotent commands") {
  const std::vector<std::pair<error_category, const char*>> deaths = {
    {error_category::communication_error, "worker_exited"},
    // The request was written before the worker was told to stop.
    {error_category::resource_error, "worker_stopping"},
    {error_category::communication_error, "protocol_violation"},
    {error_category::communication_error, "garbled"},
    {error_category::timeout_error, "request_timeout"},
    {error_category::system_error, "worker_exited"},
  };
  for (const auto& [cat, type] : deaths) {
    CAPTURE(type);
    dspex::retry_policy p(exact_settings());
    const auto e = err(cat, type);
    CHECK(p.classify(e) == dspex::retry_class::idempotent_only);
    auto no = p.decide(e, 1, t0, t0 + 60s, false);
    CHECK_FALSE(no.retry);
    CHECK(no.why == dspex::retry_reason::not_idempotent);
    auto yes = p.decide(e, 1, t0, t0 + 60s, true);
    CHECK(yes.retry);
    CHECK(yes.delay == 100ms);
    CHECK(yes.why == dspex::retry_reason::retry_idempotent);
  }
}

TEST_CASE("retry: python_error, passed deadlines, fail-fast answers and unknown errors are never retried") {
  const std::vector<std::pair<error_category, const char*>> never = {
    {error_category::python_error, "command_failed"},
    {error_category::python_error, "anything"},
    {error_category::timeout_error, "checkout_timeout"},
    {error_category::resource_error, "checkout_timeout"},
    {error_category::timeout_error, "caller_timeout"},
    {error_category::resource_error, "circuit_open"},
    {error_category::resource_error, "pool_unavailable"},
    {error_category::resource_error, "pool_saturated"},
    {error_category::resource_error, "pool_stopping"},
    {error_category::communication_error, "lease_revoked"},
    {error_category::communication_error, "caller_lost"},
    {error_category::session_error, "not_found"},
    {error_category::system_error, "actor_error"},
    {error_category::initialization_error, "spawn_failed"},
  };
  for (const auto& [cat, type] : never) {
    CAPTURE(type);
    dspex::retry_policy p(exact_settings());
    const auto e = err(cat, type);
    CHECK(p.classify(e) == dspex::retry_class::never);
    for (bool idempotent : {false, true}) {
      auto d = p.decide(e, 1, t0, t0 + 60s, idempotent);
      CHECK_FALSE(d.retry);
      CHECK(d.why == dspex::retry_reason::not_retryable);
    }
  }
}

TEST_CASE("retry: the caller's deadline bounds every retry") {
  const auto e = err(error_category::communication_error, "send_failed");
  dspex::retry_policy p(exact_settings());
  // The delay would end exactly at the deadline: no time left for the attempt.
  auto at = p.decide(e, 1, t0, t0 + 100ms, true);
  CHECK_FALSE(at.retry);
  CHECK(at.why == dspex::retry_reason::deadline);
  CHECK(at.reason.find("deadline") != std::string::npos);
  // One millisecond more and it may go.
  CHECK(p.decide(e, 1, t0, t0 + 101ms, true).retry);
  // Already past.
  auto past = p.decide(e, 1, t0, t0 - 1ms, true);
  CHECK_FALSE(past.retry);
  CHECK(past.why == dspex::retry_reason::deadline);
  // Sub-millisecond remainders round down (err on the side of not retrying).
  dspex::retry_policy zero_delay([] {
    auto s = exact_settings();
    s.backoff.base = 0ms;
    return s;
  }());
  CHECK_FALSE(zero_delay.decide(e, 1, t0, t0 + 999us, true).retry);
  CHECK(zero_delay.decide(e, 1, t0, t0 + 1ms, true).retry);

  // min_attempt_budget: the attempt must also have this much time.
  auto s = exact_settings();
  s.min_attempt_budget = 50ms;
  dspex::retry_policy budget(s);
  CHECK_FALSE(budget.decide(e, 1, t0, t0 + 150ms, true).retry);
  CHECK(budget.decide(e, 1, t0, t0 + 151ms, true).retry);
}

TEST_CASE("retry: a simulated call loop stops at the deadline, not after it") {
  // Every attempt takes 100 ms and fails before reaching a worker; the
  // caller allows 1 s in all. Attempts start at 0, 200 (after 100 + 100)
  // and 500 (after 300 + 200); after the third fails at 600 a 400 ms delay
  // would reach the deadline exactly, so the loop ends there.
  dspex::retry_policy p(exact_settings(10));
  const auto e = err(error_category::communication_error, "send_failed");
  const auto deadline = t0 + 1000ms;
  auto now = t0;
  std::vector<long long> starts;
  dspex::retry_decision last;
  for (std::size_t attempt = 1;; ++attempt) {
    starts.push_back(std::chrono::duration_cast<ms>(now - t0).count());
    now += 100ms;  // the attempt runs and fails
    last = p.decide(e, attempt, now, deadline, false);
    if (!last.retry)
      break;
    now += last.delay;
    REQUIRE(now < deadline);
  }
  CHECK(starts == std::vector<long long>{0, 200, 500});
  CHECK(last.why == dspex::retry_reason::deadline);
  CHECK(now <= deadline);
}

TEST_CASE("retry: max_attempts counts the first attempt") {
  const auto e = err(error_category::communication_error, "send_failed");
  dspex::retry_policy once(exact_settings(1));
  auto d = once.decide(e, 1, t0, t0 + 60s, true);
  CHECK_FALSE(d.retry);
  CHECK(d.why == dspex::retry_reason::attempts_exhausted);

  dspex::retry_policy twice(exact_settings(2));
  CHECK(twice.decide(e, 1, t0, t0 + 60s, true).retry);
  CHECK_FALSE(twice.decide(e, 2, t0, t0 + 60s, true).retry);

  auto zero = exact_settings(0);
  CHECK(zero.validate());
  dspex::retry_policy clamped(zero);  // clamped to 1: never retries
  CHECK(clamped.settings().max_attempts == 1);
  CHECK_FALSE(clamped.decide(e, 1, t0, t0 + 60s, true).retry);
}

TEST_CASE("retry: with jitter, decisions are deterministic per seed and within bounds") {
  auto s = exact_settings(6);
  s.backoff.jitter = 0.5;
  const auto e = err(error_category::timeout_error, "request_timeout");
  dspex::retry_policy a(s, 7), b(s, 7);
  const std::vector<long long> nominal = {100, 200, 400, 800, 1000};
  for (std::size_t attempt = 1; attempt <= nominal.size(); ++attempt) {
    auto da = a.decide(e, attempt, t0, t0 + 60s, true);
    auto db = b.decide(e, attempt, t0, t0 + 60s, true);
    REQUIRE(da.retry);
    CHECK(da.delay == db.delay);
    CHECK(da.delay.count() <= nominal[attempt - 1]);
    CHECK(da.delay.count() >= nominal[attempt - 1] / 2);
  }
}

TEST_CASE("retry: idempotency defaults and the caller's word") {
  for (const char* cmd : {"ping", "list_programs", "get_stats", "get_program_info"}) {
    CAPTURE(cmd);
    CHECK(dspex::idempotent_by_default(cmd));
    CHECK(dspex::resolve_idempotent(cmd, std::nullopt));
    CHECK_FALSE(dspex::resolve_idempotent(cmd, false));  // the caller wins
  }
  for (const char* cmd : {"execute_program", "create_program", "delete_program", "configure_lm", "", "PING"}) {
    CAPTURE(cmd);
    CHECK_FALSE(dspex::idempotent_by_default(cmd));
    CHECK_FALSE(dspex::resolve_idempotent(cmd, std::nullopt));
    CHECK(dspex::resolve_idempotent(cmd, true));
  }
}

TEST_CASE("retry: custom rules replace the default table, first match wins") {
  auto s = exact_settings();
  s.rules = {
    {error_category::resource_error, "pool_saturated", dspex::retry_class::safe},
    {error_category::resource_error, "", dspex::retry_class::idempotent_only},
  };
  dspex::retry_policy p(s);
  CHECK(p.classify(err(error_category::resource_error, "pool_saturated")) == dspex::retry_class::safe);
  CHECK(p.classify(err(error_category::resource_error, "full")) == dspex::retry_class::idempotent_only);
  // Not listed any more: never.
  CHECK(p.classify(err(error_category::communication_error, "send_failed")) == dspex::retry_class::never);
}

TEST_CASE("retry settings: validate") {
  CHECK_FALSE(dspex::retry_settings{}.validate());
  auto s = exact_settings();
  s.min_attempt_budget = -1ms;
  REQUIRE(s.validate());
  CHECK(s.validate()->context.at("key") == "retry.min_attempt_budget");
  auto b = exact_settings();
  b.backoff.jitter = 2.0;
  REQUIRE(b.validate());
  CHECK(b.validate()->context.at("key") == "backoff.jitter");
  CHECK(std::string(dspex::to_string(dspex::retry_reason::deadline)) == "deadline");
  CHECK(std::string(dspex::to_string(dspex::retry_class::idempotent_only)) == "idempotent_only");
}

// ===========================================================================
// Circuit breaker
// ===========================================================================

namespace {

struct fake_clock {
  time_point now = t0;
};

struct breaker_fixture {
  std::shared_ptr<fake_clock> clock = std::make_shared<fake_clock>();
  std::vector<dspex::circuit_transition> events;
  dspex::circuit_breaker breaker;

  explicit breaker_fixture(dspex::circuit_breaker_config c = config())
    : breaker(std::move(c), [clk = clock] { return clk->now; },
              [this](const dspex::circuit_transition& t) { events.push_back(t); }) {}

  static dspex::circuit_breaker_config config() {
    dspex::circuit_breaker_config c;
    c.name = "pool-a";
    c.failure_threshold = 3;
    c.failure_window = 10s;
    c.open_timeout = 5s;
    c.half_open_max_probes = 2;
    c.success_threshold = 2;
    return c;
  }

  void advance(std::chrono::steady_clock::duration d) { clock->now += d; }

  dspex::circuit_permit permit() {
    auto a = breaker.allow();
    REQUIRE(a);
    REQUIRE(a.permit);
    CHECK_FALSE(a.rejection);
    return *a.permit;
  }

  void fail(const char* type = "worker_exited") {
    breaker.record_failure(permit(), err(error_category::communication_error, type));
  }

  void open_it() {
    fail();
    fail();
    fail();
    REQUIRE(breaker.state() == dspex::circuit_state::open);
  }

  std::vector<std::pair<dspex::circuit_state, dspex::circuit_state>> moves() const {
    std::vector<std::pair<dspex::circuit_state, dspex::circuit_state>> out;
    for (const auto& e : events)
      out.emplace_back(e.from, e.to);
    return out;
  }
};

using cs = dspex::circuit_state;

} // namespace

TEST_CASE("breaker: closed admits every call, N consecutive failures open it") {
  breaker_fixture f;
  CHECK(f.breaker.state() == cs::closed);
  auto p1 = f.permit();
  auto p2 = f.permit();
  CHECK(p1.id != p2.id);
  CHECK_FALSE(p1.probe);

  f.fail();
  f.fail();
  CHECK(f.breaker.consecutive_failures() == 2);
  f.breaker.record_success(f.permit());  // a success ends the run
  CHECK(f.breaker.consecutive_failures() == 0);
  f.fail();
  f.fail();
  CHECK(f.breaker.state() == cs::closed);
  CHECK(f.events.empty());
  f.fail("protocol_violation");
  CHECK(f.breaker.state() == cs::open);
  REQUIRE(f.events.size() == 1);
  CHECK(f.events[0].from == cs::closed);
  CHECK(f.events[0].to == cs::open);
  CHECK(f.events[0].at == f.clock->now);
  CHECK(f.events[0].reason.find("3 consecutive failures") != std::string::npos);
  CHECK(f.events[0].reason.find("communication_error/protocol_violation") != std::string::npos);
  REQUIRE(f.breaker.last_failure());
  CHECK(f.breaker.last_failure()->type == "protocol_violation");
}

TEST_CASE("breaker: open rejects with resource_error/circuit_open naming when it half-opens") {
  breaker_fixture f;
  f.open_it();
  const auto opened = f.clock->now;
  REQUIRE(f.breaker.half_open_at());
  CHECK(*f.breaker.half_open_at() == opened + 5s);

  auto a = f.breaker.allow();
  CHECK_FALSE(a);
  CHECK_FALSE(a.permit);
  REQUIRE(a.rejection);
  CHECK(a.rejection->category == error_category::resource_error);
  CHECK(a.rejection->type == "circuit_open");
  CHECK(a.rejection->context.at("circuit") == "pool-a");
  CHECK(a.rejection->context.at("state") == "open");
  CHECK(a.rejection->context.at("retry_after_ms") == 5000);
  CHECK(a.rejection->context.at("last_failure").get<std::string>().find("worker_exited")
        != std::string::npos);

  f.advance(3s);
  auto later = f.breaker.allow();
  REQUIRE(later.rejection);
  CHECK(later.rejection->context.at("retry_after_ms") == 2000);
  CHECK(later.rejection->message.find("half-opens in 2000 ms") != std::string::npos);

  f.advance(1999ms);
  f.breaker.update();
  CHECK(f.breaker.state() == cs::open);
  CHECK_FALSE(f.breaker.allow());
  CHECK(f.events.size() == 1);
}

TEST_CASE("breaker: update() half-opens on time without a call") {
  breaker_fixture f;
  f.open_it();
  f.advance(5s);
  CHECK(f.breaker.state() == cs::open);  // recorded state until something looks
  f.breaker.update();
  CHECK(f.breaker.state() == cs::half_open);
  CHECK_FALSE(f.breaker.half_open_at());
  REQUIRE(f.events.size() == 2);
  CHECK(f.events[1].from == cs::open);
  CHECK(f.events[1].to == cs::half_open);
  CHECK(f.events[1].at == t0 + 5s);
  CHECK(f.events[1].reason.find("open_timeout") != std::string::npos);
  f.breaker.update();  // idempotent
  CHECK(f.events.size() == 2);
}

TEST_CASE("breaker: half-open admits at most K probes, M successes close it") {
  breaker_fixture f;
  f.open_it();
  f.advance(5s);
  auto p1 = f.permit();  // allow() itself half-opens
  CHECK(f.breaker.state() == cs::half_open);
  CHECK(p1.probe);
  auto p2 = f.permit();
  CHECK(f.breaker.probes_in_flight() == 2);

  auto third = f.breaker.allow();
  CHECK_FALSE(third);
  REQUIRE(third.rejection);
  CHECK(third.rejection->type == "circuit_open");
  CHECK(third.rejection->context.at("state") == "half_open");
  CHECK(third.rejection->context.at("probes_in_flight") == 2);

  f.breaker.release(p2);  // a cancelled probe frees its slot, counts nothing
  CHECK(f.breaker.probes_in_flight() == 1);
  CHECK(f.breaker.probe_successes() == 0);
  auto p3 = f.permit();

  f.breaker.record_success(p1);
  CHECK(f.breaker.state() == cs::half_open);
  CHECK(f.breaker.probe_successes() == 1);
  f.breaker.record_success(p1);  // reported twice: counted once
  CHECK(f.breaker.probe_successes() == 1);
  f.breaker.record_success(p3);
  CHECK(f.breaker.state() == cs::closed);
  CHECK(f.moves() == std::vector<std::pair<cs, cs>>{{cs::closed, cs::open},
                                                     {cs::open, cs::half_open},
                                                     {cs::half_open, cs::closed}});
  CHECK(f.events.back().reason.find("2 probe(s) succeeded") != std::string::npos);
  CHECK_FALSE(f.permit().probe);
  CHECK(f.breaker.consecutive_failures() == 0);
}

TEST_CASE("breaker: any counted half-open failure reopens it for a full open_timeout") {
  breaker_fixture f;
  f.open_it();
  f.advance(6s);
  auto p1 = f.permit();
  auto p2 = f.permit();
  f.breaker.record_success(p1);
  f.advance(250ms);
  f.breaker.record_failure(p2, err(error_category::timeout_error, "request_timeout"));
  CHECK(f.breaker.state() == cs::open);
  REQUIRE(f.events.size() == 3);
  CHECK(f.events[2].from == cs::half_open);
  CHECK(f.events[2].to == cs::open);
  CHECK(f.events[2].at == t0 + 6250ms);
  CHECK(f.events[2].reason.find("timeout_error/request_timeout") != std::string::npos);
  REQUIRE(f.breaker.half_open_at());
  CHECK(*f.breaker.half_open_at() == t0 + 6250ms + 5s);
  auto a = f.breaker.allow();
  REQUIRE(a.rejection);
  CHECK(a.rejection->context.at("retry_after_ms") == 5000);
  CHECK(f.breaker.last_failure()->type == "request_timeout");
}

TEST_CASE("breaker: results of permits from an earlier state are ignored") {
  breaker_fixture f;
  auto slow_ok = f.permit();    // issued while closed, finishes after the circuit opened
  auto slow_bad = f.permit();
  f.open_it();
  f.breaker.record_success(slow_ok);
  CHECK(f.breaker.state() == cs::open);
  f.advance(5s);
  auto probe = f.permit();
  CHECK(f.breaker.state() == cs::half_open);
  f.breaker.record_failure(slow_bad, err(error_category::communication_error, "worker_exited"));
  CHECK(f.breaker.state() == cs::half_open);  // a stale failure does not reopen
  f.breaker.release(slow_bad);
  CHECK(f.breaker.probes_in_flight() == 1);
  f.breaker.record_success(probe);
  f.breaker.record_success(f.permit());
  CHECK(f.breaker.state() == cs::closed);
  f.breaker.record_success(probe);  // a probe reported after close: ignored
  CHECK(f.breaker.state() == cs::closed);
  CHECK(f.events.size() == 3);

  // Closed again, but in a new epoch: failures of permits from the first
  // closed epoch neither count nor end a run.
  auto fresh = f.permit();
  for (int i = 0; i < 3; ++i)
    f.breaker.record_failure(slow_bad, err(error_category::communication_error, "worker_exited"));
  CHECK(f.breaker.consecutive_failures() == 0);
  f.breaker.record_failure(fresh, err(error_category::communication_error, "worker_exited"));
  CHECK(f.breaker.consecutive_failures() == 1);
  f.breaker.record_success(slow_ok);
  CHECK(f.breaker.consecutive_failures() == 1);
  CHECK(f.breaker.state() == cs::closed);
}

TEST_CASE("breaker: failures older than failure_window drop out of the run") {
  breaker_fixture f;
  f.fail();           // t = 0
  f.advance(6s);
  f.fail();           // t = 6
  f.advance(6s);
  f.fail();           // t = 12: the one at 0 is 12 s old, out of the 10 s window
  CHECK(f.breaker.state() == cs::closed);
  CHECK(f.breaker.consecutive_failures() == 2);
  f.advance(1s);
  f.fail();           // t = 13: 6, 12, 13 are within 10 s
  CHECK(f.breaker.state() == cs::open);

  auto c = breaker_fixture::config();
  c.failure_window = std::chrono::steady_clock::duration::zero();  // pure consecutive count
  breaker_fixture g(c);
  g.fail();
  g.advance(1h);
  g.fail();
  g.advance(1h);
  g.fail();
  CHECK(g.breaker.state() == cs::open);
}

TEST_CASE("breaker: errors that say nothing about the pool count as successes") {
  CHECK_FALSE(dspex::circuit_counts_failure(err(error_category::python_error, "command_failed")));
  CHECK_FALSE(dspex::circuit_counts_failure(err(error_category::session_error, "expired")));
  CHECK_FALSE(dspex::circuit_counts_failure(err(error_category::configuration_error, "invalid_setting")));
  CHECK_FALSE(dspex::circuit_counts_failure(err(error_category::communication_error, "caller_lost")));
  CHECK_FALSE(dspex::circuit_counts_failure(err(error_category::resource_error, "circuit_open")));
  CHECK(dspex::circuit_counts_failure(err(error_category::resource_error, "pool_saturated")));
  CHECK(dspex::circuit_counts_failure(err(error_category::timeout_error, "checkout_timeout")));
  CHECK(dspex::circuit_counts_failure(err(error_category::communication_error, "worker_exited")));
  CHECK(dspex::circuit_counts_failure(err(error_category::initialization_error, "spawn_failed")));

  breaker_fixture f;
  f.fail();
  f.fail();
  f.breaker.record_failure(f.permit(), err(error_category::python_error, "command_failed"));
  CHECK(f.breaker.consecutive_failures() == 0);
  f.fail();
  f.fail();
  CHECK(f.breaker.state() == cs::closed);
  f.fail();
  f.advance(5s);
  auto p1 = f.permit();
  auto p2 = f.permit();
  f.breaker.record_failure(p1, err(error_category::python_error, "command_failed"));
  CHECK(f.breaker.state() == cs::half_open);  // the worker answered: a probe success
  f.breaker.record_failure(p2, err(error_category::session_error, "expired"));
  CHECK(f.breaker.state() == cs::closed);
}

TEST_CASE("breaker: a custom counting rule") {
  auto c = breaker_fixture::config();
  c.failure_threshold = 1;
  c.counts = [](const dspex::error& e) { return e.type == "fatal"; };
  breaker_fixture f(c);
  f.fail("worker_exited");
  CHECK(f.breaker.state() == cs::closed);
  f.fail("fatal");
  CHECK(f.breaker.state() == cs::open);
}

TEST_CASE("breaker: observer sees a full cycle in order, with the fake clock's times") {
  breaker_fixture f;
  f.open_it();                                   // closed -> open at 0
  f.advance(5s);
  auto probe = f.permit();                       // open -> half_open at 5
  f.advance(1s);
  f.breaker.record_failure(probe, err(error_category::communication_error, "send_failed"));  // -> open at 6
  f.advance(5s);
  f.breaker.update();                            // -> half_open at 11
  auto a = f.permit();
  auto b = f.permit();
  f.advance(1s);
  f.breaker.record_success(a);
  f.breaker.record_success(b);                   // -> closed at 12
  f.open_it();                                   // -> open at 12
  f.breaker.reset("operator reset");             // -> closed at 12
  f.breaker.reset();                             // already closed: no event

  CHECK(f.moves() == std::vector<std::pair<cs, cs>>{{cs::closed, cs::open},
                                                     {cs::open, cs::half_open},
                                                     {cs::half_open, cs::open},
                                                     {cs::open, cs::half_open},
                                                     {cs::half_open, cs::closed},
                                                     {cs::closed, cs::open},
                                                     {cs::open, cs::closed}});
  const std::vector<time_point> times = {t0, t0 + 5s, t0 + 6s, t0 + 11s, t0 + 12s, t0 + 12s, t0 + 12s};
  REQUIRE(f.events.size() == times.size());
  for (std::size_t i = 0; i < times.size(); ++i) {
    CAPTURE(i);
    CHECK(f.events[i].at == times[i]);
    CHECK_FALSE(f.events[i].reason.empty());
  }
  CHECK(f.events.back().reason == "operator reset");
  CHECK(f.breaker.state() == cs::closed);
  CHECK_FALSE(f.permit().probe);
}

TEST_CASE("breaker: open_timeout 0 half-opens at the next call, no observer is fine") {
  dspex::circuit_breaker_config c;
  c.failure_threshold = 1;
  c.open_timeout = std::chrono::steady_clock::duration::zero();
  auto clock = std::make_shared<fake_clock>();
  dspex::circuit_breaker b(c, [clock] { return clock->now; });
  auto p = b.allow();
  REQUIRE(p);
  b.record_failure(*p.permit, err(error_category::communication_error, "worker_exited"));
  CHECK(b.state() == cs::open);
  auto probe = b.allow();
  REQUIRE(probe);
  CHECK(probe.permit->probe);
  CHECK(b.state() == cs::half_open);
}

TEST_CASE("breaker config: validate names the field, the breaker clamps zeros") {
  CHECK_FALSE(dspex::circuit_breaker_config{}.validate());
  auto check_bad = [](dspex::circuit_breaker_config c, const char* key) {
    auto e = c.validate();
    REQUIRE(e);
    CHECK(e->category == error_category::configuration_error);
    CHECK(e->context.at("key") == key);
  };
  dspex::circuit_breaker_config c;
  c.failure_threshold = 0;
  check_bad(c, "circuit.failure_threshold");
  c = {};
  c.half_open_max_probes = 0;
  check_bad(c, "circuit.half_open_max_probes");
  c = {};
  c.success_threshold = 0;
  check_bad(c, "circuit.success_threshold");
  c = {};
  c.open_timeout = -1s;
  check_bad(c, "circuit.open_timeout");
  c = {};
  c.failure_window = -1s;
  check_bad(c, "circuit.failure_window");

  dspex::circuit_breaker_config zeros;
  zeros.failure_threshold = 0;
  zeros.half_open_max_probes = 0;
  zeros.success_threshold = 0;
  breaker_fixture f(zeros);
  CHECK(f.breaker.config().failure_threshold == 1);
  f.fail();  // one failure opens
  CHECK(f.breaker.state() == cs::open);
  CHECK(std::string(dspex::to_string(cs::half_open)) == "half_open");
}

// ===========================================================================
// Worker lifecycle
// ===========================================================================

namespace {

using ls = dspex::lifecycle_state;

const std::vector<ls> all_states = {ls::initializing, ls::ready,       ls::busy,
                                    ls::degraded,     ls::terminating, ls::terminated};

/// The table of issue 4, written out independently of lifecycle_allows().
const std::set<std::pair<ls, ls>> valid_pairs = {
  {ls::initializing, ls::ready},   {ls::initializing, ls::terminating},
  {ls::ready, ls::busy},           {ls::ready, ls::degraded},
  {ls::ready, ls::terminating},    {ls::busy, ls::ready},
  {ls::busy, ls::degraded},        {ls::busy, ls::terminating},
  {ls::degraded, ls::ready},       {ls::degraded, ls::terminating},
  {ls::terminating, ls::terminated},
};

/// A valid path from initializing to `s`.
std::vector<ls> path_to(ls s) {
  switch (s) {
    case ls::initializing: return {};
    case ls::ready: return {ls::ready};
    case ls::busy: return {ls::ready, ls::busy};
    case ls::degraded: return {ls::ready, ls::degraded};
    case ls::terminating: return {ls::terminating};
    case ls::terminated: return {ls::terminating, ls::terminated};
  }
  return {};
}

dspex::worker_lifecycle in_state(ls s, time_point& now) {
  dspex::worker_lifecycle w("w1", now);
  for (auto step : path_to(s)) {
    now += 10ms;
    auto e = w.transition(step, "setup", now);
    REQUIRE_FALSE(e);
  }
  REQUIRE(w.state() == s);
  return w;
}

} // namespace

static_assert(dspex::lifecycle_allows(ls::initializing, ls::ready));
static_assert(!dspex::lifecycle_allows(ls::degraded, ls::busy));
static_assert(!dspex::lifecycle_allows(ls::terminated, ls::terminating));

TEST_CASE("lifecycle: every one of the 36 (from, to) pairs against the table") {
  std::size_t valid = 0, invalid = 0;
  for (auto from : all_states) {
    for (auto to : all_states) {
      CAPTURE(dspex::to_string(from));
      CAPTURE(dspex::to_string(to));
      auto now = t0;
      auto w = in_state(from, now);
      const auto history_before = w.history().size();
      const auto total_before = w.transitions_total();
      const bool expected = valid_pairs.count({from, to}) == 1;
      CHECK(dspex::lifecycle_allows(from, to) == expected);

      now += 70ms;
      auto e = w.transition(to, "because", now);
      if (expected) {
        ++valid;
        CHECK_FALSE(e);
        CHECK(w.state() == to);
        CHECK(w.entered_at() == now);
        REQUIRE(w.history().size() == history_before + 1);
        const auto& rec = w.history().back();
        CHECK(rec.from == from);
        CHECK(rec.to == to);
        CHECK(rec.reason == "because");
        CHECK(rec.at == now);
        CHECK(rec.time_in_from == 70ms);
        CHECK(w.transitions_total() == total_before + 1);
        CHECK(w.rejected_total() == 0);
      } else {
        ++invalid;
        REQUIRE(e);
        CHECK(e->category == error_category::system_error);
        CHECK(e->type == "invalid_transition");
        CHECK(e->context.at("worker_id") == "w1");
        CHECK(e->context.at("from") == dspex::to_string(from));
        CHECK(e->context.at("to") == dspex::to_string(to));
        CHECK(e->context.at("reason") == "because");
        CHECK(e->message.find("because") != std::string::npos);
        CHECK(w.state() == from);  // nothing changed
        CHECK(w.history().size() == history_before);
        CHECK(w.transitions_total() == total_before);
        CHECK(w.rejected_total() == 1);
      }
    }
  }
  CHECK(valid == 11);
  CHECK(invalid == 25);
}

TEST_CASE("lifecycle: only ready accepts work, only terminated is terminal") {
  for (auto s : all_states) {
    CAPTURE(dspex::to_string(s));
    auto now = t0;
    auto w = in_state(s, now);
    CHECK(w.accepts_work() == (s == ls::ready));
    CHECK(w.terminated() == (s == ls::terminated));
  }
}

TEST_CASE("lifecycle: the history records reasons and the time spent in each state") {
  auto now = t0;
  dspex::worker_lifecycle w("w7", now);
  CHECK(w.state() == ls::initializing);
  CHECK(w.history().empty());
  CHECK(w.worker_id() == "w7");

  const std::vector<std::tuple<ls, const char*, ms>> steps = {
    {ls::ready, "init ping answered", 250ms},
    {ls::busy, "request 1 sent", 50ms},
    {ls::ready, "request 1 answered", 1000ms},
    {ls::degraded, "health check failed", 30000ms},
    {ls::ready, "health check passed", 5000ms},
    {ls::terminating, "max_requests reached", 20ms},
    {ls::terminated, "process reaped", 300ms},
  };
  for (const auto& [to, reason, wait] : steps) {
    now += wait;
    CHECK(w.time_in_state(now) == wait);
    REQUIRE_FALSE(w.transition(to, reason, now));
  }
  REQUIRE(w.history().size() == steps.size());
  ls from = ls::initializing;
  auto at = t0;
  for (std::size_t i = 0; i < steps.size(); ++i) {
    CAPTURE(i);
    const auto& rec = w.history()[i];
    const auto& [to, reason, wait] = steps[i];
    at += wait;
    CHECK(rec.from == from);
    CHECK(rec.to == to);
    CHECK(rec.reason == reason);
    CHECK(rec.time_in_from == wait);
    CHECK(rec.at == at);
    from = to;
  }
  CHECK(w.transitions_total() == 7);
  // Terminal: nothing leaves terminated, and asking is an error, not a crash.
  auto e = w.transition(ls::ready, "late health check", now + 1s);
  REQUIRE(e);
  CHECK(e->type == "invalid_transition");
  CHECK(w.rejected_total() == 1);
}

TEST_CASE("lifecycle: the history is bounded, totals still count every transition") {
  auto now = t0;
  dspex::worker_lifecycle w("w2", now, 4);
  REQUIRE_FALSE(w.transition(ls::ready, "init", now += 1ms));
  for (int i = 0; i < 10; ++i) {
    REQUIRE_FALSE(w.transition(ls::busy, "req " + std::to_string(i), now += 1ms));
    REQUIRE_FALSE(w.transition(ls::ready, "done " + std::to_string(i), now += 2ms));
  }
  CHECK(w.transitions_total() == 21);
  REQUIRE(w.history().size() == 4);
  CHECK(w.history()[0].reason == "req 8");
  CHECK(w.history()[1].reason == "done 8");
  CHECK(w.history()[2].reason == "req 9");
  CHECK(w.history()[3].reason == "done 9");
  CHECK(w.history()[3].time_in_from == 2ms);

  dspex::worker_lifecycle none("w3", t0, 0);
  REQUIRE_FALSE(none.transition(ls::ready, "init", t0 + 1ms));
  CHECK(none.history().empty());
  CHECK(none.transitions_total() == 1);
}

TEST_CASE("lifecycle: a clock that goes backwards counts as zero time, bad enum values are errors") {
  auto now = t0;
  dspex::worker_lifecycle w("w4", now);
  REQUIRE_FALSE(w.transition(ls::ready, "init", now + 100ms));
  REQUIRE_FALSE(w.transition(ls::busy, "req", now + 50ms));  // earlier than the last transition
  CHECK(w.history().back().time_in_from == std::chrono::steady_clock::duration::zero());
  CHECK(w.time_in_state(now) == std::chrono::steady_clock::duration::zero());
  CHECK(w.entered_at() == now + 100ms);

  const auto bogus = static_cast<ls>(42);
  CHECK(std::string(dspex::to_string(bogus)) == "unknown");
  auto e = w.transition(bogus, "garbage", now + 1s);
  REQUIRE(e);
  CHECK(e->context.at("to") == "unknown");
  CHECK(w.state() == ls::busy);
  CHECK_FALSE(dspex::lifecycle_allows(bogus, ls::ready));
}

TEST_CASE("lifecycle states have stable names") {
  const std::vector<std::string> names = {"initializing", "ready",       "busy",
                                          "degraded",     "terminating", "terminated"};
  for (std::size_t i = 0; i < all_states.size(); ++i) {
    CHECK(dspex::to_string(all_states[i]) == names[i]);
    auto back = dspex::lifecycle_state_from_string(names[i]);
    REQUIRE(back);
    CHECK(*back == all_states[i]);
  }
  CHECK_FALSE(dspex::lifecycle_state_from_string("idle"));
}
