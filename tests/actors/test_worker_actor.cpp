// The worker actor against the real bundled worker: handshake, handshake
// failures, crashes, protocol violations and request timeouts.
#include <csignal>

#include <caf/all.hpp>
#include <doctest/doctest.h>

#include "dspex/actors/messages.hpp"
#include "dspex/actors/worker_actor.hpp"
#include "support/harness.hpp"

using namespace dspex;
using namespace dspex::testing;

namespace {

struct worker_fixture {
  caf::actor_system_config cfg;
  caf::actor_system sys{cfg};
  std::unique_ptr<caf::scoped_actor> self = std::make_unique<caf::scoped_actor>(sys);
  caf::actor worker;
  int pid = 0;

  ~worker_fixture() {
    if (worker) {
      (*self)->send_exit(worker, caf::exit_reason::kill);
      await_down();
    }
    self.reset();
  }

  void start(settings s, const std::string& id = "tw1") {
    worker = spawn_worker(sys, worker_config{id, std::make_shared<const settings>(s), *self});
    (*self)->monitor(worker);
  }

  // Waits for the ready notification; 0 when the worker went down instead.
  int await_ready() {
    bool done = false;
    while (!done) {
      (*self)->receive(
        [&](worker_ready_atom, const std::string&, int p) {
          pid = p;
          done = true;
        },
        [&](caf::down_msg& dm) {
          down_reason = dm.reason;
          worker = nullptr;
          done = true;
        },
        caf::after(std::chrono::seconds{20}) >> [&] { done = true; });
    }
    return pid;
  }

  outcome execute(const std::string& command, nlohmann::json args,
                  std::chrono::milliseconds timeout = std::chrono::seconds{10}) {
    outcome result;
    call c{command, std::move(args), std::chrono::steady_clock::now() + timeout};
    (*self)
      ->request(worker, caf::duration{timeout + std::chrono::seconds{5}}, execute_atom::value,
                std::move(c))
      .receive([&](outcome& o) { result = std::move(o); },
               [&](caf::error& e) {
                 result = outcome::failure(make_error(error_category::system_error, "test",
                                                      caf::to_string(e)));
               });
    return result;
  }

  // Waits for the worker's down message (skipping checkins); returns its reason.
  caf::error await_down() {
    bool done = false;
    while (!done && worker) {
      (*self)->receive([&](caf::down_msg& dm) { down_reason = dm.reason; done = true; },
                       [&](checkin_atom, const std::string&, const checkin_status&) {},
                       [&](worker_gone_atom, const std::string&) {
                         (*self)->send(worker, release_atom::value);
                       },
                       [&](worker_ready_atom, const std::string&, int) {},
                       caf::after(std::chrono::seconds{20}) >> [&] { done = true; });
    }
    worker = nullptr;
    return down_reason;
  }

  caf::error down_reason;
};

worker_exit exit_code(const caf::error& reason) {
  REQUIRE(reason.category() == worker_exit_category);
  return static_cast<worker_exit>(reason.code());
}

} // namespace

TEST_CASE("handshake succeeds, the LM is configured, requests are served and checked in") {
  worker_fixture f;
  f.start(test_settings());
  REQUIRE(f.await_ready() > 0);
  CHECK(process_state(f.pid).has_value());
  auto pong = f.execute("ping", nullptr);
  REQUIRE(pong.ok());
  CHECK(pong.value()["worker_id"] == "tw1");
  CHECK(pong.value()["mode"] == "pool-worker");
  CHECK(pong.value()["lm"].is_string());  // configured before it served anything
  bool checked_in = false;
  (*f.self)->receive([&](checkin_atom, const std::string& id, const checkin_status& st) {
    checked_in = id == "tw1" && st.what == checkin_status::kind::ok;
  });
  CHECK(checked_in);
  // A Python-side error is an ordinary error of that request.
  auto unknown = f.execute("no_such_command", nullptr);
  REQUIRE_FALSE(unknown.ok());
  CHECK(unknown.error().category == error_category::python_error);
  CHECK(unknown.error().message.find("Unknown command") != std::string::npos);
  CHECK(f.execute("ping", nullptr).ok());
  // Graceful stop: shutdown → exit 0 → normal exit reason, process reaped.
  (*f.self)->send(f.worker, stop_atom::value);
  auto reason = f.await_down();
  CHECK_FALSE(reason);
  CHECK(wait_gone(f.pid, std::chrono::seconds{5}));
}

TEST_CASE("a worker that never answers the init ping fails with init_timeout and is killed") {
  worker_fixture f;
  auto s = test_settings();
  s.pool.init_timeout = std::chrono::milliseconds{400};
  s.worker.extra_args = {"--test-init", "hang"};
  f.start(s);
  CHECK(f.await_ready() == 0);
  CHECK(exit_code(f.down_reason) == worker_exit::init_timeout);
  auto detail = decode_exit_reason(f.down_reason);
  REQUIRE(detail);
  CHECK(detail->category == error_category::initialization_error);
  CHECK(detail->type == "init_timeout");
  REQUIRE(detail->context.contains("pid"));
  CHECK(wait_gone(detail->context["pid"].get<int>(), std::chrono::seconds{5}));
}

TEST_CASE("start failures say why: exit, traceback, refused init, missing interpreter") {
  SUBCASE("exits at once") {
    worker_fixture f;
    auto s = test_settings();
    s.worker.extra_args = {"--test-init", "exit"};
    f.start(s);
    CHECK(f.await_ready() == 0);
    CHECK(exit_code(f.down_reason) == worker_exit::init_failed);
    CHECK(decode_exit_reason(f.down_reason)->message.find("exit code 3") != std::string::npos);
  }
  SUBCASE("prints a traceback: its last line is in the reason") {
    worker_fixture f;
    auto s = test_settings();
    s.worker.extra_args = {"--test-init", "traceback"};
    f.start(s);
    CHECK(f.await_ready() == 0);
    auto detail = decode_exit_reason(f.down_reason);
    REQUIRE(detail);
    CHECK(detail->message.find("RuntimeError") != std::string::npos);
  }
  SUBCASE("refuses the init ping") {
    worker_fixture f;
    auto s = test_settings();
    s.worker.extra_args = {"--test-init", "error"};
    f.start(s);
    CHECK(f.await_ready() == 0);
    auto detail = decode_exit_reason(f.down_reason);
    REQUIRE(detail);
    CHECK(detail->type == "init_failed");
    CHECK(detail->message.find("init refused") != std::string::npos);
  }
  SUBCASE("interpreter missing") {
    worker_fixture f;
    auto s = test_settings();
    s.worker.python = "/nonexistent/python3";
    f.start(s);
    CHECK(f.await_ready() == 0);
    CHECK(exit_code(f.down_reason) == worker_exit::spawn_failed);
    CHECK(decode_exit_reason(f.down_reason)->message.find("/nonexistent/python3")
          != std::string::npos);
  }
  CHECK(wait_no_children(::getpid(), std::chrono::seconds{5}).empty());
}

TEST_CASE("a crash during a request fails that request with a typed error") {
  worker_fixture f;
  f.start(test_settings());
  REQUIRE(f.await_ready() > 0);
  auto r = f.execute("crash", {{"code", 7}});
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().category == error_category::communication_error);
  CHECK(r.error().type == "worker_exited");
  CHECK(r.error().context["exit"] == "exit code 7");
  CHECK(r.error().context["command"] == "crash");
  CHECK(exit_code(f.await_down()) == worker_exit::process_exited);
  CHECK(wait_gone(f.pid, std::chrono::seconds{5}));
}

TEST_CASE("a crash in the middle of a frame is a protocol violation") {
  worker_fixture f;
  f.start(test_settings());
  REQUIRE(f.await_ready() > 0);
  auto r = f.execute("crash", {{"code", 1}, {"when", "mid_frame"}});
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().category == error_category::communication_error);
  f.await_down();
  CHECK(wait_gone(f.pid, std::chrono::seconds{5}));
}

TEST_CASE("garbage on stdout removes the worker") {
  for (auto kind : {"bad_json", "wrong_id", "oversize_header", "noise"}) {
    CAPTURE(kind);
    worker_fixture f;
    f.start(test_settings());
    REQUIRE(f.await_ready() > 0);
    auto r = f.execute("garbage", {{"kind", kind}});
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().category == error_category::communication_error);
    CHECK(r.error().type == "protocol_violation");
    CHECK(exit_code(f.await_down()) == worker_exit::protocol_violation);
    CHECK(wait_gone(f.pid, std::chrono::seconds{5}));
  }
}

TEST_CASE("a request past its deadline times out and the worker is killed, not reused") {
  worker_fixture f;
  f.start(test_settings());
  REQUIRE(f.await_ready() > 0);
  auto r = f.execute("sleep", {{"ms", 5000}}, std::chrono::milliseconds{300});
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().category == error_category::timeout_error);
  CHECK(r.error().type == "request_timeout");
  CHECK(exit_code(f.await_down()) == worker_exit::request_timeout);
  CHECK(wait_gone(f.pid, std::chrono::seconds{5}));
}

TEST_CASE("a worker killed by a signal while idle quits with process_exited") {
  worker_fixture f;
  f.start(test_settings());
  REQUIRE(f.await_ready() > 0);
  REQUIRE(::kill(f.pid, SIGKILL) == 0);
  auto reason = f.await_down();
  CHECK(exit_code(reason) == worker_exit::process_exited);
  CHECK(decode_exit_reason(reason)->context["exit"] == "signal 9 (SIGKILL)");
  CHECK(wait_gone(f.pid, std::chrono::seconds{5}));
}
