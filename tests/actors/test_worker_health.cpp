// The worker actor's lifecycle and health checks against the real bundled
// worker: published transitions, the transition history (lifecycle_atom),
// health pings that pass, fail (degraded, recovery) or hang (killed,
// worker_exit::health_timeout), and messages that arrive in the wrong state.
#include <unistd.h>

#include <caf/all.hpp>
#include <doctest/doctest.h>

#include "dspex/actors/messages.hpp"
#include "dspex/actors/worker_actor.hpp"
#include "support/event_recorder.hpp"
#include "support/harness.hpp"
#include "support/worker_fixture.hpp"
#include "support/worker_gate.hpp"

using namespace dspex;
using namespace dspex::testing;

namespace {

constexpr auto hang_catch = worker_fixture::hang_catch;

// The worker fixture plus the health check and lifecycle messages.
struct health_fixture : worker_fixture {
  void start(settings s, const std::string& id = "hw1") { worker_fixture::start(std::move(s), id); }

  outcome health_check() {
    outcome result;
    (*self)
      ->request(worker, caf::duration{hang_catch}, health_check_atom::value)
      .receive([&](outcome& o) { result = std::move(o); },
               [&](caf::error& e) { result = test_failure(e); });
    return result;
  }

  lifecycle_history history() {
    lifecycle_history h;
    (*self)
      ->request(worker, caf::duration{hang_catch}, lifecycle_atom::value)
      .receive([&](lifecycle_history& x) { h = std::move(x); },
               [&](caf::error& e) { FAIL("lifecycle_atom failed: " << caf::to_string(e)); });
    return h;
  }

  // Checkins already in the mailbox. Every checkin is sent before the reply
  // it belongs to, so after a reply this count is exact.
  std::size_t drain_checkins() {
    std::size_t n = 0;
    bool more = true;
    while (more)
      (*self)->receive([&](checkin_atom, const std::string&, const checkin_status&) { ++n; },
                       caf::after(std::chrono::milliseconds{0}) >> [&] { more = false; });
    return n;
  }

  // Waits for (worker_gone_atom) without releasing.
  bool await_gone() {
    bool gone = false;
    bool done = false;
    while (!done)
      (*self)->receive([&](worker_gone_atom, const std::string&, const dspex::error&) { gone = done = true; },
                       [&](checkin_atom, const std::string&, const checkin_status&) {},
                       caf::after(hang_catch) >> [&] { done = true; });
    return gone;
  }
};

event_recorder::predicate transition(std::string from, std::string to, std::string reason = {}) {
  return [=](const event& e) {
    return e.kind == event_kind::worker_transition && e.from == from && e.to == to
           && (reason.empty() || e.reason == reason);
  };
}

bool rejected(const event& e) {
  return e.kind == event_kind::worker_transition && e.err && e.err->type == "invalid_transition";
}

std::vector<event> transitions_of(const event_recorder& r) {
  std::vector<event> out;
  for (auto& e : r.all())
    if (e.kind == event_kind::worker_transition && !rejected(e))
      out.push_back(e);
  return out;
}

// Every published transition continues from where the previous one ended,
// each is one the table allows, and the first leaves initializing.
void check_chain(const std::vector<event>& ts) {
  auto state = std::string{"initializing"};
  for (auto& e : ts) {
    CAPTURE(e.describe());
    CHECK(e.from == state);
    auto from = lifecycle_state_from_string(e.from);
    auto to = lifecycle_state_from_string(e.to);
    REQUIRE(from);
    REQUIRE(to);
    CHECK(lifecycle_allows(*from, *to));
    CHECK(e.source == e.worker_id);
    CHECK(e.fields.contains("time_in_from_ms"));
    state = e.to;
  }
}

void check_no_children_left() {
  CHECK(wait_no_children(::getpid(), std::chrono::seconds{5}).empty());
}

worker_exit exit_code(const caf::error& reason) {
  REQUIRE(reason.category() == worker_exit_category);
  return static_cast<worker_exit>(reason.code());
}

} // namespace

TEST_CASE("lifecycle events: initializing -> ready, ready -> busy -> ready per request, "
          "terminating -> terminated on stop") {
  {
    health_fixture f;
    f.start(test_settings());
    REQUIRE(f.await_ready() > 0);
    // Published before wready was sent.
    CHECK(f.events->count(transition("initializing", "ready", "initialized")) == 1);
    REQUIRE(f.execute("ping", nullptr).ok());
    CHECK(f.events->count(transition("ready", "busy", "request")) == 1);
    CHECK(f.events->count(transition("busy", "ready", "reply")) == 1);
    // A Python-side error is an ordinary reply: back to ready, not degraded.
    REQUIRE_FALSE(f.execute("no_such_command", nullptr).ok());
    CHECK(f.events->count(transition("busy", "ready", "reply")) == 2);
    CHECK(f.events->count(kind_is(event_kind::worker_transition, "degraded")) == 0);
    for (auto& e : f.events->all())
      if (e.kind == event_kind::worker_transition) {
        CHECK(e.worker_id == "hw1");
        CHECK(e.source == "hw1");
      }
    (*f.self)->send(f.worker, stop_atom::value);
    CHECK_FALSE(f.await_down());  // normal exit
    // terminated is published before the actor quits, so before its down_msg.
    CHECK(f.events->count(transition("ready", "terminating", "stop")) == 1);
    CHECK(f.events->count(transition("terminating", "terminated", "stopped")) == 1);
    CHECK(f.events->count(rejected) == 0);
    check_chain(transitions_of(*f.events));
    CHECK(wait_gone(f.pid, std::chrono::seconds{5}));
  }
  check_no_children_left();
}

TEST_CASE("the transition history carries reasons, times and durations") {
  {
    health_fixture f;
    f.start(test_settings());
    REQUIRE(f.await_ready() > 0);
    REQUIRE(f.execute("sleep", {{"ms", 200}}).ok());
    REQUIRE(f.health_check().ok());
    auto h = f.history();
    REQUIRE(h.size() == 5);
    using ls = lifecycle_state;
    struct expected { ls from; ls to; const char* reason; };
    const expected want[] = {
      {ls::initializing, ls::ready, "initialized"},
      {ls::ready, ls::busy, "request"},
      {ls::busy, ls::ready, "reply"},
      {ls::ready, ls::busy, "health_check"},
      {ls::busy, ls::ready, "health_check_passed"},
    };
    for (std::size_t i = 0; i < h.size(); ++i) {
      CAPTURE(i);
      CHECK(h[i].from == want[i].from);
      CHECK(h[i].to == want[i].to);
      CHECK(h[i].reason == want[i].reason);
      CHECK(h[i].time_in_from >= std::chrono::steady_clock::duration::zero());
      if (i > 0)
        CHECK(h[i].at >= h[i - 1].at);
    }
    // The request slept 200 ms in the process, all of it spent busy.
    CHECK(h[2].time_in_from >= std::chrono::milliseconds{200});
    // The published event carries the same duration in milliseconds.
    bool found = false;
    for (auto& e : f.events->all())
      if (transition("busy", "ready", "reply")(e)) {
        found = true;
        CHECK(e.fields["time_in_from_ms"].get<std::int64_t>() >= 200);
      }
    CHECK(found);
  }
  check_no_children_left();
}

TEST_CASE("a health check of an idle worker passes, leaves it ready and checks nothing in") {
  {
    health_fixture f;
    f.start(test_settings());
    REQUIRE(f.await_ready() > 0);
    auto r = f.health_check();
    REQUIRE(r.ok());
    CHECK(r.value()["status"] == "ok");
    CHECK(r.value()["worker_id"] == "hw1");
    CHECK(f.drain_checkins() == 0);  // the owner asked with a request: that is its answer
    CHECK(f.events->count(transition("ready", "busy", "health_check")) == 1);
    CHECK(f.events->count(transition("busy", "ready", "health_check_passed")) == 1);
    // It still serves: one request, one checkin.
    REQUIRE(f.execute("ping", nullptr).ok());
    CHECK(f.drain_checkins() == 1);
    CHECK(f.history().back().to == lifecycle_state::ready);
  }
  check_no_children_left();
}

TEST_CASE("a worker whose pings fail goes degraded, refuses work, and a passing ping brings it "
          "back") {
  {
    health_fixture f;
    f.start(test_settings());
    REQUIRE(f.await_ready() > 0);
    REQUIRE(f.execute("fail_pings", {{"count", 2}}).ok());
    CHECK(f.drain_checkins() == 1);

    auto bad = f.health_check();
    REQUIRE_FALSE(bad.ok());
    CHECK(bad.error().category == error_category::health_check_error);
    CHECK(bad.error().type == "ping_failed");
    CHECK(bad.error().message.find("ping failure injected") != std::string::npos);
    CHECK(f.events->count(transition("busy", "degraded", "health_check_failed")) == 1);
    for (auto& e : f.events->all())
      if (transition("busy", "degraded")(e)) {
        REQUIRE(e.err);
        CHECK(e.err->type == "ping_failed");
      }

    // Degraded takes no work: pool-mediated calls and lease holders alike.
    auto refused = f.execute("ping", nullptr);
    REQUIRE_FALSE(refused.ok());
    CHECK(refused.error().category == error_category::resource_error);
    CHECK(refused.error().type == "worker_not_ready");
    CHECK(refused.error().context["state"] == "degraded");
    (*f.self)->send(f.worker, lease_atom::value, std::uint64_t{7});
    outcome leased;
    (*f.self)
      ->request(f.worker, caf::duration{hang_catch}, execute_atom::value, std::uint64_t{7},
                call{"ping", nullptr, std::chrono::steady_clock::now() + std::chrono::seconds{5}})
      .receive([&](outcome& o) { leased = std::move(o); },
               [&](caf::error& e) { leased = test_failure(e); });
    REQUIRE_FALSE(leased.ok());
    CHECK(leased.error().type == "worker_not_ready");
    (*f.self)->send(f.worker, lease_atom::value, std::uint64_t{0});
    CHECK(f.drain_checkins() == 0);

    // A second failing ping: still degraded, no new transition.
    auto bad2 = f.health_check();
    REQUIRE_FALSE(bad2.ok());
    CHECK(bad2.error().type == "ping_failed");
    CHECK(f.events->count(kind_is(event_kind::worker_transition, "degraded")) == 1);
    CHECK(f.history().back().to == lifecycle_state::degraded);

    // The next ping passes: degraded -> ready, and it serves again.
    auto good = f.health_check();
    REQUIRE(good.ok());
    CHECK(good.value()["status"] == "ok");
    CHECK(f.events->count(transition("degraded", "ready", "health_check_passed")) == 1);
    auto back = f.history().back();
    CHECK(back.from == lifecycle_state::degraded);
    CHECK(back.to == lifecycle_state::ready);
    REQUIRE(f.execute("ping", nullptr).ok());
    CHECK(f.drain_checkins() == 1);
    CHECK(f.events->count(rejected) == 0);
    check_chain(transitions_of(*f.events));
  }
  check_no_children_left();
}

TEST_CASE("a hung idle worker fails its health check with health_timeout, is killed and quits "
          "with worker_exit::health_timeout") {
  {
    health_fixture f;
    auto s = test_settings();
    s.pool.health_timeout = std::chrono::milliseconds{300};
    f.start(s);
    REQUIRE(f.await_ready() > 0);
    auto hung = f.execute("hang", {{"after_reply", true}});
    REQUIRE(hung.ok());
    CHECK(hung.value()["hanging"] == true);

    auto r = f.health_check();  // bounded by the worker itself (300 ms)
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().category == error_category::health_check_error);
    CHECK(r.error().type == "health_timeout");
    CHECK(r.error().context["pid"] == f.pid);
    // Killed at once, not left for the owner to find.
    CHECK(wait_gone(f.pid, std::chrono::seconds{5}));

    // It was ready, so it waits for the owner's release (calls may be on
    // their way); meanwhile its history tells what happened.
    REQUIRE(f.await_gone());
    auto h = f.history();
    REQUIRE(h.size() >= 2);
    auto& last = h.back();
    CHECK(last.from == lifecycle_state::busy);
    CHECK(last.to == lifecycle_state::terminating);
    CHECK(last.reason == "health_timeout");
    CHECK(last.time_in_from >= std::chrono::milliseconds{300});  // the whole health_timeout
    CHECK(h[h.size() - 2].reason == "health_check");
    // Gone: nothing more to check.
    auto health_busy = f.health_check();
    REQUIRE_FALSE(health_busy.ok());
    CHECK(health_busy.error().type == "worker_busy");

    (*f.self)->send(f.worker, stop_atom::value);  // the owner's release
    auto reason = f.await_down();
    CHECK(exit_code(reason) == worker_exit::health_timeout);
    auto detail = decode_exit_reason(reason);
    REQUIRE(detail);
    CHECK(detail->category == error_category::health_check_error);
    CHECK(detail->type == "health_timeout");
    CHECK(f.events->count(transition("busy", "terminating", "health_timeout")) == 1);
    CHECK(f.events->count(transition("terminating", "terminated", "released")) == 1);
    for (auto& e : f.events->all())
      if (transition("busy", "terminating")(e)) {
        REQUIRE(e.err);
        CHECK(e.err->type == "health_timeout");
        CHECK(e.fields["time_in_from_ms"].get<std::int64_t>() >= 300);
      }
    CHECK(f.events->count(rejected) == 0);
    check_chain(transitions_of(*f.events));
  }
  check_no_children_left();
}

TEST_CASE("a health check on a busy worker answers worker_busy and leaves the request alone") {
  {
    health_fixture f;
    f.start(test_settings());
    REQUIRE(f.await_ready() > 0);
    // The sleep lasts until the gate opens, after the check: the check
    // finds the worker busy.
    worker_gate gate;
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds{60};
    auto req = (*f.self)->request(f.worker, caf::duration{hang_catch}, execute_atom::value,
                                  call{"sleep", gate.sleep_args(), deadline});
    auto r = f.health_check();
    gate.open();
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().category == error_category::resource_error);
    CHECK(r.error().type == "worker_busy");
    CHECK(r.error().context["state"] == "busy");
    outcome slept;
    std::move(req).receive([&](outcome& o) { slept = std::move(o); },
                           [&](caf::error& e) { slept = test_failure(e); });
    REQUIRE(slept.ok());
    CHECK(slept.value()["released"] == true);
    CHECK(f.drain_checkins() == 1);
    CHECK(f.events->count(transition("ready", "busy", "health_check")) == 0);
    // Idle again: now the check runs.
    CHECK(f.health_check().ok());
    CHECK(f.events->count(rejected) == 0);
  }
  check_no_children_left();
}

TEST_CASE("messages in the wrong state never crash the worker nor make invalid transitions") {
  {
    health_fixture f;
    f.start(test_settings());
    // Sent right after the spawn, long before the process can answer its
    // init ping: answered while initializing.
    auto hc = (*f.self)->request(f.worker, caf::duration{hang_catch}, health_check_atom::value);
    auto ex = (*f.self)->request(f.worker, caf::duration{hang_catch}, execute_atom::value,
                                 call{"ping", nullptr,
                                      std::chrono::steady_clock::now() + std::chrono::seconds{5}});
    outcome r;
    std::move(hc).receive([&](outcome& o) { r = std::move(o); },
                          [&](caf::error& e) { r = test_failure(e); });
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().type == "worker_busy");
    CHECK(r.error().context["state"] == "initializing");
    outcome early;
    std::move(ex).receive([&](outcome& o) { early = std::move(o); },
                          [&](caf::error& e) { early = test_failure(e); });
    REQUIRE_FALSE(early.ok());
    CHECK(early.error().type == "worker_not_ready");
    CHECK(early.error().context["state"] == "initializing");
    REQUIRE(f.await_ready() > 0);
    CHECK(f.history().back().to == lifecycle_state::ready);

    // A burst after stop: a second stop, a check and a call. The worker may
    // already be gone for the last ones (then CAF answers for it).
    (*f.self)->send(f.worker, stop_atom::value);
    (*f.self)->send(f.worker, stop_atom::value);
    auto late = f.health_check();
    REQUIRE_FALSE(late.ok());
    CHECK((late.error().type == "worker_busy" || late.error().type == "test"));
    auto late_call = f.execute("ping", nullptr);
    CHECK_FALSE(late_call.ok());
    CHECK_FALSE(f.await_down());
    CHECK(f.events->count(rejected) == 0);
    auto ts = transitions_of(*f.events);
    check_chain(ts);
    REQUIRE_FALSE(ts.empty());
    CHECK(ts.back().to == "terminated");
    CHECK(f.events->count(kind_is(event_kind::worker_transition, "terminating")) == 1);
  }
  check_no_children_left();
}

TEST_CASE("start failures and exit messages end the lifecycle in terminated") {
  SUBCASE("interpreter missing: initializing -> terminating -> terminated") {
    health_fixture f;
    auto s = test_settings();
    s.worker.python = "/nonexistent/python3";
    f.start(s);
    CHECK(f.await_ready() == 0);
    CHECK(exit_code(f.down_reason) == worker_exit::spawn_failed);
    CHECK(f.events->count(transition("initializing", "terminating", "spawn_failed")) == 1);
    CHECK(f.events->count(transition("terminating", "terminated", "spawn_failed")) == 1);
  }
  SUBCASE("an exit message (not kill) is published and ends the process") {
    health_fixture f;
    f.start(test_settings());
    REQUIRE(f.await_ready() > 0);
    (*f.self)->send_exit(f.worker, caf::exit_reason::user_shutdown);
    auto reason = f.await_down();
    CHECK(reason == caf::make_error(caf::exit_reason::user_shutdown));
    CHECK(f.events->count(kind_is(event_kind::worker_transition, "terminated")) == 1);
    auto ts = transitions_of(*f.events);
    REQUIRE(ts.size() >= 2);
    CHECK(ts.back().reason.rfind("exit: ", 0) == 0);
    check_chain(ts);
    CHECK(wait_gone(f.pid, std::chrono::seconds{5}));
  }
  check_no_children_left();
}
