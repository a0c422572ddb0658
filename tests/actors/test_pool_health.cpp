// Health checks from the pool's side (issue 4, item 4): idle workers are
// pinged every pool.health_interval, never while busy; a failed ping
// degrades a worker, pool.health_max_failures in a row replace it, and a
// hung worker is killed within pool.health_timeout and replaced.
#include <doctest/doctest.h>

#include "support/event_recorder.hpp"
#include "support/test_pool.hpp"

using namespace dspex;
using namespace dspex::testing;

namespace {

settings health_settings(std::size_t size) {
  auto s = test_settings(size);
  s.pool.health_interval = 100ms;
  s.pool.health_timeout = 300ms;
  s.pool.health_max_failures = 3;
  return s;
}

bool health_timeout_failure(const event& e) {
  return e.kind == event_kind::health_check_failed && e.err && e.err->type == "health_timeout";
}

bool health_ping(const event& e) {
  return e.kind == event_kind::worker_transition && e.from == "ready" && e.to == "busy"
         && e.reason == "health_check";
}

} // namespace

TEST_CASE("a hung idle worker is detected by its health check, killed and replaced") {
  test_pool_options opts;
  opts.config = health_settings(1);
  test_pool pool{std::move(opts)};
  event_recorder events{pool.events()};
  REQUIRE(pool.wait_for_pool_ready());
  auto hung = pool.status().workers.at(0);
  // Replies, then stops reading: the next request (the health ping) hangs.
  auto r = pool.execute("hang", {{"after_reply", true}});
  REQUIRE(r.ok());
  REQUIRE(events.wait_for(health_timeout_failure));
  CHECK(wait_gone(hung.pid, 10s));  // killed, and reaped: /proc has no trace of it
  REQUIRE(events.wait_for([&](const event& e) {
    return e.kind == event_kind::worker_removed && e.worker_id == hung.id;
  }));
  REQUIRE(pool.wait_for([&](const pool_status& s) {
    return s.idle == 1 && s.workers.at(0).id != hung.id;
  }));
  auto st = pool.status();
  CHECK(st.health_check_failures >= 1);
  CHECK(pool.execute("ping").ok());
}

TEST_CASE("a failed health ping degrades a worker, a passing one brings it back") {
  test_pool_options opts;
  opts.config = health_settings(1);
  test_pool pool{std::move(opts)};
  event_recorder events{pool.events()};
  REQUIRE(pool.wait_for_pool_ready());
  auto worker = pool.status().workers.at(0);
  REQUIRE(pool.execute("fail_pings", {{"count", 1}}).ok());
  REQUIRE(events.wait_for([](const event& e) {
    return e.kind == event_kind::health_check_failed && e.attempt == 1 && e.err
           && e.err->type == "ping_failed";
  }));
  REQUIRE(events.wait_for(kind_is(event_kind::worker_transition, "degraded")));
  REQUIRE(events.wait_for([](const event& e) {
    return e.kind == event_kind::worker_transition && e.from == "degraded" && e.to == "ready";
  }));
  // The same worker serves again: a degraded worker is not replaced.
  auto r = pool.execute("ping");
  REQUIRE(r.ok());
  CHECK(r.value().value("worker_id", "") == worker.id);
  CHECK(events.count(kind_is(event_kind::worker_removed)) == 0);
}

TEST_CASE("health_max_failures failed pings in a row replace the worker") {
  test_pool_options opts;
  opts.config = health_settings(1);
  test_pool pool{std::move(opts)};
  event_recorder events{pool.events()};
  REQUIRE(pool.wait_for_pool_ready());
  auto worker = pool.status().workers.at(0);
  REQUIRE(pool.execute("fail_pings", {{"count", 100}}).ok());
  REQUIRE(events.wait_for([&](const event& e) {
    return e.kind == event_kind::worker_removed && e.worker_id == worker.id;
  }));
  CHECK(events.count(kind_is(event_kind::health_check_failed)) == 3);
  for (auto& e : events.all())
    if (e.kind == event_kind::worker_removed) {
      REQUIRE(e.err);
      CHECK(e.err->category == error_category::health_check_error);
      CHECK(e.err->type == "health_check_failed");
    }
  CHECK(wait_gone(worker.pid, 10s));
  REQUIRE(pool.wait_for([&](const pool_status& s) {
    return s.idle == 1 && s.workers.at(0).id != worker.id;
  }));
}

TEST_CASE("a busy worker is never health-checked: no head-of-line blocking") {
  test_pool_options opts;
  opts.config = health_settings(1);
  opts.config.pool.health_interval = 20ms;
  test_pool pool{std::move(opts)};
  event_recorder events{pool.events()};
  REQUIRE(pool.wait_for_pool_ready());
  // Idle: pinged.
  REQUIRE(events.wait_for(health_ping));
  // While a long request runs, no ping may start: every health ping falls
  // outside the request's busy period.
  auto r = pool.execute("sleep", {{"ms", 600}});
  REQUIRE(r.ok());
  auto all = events.all();
  bool in_request = false;
  std::size_t pings_during_request = 0, requests = 0;
  for (auto& e : all) {
    if (e.kind != event_kind::worker_transition)
      continue;
    if (e.from == "ready" && e.to == "busy" && e.reason != "health_check") {
      in_request = true;
      ++requests;
    } else if (e.from == "busy" && e.to == "ready") {
      in_request = false;
    } else if (health_ping(e) && in_request) {
      ++pings_during_request;
    }
  }
  CHECK(requests >= 1);
  CHECK(pings_during_request == 0);
  CHECK(pool.status().health_check_failures == 0);
}

TEST_CASE("health checks off (health_interval 0): no pings at all") {
  test_pool_options opts;
  opts.config = health_settings(1);
  opts.config.pool.health_interval = 0ms;
  opts.config.pool.max_age = 200ms;  // keeps the maintenance tick running
  test_pool pool{std::move(opts)};
  event_recorder events{pool.events()};
  REQUIRE(pool.wait_for_pool_ready());
  REQUIRE(events.wait_for(kind_is(event_kind::worker_recycled)));  // ticks happened
  CHECK(events.count(health_ping) == 0);
}
