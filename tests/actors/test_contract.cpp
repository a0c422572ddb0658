// Layer 1: the worker contract as the pool drives it, against the scripted
// contract and fake in-process workers. As in NimblePool's own tests, every
// callback is scripted, in order (init_worker and terminate_worker included):
// the fixture scripts the initial workers' init_worker and allows the
// terminate_worker(pool_stopping) calls of its teardown; anything unscripted,
// or a scripted step that never ran, fails the test when the fixture ends
// (check_script, on the test thread, after the pool stopped).
#include <algorithm>
#include <optional>
#include <thread>

#include <doctest/doctest.h>

#include "dspex/actors/python_worker_contract.hpp"
#include "dspex/actors/worker_actor.hpp"
#include "support/event_recorder.hpp"
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

  /// `start`: the init_worker steps of the pool's start; by default
  /// init_worker ok for w1..w<size> (none for a lazy pool).
  explicit fixture(std::size_t size = 2, std::function<void(settings&)> tune = {},
                   std::optional<std::vector<step>> start = std::nullopt)
    : contract(std::make_shared<scripted_contract>()) {
    auto s = test_settings(size);
    if (tune)
      tune(s);
    if (!start) {
      start.emplace();
      if (!s.pool.lazy)
        for (std::size_t i = 1; i <= size; ++i)
          start->push_back(step::init(act::ok, "w" + std::to_string(i)));
    }
    for (auto& st : *start)
      contract->expect(st);
    pool = std::make_unique<test_pool>(test_pool_options{s, contract});
  }

  // The teardown: the pool stops (terminate_worker(pool_stopping) for each
  // worker left, the only callbacks allowed unscripted), then the script is
  // verified: every step ran, nothing came unscripted.
  ~fixture() {
    contract->allow(step::terminate({}, "pool_stopping"));
    pool.reset();
    check_script(*contract);
  }

  fixture(const fixture&) = delete;
  fixture& operator=(const fixture&) = delete;

  void expect(std::initializer_list<step> steps) { contract->expect(steps); }

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
  f.expect({step::checkout(act::ok, "w1", "anonymous"), step::checkin(act::ok, "w1", "ok")});
  auto r = f.pool->execute("work");
  REQUIRE(r.ok());
  CHECK(r.value()["worker_id"] == "w1");
  REQUIRE(f.pool->wait_for(all_idle));
  CHECK(f.contract->calls() == strings{"handle_checkout w1 anonymous", "handle_checkin w1 ok"});
  auto st = f.pool->status();
  CHECK(st.workers.at(0).stats.checkouts == 1);
  CHECK(st.workers.at(0).stats.successful_checkins == 1);
}

TEST_CASE("checkout remove: the worker is replaced and the same caller is served by the next") {
  fixture f;
  REQUIRE(f.ready());
  f.expect({step::checkout(act::remove, "w1", "anonymous"),
            step::terminate("w1", "checkout_failed"),
            step::init(act::ok, "w3"),
            step::checkout(act::ok, "w2", "anonymous"),
            step::checkin(act::ok, "w2", "ok")});
  auto r = f.pool->execute("work");
  REQUIRE(r.ok());
  CHECK(r.value()["worker_id"] == "w2");
  REQUIRE(f.pool->wait_for([](const pool_status& s) { return all_idle(s) && s.replaced == 1; }));
  CHECK(f.contract->calls()
        == strings{"handle_checkout w1 anonymous", "terminate_worker w1 checkout_failed",
                   "init_worker w3", "handle_checkout w2 anonymous", "handle_checkin w2 ok"});
}

TEST_CASE("checkout skip: that caller fails with the error and the worker stays") {
  fixture f(1);
  REQUIRE(f.ready());
  f.expect({step::checkout(act::skip, "w1"),
            step::checkout(act::ok, "w1"),
            step::checkin(act::ok, "w1", "ok")});
  auto r = f.pool->execute("work");
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().type == "scripted_skip");
  auto again = f.pool->execute("work");
  REQUIRE(again.ok());
  CHECK(again.value()["worker_id"] == "w1");
  CHECK(f.pool->status().replaced == 0);
  REQUIRE(f.pool->wait_for(all_idle));
  CHECK(f.contract->calls() == strings{"handle_checkout w1 anonymous",
                                       "handle_checkout w1 anonymous", "handle_checkin w1 ok"});
}

TEST_CASE("a throwing handle_checkout counts as remove with connect_error") {
  fixture f;
  REQUIRE(f.ready());
  f.expect({step::checkout(act::raise, "w1"),
            step::terminate("w1", "connect_error"),
            step::init(act::ok, "w3"),
            step::checkout(act::ok, "w2"),
            step::checkin(act::ok, "w2", "ok")});
  auto r = f.pool->execute("work");
  REQUIRE(r.ok());
  CHECK(r.value()["worker_id"] == "w2");
  REQUIRE(f.pool->wait_for([](const pool_status& s) { return all_idle(s) && s.replaced == 1; }));
  CHECK(f.contract->calls().at(1) == "terminate_worker w1 connect_error");
}

TEST_CASE("checkin remove and a throwing checkin remove the worker") {
  for (auto a : {act::remove, act::raise}) {
    fixture f(1);
    REQUIRE(f.ready());
    f.expect({step::checkout(act::ok, "w1"),
              step::checkin(a, "w1", "ok"),
              step::terminate("w1"),
              step::init(act::ok, "w2")});
    REQUIRE(f.pool->execute("work").ok());
    REQUIRE(f.pool->wait_for([](const pool_status& s) { return all_idle(s) && s.replaced == 1; }));
    auto calls = f.contract->calls();
    REQUIRE(calls.size() == 4);
    CHECK(calls[0] == "handle_checkout w1 anonymous");
    CHECK(calls[1] == "handle_checkin w1 ok");
    CHECK(calls[2].rfind("terminate_worker w1", 0) == 0);
    CHECK(calls[3] == "init_worker w2");
  }
}

// (handle_info is not driven here yet: the worker_gone message that triggers
// it is being changed to carry an error.)
TEST_CASE("handle_ping on idle workers: ok keeps, remove replaces") {
  fixture f;
  REQUIRE(f.ready());
  f.expect({step::ping(act::ok, "w1"),
            step::ping(act::remove, "w2"),
            step::terminate("w2", "scripted_ping_remove"),
            step::init(act::ok, "w3")});
  CHECK(f.pool->ping_idle() == 1);
  REQUIRE(f.pool->wait_for([](const pool_status& s) { return all_idle(s) && s.replaced == 1; }));
  CHECK(f.contract->calls()
        == strings{"handle_ping w1", "handle_ping w2", "terminate_worker w2 scripted_ping_remove",
                   "init_worker w3"});
}

// The maintenance tick: a worker idle for pool.health_interval gets the
// contract's handle_ping first; remove replaces it, ok goes on to the ping
// through its process. All scripted before the pool starts: the tick races
// nothing the test does.
TEST_CASE("the maintenance tick runs handle_ping on a worker idle for pool.health_interval") {
  auto contract = std::make_shared<scripted_contract>();
  for (auto& st : {step::init(act::ok, "w1"), step::ping(act::remove, "w1"),
                   step::terminate("w1", "scripted_ping_remove"), step::init(act::ok, "w2")})
    contract->expect(st);
  contract->allow(step::ping(act::ok, "w2"));  // and then at every tick
  auto s = test_settings(1);
  s.pool.health_interval = 20ms;
  {
    test_pool pool{test_pool_options{s, contract}};
    auto pinged = [&](const std::string& id) {
      auto calls = contract->calls();
      return std::count(calls.begin(), calls.end(), "handle_ping " + id);
    };
    REQUIRE(pool.wait_for([&](const pool_status& st) {
      return st.replaced == 1 && all_idle(st) && pinged("w2") >= 2;
    }));
    auto calls = contract->calls();
    REQUIRE(calls.size() >= 6);
    CHECK(calls[0] == "init_worker w1");
    CHECK(calls[1] == "handle_ping w1");
    CHECK(calls[2] == "terminate_worker w1 scripted_ping_remove");
    CHECK(calls[3] == "init_worker w2");
    for (std::size_t i = 4; i < calls.size(); ++i)
      CHECK(calls[i] == "handle_ping w2");
    contract->allow(step::terminate({}, "pool_stopping"));
  }
  check_script(*contract);
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
  f.expect({step::checkout(act::ok, "w1", "session:s1"), step::checkin(act::ok, "w1", "ok")});
  test_caller c{*f.pool};
  auto lease = c.checkout(checkout_type::session("s1"));
  REQUIRE(lease.grant);
  CHECK(f.contract->calls() == strings{"handle_checkout w1 session:s1"});
  CHECK(c.execute(*lease.grant, "work").ok());
  CHECK(c.checkin(*lease.grant));
  CHECK(f.pool->wait_for(all_idle));
}

TEST_CASE("wait_for_pool_ready reports a timeout instead of pretending success") {
  // A pool whose second worker never gets ready.
  fixture stuck(2, {}, std::vector<step>{step::init(act::ok, "w1"), step::init(act::async, "w2")});
  CHECK_FALSE(stuck.pool->wait_for_pool_ready(300ms));
  auto st = stuck.pool->status();
  CHECK(st.idle == 1);
  CHECK(st.starting == 1);
}

TEST_CASE("a caller that dies while queued is dropped and gets no worker") {
  fixture f(1);
  REQUIRE(f.ready());
  f.expect({step::checkout(act::ok, "w1"), step::checkin(act::ok, "w1", "ok")});
  test_caller holder{*f.pool};
  auto lease = holder.checkout();
  REQUIRE(lease.grant);
  {
    test_caller doomed{*f.pool};
    doomed.checkout_async();
    REQUIRE(f.pool->wait_for([](const pool_status& s) { return s.queued == 1; }));
    doomed.die();
  }
  REQUIRE(f.pool->wait_for([](const pool_status& s) { return s.queued == 0; }));
  CHECK(holder.checkin(*lease.grant));
  REQUIRE(f.pool->wait_for(all_idle));
  CHECK(f.pool->status().workers.at(0).stats.checkouts == 1);
}

TEST_CASE("a caller that dies holding a lease: in sync the worker returns, else it is replaced") {
  SUBCASE("no request in flight") {
    fixture f(1);
    REQUIRE(f.ready());
    f.expect({step::checkout(act::ok, "w1")});  // the revoke returns it: no checkin callback
    test_caller c{*f.pool};
    auto lease = c.checkout();
    REQUIRE(lease.grant);
    c.die();
    REQUIRE(f.pool->wait_for(all_idle));
    auto st = f.pool->status();
    CHECK(st.replaced == 0);
    CHECK(st.workers.at(0).id == "w1");
  }
  SUBCASE("a request in flight") {
    fixture f(1);
    REQUIRE(f.ready());
    f.expect({step::checkout(act::ok, "w1"),
              step::terminate("w1", "lease_revoked"),
              step::init(act::ok, "w2")});
    test_caller c{*f.pool};
    auto lease = c.checkout();
    REQUIRE(lease.grant);
    c.execute_async(*lease.grant, "hold");
    c.die();
    REQUIRE(f.pool->wait_for([](const pool_status& s) { return all_idle(s) && s.replaced == 1; }));
    CHECK(f.pool->status().workers.at(0).id == "w2");
  }
}

TEST_CASE("only the lease holder's requests reach a checked-out worker") {
  fixture f(1);
  REQUIRE(f.ready());
  f.expect({step::checkout(act::ok, "w1"), step::checkin(act::ok, "w1", "ok")});
  test_caller c{*f.pool};
  auto lease = c.checkout();
  REQUIRE(lease.grant);
  CHECK(c.execute(*lease.grant, "work").ok());
  auto forged = *lease.grant;
  forged.lease_id ^= 2;
  auto r = c.execute(forged, "work");
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().type == "not_lease_holder");
  CHECK(c.checkin(*lease.grant));
  auto stale = c.execute(*lease.grant, "work");
  REQUIRE_FALSE(stale.ok());
  CHECK(stale.error().type == "not_lease_holder");
  CHECK_FALSE(c.checkin(*lease.grant));  // a second checkin is a no-op, not a crash
}

TEST_CASE("a caller whose deadline passes while queued gets checkout_timeout") {
  fixture f(1);
  REQUIRE(f.ready());
  f.expect({step::checkout(act::ok, "w1"), step::checkin(act::ok, "w1", "ok")});
  test_caller holder{*f.pool};
  auto lease = holder.checkout();
  REQUIRE(lease.grant);
  test_caller late{*f.pool};
  auto r = late.checkout(checkout_type::anonymous(), 100ms);
  REQUIRE_FALSE(r.grant);
  CHECK(r.err.category == error_category::timeout_error);
  CHECK(r.err.type == "checkout_timeout");
  auto st = f.pool->status();
  CHECK(st.queued == 0);
  CHECK(st.leased == 1);
  CHECK(holder.checkin(*lease.grant));
  CHECK(f.pool->wait_for(all_idle));
}

TEST_CASE("a timeout racing the handover: the caller cancels and the worker comes back") {
  fixture f(1);
  REQUIRE(f.ready());
  f.expect({step::checkout(act::ok, "w1")});  // the cancel returns it: no checkin callback
  test_caller c{*f.pool};
  f.pool->hold();
  // The caller's own wait ends while the pool is still; the pool grants later
  // (its deadline is far), CAF drops that reply, the cancel returns the worker.
  c.checkout_giving_up(50ms, 10s);
  f.pool->resume();
  REQUIRE(f.pool->wait_for([](const pool_status& s) {
    return all_idle(s) && s.workers.size() == 1 && s.workers[0].stats.checkouts == 1;
  }));
  CHECK(f.pool->status().replaced == 0);
}

TEST_CASE("an expired caller is never handed a worker, even when the pool was still") {
  fixture f(1);
  REQUIRE(f.ready());  // nothing scripted: a handle_checkout would fail the test
  test_caller c{*f.pool};
  f.pool->hold();
  c.checkout_async(checkout_type::anonymous(), 1ms);
  // The deadline passes on the clock while the pool is held.
  std::this_thread::sleep_until(std::chrono::steady_clock::now() + 5ms);
  f.pool->resume();
  auto r = c.await_checkout();
  REQUIRE_FALSE(r.grant);
  CHECK(r.err.type == "checkout_timeout");
  CHECK(f.pool->status().workers.at(0).stats.checkouts == 0);
}

TEST_CASE("overflow workers start on demand and retire when idle") {
  SUBCASE("at once") {
    fixture f(1, [](settings& s) { s.pool.max_overflow = 2; });
    REQUIRE(f.ready());
    f.expect({step::checkout(act::ok, "w1"),
              step::init(act::ok, "w2"), step::checkout(act::ok, "w2"),
              step::init(act::ok, "w3"), step::checkout(act::ok, "w3"),
              step::checkin(act::ok, "w2", "ok"), step::terminate("w2", "overflow_retired"),
              step::checkin(act::ok, "w3", "ok"), step::terminate("w3", "overflow_retired"),
              step::checkin(act::ok, "w1", "ok")});
    test_caller a{*f.pool}, b{*f.pool}, c{*f.pool}, d{*f.pool};
    auto la = a.checkout(), lb = b.checkout(), lc = c.checkout();
    REQUIRE(la.grant);
    REQUIRE(lb.grant);
    REQUIRE(lc.grant);
    auto st = f.pool->status();
    CHECK(st.overflow == 2);
    CHECK(st.leased == 3);
    auto ld = d.checkout(checkout_type::anonymous(), 100ms);  // beyond size + overflow: waits
    CHECK_FALSE(ld.grant);
    CHECK(ld.err.type == "checkout_timeout");
    CHECK(b.checkin(*lb.grant));
    CHECK(c.checkin(*lc.grant));
    REQUIRE(f.pool->wait_for([](const pool_status& s) {
      return s.overflow == 0 && s.workers.size() == 1 && s.leased == 1 && s.removing == 0;
    }));
    CHECK(a.checkin(*la.grant));
    CHECK(f.pool->wait_for(all_idle));
  }
  SUBCASE("after an idle delay, not at once") {
    constexpr auto idle_delay = 300ms;
    fixture f(1, [&](settings& s) {
      s.pool.max_overflow = 1;
      s.pool.overflow_idle_delay = idle_delay;
    });
    REQUIRE(f.ready());
    f.expect({step::checkout(act::ok, "w1"),
              step::init(act::ok, "w2"), step::checkout(act::ok, "w2"),
              step::checkin(act::ok, "w2", "ok"), step::terminate("w2", "overflow_retired"),
              step::checkin(act::ok, "w1", "ok")});
    event_recorder events{f.pool->events()};
    test_caller a{*f.pool}, b{*f.pool};
    auto la = a.checkout(), lb = b.checkout();
    REQUIRE(la.grant);
    REQUIRE(lb.grant);
    CHECK(lb.grant->worker_id == "w2");
    auto checked_in = std::chrono::steady_clock::now();
    CHECK(b.checkin(*lb.grant));
    REQUIRE(f.pool->wait_for([](const pool_status& s) {
      return s.overflow == 0 && s.removing == 0 && s.workers.size() == 1;
    }));
    // Its retirement came no sooner than the idle delay after the checkin
    // (stamped on the pool's thread). A lower bound only: a slow machine
    // makes the gap longer, never shorter, so this cannot fail by slowness.
    auto removed = events.all();
    auto it = std::find_if(removed.begin(), removed.end(), [](const event& e) {
      return e.kind == event_kind::worker_removed && e.worker_id == "w2";
    });
    REQUIRE(it != removed.end());
    CHECK(it->at - checked_in >= idle_delay);
    CHECK(a.checkin(*la.grant));
  }
}

TEST_CASE("pool_saturated beyond max_queue and full for a non-blocking checkout") {
  fixture f(1, [](settings& s) { s.pool.max_queue = 1; });
  REQUIRE(f.ready());
  // `full` and `pool_saturated` are answered without a callback.
  f.expect({step::checkout(act::ok, "w1"), step::checkin(act::ok, "w1", "ok"),
            step::checkout(act::ok, "w1"), step::checkin(act::ok, "w1", "ok")});
  test_caller a{*f.pool}, b{*f.pool}, c{*f.pool}, d{*f.pool};
  auto la = a.checkout();
  REQUIRE(la.grant);
  auto nb = d.checkout(checkout_type::anonymous(), 5s, false);
  REQUIRE_FALSE(nb.grant);
  CHECK(nb.err.category == error_category::resource_error);
  CHECK(nb.err.type == "full");
  b.checkout_async();
  REQUIRE(f.pool->wait_for([](const pool_status& s) { return s.queued == 1; }));
  auto sat = c.checkout();
  REQUIRE_FALSE(sat.grant);
  CHECK(sat.err.type == "pool_saturated");
  CHECK(a.checkin(*la.grant));
  auto lb = b.await_checkout();
  REQUIRE(lb.grant);
  CHECK(b.checkin(*lb.grant));
  CHECK(f.pool->wait_for(all_idle));
}

TEST_CASE("three consecutive failed checkins remove a worker, a success resets the count") {
  fixture f(1);
  REQUIRE(f.ready());
  auto round = [&](const char* status) {
    f.expect({step::checkout(act::ok, "w1"), step::checkin(act::ok, "w1", status)});
  };
  round("error");
  round("error");
  round("ok");
  round("error");
  round("error");
  // The third failure in a row removes it before handle_checkin is asked.
  f.expect({step::checkout(act::ok, "w1"), step::terminate("w1", "failure_threshold"),
            step::init(act::ok, "w2")});
  test_caller c{*f.pool};
  auto fail_once = [&] {
    auto l = c.checkout();
    REQUIRE(l.grant);
    CHECK(c.checkin(*l.grant, checkin_status::failed(make_error(
                                error_category::communication_error, "garbled", "garbled reply"))));
  };
  auto succeed_once = [&] {
    auto l = c.checkout();
    REQUIRE(l.grant);
    CHECK(c.checkin(*l.grant));
  };
  fail_once();
  fail_once();
  succeed_once();
  fail_once();
  fail_once();
  CHECK(f.pool->status().replaced == 0);
  CHECK(f.pool->status().workers.at(0).stats.error_checkins == 4);
  fail_once();
  REQUIRE(f.pool->wait_for([](const pool_status& s) { return all_idle(s) && s.replaced == 1; }));
  CHECK(f.pool->status().workers.at(0).id == "w2");
  auto calls = f.contract->calls();
  CHECK(std::find(calls.begin(), calls.end(), "terminate_worker w1 failure_threshold")
        != calls.end());
}

TEST_CASE("Python-side errors are the program's, not the worker's: they never remove it") {
  fixture f(1);
  REQUIRE(f.ready());
  for (int i = 0; i < 5; ++i)
    f.expect({step::checkout(act::ok, "w1"), step::checkin(act::ok, "w1", "error")});
  for (int i = 0; i < 5; ++i) {
    auto r = f.pool->execute("fail");
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().category == error_category::python_error);
  }
  REQUIRE(f.pool->wait_for(all_idle));
  auto st = f.pool->status();
  CHECK(st.replaced == 0);
  CHECK(st.workers.at(0).stats.error_checkins == 5);
}

TEST_CASE("the Python contract validates worker and caller before a handover (seed Fix 2)") {
  caf::actor_system_config cfg;
  caf::actor_system sys{cfg};
  auto stand_in = sys.spawn([]() -> caf::behavior { return {[](int) {}}; });
  auto health = std::make_shared<worker_health>();
  pool_worker w;
  w.id = "w9";
  // Never sent anything: the contract decides from the health record alone.
  w.handle = caf::actor_cast<worker_handle>(stand_in);
  w.state = health;
  auto config = std::make_shared<settings>(test_settings(1));
  python_worker_contract contract{config};
  auto checkout = [&](caller_info c = caller_info{caf::actor_addr{}, true}) {
    return contract.handle_checkout(checkout_type::anonymous(), c, w);
  };
  health->process_alive = true;
  health->pipes_open = true;
  CHECK(checkout().what() == checkout_result::kind::ok);
  CHECK(checkout().client() == stand_in);

  health->pipes_open = false;
  auto r = checkout();
  REQUIRE(r.what() == checkout_result::kind::remove);
  CHECK(r.reason().type == "connect_failed");
  CHECK(r.reason().context["reason"] == "port_closed");
  CHECK(r.reason().context["worker_id"] == "w9");

  health->process_alive = false;
  CHECK(checkout().reason().context["reason"] == "process_not_alive");

  health->actor_alive = false;
  CHECK(checkout().reason().type == "connect_exited");

  health->actor_alive = true;
  health->process_alive = true;
  health->pipes_open = true;
  auto dead_caller = checkout(caller_info{caf::actor_addr{}, false});
  REQUIRE(dead_caller.what() == checkout_result::kind::skip);  // the worker stays
  CHECK(dead_caller.reason().type == "target_process_dead");

  // The rollback switch: no validation at all.
  config->pool.use_safe_port_connect = false;
  health->process_alive = false;
  CHECK(checkout().what() == checkout_result::kind::ok);

  // handle_info: the process exited → remove; handle_ping checks health.
  CHECK(contract.handle_info(caf::make_message(worker_gone_atom::value, std::string{"w9"}), w)
          .what()
        == keep_or_remove::kind::remove);
  CHECK(contract.handle_ping(w).what() == keep_or_remove::kind::remove);
  health->process_alive = true;
  CHECK(contract.handle_ping(w).what() == keep_or_remove::kind::ok);
  CHECK(contract.handle_checkin(checkin_status::close(), w).what() == keep_or_remove::kind::remove);
  CHECK(contract.handle_checkin(checkin_status::ok(), w).what() == keep_or_remove::kind::ok);
  caf::anon_send_exit(stand_in, caf::exit_reason::kill);
}

TEST_CASE("the four checkout error terms of seed Fix 1") {
  CHECK(checkout_failed("x", "w1").type == "checkout_failed");
  CHECK(connect_failed("x", "w1").type == "connect_failed");
  CHECK(connect_exited("x", "w1").type == "connect_exited");
  auto e = connect_error("exception", "boom", "w1");
  CHECK(e.type == "connect_error");
  CHECK(e.context["kind"] == "exception");
  CHECK(e.context["worker_id"] == "w1");
  CHECK(e.message == "connect_error(exception, boom)");
}

TEST_CASE("lazy start: no worker until a caller needs one, then up to pool.size") {
  fixture f(2, [](settings& s) { s.pool.lazy = true; });
  f.expect({step::init(act::ok, "w1"), step::checkout(act::ok, "w1"),
            step::init(act::ok, "w2"), step::checkout(act::ok, "w2"),
            step::checkin(act::ok, "w1", "ok"), step::checkin(act::ok, "w2", "ok")});
  CHECK(f.pool->status().workers.empty());
  test_caller a{*f.pool}, b{*f.pool};
  auto la = a.checkout();
  REQUIRE(la.grant);
  CHECK(f.pool->status().workers.size() == 1);
  auto lb = b.checkout();
  REQUIRE(lb.grant);
  CHECK(f.pool->status().workers.size() == 2);
  CHECK(a.checkin(*la.grant));
  CHECK(b.checkin(*lb.grant));
  CHECK(f.pool->status().workers.size() == 2);
}

TEST_CASE("strategy: fifo rotates through idle workers, lifo reuses the last one") {
  auto served_by = [](const char* strategy, const strings& expected) {
    fixture f(3, [&](settings& s) { s.pool.strategy = strategy; });
    REQUIRE(f.ready());
    for (auto& id : expected)
      f.expect({step::checkout(act::ok, id), step::checkin(act::ok, id, "ok")});
    std::vector<std::string> ids;
    for (int i = 0; i < 4; ++i) {
      auto r = f.pool->execute("work");
      REQUIRE(r.ok());
      ids.push_back(r.value()["worker_id"]);
      REQUIRE(f.pool->wait_for(all_idle));
    }
    return ids;
  };
  const strings fifo{"w1", "w2", "w3", "w1"}, lifo{"w3", "w3", "w3", "w3"};
  CHECK(served_by("fifo", fifo) == fifo);
  CHECK(served_by("lifo", lifo) == lifo);
}

TEST_CASE("a contract that removes every worker at checkout backs off instead of spinning") {
  fixture f(1);
  REQUIRE(f.ready());
  // Every checkout removes its worker and the replacement is asked the same.
  // How many rounds fit in a given time depends on the machine, so they are
  // allowed rather than scripted one by one; the test checks the delays the
  // pool schedules and that each next removal waited for its delay.
  f.contract->allow(step::checkout(act::remove, {}, "anonymous"));
  f.contract->allow(step::terminate({}, "checkout_failed"));
  f.contract->allow(step::init(act::ok));
  event_recorder events{f.pool->events()};
  test_caller c{*f.pool};
  c.checkout_async(checkout_type::anonymous(), 60s);  // never served: the caller dies at the end
  // A hang guard only: the three delays add up to 1.4 s at most.
  constexpr std::size_t rounds = 3;
  REQUIRE(events.wait_for(kind_is(event_kind::restart_scheduled), rounds, 60s));
  REQUIRE(events.wait_for(kind_is(event_kind::worker_removed), rounds + 2, 60s));
  auto all = events.all();
  const auto& pc = f.pool->config().pool;
  std::size_t n = 0;
  for (auto it = all.begin(); it != all.end() && n < rounds; ++it) {
    if (it->kind != event_kind::restart_scheduled)
      continue;
    ++n;
    CAPTURE(n);
    // Exponential from restart_backoff_base, capped, and jitter only shortens (by at most 20%).
    auto full = std::min<std::chrono::milliseconds>(pc.restart_backoff_max,
                                                    pc.restart_backoff_base * (1 << (n - 1)));
    CHECK(it->attempt == n);
    CHECK(it->delay <= full);
    CHECK(it->delay >= full * 8 / 10 - 1ms);
    // The next removal came no sooner than that delay: no spinning. (A lower
    // bound: a slow machine only makes the gap longer.)
    auto next_removal = std::find_if(it, all.end(), [](const event& e) {
      return e.kind == event_kind::worker_removed;
    });
    REQUIRE(next_removal != all.end());
    CHECK(next_removal->at - it->at >= it->delay);
  }
  CHECK(n == rounds);
  // Removals before the first delay: the first one restarts at once (one young removal).
  auto first_delay = std::find_if(all.begin(), all.end(), kind_is(event_kind::restart_scheduled));
  CHECK(std::count_if(all.begin(), first_delay, kind_is(event_kind::worker_removed)) == 2);
}

// -- the checker itself ---------------------------------------------------------------------
// A scripted contract must fail a test on anything unscripted and on a scripted
// step that never ran, whether or not the test remembers to verify. These
// tests run the verification and check what it reports (so they pass), and two
// of them are real tests that must fail (doctest::should_fail).

TEST_CASE("the checker reports a scripted step that never ran, once") {
  auto contract = std::make_shared<scripted_contract>();
  contract->expect(step::init(act::ok, "w1"));
  contract->expect(step::checkout(act::remove, "w1", "anonymous"));  // never triggered
  {
    test_pool pool{test_pool_options{test_settings(1), contract}};
    REQUIRE(pool.wait_for_pool_ready());
    contract->allow(step::terminate({}, "pool_stopping"));
  }
  CHECK(contract->problems()
        == strings{"scripted step never ran: handle_checkout w1 anonymous -> remove"});
  CHECK(contract->verify()
        == strings{"scripted step never ran: handle_checkout w1 anonymous -> remove"});
  CHECK(contract->verify().empty());  // reported once: the destructor has nothing left
}

TEST_CASE("the checker reports unscripted callbacks made on the pool's thread") {
  auto contract = std::make_shared<scripted_contract>();
  contract->expect(step::init(act::ok, "w1"));
  {
    test_pool pool{test_pool_options{test_settings(1), contract}};
    REQUIRE(pool.wait_for_pool_ready());
    // Neither callback is scripted: both are answered with the default (the
    // call succeeds) and recorded, not asserted on the actor thread.
    REQUIRE(pool.execute("work").ok());
    REQUIRE(pool.wait_for(all_idle));
  }  // the pool's teardown (terminate_worker pool_stopping) is not allowed here either
  CHECK(contract->verify()
        == strings{"unscripted call: handle_checkout w1 anonymous (nothing scripted left)",
                   "unscripted call: handle_checkin w1 ok (nothing scripted left)",
                   "unscripted call: terminate_worker w1 pool_stopping (nothing scripted left)"});
}

TEST_CASE("the checker reports a callback out of order and a step for another worker") {
  auto contract = std::make_shared<scripted_contract>();
  contract->expect({step::init(act::ok, "w1"), step::init(act::ok, "w2"),
                    step::checkin(act::ok, "w1", "ok"),  // scripted before its checkout
                    step::checkout(act::ok, "w2")});     // the pool (fifo) takes w1
  {
    test_pool pool{test_pool_options{test_settings(2), contract}};
    REQUIRE(pool.wait_for_pool_ready());
    REQUIRE(pool.execute("work").ok());
    REQUIRE(pool.wait_for(all_idle));
    contract->allow(step::terminate({}, "pool_stopping"));
  }
  CHECK(contract->verify()
        == strings{"unscripted call: handle_checkout w1 anonymous (next scripted: "
                   "handle_checkin w1 ok -> ok)",
                   "scripted step never ran: handle_checkout w2 -> ok"});
}

TEST_CASE("the checker fails a test that forgets to verify: the destructor reports") {
  auto reported = std::make_shared<strings>();
  auto contract = std::make_shared<scripted_contract>();
  contract->on_failure([reported](const strings& p) { *reported = p; });
  contract->expect(step::init(act::ok, "w1"));
  contract->expect(step::ping(act::ok, "w1"));  // never triggered
  {
    test_pool pool{test_pool_options{test_settings(1), contract}};
    REQUIRE(pool.wait_for_pool_ready());
    REQUIRE(pool.execute("work").ok());  // unscripted
    REQUIRE(pool.wait_for(all_idle));
    contract->allow(step::terminate({}, "pool_stopping"));
  }
  REQUIRE(contract.use_count() == 1);  // the pool let go: it is destroyed here, on this thread
  contract.reset();                    // never verified
  CHECK(*reported
        == strings{"unscripted call: handle_checkout w1 anonymous (next scripted: "
                   "handle_ping w1 -> ok)",
                   "unscripted call: handle_checkin w1 ok (next scripted: handle_ping w1 -> ok)",
                   "scripted step never ran: handle_ping w1 -> ok"});
}

// These two must FAIL (should_fail turns their failure into a pass, and a
// pass into a failure): the default reporter fails the test it runs in.
TEST_CASE("meta: a scripted step that never ran fails the test (expected to fail)"
          * doctest::should_fail()) {
  fixture f(1);
  REQUIRE(f.ready());
  f.expect({step::checkout(act::ok, "w1")});  // never triggered; the fixture's check fails
}

TEST_CASE("meta: an unscripted callback fails the test even unverified (expected to fail)"
          * doctest::should_fail()) {
  auto contract = std::make_shared<scripted_contract>();
  contract->expect(step::init(act::ok, "w1"));
  contract->allow(step::terminate({}, "pool_stopping"));
  test_pool pool{test_pool_options{test_settings(1), contract}};
  REQUIRE(pool.wait_for_pool_ready());
  REQUIRE(pool.execute("work").ok());  // handle_checkout/handle_checkin unscripted
  REQUIRE(pool.wait_for(all_idle));
  // No verify: `pool` stops first (declared last), then the contract's
  // destructor reports on this thread.
}
