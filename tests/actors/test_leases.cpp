// Layer 2: leases through the public API against the bundled Python worker,
// and seed Fix 3's list_programs shape.
#include <thread>

#include <doctest/doctest.h>

#include "support/harness.hpp"
#include "support/test_pool.hpp"

using namespace dspex;
using namespace dspex::testing;

namespace {

std::unique_ptr<lease> take(runtime& rt, checkout_type type = checkout_type::anonymous(),
                            checkout_options options = {}) {
  auto r = rt.checkout(std::move(type), options);
  REQUIRE(std::holds_alternative<std::unique_ptr<lease>>(r));
  return std::move(std::get<std::unique_ptr<lease>>(r));
}

nlohmann::json program(const std::string& id) {
  return {{"id", id},
          {"signature",
           {{"inputs", {{{"name", "question"}}}}, {"outputs", {{{"name", "answer"}}}}}}};
}

} // namespace

TEST_CASE("a lease: checkout, several requests on the same worker, checkin") {
  auto rt = runtime::start(test_settings(2));
  auto l = take(*rt, checkout_type::session("s1"));
  auto a = l->execute("ping");
  auto b = l->execute("ping");
  REQUIRE(a.ok());
  REQUIRE(b.ok());
  CHECK(a.value()["worker_id"] == l->worker_id());
  CHECK(b.value()["worker_id"] == l->worker_id());
  CHECK(rt->status().leased == 1);
  CHECK(l->checkin());
  CHECK(l->checked_in());
  auto late = l->execute("ping");
  REQUIRE_FALSE(late.ok());
  CHECK(late.error().type == "not_lease_holder");
  auto st = wait_for_status(*rt, full_and_idle);
  CHECK(st.ok);
  CHECK(st.status.leased == 0);
  rt->stop();
  CHECK(wait_no_children(::getpid(), 10s).empty());
}

TEST_CASE("a non-blocking checkout fails with `full` when every worker is leased") {
  auto rt = runtime::start(test_settings(1));
  auto l = take(*rt);
  auto r = rt->checkout(checkout_type::anonymous(), checkout_options{std::nullopt, false});
  REQUIRE(std::holds_alternative<error>(r));
  CHECK(std::get<error>(r).type == "full");
  auto timed = rt->checkout(checkout_type::anonymous(), checkout_options{200ms, true});
  REQUIRE(std::holds_alternative<error>(timed));
  CHECK(std::get<error>(timed).type == "checkout_timeout");
  CHECK(l->checkin());
  rt->stop();
}

TEST_CASE("a dropped lease is revoked: the worker returns when in sync, else is replaced") {
  auto rt = runtime::start(test_settings(1));
  auto pid = rt->status().workers.at(0).pid;
  SUBCASE("nothing in flight: the same worker comes back") {
    take(*rt).reset();
    auto st = wait_for_status(*rt, full_and_idle);
    REQUIRE(st.ok);
    CHECK(st.status.replaced == 0);
    CHECK(st.status.workers.at(0).pid == pid);
  }
  rt->stop();
  CHECK(wait_no_children(::getpid(), 10s).empty());
}

TEST_CASE("a lease holder that dies with a request in flight: its Python worker is replaced") {
  test_pool pool{test_pool_options{test_settings(1), nullptr}};
  REQUIRE(pool.wait_for_pool_ready());
  auto pid = pool.status().workers.at(0).pid;
  {
    test_caller c{pool};
    auto l = c.checkout();
    REQUIRE(l.grant);
    // Sent before the caller dies, so it is in the worker's mailbox before
    // the pool's revoke: the revoke always finds it in flight.
    c.execute_async(*l.grant, "hang");
    c.die();
  }
  REQUIRE(pool.wait_for([](const pool_status& s) { return s.replaced == 1 && full_and_idle(s); }));
  CHECK(wait_gone(pid, 10s));
}

TEST_CASE("checkin(close) does not reuse the Python worker") {
  test_pool pool{test_pool_options{test_settings(1), nullptr}};
  REQUIRE(pool.wait_for_pool_ready());
  test_caller c{pool};
  auto l = c.checkout();
  REQUIRE(l.grant);
  CHECK(c.checkin(*l.grant, checkin_status::close()));
  REQUIRE(pool.wait_for([](const pool_status& s) { return s.replaced == 1 && full_and_idle(s); }));
  CHECK(pool.status().workers.at(0).id == "w2");
}

TEST_CASE("list_programs returns {programs: [...], total_count: N} (seed Fix 3)") {
  auto rt = runtime::start(test_settings(1));
  auto l = take(*rt, checkout_type::session("fix3"));
  for (int i = 0; i < 10; ++i) {
    auto args = program("p" + std::to_string(i));
    args["session_id"] = "fix3";
    REQUIRE(l->execute("create_program", args).ok());
  }
  auto listed = l->execute("list_programs", {{"session_id", "fix3"}});
  REQUIRE(listed.ok());
  auto& result = listed.value();
  REQUIRE(result.is_object());
  REQUIRE(result.contains("programs"));
  CHECK(result["programs"].is_array());
  CHECK(result["total_count"] == 10);
  CHECK(result["programs"].size() == 10);
  CHECK(l->checkin());
  rt->stop();
}
