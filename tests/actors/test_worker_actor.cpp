// The worker actor against the real bundled worker: handshake, handshake
// failures, crashes, protocol violations and request timeouts.
#include <csignal>

#include <caf/all.hpp>
#include <doctest/doctest.h>

#include "dspex/actors/messages.hpp"
#include "dspex/actors/worker_actor.hpp"
#include "support/harness.hpp"
#include "support/worker_fixture.hpp"

using namespace dspex;
using namespace dspex::testing;

namespace {

worker_exit exit_code(const caf::error& reason) {
  REQUIRE(reason.category() == worker_exit_category);
  return static_cast<worker_exit>(reason.code());
}

} // namespace

TEST_CASE("handshake succeeds, requests are served and checked in") {
  worker_fixture f;
  f.start(test_settings());
  REQUIRE(f.await_ready() > 0);
  CHECK(process_state(f.pid).has_value());
  auto pong = f.execute("ping", nullptr);
  REQUIRE(pong.ok());
  CHECK(pong.value()["worker_id"] == "tw1");
  CHECK(pong.value()["mode"] == "pool-worker");
  // The worker actor applies no setting of its own (lm.* is the pool's: pool_setting).
  CHECK(pong.value()["lm"].is_null());
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
