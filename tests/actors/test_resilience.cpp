// Retries, the circuit breaker and the supervision tree, through the public
// embedding API against real worker processes (issue 4, items 1, 7, 8, 9):
//  - an idempotent call whose worker is SIGKILLed mid-request is retried and
//    succeeds; a non-idempotent one is not; a python_error never is;
//  - the circuit breaker goes closed -> open -> half_open -> closed, and a
//    failed probe reopens it; an open circuit answers without reaching a worker;
//  - the root supervisor restarts a killed pool, the client switches to the
//    new one, and gives structured errors once the supervisor gave up;
//  - stop leaves no process; subscribe/unsubscribe and subscribe_actor.
//
// Every wait is on an event (event_recorder::wait_for) or on the real pool
// status (wait_for_status); the timeouts only catch hangs.
#include <csignal>
#include <future>
#include <optional>

#include <doctest/doctest.h>

#include <caf/all.hpp>

#include "dspex/actors/events_actor.hpp"
#include "dspex/actors/runtime_access.hpp"
#include "dspex/actors/service.hpp"
#include "support/event_recorder.hpp"
#include "support/harness.hpp"

using namespace dspex;
using namespace dspex::testing;

namespace {

// Waits until exactly one worker is busy and returns its pid.
int busy_worker_pid(runtime& rt) {
  auto w = wait_for_status(rt, [](const pool_status& s) {
    for (auto& x : s.workers)
      if (x.state == "busy" && x.pid > 0)
        return s.busy == 1;
    return false;
  });
  REQUIRE(w.ok);
  for (auto& x : w.status.workers)
    if (x.state == "busy")
      return x.pid;
  return 0;
}

std::uint64_t total_checkouts(const pool_status& s) {
  std::uint64_t n = 0;
  for (auto& w : s.workers)
    n += w.stats.checkouts;
  for (auto& w : s.retired)
    n += w.stats.checkouts;
  return n;
}

event_recorder::predicate circuit_is(std::string from, std::string to) {
  return [from = std::move(from), to = std::move(to)](const event& e) {
    return e.kind == event_kind::circuit_changed && e.from == from && e.to == to;
  };
}

std::optional<event> first(const event_recorder& rec, const event_recorder::predicate& match) {
  for (auto& e : rec.all())
    if (match(e))
      return e;
  return std::nullopt;
}

} // namespace

TEST_CASE("an idempotent call is retried after its worker is killed mid-request") {
  auto rt = start_runtime(test_settings(2));
  event_recorder rec{rt->events()};
  call_options opts;
  opts.idempotent = true;
  opts.timeout = 30s;
  auto fut = rt->execute_anonymous_async("sleep", {{"ms", 1000}}, opts);
  auto pid = busy_worker_pid(*rt);
  REQUIRE(pid > 0);
  REQUIRE(::kill(pid, SIGKILL) == 0);
  auto r = fut.get();
  REQUIRE_MESSAGE(r.ok(), r.error().describe());
  CHECK(r.value()["slept_ms"] == 1000);
  auto scheduled = first(rec, kind_is(event_kind::retry_scheduled));
  REQUIRE(scheduled);
  CHECK(scheduled->attempt == 2);
  CHECK(scheduled->source == "client");
  REQUIRE(scheduled->err);
  CHECK(scheduled->err->category == error_category::communication_error);
  CHECK(scheduled->err->type == "worker_exited");
  CHECK(scheduled->fields["command"] == "sleep");
  CHECK(scheduled->fields["why"] == "retry_idempotent");
  CHECK(rec.count(kind_is(event_kind::retry_scheduled)) == 1);
  CHECK(rec.count(kind_is(event_kind::retry_gave_up)) == 0);
  CHECK(wait_gone(pid, 10s));
  stop_and_check_no_children(*rt);
}

TEST_CASE("max_attempts = 1 disables the retry of an idempotent call") {
  auto rt = start_runtime(test_settings(2));
  event_recorder rec{rt->events()};
  call_options opts;
  opts.idempotent = true;
  opts.max_attempts = 1;
  auto fut = rt->execute_anonymous_async("sleep", {{"ms", 60000}}, opts);
  auto pid = busy_worker_pid(*rt);
  REQUIRE(::kill(pid, SIGKILL) == 0);
  auto r = fut.get();
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().type == "worker_exited");
  CHECK(r.error().context["attempt"] == 1);
  CHECK(rec.count(kind_is(event_kind::retry_scheduled)) == 0);
  auto gave_up = first(rec, kind_is(event_kind::retry_gave_up));
  REQUIRE(gave_up);
  CHECK(gave_up->fields["why"] == "attempts_exhausted");
  stop_and_check_no_children(*rt);
}

TEST_CASE("a non-idempotent call whose worker died mid-request is not retried") {
  auto rt = start_runtime(test_settings(2));
  event_recorder rec{rt->events()};
  // `sleep` is not idempotent by default (only ping, list_programs,
  // get_stats and get_program_info are).
  auto fut = rt->execute_anonymous_async("sleep", {{"ms", 60000}});
  auto pid = busy_worker_pid(*rt);
  REQUIRE(::kill(pid, SIGKILL) == 0);
  auto r = fut.get();
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().category == error_category::communication_error);
  CHECK(r.error().type == "worker_exited");
  CHECK(r.error().context["attempt"] == 1);
  CHECK(r.error().context["command"] == "sleep");
  CHECK(rec.count(kind_is(event_kind::retry_scheduled)) == 0);
  auto gave_up = first(rec, kind_is(event_kind::retry_gave_up));
  REQUIRE(gave_up);
  CHECK(gave_up->attempt == 1);
  CHECK(gave_up->fields["why"] == "not_idempotent");
  // Exactly one attempt reached a worker: the killed one.
  auto w = wait_for_status(*rt, [](const pool_status& s) {
    return full_and_idle(s) && s.replaced == 1;
  });
  REQUIRE(w.ok);
  CHECK(total_checkouts(w.status) == 1);
  stop_and_check_no_children(*rt);
}

TEST_CASE("a python_error is never retried and does not count against the circuit") {
  auto s = test_settings(1);
  s.circuit.failure_threshold = 2;
  auto rt = start_runtime(s);
  event_recorder rec{rt->events()};
  call_options opts;
  opts.idempotent = true;
  for (int i = 0; i < 3; ++i) {
    auto r = rt->execute_anonymous("sleep", {{"ms", -1}}, opts);
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().category == error_category::python_error);
    CHECK(r.error().context["attempt"] == 1);
  }
  CHECK(rec.count(kind_is(event_kind::retry_scheduled)) == 0);
  CHECK(rec.count(kind_is(event_kind::retry_gave_up)) == 0);
  CHECK(rec.count(kind_is(event_kind::circuit_changed)) == 0);
  auto st = rt->status();
  CHECK(st.circuit == "closed");
  CHECK(total_checkouts(st) == 3);
  stop_and_check_no_children(*rt);
}

TEST_CASE("the circuit breaker goes through all its states") {
  auto s = test_settings(2);
  s.circuit.failure_threshold = 3;
  // Long enough that "rejected while open" right after the third failure
  // never finds the circuit half open already, even on a loaded machine.
  s.circuit.open_timeout = 1500ms;
  s.circuit.success_threshold = 1;
  s.circuit.half_open_probes = 1;
  auto rt = start_runtime(s);
  event_recorder rec{rt->events()};
  auto crash = [&] {
    auto r = rt->execute_anonymous("crash", {{"code", 3}});
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().type == "worker_exited");
  };

  // closed -> open: three counted failures in a row.
  crash();
  crash();
  auto before = wait_for_status(*rt, [](const pool_status& st) {
    return full_and_idle(st) && st.replaced == 2;
  });
  REQUIRE(before.ok);
  CHECK(before.status.circuit == "closed");
  CHECK(rec.count(kind_is(event_kind::circuit_changed)) == 0);
  crash();
  // The breaker recorded the failure (and published) before the call returned.
  CHECK(rec.count(circuit_is("closed", "open")) == 1);

  // Open: rejected at once, without reaching the pool.
  auto rejected = rt->execute_anonymous("ping");
  REQUIRE_FALSE(rejected.ok());
  CHECK(rejected.error().category == error_category::resource_error);
  CHECK(rejected.error().type == "circuit_open");
  CHECK(rejected.error().context["state"] == "open");
  CHECK(rejected.error().context["attempt"] == 1);
  CHECK(rec.count(kind_is(event_kind::retry_scheduled)) == 0);  // never retried

  // open -> half_open after open_timeout, published without a request.
  REQUIRE(rec.wait_for(circuit_is("open", "half_open")));
  auto after = wait_for_status(*rt, [](const pool_status& st) {
    return full_and_idle(st) && st.replaced == 3;
  });
  REQUIRE(after.ok);
  CHECK(after.status.circuit == "half_open");
  // Only the third crash reached a worker since `before`: the rejected ping did not.
  CHECK(total_checkouts(after.status) == total_checkouts(before.status) + 1);

  // half_open -> closed: a successful probe (success_threshold 1).
  auto probe = rt->execute_anonymous("ping");
  REQUIRE_MESSAGE(probe.ok(), probe.error().describe());
  CHECK(rec.count(circuit_is("half_open", "closed")) == 1);
  CHECK(rt->status().circuit == "closed");

  // Again closed -> open, then a failed probe: half_open -> open.
  crash();
  crash();
  crash();
  CHECK(rec.count(circuit_is("closed", "open")) == 2);
  REQUIRE(rec.wait_for(circuit_is("open", "half_open"), 2));
  crash();  // the probe
  CHECK(rec.count(circuit_is("half_open", "open")) == 1);
  CHECK(rec.count(kind_is(event_kind::circuit_changed)) == 6);
  stop_and_check_no_children(*rt);
}

TEST_CASE("the pool's supervisor restarts a killed pool and calls reach the new one") {
  auto rt = start_runtime(test_settings(1));
  event_recorder rec{rt->events()};
  auto old_pids = worker_pids(rt->status());
  auto inflight = rt->execute_anonymous_async("sleep", {{"ms", 60000}});
  busy_worker_pid(*rt);
  {
    auto old_pool = runtime_access::pool(*rt);
    REQUIRE(old_pool);
    caf::anon_send_exit(old_pool, caf::exit_reason::kill);
  }
  // A call made while the pool dies: it reaches the dying pool (bounced:
  // retried, nothing ran), is in flight on it (idempotent: retried), or waits
  // for the new one. Whichever happens, it succeeds.
  auto during = rt->execute_anonymous_async("ping");
  REQUIRE(rec.wait_for(kind_is(event_kind::supervisor, "child_restarted")));
  auto restarted = first(rec, kind_is(event_kind::supervisor, "child_restarted"));
  CHECK(restarted->source == "dspex.pool.default");
  CHECK(restarted->pool == "default");
  CHECK(restarted->fields["child_id"] == "pool");
  CHECK(restarted->attempt == 1);
  auto exited = first(rec, kind_is(event_kind::supervisor, "child_exited"));
  REQUIRE(exited);
  CHECK(exited->reason.find("kill") != std::string::npos);

  // The call in flight on the killed pool got an answer: its worker died
  // with it (not retried: sleep is not idempotent).
  auto lost = inflight.get();
  REQUIRE_FALSE(lost.ok());
  CHECK(lost.error().category == error_category::communication_error);
  CHECK(lost.error().type == "worker_exited");

  // The client published child_restarted after switching to the new pool
  // and registering it for service detection.
  {
    auto pool = runtime_access::pool(*rt);
    REQUIRE(pool);
    auto found = detect_service(runtime_access::system(*rt));
    REQUIRE(std::holds_alternative<service>(found));
    CHECK(std::get<service>(found).handle == pool);
  }
  auto r = rt->execute_anonymous("ping");
  REQUIRE_MESSAGE(r.ok(), r.error().describe());
  auto d = during.get();
  REQUIRE_MESSAGE(d.ok(), d.error().describe());
  for (auto pid : old_pids)
    CHECK(wait_gone(pid, 10s));
  CHECK(wait_for_status(*rt, full_and_idle).ok);
  stop_and_check_no_children(*rt);
}

TEST_CASE("calls fail with supervisor_gave_up once the pool's supervisor gave up") {
  auto rt = start_runtime(test_settings(1));
  event_recorder rec{rt->events()};
  // dspex.pool.default allows 3 restarts within 5 s: the 4th failure makes it give up.
  for (std::size_t i = 1; i <= 4; ++i) {
    {
      auto pool = runtime_access::pool(*rt);
      REQUIRE(pool);
      caf::anon_send_exit(pool, caf::exit_reason::kill);
    }
    if (i < 4)
      REQUIRE(rec.wait_for(kind_is(event_kind::supervisor, "child_restarted"), i));
  }
  REQUIRE(rec.wait_for(kind_is(event_kind::supervisor, "gave_up")));
  auto gave_up = first(rec, kind_is(event_kind::supervisor, "gave_up"));
  REQUIRE(gave_up->err);
  CHECK(gave_up->err->type == "supervisor_gave_up");

  auto r = rt->execute_anonymous("ping");
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().category == error_category::resource_error);
  CHECK(r.error().type == "supervisor_gave_up");
  CHECK(r.error().context["supervisor"] == "dspex.pool.default");
  CHECK(r.error().context["child_id"] == "pool");
  auto lease = rt->checkout();
  REQUIRE(std::holds_alternative<error>(lease));
  CHECK(std::get<error>(lease).type == "supervisor_gave_up");
  CHECK(rt->status().health == "unavailable");
  stop_and_check_no_children(*rt);
}

TEST_CASE("stop leaves no process and retries nothing, subscribe and unsubscribe") {
  auto rt = start_runtime(test_settings(3));
  std::atomic<int> removed_seen{0};
  auto id = rt->subscribe([&](const event& e) {
    if (e.kind == event_kind::worker_removed)
      ++removed_seen;
  });
  event_recorder rec{rt->events()};  // subscribed after: sees each event after the handler

  auto r = rt->execute_anonymous("crash", {{"code", 3}});
  REQUIRE_FALSE(r.ok());
  REQUIRE(rec.wait_for(kind_is(event_kind::worker_removed)));
  CHECK(removed_seen == 1);
  rt->unsubscribe(id);
  r = rt->execute_anonymous("crash", {{"code", 3}});
  REQUIRE_FALSE(r.ok());
  REQUIRE(rec.wait_for(kind_is(event_kind::worker_removed), 2));
  CHECK(removed_seen == 1);  // published after unsubscribe: not delivered

  REQUIRE(wait_for_status(*rt, full_and_idle).ok);
  auto pids = worker_pids(rt->status());
  call_options opts;
  opts.idempotent = true;
  auto inflight = rt->execute_anonymous_async("sleep", {{"ms", 60000}}, opts);
  busy_worker_pid(*rt);
  rec.clear();
  rt->stop();
  auto late = inflight.get();
  REQUIRE_FALSE(late.ok());
  CHECK(late.error().category == error_category::resource_error);
  CHECK(rec.count(kind_is(event_kind::retry_scheduled)) == 0);
  for (auto pid : pids)
    CHECK(process_gone(pid));
  CHECK(child_pids(::getpid()).empty());
  auto after = rt->execute_anonymous("ping");
  REQUIRE_FALSE(after.ok());
  CHECK(after.error().type == "pool_stopping");
}

TEST_CASE("subscribe_actor delivers events to an actor") {
  auto rt = start_runtime(test_settings(1));
  std::promise<event> got;
  auto fut = got.get_future();
  auto watcher = runtime_access::system(*rt).spawn(
    [&got](caf::event_based_actor* self) -> caf::behavior {
      return {
        [=, &got](const event& e) {
          if (e.kind == event_kind::worker_removed) {
            got.set_value(e);
            self->quit();
          }
        },
      };
    });
  auto id = subscribe_actor(rt->events(), watcher);
  CHECK(id != 0);
  auto r = rt->execute_anonymous("crash", {{"code", 3}});
  REQUIRE_FALSE(r.ok());
  REQUIRE(fut.wait_for(15s) == std::future_status::ready);
  auto e = fut.get();
  CHECK(e.kind == event_kind::worker_removed);
  REQUIRE(e.err);
  CHECK(e.err->type == "worker_exited");
  rt->events().unsubscribe(id);
  watcher = nullptr;
  stop_and_check_no_children(*rt);
}
