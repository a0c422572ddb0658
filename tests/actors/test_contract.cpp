// Layer 1: the worker contract as the pool drives it, against the scripted
// contract and fake in-process workers. Every test checks the exact order of
// callbacks and that every scripted step ran.
#include <doctest/doctest.h>

#include "support/scripted_contract.hpp"
#include "support/test_pool.hpp"

using namespace dspex;
using namespace dspex::testing;
using act = step::action;
using strings = std::vector<std::string>;

namespace {

struct fixture {
  std::shared_ptr<scripted_contract> contract;
  std::unique_ptr<test_pool> pool;

  explicit fixture(std::size_t size = 2, std::function<void(settings&)> tune = {},
                   bool async_start = false)
    : contract(std::make_shared<scripted_contract>(async_start)) {
    auto s = test_settings(size);
    if (tune)
      tune(s);
    pool = std::make_unique<test_pool>(test_pool_options{s, contract});
  }

  void start(std::function<void(scripted_contract&)> script = {}) {
    if (script)
      script(*contract);
  }

  bool ready() {
    auto ok = pool->wait_for_pool_ready();
    contract->clear_calls();
    return ok;
  }
};

bool all_idle(const pool_status& s) {
  return s.idle == s.size && s.busy == 0 && s.leased == 0 && s.starting == 0 && s.removing == 0
         && s.queued == 0;
}

} // namespace

TEST_CASE("checkout ok: the caller is served, the worker checks in") {
  fixture f;
  REQUIRE(f.ready());
  auto r = f.pool->execute("work");
  REQUIRE(r.ok());
  CHECK(r.value()["worker_id"] == "w1");
  REQUIRE(f.pool->wait_for(all_idle));
  CHECK(f.contract->calls() == strings{"handle_checkout w1 anonymous", "handle_checkin w1 ok"});
  CHECK(f.contract->unmet().empty());
  auto st = f.pool->status();
  CHECK(st.workers.at(0).stats.checkouts == 1);
  CHECK(st.workers.at(0).stats.successful_checkins == 1);
}

TEST_CASE("checkout remove: the worker is replaced and the same caller is served by the next") {
  fixture f;
  REQUIRE(f.ready());
  f.contract->expect(step::checkout(act::remove, "w1"));
  auto r = f.pool->execute("work");
  REQUIRE(r.ok());
  CHECK(r.value()["worker_id"] == "w2");
  REQUIRE(f.pool->wait_for([](const pool_status& s) { return all_idle(s) && s.replaced == 1; }));
  CHECK(f.contract->calls()
        == strings{"handle_checkout w1 anonymous", "terminate_worker w1 checkout_failed",
                   "init_worker w3", "handle_checkout w2 anonymous", "handle_checkin w2 ok"});
  CHECK(f.contract->unmet().empty());
}

TEST_CASE("checkout skip: that caller fails with the error and the worker stays") {
  fixture f(1);
  REQUIRE(f.ready());
  f.contract->expect(step::checkout(act::skip, "w1"));
  auto r = f.pool->execute("work");
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().type == "scripted_skip");
  auto again = f.pool->execute("work");
  REQUIRE(again.ok());
  CHECK(again.value()["worker_id"] == "w1");
  CHECK(f.pool->status().replaced == 0);
  CHECK(f.contract->calls() == strings{"handle_checkout w1 anonymous",
                                       "handle_checkout w1 anonymous", "handle_checkin w1 ok"});
  CHECK(f.contract->unmet().empty());
}

TEST_CASE("a throwing handle_checkout counts as remove with connect_error") {
  fixture f;
  REQUIRE(f.ready());
  f.contract->expect(step::checkout(act::raise, "w1"));
  auto r = f.pool->execute("work");
  REQUIRE(r.ok());
  CHECK(r.value()["worker_id"] == "w2");
  CHECK(f.contract->calls().at(1) == "terminate_worker w1 connect_error");
  CHECK(f.contract->unmet().empty());
}

TEST_CASE("checkin remove and a throwing checkin remove the worker") {
  for (auto a : {act::remove, act::raise}) {
    fixture f(1);
    REQUIRE(f.ready());
    f.contract->expect(step::checkin(a, "w1"));
    REQUIRE(f.pool->execute("work").ok());
    REQUIRE(f.pool->wait_for([](const pool_status& s) { return all_idle(s) && s.replaced == 1; }));
    auto calls = f.contract->calls();
    REQUIRE(calls.size() == 4);
    CHECK(calls[0] == "handle_checkout w1 anonymous");
    CHECK(calls[1] == "handle_checkin w1 ok");
    CHECK(calls[2].rfind("terminate_worker w1", 0) == 0);
    CHECK(calls[3] == "init_worker w2");
    CHECK(f.contract->unmet().empty());
  }
}

TEST_CASE("handle_ping and handle_info on idle workers: ok keeps, remove replaces") {
  fixture f;
  REQUIRE(f.ready());
  f.contract->expect(step::ping(act::ok, "w1"));
  f.contract->expect(step::ping(act::remove, "w2"));
  CHECK(f.pool->ping_idle() == 1);
  REQUIRE(f.pool->wait_for([](const pool_status& s) { return all_idle(s) && s.replaced == 1; }));
  CHECK(f.contract->calls()
        == strings{"handle_ping w1", "handle_ping w2", "terminate_worker w2 scripted_ping_remove",
                   "init_worker w3"});
  CHECK(f.contract->unmet().empty());
}

TEST_CASE("an unknown checkout type is rejected, not a removal") {
  auto parsed = checkout_type::parse("sesion:abc");
  REQUIRE(std::holds_alternative<error>(parsed));
  CHECK(std::get<error>(parsed).type == "unknown_checkout_type");
  CHECK(std::get<checkout_type>(checkout_type::parse("session:abc")).session_id() == "abc");
  CHECK(std::get<checkout_type>(checkout_type::parse("any_worker")).what()
        == checkout_type::kind::any_worker);
}

TEST_CASE("a session checkout records the session on the worker until checkin") {
  fixture f(1);
  REQUIRE(f.ready());
  test_caller c{*f.pool};
  auto lease = c.checkout(checkout_type::session("s1"));
  REQUIRE(lease.grant);
  CHECK(f.contract->calls() == strings{"handle_checkout w1 session:s1"});
  CHECK(c.execute(*lease.grant, "work").ok());
  CHECK(c.checkin(*lease.grant));
  CHECK(f.pool->wait_for(all_idle));
}
