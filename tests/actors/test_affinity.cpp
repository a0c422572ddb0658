// Session affinity in the pool (issue 5, item 3): hint, strict_queue and
// strict_fail_fast, with hits, misses and rebinds counted in the status.
#include <csignal>
#include <future>
#include <set>

#include <doctest/doctest.h>

#include "support/test_pool.hpp"
#include "support/worker_gate.hpp"

using namespace dspex;
using namespace dspex::testing;

namespace {

call session_call(const std::string& command, nlohmann::json args, const std::string& preferred,
                  affinity_mode mode, std::chrono::milliseconds timeout = 10s) {
  call c;
  c.command = command;
  c.args = std::move(args);
  c.args["session_id"] = "s1";
  c.deadline = std::chrono::steady_clock::now() + timeout;
  c.type = checkout_type::session("s1");
  c.preferred_worker = preferred;
  c.affinity = mode;
  return c;
}

std::future<outcome> async(test_pool& pool, call c) {
  auto p = std::make_shared<std::promise<outcome>>();
  auto f = p->get_future();
  pool.execute_async(std::move(c), [p](outcome o) { p->set_value(std::move(o)); });
  return f;
}

// Makes `id` busy until `gate` opens; returns the future of that call.
std::future<outcome> occupy(test_pool& pool, const std::string& id, const worker_gate& gate) {
  auto f = async(pool, session_call("sleep", gate.sleep_args(), id, affinity_mode::strict_queue));
  REQUIRE(pool.wait_for([&](const pool_status& s) {
    for (auto& w : s.workers)
      if (w.id == id)
        return w.state == "busy";
    return false;
  }));
  return f;
}

} // namespace

TEST_CASE("the session's worker serves its calls when idle (hint): hits counted") {
  test_pool pool;  // 2 workers
  REQUIRE(pool.wait_for_pool_ready());
  auto first = pool.execute(session_call("ping", {}, "", affinity_mode::hint));
  REQUIRE(first.ok());
  auto mine = first.served_by();
  REQUIRE_FALSE(mine.empty());
  for (int i = 0; i < 6; ++i) {
    auto r = pool.execute(session_call("ping", {}, mine, affinity_mode::hint));
    REQUIRE(r.ok());
    CHECK(r.served_by() == mine);  // round-robin alone would alternate
  }
  auto st = pool.status();
  CHECK(st.affinity_hits == 6);
  CHECK(st.affinity_misses == 0);
}

TEST_CASE("hint: a busy session worker means another idle worker serves (a miss)") {
  test_pool pool;
  REQUIRE(pool.wait_for_pool_ready());
  auto ids = pool.status().workers;
  auto mine = ids.at(0).id;
  worker_gate gate;
  auto busy = occupy(pool, mine, gate);
  auto r = pool.execute(session_call("ping", {}, mine, affinity_mode::hint));
  REQUIRE(r.ok());
  CHECK(r.served_by() != mine);
  gate.open();
  CHECK(busy.get().ok());
  CHECK(pool.status().affinity_misses == 1);
}

TEST_CASE("strict_queue: waits for the session's worker even when another is idle") {
  test_pool pool;
  REQUIRE(pool.wait_for_pool_ready());
  auto mine = pool.status().workers.at(0).id;
  worker_gate gate;
  auto busy = occupy(pool, mine, gate);
  auto strict = async(pool, session_call("ping", {}, mine, affinity_mode::strict_queue));
  // It waits (queued) although the other worker is idle, until its own is free.
  REQUIRE(pool.wait_for([](const pool_status& s) { return s.queued == 1 && s.idle == 1; }));
  CHECK(strict.wait_for(0s) != std::future_status::ready);
  gate.open();
  auto r = strict.get();
  REQUIRE(r.ok());
  CHECK(r.served_by() == mine);
  CHECK(busy.get().ok());
  // Other callers were not held up behind it meanwhile (no head-of-line blocking).
  auto st = pool.status();
  CHECK(st.affinity_misses == 0);
}

TEST_CASE("strict_queue: a caller behind a waiting strict call is served by the idle worker") {
  test_pool pool;
  REQUIRE(pool.wait_for_pool_ready());
  auto ws = pool.status().workers;
  auto mine = ws.at(0).id;
  worker_gate gate;
  auto busy = occupy(pool, mine, gate);
  auto strict = async(pool, session_call("ping", {}, mine, affinity_mode::strict_queue));
  REQUIRE(pool.wait_for([](const pool_status& s) { return s.queued == 1; }));
  auto other = pool.execute("ping");  // anonymous, after the strict call
  REQUIRE(other.ok());
  CHECK(other.served_by() == ws.at(1).id);
  CHECK(strict.wait_for(0s) != std::future_status::ready);  // still waiting for its worker
  gate.open();
  auto sr = strict.get();
  REQUIRE(sr.ok());
  CHECK(sr.served_by() == mine);
  CHECK(busy.get().ok());
}

TEST_CASE("strict_fail_fast: a busy session worker fails the call at once with worker_busy") {
  test_pool pool;
  REQUIRE(pool.wait_for_pool_ready());
  auto mine = pool.status().workers.at(0).id;
  worker_gate gate;
  auto busy = occupy(pool, mine, gate);
  auto r = pool.execute(session_call("ping", {}, mine, affinity_mode::strict_fail_fast, 10s));
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().category == error_category::resource_error);
  CHECK(r.error().type == "worker_busy");
  CHECK(r.error().context.value("session_id", "") == "s1");
  CHECK(r.error().context.value("worker_id", "") == mine);
  gate.open();
  CHECK(busy.get().ok());
  // Idle again: served by it.
  auto again = pool.execute(session_call("ping", {}, mine, affinity_mode::strict_fail_fast));
  REQUIRE(again.ok());
  CHECK(again.served_by() == mine);
}

TEST_CASE("every mode rebinds when the session's worker is gone") {
  for (auto mode : {affinity_mode::hint, affinity_mode::strict_queue,
                    affinity_mode::strict_fail_fast}) {
    CAPTURE(to_string(mode));
    test_pool pool;
    REQUIRE(pool.wait_for_pool_ready());
    auto victim = pool.status().workers.at(0);
    REQUIRE(::kill(victim.pid, SIGKILL) == 0);
    REQUIRE(pool.wait_for([&](const pool_status& s) {
      for (auto& w : s.workers)
        if (w.id == victim.id)
          return false;
      return true;
    }));
    auto r = pool.execute(session_call("ping", {}, victim.id, mode));
    REQUIRE(r.ok());
    CHECK(r.served_by() != victim.id);
    CHECK(pool.status().affinity_rebinds == 1);
  }
}

TEST_CASE("one LM configuration per pool: configure_lm reaches every worker and every replacement") {
  test_pool pool;  // 2 workers, mock LM "mock/mock"
  REQUIRE(pool.wait_for_pool_ready());
  auto r = pool.execute("configure_lm", {{"provider", "mock"}, {"model", "pool-model"}});
  REQUIRE(r.ok());
  // Both workers answer with the new LM, whichever serves. The other one
  // serves once its own configuration is done (a round trip of its own,
  // racing these calls): until both have served, bounded by a hang guard.
  std::set<std::string> seen;
  for (int i = 0; i < 500 && seen.size() < 2; ++i) {
    auto p = pool.execute("ping");
    REQUIRE(p.ok());
    CHECK(p.value()["lm"] == "mock/pool-model");
    seen.insert(p.served_by());
  }
  CHECK(seen.size() == 2);
  // A replacement is configured before it serves anything.
  auto victim = pool.status().workers.at(0);
  REQUIRE(::kill(victim.pid, SIGKILL) == 0);
  REQUIRE(pool.wait_for([&](const pool_status& s) {
    if (s.idle != 2)
      return false;
    for (auto& w : s.workers)
      if (w.id == victim.id)
        return false;
    return true;
  }));
  for (int i = 0; i < 4; ++i) {
    auto p = pool.execute("ping");
    REQUIRE(p.ok());
    CHECK(p.value()["lm"] == "mock/pool-model");
  }
  // A refused configuration is the caller's error and changes nothing.
  auto bad = pool.execute("configure_lm", {{"provider", "no-such-provider"}});
  REQUIRE_FALSE(bad.ok());
  CHECK(bad.error().category == error_category::python_error);
  auto p = pool.execute("ping");
  REQUIRE(p.ok());
  CHECK(p.value()["lm"] == "mock/pool-model");
}
