// Service detection (seed Fix 5) and the standalone bridge, against real
// worker processes: each of detect_service's outcomes, a dead registration
// skipped, and a bridge that serves, queues FIFO, restarts its worker after
// SIGKILL, backs off when starts keep failing, and stops leaving no child.
//
// Every test case has its own actor system (scheduling policy "sharing");
// its fixture unregisters every name and stops every pool and bridge before
// the system is destroyed, so ~actor_system() never waits on a live actor.
#include <csignal>
#include <future>
#include <thread>

#include <doctest/doctest.h>

#include <fstream>

#include <caf/all.hpp>

#include "dspex/actors/bridge_actor.hpp"
#include "dspex/actors/messages.hpp"
#include "dspex/actors/pool_actor.hpp"
#include "dspex/actors/service.hpp"
#include "support/harness.hpp"
#include "support/worker_gate.hpp"

using namespace dspex;
using namespace dspex::testing;

namespace {

constexpr auto margin = std::chrono::seconds{5};

class fixture {
public:
  fixture() : cfg_{}, sys_{cfg_.set("scheduler.policy", caf::atom("sharing"))} {
  }

  ~fixture() {
    unregister_services(sys_);
    for (auto& a : started_)
      stop(a);
  }

  caf::actor_system& sys() { return sys_; }

  caf::actor start_pool(std::size_t size = 1) {
    // As the registry holds it: untyped.
    auto a = caf::actor_cast<caf::actor>(
      spawn_pool(sys_, std::make_shared<const settings>(test_settings(size))));
    started_.push_back(a);
    REQUIRE(await_ready(a).ok());
    return a;
  }

  caf::actor start_bridge(settings s = test_settings(1), bool wait_ready = true) {
    auto a = caf::actor_cast<caf::actor>(
      spawn_bridge(sys_, std::make_shared<const settings>(std::move(s))));
    started_.push_back(a);
    if (wait_ready)
      REQUIRE(await_ready(a).ok());
    return a;
  }

  outcome await_ready(const caf::actor& a) {
    outcome result = outcome::failure(make_error(error_category::system_error, "no_reply", ""));
    caf::scoped_actor self{sys_};
    self->request(a, caf::duration{15s}, await_ready_atom::value)
      .receive([&](outcome& o) { result = std::move(o); },
               [&](caf::error& e) {
                 result = outcome::failure(
                   make_error(error_category::system_error, "actor_error", sys_.render(e)));
               });
    return result;
  }

  outcome execute(const caf::actor& a, const std::string& command,
                  nlohmann::json args = nlohmann::json::object(),
                  std::chrono::milliseconds timeout = 5s) {
    outcome result = outcome::failure(make_error(error_category::system_error, "no_reply", ""));
    caf::scoped_actor self{sys_};
    call c{command, std::move(args), std::chrono::steady_clock::now() + timeout};
    self->request(a, caf::duration{timeout + margin}, execute_atom::value, std::move(c))
      .receive([&](outcome& o) { result = std::move(o); },
               [&](caf::error& e) {
                 result = outcome::failure(
                   make_error(error_category::system_error, "actor_error", sys_.render(e)));
               });
    return result;
  }

  /// A call from its own thread (and its own caller actor).
  std::future<outcome> execute_async(const caf::actor& a, const std::string& command,
                                     nlohmann::json args = nlohmann::json::object(),
                                     std::chrono::milliseconds timeout = 10s) {
    return std::async(std::launch::async, [this, a, command, args, timeout] {
      return execute(a, command, args, timeout);
    });
  }

  pool_status status(const caf::actor& a) {
    pool_status result;
    caf::scoped_actor self{sys_};
    self->request(a, caf::duration{10s}, status_atom::value)
      .receive([&](pool_status& s) { result = std::move(s); }, [&](caf::error&) {});
    return result;
  }

  bool wait_status(const caf::actor& a, const std::function<bool(const pool_status&)>& pred,
                   std::chrono::milliseconds timeout = 10s) {
    auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      if (pred(status(a)))
        return true;
      if (std::chrono::steady_clock::now() >= deadline)
        return false;
      std::this_thread::sleep_for(5ms);
    }
  }

  /// Graceful stop (bounded), then waits until the actor has terminated.
  /// Returns whether it answered the stop with true.
  bool stop(const caf::actor& a) {
    caf::scoped_actor self{sys_};
    self->monitor(a);
    bool answered = false;
    self->request(a, caf::duration{10s}, stop_atom::value)
      .receive([&](bool ok) { answered = ok; }, [&](caf::error&) {});
    if (!answered)
      self->send_exit(a, caf::exit_reason::kill);
    bool down = false;
    self->receive([&](caf::down_msg&) { down = true; }, caf::after(std::chrono::seconds{10}) >> [] {});
    CHECK(down);
    return answered;
  }

private:
  caf::actor_system_config cfg_;
  caf::actor_system sys_;
  std::vector<caf::actor> started_;
};

const service& found(const detect_result& r) {
  if (auto* err = std::get_if<error>(&r))
    FAIL("no service detected: " << err->describe());
  return std::get<service>(r);
}

std::string worker_mode(fixture& f, const caf::actor& a) {
  auto r = f.execute(a, "ping");
  REQUIRE(r.ok());
  return r.value()["mode"].get<std::string>();
}

bool registry_name_gone(caf::actor_system& sys, caf::atom_value key) {
  auto deadline = std::chrono::steady_clock::now() + 5s;
  while (sys.registry().get(key) != nullptr) {
    if (std::chrono::steady_clock::now() >= deadline)
      return false;
    std::this_thread::sleep_for(2ms);
  }
  return true;
}

nlohmann::json qa_program(const std::string& id) {
  return {{"id", id},
          {"signature",
           {{"inputs", {{{"name", "question"}}}}, {"outputs", {{{"name", "answer"}}}}}}};
}

} // namespace

TEST_CASE("detect_service: the registered pool comes first") {
  fixture f;
  auto pool = f.start_pool();
  auto bridge = f.start_bridge();
  REQUIRE(register_bridge(f.sys(), bridge));
  REQUIRE(register_pool(f.sys(), pool));
  CHECK(f.sys().registry().get<caf::actor>(pool_service_name) == pool);
  auto r = detect_service(f.sys());
  auto& s = found(r);
  CHECK(s.kind == service_kind::pool);
  CHECK(s.handle == pool);
  CHECK(s.name == "dspexpool");
  CHECK_FALSE(s.from_fallback);
  CHECK(worker_mode(f, s.handle) == "pool-worker");
  // Unregistering another actor's name does nothing; its own does.
  CHECK_FALSE(unregister_pool(f.sys(), bridge));
  CHECK(unregister_pool(f.sys(), pool));
  CHECK(f.sys().registry().get(pool_service_name) == nullptr);
}

TEST_CASE("detect_service: no pool, the registered bridge") {
  fixture f;
  auto bridge = f.start_bridge();
  REQUIRE(register_bridge(f.sys(), bridge));
  auto r = detect_service(f.sys());
  auto& s = found(r);
  CHECK(s.kind == service_kind::bridge);
  CHECK(s.handle == bridge);
  CHECK(s.name == "dspexbrdg");
  CHECK_FALSE(s.from_fallback);
  CHECK(worker_mode(f, s.handle) == "standalone");
}

TEST_CASE("detect_service: neither name registered, the fallback registry") {
  fixture f;
  auto bridge = f.start_bridge();
  auto pool = f.start_pool();
  // The bridge is registered first, yet a live pool is preferred.
  REQUIRE(register_service("svc-test-bridge", service_kind::bridge, bridge));
  REQUIRE(register_service("svc-test-pool", service_kind::pool, pool));
  {
    auto r = detect_service(f.sys());
    auto& s = found(r);
    CHECK(s.kind == service_kind::pool);
    CHECK(s.handle == pool);
    CHECK(s.name == "svc-test-pool");
    CHECK(s.from_fallback);
  }
  CHECK(unregister_service("svc-test-pool"));
  CHECK_FALSE(unregister_service("svc-test-pool"));
  {
    auto r = detect_service(f.sys());
    auto& s = found(r);
    CHECK(s.kind == service_kind::bridge);
    CHECK(s.handle == bridge);
    CHECK(s.name == "svc-test-bridge");
    CHECK(s.from_fallback);
    CHECK(worker_mode(f, s.handle) == "standalone");
  }
  // Entries of another actor system do not serve this one.
  fixture other;
  auto r = detect_service(other.sys());
  CHECK(std::holds_alternative<error>(r));
}

TEST_CASE("detect_service: nothing running is 'Python bridge not available'") {
  fixture f;
  auto r = detect_service(f.sys());
  REQUIRE(std::holds_alternative<error>(r));
  auto& err = std::get<error>(r);
  CHECK(err.message == "Python bridge not available");
  CHECK(err.category == error_category::connection_error);
  CHECK(err.type == "service_unavailable");
  // Registration of nothing, or of a name without an actor, is refused.
  CHECK_FALSE(register_pool(f.sys(), caf::actor{}));
  CHECK_FALSE(register_service("", service_kind::pool, caf::actor{}));
}

TEST_CASE("detect_service skips a registered pool that has terminated") {
  fixture f;
  auto pool = f.start_pool();
  auto bridge = f.start_bridge();
  REQUIRE(register_pool(f.sys(), pool));
  REQUIRE(register_bridge(f.sys(), bridge));
  REQUIRE(std::get<service>(detect_service(f.sys())).handle == pool);
  CHECK(is_alive(pool));
  // Stopped and terminated, but still registered until its clean-up ran:
  // detection checks liveness itself, it does not trust the entry.
  REQUIRE(f.stop(pool));
  CHECK_FALSE(is_alive(pool));
  {
    auto r = detect_service(f.sys());
    auto& s = found(r);
    CHECK(s.kind == service_kind::bridge);
    CHECK(s.handle == bridge);
  }
  // The termination functor erased the name; registering a dead actor fails.
  CHECK(registry_name_gone(f.sys(), pool_service_name));
  CHECK_FALSE(register_pool(f.sys(), pool));
  // The same for the fallback registry, down to nothing.
  CHECK(unregister_bridge(f.sys(), bridge));
  auto fallback_pool = f.start_pool();
  REQUIRE(register_service("svc-dead-pool", service_kind::pool, fallback_pool));
  REQUIRE(f.stop(fallback_pool));
  auto r = detect_service(f.sys());
  REQUIRE(std::holds_alternative<error>(r));
  CHECK(std::get<error>(r).message == "Python bridge not available");
  CHECK_FALSE(register_service("svc-dead-pool", service_kind::pool, fallback_pool));
}

TEST_CASE("the bridge serves calls through one standalone worker") {
  fixture f;
  auto bridge = f.start_bridge();
  auto ping = f.execute(bridge, "ping");
  REQUIRE(ping.ok());
  CHECK(ping.value()["mode"] == "standalone");
  CHECK(ping.value()["worker_id"] == "w1");
  CHECK(ping.value()["lm"] == "mock/mock");  // the LM configuration reached it

  REQUIRE(f.execute(bridge, "create_program", qa_program("qa")).ok());
  auto run = f.execute(bridge, "execute_program",
                       {{"program_id", "qa"}, {"inputs", {{"question", "2+2?"}}}});
  REQUIRE(run.ok());
  CHECK(run.value()["program_id"] == "qa");
  CHECK(run.value()["outputs"].contains("answer"));

  // A Python-side error is the caller's; the worker stays.
  auto missing = f.execute(bridge, "execute_program", {{"program_id", "nope"}});
  REQUIRE_FALSE(missing.ok());
  CHECK(missing.error().category == error_category::python_error);

  auto st = f.status(bridge);
  CHECK(st.size == 1);
  CHECK(st.idle == 1);
  CHECK(st.busy == 0);
  REQUIRE(st.workers.size() == 1);
  CHECK(st.workers[0].id == "w1");
  CHECK(st.workers[0].pid > 0);
  CHECK(st.workers[0].stats.checkouts == 4);
  CHECK(st.workers[0].stats.successful_checkins == 3);
  CHECK(st.workers[0].stats.error_checkins == 1);
}

TEST_CASE("the bridge queues concurrent callers in FIFO order, each with its deadline") {
  fixture f;
  auto bridge = f.start_bridge();
  worker_gate gate;  // the only worker stays busy until every caller is queued
  auto holder = f.execute_async(bridge, "sleep", gate.sleep_args());
  REQUIRE(f.wait_status(bridge, [](const pool_status& s) { return s.busy == 1; }));
  constexpr int n = 8;
  std::vector<std::future<outcome>> calls;
  for (int i = 0; i < n; ++i) {
    calls.push_back(f.execute_async(bridge, "get_stats"));
    // One at a time: the submission order is the order the bridge got them.
    REQUIRE(f.wait_status(bridge, [&](const pool_status& s) {
      return s.queued == static_cast<std::size_t>(i + 1);
    }));
  }
  // One more caller gives up while queued: it gets checkout_timeout and never
  // reaches the worker.
  auto impatient = f.execute_async(bridge, "echo", {{"tag", "late"}}, 600ms);
  auto late = impatient.get();
  REQUIRE_FALSE(late.ok());
  CHECK(late.error().category == error_category::timeout_error);
  CHECK(late.error().type == "checkout_timeout");
  gate.open();
  REQUIRE(holder.get().ok());
  long last = -1;
  for (auto& c : calls) {
    auto r = c.get();
    REQUIRE(r.ok());
    auto count = r.value()["command_count"].get<long>();
    CHECK(count > last);
    last = count;
  }
  auto st = f.status(bridge);
  CHECK(st.queued == 0);
  CHECK(st.replaced == 0);
  REQUIRE(st.workers.size() == 1);
  // The holder and the n callers; the expired caller never had the worker.
  CHECK(st.workers[0].stats.checkouts == n + 1);
}

TEST_CASE("the bridge restarts its worker after SIGKILL") {
  fixture f;
  auto bridge = f.start_bridge();
  auto first = f.status(bridge).workers.at(0).pid;
  REQUIRE(first > 0);

  SUBCASE("idle") {
    REQUIRE(::kill(first, SIGKILL) == 0);
  }
  SUBCASE("busy: the call on it fails with a clear error") {
    auto pending = f.execute_async(bridge, "sleep", {{"ms", 20000}}, 30s);
    REQUIRE(f.wait_status(bridge, [](const pool_status& s) { return s.busy == 1; }));
    REQUIRE(::kill(first, SIGKILL) == 0);
    auto r = pending.get();
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().category == error_category::communication_error);
    CHECK(r.error().type == "worker_exited");
  }
  REQUIRE(f.wait_status(bridge, [&](const pool_status& s) {
    return s.replaced == 1 && s.idle == 1 && !s.workers.empty() && s.workers[0].pid != first;
  }));
  CHECK(wait_gone(first, 5s));
  CHECK_FALSE(process_state(first).has_value());
  auto ping = f.execute(bridge, "ping");
  REQUIRE(ping.ok());
  CHECK(ping.value()["worker_id"] == "w2");
  CHECK(ping.value()["mode"] == "standalone");
  // Exactly one worker process: the replacement (its guardian, a child too, aside).
  auto children = child_pids(::getpid());
  std::size_t workers = 0;
  for (auto pid : children) {
    workers += is_guardian(pid) ? 0 : 1;
  }
  CHECK(workers == 1);
}

TEST_CASE("a bridge whose worker cannot start backs off instead of looping") {
  fixture f;
  auto s = test_settings(1);
  s.worker.python = "/nonexistent/python3";
  auto bridge = f.start_bridge(s, false);
  auto ready = f.await_ready(bridge);
  REQUIRE_FALSE(ready.ok());
  CHECK(ready.error().category == error_category::initialization_error);
  // The crash-loop guard: 0, 200, 600 ms, ... so the bridge is broken after
  // pool.broken_after (3) failed starts, in about 0.6 s, not a busy loop.
  REQUIRE(f.wait_status(bridge, [](const pool_status& s) { return s.health == "broken"; }));
  auto st = f.status(bridge);
  CHECK(st.start_failures >= 3);
  CHECK(st.start_failures <= 6);
  REQUIRE(st.last_start_failure);
  CHECK(st.last_start_failure->type == "spawn_failed");
  // A call fails at once, naming the reason, instead of waiting for its deadline.
  auto r = f.execute(bridge, "ping", nlohmann::json::object(), 30s);
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().type == "pool_unavailable");
  CHECK(r.error().message.find("/nonexistent/python3") != std::string::npos);
}

TEST_CASE("stopping the bridge leaves no child process behind") {
  fixture f;
  auto bridge = f.start_bridge();
  REQUIRE(register_bridge(f.sys(), bridge));
  auto pid = f.status(bridge).workers.at(0).pid;
  // A caller in flight and one queued are both answered, with errors.
  auto busy = f.execute_async(bridge, "sleep", {{"ms", 20000}}, 30s);
  REQUIRE(f.wait_status(bridge, [](const pool_status& s) { return s.busy == 1; }));
  auto queued = f.execute_async(bridge, "ping");
  REQUIRE(f.wait_status(bridge, [](const pool_status& s) { return s.queued == 1; }));
  CHECK(f.stop(bridge));
  auto b = busy.get();
  REQUIRE_FALSE(b.ok());
  CHECK(b.error().type == "worker_stopping");
  auto q = queued.get();
  REQUIRE_FALSE(q.ok());
  CHECK(q.error().type == "pool_stopping");
  CHECK(wait_gone(pid, 5s));
  CHECK(wait_no_children(::getpid(), 10s).empty());
  // Gone from detection as well.
  CHECK(std::holds_alternative<error>(detect_service(f.sys())));
  CHECK(registry_name_gone(f.sys(), bridge_service_name));
}

TEST_CASE("a runtime, whose pool is registered as dspexpool, still stops cleanly") {
  // The runtime's actor system is private: this checks that registering at
  // start and unregistering at stop() leave the stop sequence intact (no
  // registry entry keeps the actor system's destruction waiting).
  auto rt = runtime::start(test_settings(1));
  CHECK(rt->execute_anonymous("ping").ok());
  rt->stop();
  CHECK(wait_no_children(::getpid(), 10s).empty());
}
