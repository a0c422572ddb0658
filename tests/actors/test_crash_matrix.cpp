// The crash matrix: every way a worker process can fail, with the REAL bundled
// worker, through the pool (the public API dspex::runtime, or test_pool where a
// lease or actor-level view is needed). For each failure:
//  - the caller gets a structured error of the expected category/type (or
//    success where the runtime recovers transparently, e.g. an idempotent
//    call retried on another worker);
//  - the broken worker is removed and its process is gone (/proc, wait_gone);
//  - the pool returns to full size (full_and_idle) and the next call succeeds;
//  - no child is left at the end (stop_and_check_no_children).
//
// Calls that must show the raw error use max_attempts = 1 (the pool client
// retries idempotent calls after a worker failed mid-request; see the README,
// "Retries"). Every wait is on the real pool status, on an event, or on /proc;
// timeouts only catch hangs.
//
// Covered elsewhere and not repeated here (see there):
//  - test_crash_loop.cpp: a missing interpreter or a failing script from the
//    start (backoff, broken, recovery), starts failing while another worker
//    still serves (degraded), the spawn count of an exiting script;
//  - test_resilience.cpp: retries, circuit breaker, supervision tree;
//  - a SIGKILL from outside vs a worker that dies at start (killed_at_start,
//    the matrix's case 12): tested with that feature, not here.
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <future>
#include <iterator>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <doctest/doctest.h>

#include "dspex/proc_stats.hpp"
#include "support/event_recorder.hpp"
#include "support/harness.hpp"
#include "support/scratch_dir.hpp"
#include "support/test_pool.hpp"

extern char** environ;

using namespace dspex;
using namespace dspex::testing;
namespace fs = std::filesystem;

namespace {

// -- helpers ----------------------------------------------------------------------------

/// A token no other call of this process ever carries.
std::string unique_token() {
  static std::atomic<int> n{0};
  return "tok-" + std::to_string(::getpid()) + "-" + std::to_string(++n);
}

/// One call that shows the raw error: no retry, `timeout` for all of it.
call_options raw(std::chrono::milliseconds timeout = 30s) {
  call_options o;
  o.timeout = timeout;
  o.max_attempts = 1;
  return o;
}

bool contains(const std::vector<int>& v, int x) {
  return std::find(v.begin(), v.end(), x) != v.end();
}

bool has_worker_id(const pool_status& s, const std::string& id) {
  return std::any_of(s.workers.begin(), s.workers.end(),
                     [&](const worker_info& w) { return w.id == id; });
}

/// Waits until exactly one worker is busy; returns it (pid and id).
worker_info busy_worker(runtime& rt) {
  auto w = wait_for_status(rt, [](const pool_status& s) {
    if (s.busy != 1)
      return false;
    for (auto& x : s.workers)
      if (x.state == "busy" && x.pid > 0)
        return true;
    return false;
  });
  REQUIRE_MESSAGE(w.ok, w.status.to_json().dump());
  for (auto& x : w.status.workers)
    if (x.state == "busy")
      return x;
  return {};
}

/// The failure names the worker it happened on (worker_id, pid, command) and
/// the one attempt; returns that worker's pid.
int failed_worker_pid(const outcome& r, const std::string& command) {
  const auto& ctx = r.error().context;
  CHECK_MESSAGE(ctx.contains("worker_id"), r.error().describe());
  CHECK(ctx.value("command", "") == command);
  CHECK(ctx.value("attempt", 0) == 1);
  REQUIRE_MESSAGE(ctx.contains("pid"), r.error().describe());
  return ctx["pid"].get<int>();
}

/// After a failure on worker `broken` (its pid and id): the process is gone,
/// the worker is no longer in the pool, the pool is back at full size with
/// `replaced` replacements, the other workers (`before` minus the broken one)
/// are untouched, and the next call succeeds with its own reply.
void check_replaced_and_serving(runtime& rt, int broken_pid, const std::string& broken_id,
                                const std::vector<int>& before, std::uint64_t replaced = 1) {
  CHECK_MESSAGE(wait_gone(broken_pid, 10s), "the broken worker's process " << broken_pid
                                                                           << " is still there");
  auto w = wait_for_status(rt, [&](const pool_status& s) {
    return full_and_idle(s) && s.replaced >= replaced && !contains(worker_pids(s), broken_pid);
  });
  REQUIRE_MESSAGE(w.ok, w.status.to_json().dump());
  CHECK(w.status.replaced == replaced);
  CHECK_FALSE(has_worker_id(w.status, broken_id));
  auto now = worker_pids(w.status);
  for (auto pid : before)
    if (pid != broken_pid)
      CHECK_MESSAGE(contains(now, pid), "healthy worker " << pid << " was removed too");
  auto token = unique_token();
  auto next = rt.execute_anonymous("echo", {{"token", token}}, raw(10s));
  REQUIRE_MESSAGE(next.ok(), next.error().describe());
  CHECK(next.value()["token"] == token);
  CHECK(next.served_by() != broken_id);
}

/// A deterministic payload of `n` printable bytes (no JSON escapes), so a
/// corrupted or reordered chunk would show.
std::string payload(std::size_t n) {
  static const char alphabet[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
  std::string s(n, ' ');
  std::uint64_t x = 0x9E3779B97F4A7C15ull;
  for (std::size_t i = 0; i < n; ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    s[i] = alphabet[x % (sizeof alphabet - 1)];
  }
  return s;
}

/// A regular file's text (the dspex program's captured output).
std::string read_text(const std::string& path) {
  std::ifstream in(path);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

/// "pid state comm [cmdline]" of each process, for failure messages.
std::string describe_processes(const std::vector<pid_t>& pids) {
  std::ostringstream out;
  for (auto pid : pids) {
    auto state = process_state(pid);
    out << "\n  " << pid << " " << (state ? *state : '-') << " " << comm(pid) << " ["
        << cmdline(pid) << "]";
  }
  return out.str();
}

/// A field of /proc/<pid>/status as a number (-1 when missing).
long status_field(pid_t pid, const std::string& key) {
  std::istringstream in(read_proc_file(pid, "status").value_or(""));
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(key + ":", 0) == 0)
      return std::strtol(line.c_str() + key.size() + 1, nullptr, 10);
  return -1;
}

/// Fill and capacity of the pipe that is `pid`'s stdin for the protocol (the
/// worker's only read-only pipe: it moved stdin to another fd and put
/// /dev/null on fd 0), opened through /proc. nullopt when not found.
struct pipe_fill {
  int queued = 0;
  int capacity = 0;
};
std::optional<pipe_fill> request_pipe_fill(pid_t pid) {
  const std::string dir = "/proc/" + std::to_string(pid);
  for (auto& ent : fs::directory_iterator(dir + "/fd", fs::directory_options::skip_permission_denied)) {
    std::error_code ec;
    auto target = fs::read_symlink(ent.path(), ec);
    if (ec || target.string().rfind("pipe:", 0) != 0)
      continue;
    const std::string entry = "fdinfo/" + ent.path().filename().string();
    auto info = read_proc_file(pid, entry.c_str()).value_or("");
    auto at = info.find("flags:");
    if (at == std::string::npos)
      continue;
    auto flags = std::strtol(info.c_str() + at + 6, nullptr, 8);
    if ((flags & O_ACCMODE) != O_RDONLY)
      continue;
    int fd = ::open(ent.path().c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0)
      continue;
    pipe_fill f;
    if (::ioctl(fd, FIONREAD, &f.queued) != 0)
      f.queued = -1;
    f.capacity = ::fcntl(fd, F_GETPIPE_SZ);
    ::close(fd);
    return f;
  }
  return std::nullopt;
}

/// No child of ours is left (waits up to 10 s); names those that are.
void check_no_children() {
  auto left = wait_no_children(::getpid(), 10s);
  CHECK_MESSAGE(left.empty(), "children left: " << describe_processes(left));
}

/// The error of a runtime::start that must fail (the test fails when it starts).
error start_error_of(const settings& s) {
  try {
    runtime::start(s);
  } catch (const start_error& e) {
    return e.details();
  }
  FAIL("start should have failed");
  return {};
}

/// stop_and_check_no_children, naming the children left if any.
void stop_and_report(runtime& rt) {
  stop_and_check_no_children(rt);
  auto left = child_pids(::getpid());
  if (!left.empty())
    MESSAGE("children left after stop: " << describe_processes(left));
}

/// Waits (bounded) until `pred()`, polling every 10 ms.
template <class Pred>
bool poll_for(std::chrono::milliseconds timeout, Pred&& pred) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    if (pred())
      return true;
    if (std::chrono::steady_clock::now() >= deadline)
      return false;
    std::this_thread::sleep_for(10ms);
  }
}

} // namespace

// -- 1. dies while reading a request ----------------------------------------------------

TEST_CASE("crash_matrix 1: a worker killed while a request larger than the pipe is being written") {
  auto rt = start_runtime(test_settings(1));
  auto before = worker_pids(rt->status());
  auto victim = rt->status().workers.at(0);
  // Stopped, it reads nothing: 1 MiB cannot fit in its stdin pipe.
  REQUIRE(::kill(victim.pid, SIGSTOP) == 0);
  REQUIRE(poll_for(10s, [&] { return process_state(victim.pid) == 'T'; }));
  auto big = payload(1 << 20);
  auto fut = rt->execute_anonymous_async("echo", {{"blob", big}}, raw(60s));
  REQUIRE(busy_worker(*rt).pid == victim.pid);
  // The write is in progress: the pipe is full and the rest still queued.
  std::optional<pipe_fill> fill;
  REQUIRE_MESSAGE(poll_for(10s,
                           [&] {
                             fill = request_pipe_fill(victim.pid);
                             return fill && fill->capacity > 0 && fill->queued == fill->capacity;
                           }),
                  "request pipe: " << (fill ? fill->queued : -2) << " of "
                                   << (fill ? fill->capacity : -2));
  CHECK(fill->capacity < static_cast<int>(big.size()));
  REQUIRE(::kill(victim.pid, SIGKILL) == 0);
  auto r = fut.get();
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().category == error_category::communication_error);
  CHECK(r.error().type == "worker_exited");
  CHECK(r.error().context.value("exit", "") == "signal 9 (SIGKILL)");
  CHECK(failed_worker_pid(r, "echo") == victim.pid);
  check_replaced_and_serving(*rt, victim.pid, victim.id, before);
  // The replacement takes the same large request whole.
  auto again = rt->execute_anonymous("echo", {{"blob", big}}, raw(30s));
  REQUIRE_MESSAGE(again.ok(), again.error().describe());
  CHECK(again.value()["blob"] == big);
  stop_and_report(*rt);
}

// -- 2. dies while executing ------------------------------------------------------------

TEST_CASE("crash_matrix 2a: a worker that exits while executing (crash before_reply with exit code 7)") {
  auto rt = start_runtime(test_settings(2));
  auto before = worker_pids(rt->status());
  auto r = rt->execute_anonymous("crash", {{"code", 7}, {"when", "before_reply"}}, raw());
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().category == error_category::communication_error);
  CHECK(r.error().type == "worker_exited");
  CHECK(r.error().context.value("exit", "") == "exit code 7");
  auto pid = failed_worker_pid(r, "crash");
  CHECK(contains(before, pid));
  check_replaced_and_serving(*rt, pid, r.error().context["worker_id"], before);
  stop_and_report(*rt);
}

TEST_CASE("crash_matrix 2b: a worker SIGKILLed from outside during `sleep`") {
  auto rt = start_runtime(test_settings(2));
  auto before = worker_pids(rt->status());
  SUBCASE("max_attempts = 1: the raw error") {
    auto fut = rt->execute_anonymous_async("sleep", {{"ms", 60000}}, raw(60s));
    auto victim = busy_worker(*rt);
    REQUIRE(::kill(victim.pid, SIGKILL) == 0);
    auto r = fut.get();
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().category == error_category::communication_error);
    CHECK(r.error().type == "worker_exited");
    CHECK(r.error().context.value("exit", "") == "signal 9 (SIGKILL)");
    CHECK(failed_worker_pid(r, "sleep") == victim.pid);
    check_replaced_and_serving(*rt, victim.pid, victim.id, before);
  }
  SUBCASE("idempotent: retried on another worker, the caller sees success") {
    call_options o;
    o.timeout = 60s;
    o.idempotent = true;
    o.max_attempts = 2;
    auto fut = rt->execute_anonymous_async("sleep", {{"ms", 3000}}, o);
    auto victim = busy_worker(*rt);
    REQUIRE(::kill(victim.pid, SIGKILL) == 0);
    auto r = fut.get();
    REQUIRE_MESSAGE(r.ok(), r.error().describe());
    CHECK(r.value()["slept_ms"] == 3000);
    CHECK(r.served_by() != victim.id);
    check_replaced_and_serving(*rt, victim.pid, victim.id, before);
  }
  stop_and_report(*rt);
}

// -- 3. dies while writing its reply --------------------------------------------------

// The partial frame is read before the exit is reported (the I/O thread drains
// stdout before it reaps), so the runtime reports the truncated frame.
TEST_CASE("crash_matrix 3: a worker that dies mid-frame (crash mid_frame): protocol_violation/truncated") {
  auto rt = start_runtime(test_settings(2));
  auto before = worker_pids(rt->status());
  auto r = rt->execute_anonymous("crash", {{"code", 5}, {"when", "mid_frame"}}, raw());
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().category == error_category::communication_error);
  CHECK(r.error().type == "protocol_violation");
  CHECK(r.error().context.value("protocol_error", "") == "truncated");
  auto pid = failed_worker_pid(r, "crash");
  CHECK(contains(before, pid));
  check_replaced_and_serving(*rt, pid, r.error().context["worker_id"], before);
  stop_and_report(*rt);
}

// -- 4. garbage on stdout ---------------------------------------------------------------

namespace {

/// `garbage {kind}` on one of two workers: the caller gets `type` (with
/// `protocol_error` when not empty); that worker, still alive and serving
/// from its own point of view, is killed and replaced.
void garbage_case(const std::string& kind, error_category category, const std::string& type,
                  const std::string& protocol_error, std::chrono::milliseconds timeout = 30s) {
  auto rt = start_runtime(test_settings(2));
  auto before = worker_pids(rt->status());
  auto r = rt->execute_anonymous("garbage", {{"kind", kind}}, raw(timeout));
  REQUIRE_FALSE(r.ok());
  CHECK_MESSAGE(r.error().category == category, r.error().describe());
  CHECK_MESSAGE(r.error().type == type, r.error().describe());
  if (!protocol_error.empty())
    CHECK(r.error().context.value("protocol_error", "") == protocol_error);
  auto pid = failed_worker_pid(r, "garbage");
  CHECK(contains(before, pid));
  check_replaced_and_serving(*rt, pid, r.error().context["worker_id"], before);
  stop_and_report(*rt);
}

} // namespace

TEST_CASE("crash_matrix 4a: an oversize length header is a protocol violation (oversize)") {
  garbage_case("oversize_header", error_category::communication_error, "protocol_violation",
               "oversize");
}

// Stray bytes: their first 4 bytes read as a length of 0xFFFF7878.
TEST_CASE("crash_matrix 4b: stray bytes on stdout are a protocol violation (oversize)") {
  garbage_case("noise", error_category::communication_error, "protocol_violation", "oversize");
}

TEST_CASE("crash_matrix 4c: a frame that is not JSON is a protocol violation (bad_json)") {
  garbage_case("bad_json", error_category::communication_error, "protocol_violation", "bad_json");
}

TEST_CASE("crash_matrix 4d: a reply to another id is a protocol violation (mismatched_id)") {
  garbage_case("wrong_id", error_category::communication_error, "protocol_violation",
               "mismatched_id");
}

TEST_CASE("crash_matrix 4e: no reply at all: request_timeout at the call's deadline") {
  garbage_case("no_reply", error_category::timeout_error, "request_timeout", "", 500ms);
}

// -- 5. a stale reply never reaches the next caller -----------------------------------------

TEST_CASE("crash_matrix 5: a timed-out worker is killed and the next caller gets its own reply") {
  auto rt = start_runtime(test_settings(1));
  auto before = worker_pids(rt->status());
  auto old = rt->status().workers.at(0);
  // Its reply would come 1.7 s after the deadline, if the worker lived.
  auto slow = rt->execute_anonymous("sleep", {{"ms", 2000}}, raw(300ms));
  REQUIRE_FALSE(slow.ok());
  CHECK(slow.error().category == error_category::timeout_error);
  CHECK(slow.error().type == "request_timeout");
  CHECK(failed_worker_pid(slow, "sleep") == old.pid);
  // At once, before the replacement is even ready: queued, then served by it.
  auto token = unique_token();
  auto next = rt->execute_anonymous("echo", {{"token", token}}, raw(30s));
  REQUIRE_MESSAGE(next.ok(), next.error().describe());
  CHECK(next.value()["token"] == token);
  CHECK_FALSE(next.value().contains("slept_ms"));
  CHECK(next.served_by() != old.id);
  CHECK(wait_gone(old.pid, 10s));
  // Once the old process is gone nothing can write its reply any more: every
  // later call gets its own.
  for (int i = 0; i < 20; ++i) {
    auto t = unique_token();
    auto r = rt->execute_anonymous("echo", {{"token", t}}, raw(10s));
    REQUIRE_MESSAGE(r.ok(), r.error().describe());
    CHECK(r.value()["token"] == t);
  }
  check_replaced_and_serving(*rt, old.pid, old.id, before);
  stop_and_report(*rt);
}

// -- 6. replies bigger than the pipe buffer ----------------------------------------------

TEST_CASE("crash_matrix 6: echo of 1 MiB and 8 MiB payloads comes back intact") {
  auto s = test_settings(2);
  s.pool.max_frame_bytes = 32u << 20;  // the worker is told the same limit
  auto rt = start_runtime(s);
  auto before = worker_pids(rt->status());
  for (std::size_t size : {std::size_t{1} << 20, std::size_t{8} << 20}) {
    CAPTURE(size);
    auto blob = payload(size);
    auto token = unique_token();
    auto r = rt->execute_anonymous("echo", {{"blob", blob}, {"token", token}}, raw(60s));
    REQUIRE_MESSAGE(r.ok(), r.error().describe());
    REQUIRE(r.value()["blob"].is_string());
    CHECK(r.value()["blob"].get_ref<const std::string&>().size() == size);
    CHECK(r.value()["blob"] == blob);
    CHECK(r.value()["token"] == token);
  }
  // Nothing broke: no worker replaced, and the next small call is fine.
  auto st = wait_for_status(*rt, full_and_idle);
  REQUIRE(st.ok);
  CHECK(st.status.replaced == 0);
  auto now = worker_pids(st.status);
  std::sort(now.begin(), now.end());
  std::sort(before.begin(), before.end());
  CHECK(now == before);
  CHECK(rt->execute_anonymous("ping", {}, raw(10s)).ok());
  stop_and_report(*rt);
}

// -- 7. hang: killed at the deadline, never reused ---------------------------------------

TEST_CASE("crash_matrix 7: a hung worker is killed at the deadline and never serves again") {
  auto rt = start_runtime(test_settings(2));
  auto before = worker_pids(rt->status());
  auto fut = rt->execute_anonymous_async("hang", {}, raw(1s));
  auto hung = busy_worker(*rt);
  auto r = fut.get();
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().category == error_category::timeout_error);
  CHECK(r.error().type == "request_timeout");
  CHECK(failed_worker_pid(r, "hang") == hung.pid);
  CHECK(wait_gone(hung.pid, 10s));
  check_replaced_and_serving(*rt, hung.pid, hung.id, before);
  // Later calls are all served by other workers (other pids).
  std::set<std::string> served;
  for (int i = 0; i < 10; ++i) {
    auto p = rt->execute_anonymous("ping", {}, raw(10s));
    REQUIRE_MESSAGE(p.ok(), p.error().describe());
    CHECK(p.served_by() != hung.id);
    served.insert(p.served_by());
  }
  auto st = rt->status();
  CHECK_FALSE(contains(worker_pids(st), hung.pid));
  for (auto& w : st.workers)
    CHECK(w.pid != hung.pid);
  CHECK(served.size() == 2);
  stop_and_report(*rt);
}

// -- 8. exec failure ----------------------------------------------------------------------

TEST_CASE("crash_matrix 8a: an interpreter path that does not exist: start_error naming it") {
  scratch_dir dir;
  auto python = (dir.path / "no-such-python3").string();
  auto s = test_settings(2);
  s.worker.python = python;
  auto err = start_error_of(s);
  CHECK(err.category == error_category::configuration_error);
  CHECK(err.type == "invalid_setting");
  CHECK(err.message.find(python) != std::string::npos);
  CHECK(err.message.find("worker.python") != std::string::npos);
  check_no_children();
}

// The path exists and is executable, so the settings pass; exec itself fails
// (its #! interpreter does not exist).
TEST_CASE("crash_matrix 8b: an interpreter whose exec fails: start_error spawn_failed naming it") {
  scratch_dir dir;
  auto python = dir.write("python3", "#!/nonexistent/dspex-interpreter\n", true).string();
  auto s = test_settings(2);
  s.worker.python = python;
  auto err = start_error_of(s);
  CHECK_MESSAGE(err.category == error_category::initialization_error,
                err.describe());
  CHECK_MESSAGE(err.type == "spawn_failed", err.describe());
  CHECK_MESSAGE(err.message.find(python) != std::string::npos, err.describe());
  check_no_children();
}

// The configured LM is the pool's setting: each worker applies it before it
// counts as started, so one the workers refuse is a start failure, not a
// pool that serves without it.
TEST_CASE("crash_matrix 8d: a configured LM the workers refuse: start_error setting_failed naming it") {
  auto s = test_settings(2);
  s.lm.provider = "no-such-provider";
  s.pool.restart_backoff_base = 20ms;
  s.pool.restart_backoff_max = 100ms;
  auto err = start_error_of(s);
  CHECK_MESSAGE(err.category == error_category::initialization_error,
                err.describe());
  CHECK_MESSAGE(err.type == "setting_failed", err.describe());
  CHECK_MESSAGE(err.message.find("configure_lm") != std::string::npos,
                err.describe());
  CHECK_MESSAGE(err.message.find("no-such-provider") != std::string::npos,
                err.describe());
  check_no_children();
}

// Its own start succeeded (the init ping was answered): a worker that dies
// applying the pool's setting is a worker lost before serving anyone, not a
// start failure (a kill from outside in that window must cost no backoff).
// Dying again and again, it is still held by the crash-loop guard.
TEST_CASE("crash_matrix 8e: a worker that dies applying the pool's setting at start: no start failure, the guard backs off") {
  auto bus = std::make_shared<event_bus>();
  event_recorder events{*bus};  // before the pool starts: no event missed
  {
    test_pool_options opts;
    opts.config = test_settings(1);
    opts.config.worker.extra_args = {"--test-init", "setting-exit"};
    opts.config.pool.restart_backoff_base = 20ms;
    opts.config.pool.restart_backoff_max = 100ms;
    opts.events = bus;
    test_pool pool{std::move(opts)};
    REQUIRE(events.wait_for(kind_is(event_kind::restart_scheduled), 1, 20s));
    auto removed = events.count(kind_is(event_kind::worker_removed));
    CHECK(removed >= 2);
    CHECK(events.count(kind_is(event_kind::worker_start_failed)) == 0);
    for (auto& e : events.all()) {
      if (e.kind == event_kind::worker_removed) {
        REQUIRE(e.err);
        CHECK_MESSAGE(e.err->type == "worker_exited", e.err->describe());
      }
      if (e.kind == event_kind::restart_scheduled)
        CHECK(e.reason == "workers die before serving anyone");
    }
    CHECK(pool.status().start_failures == 0);
  }
  check_no_children();
}

// The pool-level variants (broken from the start, degraded while another
// worker serves, recovery) are in test_crash_loop.cpp; this is the public API
// with its only worker dying after the interpreter went away.
TEST_CASE("crash_matrix 8c: the interpreter removed after start: the only worker dies "
          "and pool_unavailable names it until it is back") {
  scratch_dir dir;
  auto python = dir.path / "python3";
  fs::create_symlink(DSPEX_TEST_PYTHON, python);
  auto s = test_settings(1);
  s.worker.python = python.string();
  s.pool.restart_backoff_base = 20ms;
  s.pool.restart_backoff_max = 200ms;
  auto rt = start_runtime(s);
  event_recorder events{rt->events()};
  auto before = rt->status().workers.at(0);
  fs::remove(python);
  auto r = rt->execute_anonymous("crash", {{"code", 3}}, raw());
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().type == "worker_exited");
  CHECK(wait_gone(before.pid, 10s));
  REQUIRE(events.wait_for(kind_is(event_kind::pool_health_changed, "broken")));
  auto st = rt->status();
  REQUIRE(st.last_start_failure);
  CHECK(st.last_start_failure->type == "spawn_failed");
  auto started = std::chrono::steady_clock::now();
  auto fast = rt->execute_anonymous("ping", {}, raw(60s));
  REQUIRE_FALSE(fast.ok());
  CHECK(fast.error().category == error_category::resource_error);
  CHECK(fast.error().type == "pool_unavailable");
  CHECK(fast.error().message.find(python.string()) != std::string::npos);
  CHECK(std::chrono::steady_clock::now() - started < 20s);  // hang guard: not the 60 s deadline
  fs::create_symlink(DSPEX_TEST_PYTHON, python);
  REQUIRE(wait_for_status(*rt, full_and_idle).ok);
  auto token = unique_token();
  auto ok = rt->execute_anonymous("echo", {{"token", token}}, raw(10s));
  REQUIRE_MESSAGE(ok.ok(), ok.error().describe());
  CHECK(ok.value()["token"] == token);
  stop_and_report(*rt);
}

// -- 9. crash loop: what test_crash_loop.cpp does not cover ------------------------------

// test_crash_loop.cpp covers a missing interpreter and scripts that exit or
// raise; here the REAL bundled worker fails every start through its own
// --test-init modes, and callers fail fast naming the failure.
TEST_CASE("crash_matrix 9: every start fails (--test-init): broken and pool_unavailable at once naming it") {
  struct mode {
    const char* name;
    const char* type;     // of the start failure
    const char* mention;  // in the caller's error message
  };
  const mode modes[] = {
    {"exit", "init_failed", "exit code 3"},
    {"error", "init_failed", "init refused (test-init error)"},
    {"traceback", "init_failed", "RuntimeError: worker failed to start: test-init traceback"},
    {"hang", "init_timeout", "did not answer the init ping"},
  };
  for (auto& m : modes) {
    std::string name = m.name;
    CAPTURE(name);
    {
      test_pool_options opts;
      opts.config = test_settings(2);
      opts.config.worker.extra_args = {"--test-init", name};
      if (name == "hang")
        opts.config.pool.init_timeout = 1s;  // else the default: a slow start is no init_timeout
      opts.config.pool.restart_backoff_base = 20ms;
      opts.config.pool.restart_backoff_max = 200ms;
      opts.config.pool.broken_after = 3;
      test_pool pool{std::move(opts)};
      event_recorder events{pool.events()};
      REQUIRE(events.wait_for(kind_is(event_kind::pool_health_changed, "broken"), 1, 20s));
      for (auto& e : events.all())
        if (e.kind == event_kind::worker_start_failed) {
          REQUIRE(e.err);
          CHECK(e.err->category == error_category::initialization_error);
          CHECK_MESSAGE(e.err->type == m.type, e.err->describe());
        }
      auto started = std::chrono::steady_clock::now();
      auto r = pool.execute("ping", {}, 60s);
      REQUIRE_FALSE(r.ok());
      CHECK(r.error().category == error_category::resource_error);
      CHECK(r.error().type == "pool_unavailable");
      CHECK_MESSAGE(r.error().message.find(m.mention) != std::string::npos, r.error().describe());
      CHECK(r.error().context.contains("last_start_failure"));
      CHECK(std::chrono::steady_clock::now() - started < 20s);  // hang guard: not the 60 s deadline
    }
    check_no_children();
  }
}

// -- 10. caller death -----------------------------------------------------------------------

TEST_CASE("crash_matrix 10a: a caller that dies while its checkout is queued") {
  auto owned = std::make_unique<test_pool>(test_pool_options{test_settings(1), nullptr});
  auto& pool = *owned;
  REQUIRE(pool.wait_for_pool_ready());
  auto worker = pool.status().workers.at(0);
  test_caller holder{pool};
  auto first = holder.checkout();
  REQUIRE(first.grant);
  auto doomed = std::make_unique<test_caller>(pool);
  doomed->checkout_async(checkout_type::anonymous(), 30s);
  REQUIRE(pool.wait_for([](const pool_status& s) { return s.queued == 1; }));
  test_caller next{pool};
  next.checkout_async(checkout_type::anonymous(), 30s);
  REQUIRE(pool.wait_for([](const pool_status& s) { return s.queued == 2; }));
  doomed->die();
  REQUIRE(pool.wait_for([](const pool_status& s) { return s.queued == 1; }));
  // The worker freed later goes to the next live caller.
  CHECK(holder.checkin(*first.grant));
  auto got = next.await_checkout(10s);
  REQUIRE_MESSAGE(got.grant, got.err.describe());
  CHECK(got.grant->worker_id == worker.id);
  auto token = unique_token();
  auto r = next.execute(*got.grant, "echo", {{"token", token}});
  REQUIRE_MESSAGE(r.ok(), r.error().describe());
  CHECK(r.value()["token"] == token);
  CHECK(next.checkin(*got.grant));
  // Nothing leaked: no lease, no queued caller, the same worker idle.
  REQUIRE(pool.wait_for([](const pool_status& s) {
    return full_and_idle(s) && s.leased == 0 && s.queued == 0;
  }));
  auto st = pool.status();
  CHECK(st.replaced == 0);
  CHECK(st.workers.at(0).pid == worker.pid);
  CHECK(pool.execute("ping").ok());
  holder.die();
  next.die();
  owned.reset();
  check_no_children();
}

TEST_CASE("crash_matrix 10b: a caller that dies holding a lease") {
  auto owned = std::make_unique<test_pool>(test_pool_options{test_settings(1), nullptr});
  auto& pool = *owned;
  REQUIRE(pool.wait_for_pool_ready());
  auto worker = pool.status().workers.at(0);
  SUBCASE("no request in flight: the same worker returns") {
    {
      test_caller c{pool};
      auto l = c.checkout();
      REQUIRE(l.grant);
      REQUIRE(c.execute(*l.grant, "ping").ok());
      c.die();
    }
    REQUIRE(pool.wait_for([](const pool_status& s) {
      return full_and_idle(s) && s.leased == 0;
    }));
    auto st = pool.status();
    CHECK(st.replaced == 0);
    CHECK(st.workers.at(0).pid == worker.pid);
    CHECK(process_state(worker.pid).has_value());
    test_caller again{pool};
    auto l = again.checkout();
    REQUIRE(l.grant);
    CHECK(l.grant->worker_id == worker.id);
    CHECK(again.execute(*l.grant, "ping").ok());
    CHECK(again.checkin(*l.grant));
  }
  SUBCASE("a request in flight: the worker is replaced; a queued caller gets the new one") {
    test_caller waiting{pool};
    {
      test_caller c{pool};
      auto l = c.checkout();
      REQUIRE(l.grant);
      waiting.checkout_async(checkout_type::anonymous(), 30s);
      REQUIRE(pool.wait_for([](const pool_status& s) { return s.queued == 1; }));
      // Sent before the caller dies, so it is in the worker's mailbox before
      // the pool's revoke: the revoke always finds it in flight.
      c.execute_async(*l.grant, "hang");
      c.die();
    }
    CHECK(wait_gone(worker.pid, 10s));
    auto got = waiting.await_checkout(15s);
    REQUIRE_MESSAGE(got.grant, got.err.describe());
    CHECK(got.grant->worker_id != worker.id);
    auto token = unique_token();
    auto r = waiting.execute(*got.grant, "echo", {{"token", token}});
    REQUIRE_MESSAGE(r.ok(), r.error().describe());
    CHECK(r.value()["token"] == token);
    CHECK(waiting.checkin(*got.grant));
    REQUIRE(pool.wait_for([](const pool_status& s) {
      return full_and_idle(s) && s.replaced == 1 && s.leased == 0 && s.queued == 0;
    }));
    CHECK(pool.status().workers.at(0).pid != worker.pid);
  }
  CHECK(pool.execute("ping").ok());
  owned.reset();
  check_no_children();
}

// -- 11. the whole dspex program SIGKILLed under load ------------------------------------------

namespace {

/// Children of `parent` whose command line runs the worker in a pool.
std::vector<pid_t> worker_children(pid_t parent) {
  std::vector<pid_t> out;
  for (auto pid : child_pids(parent))
    if (cmdline(pid).find("pool-worker") != std::string::npos)
      out.push_back(pid);
  return out;
}

std::vector<pid_t> children_named(pid_t parent, const std::string& name) {
  std::vector<pid_t> out;
  for (auto pid : child_pids(parent))
    if (comm(pid) == name)
      out.push_back(pid);
  return out;
}

/// Reaps whatever child of ours ended (we are the subreaper of the orphans).
void reap_any() {
  while (::waitpid(-1, nullptr, WNOHANG) > 0) {
  }
}

} // namespace

TEST_CASE("crash_matrix 11: the dspex program SIGKILLed under load leaves no worker and no grandchild") {
  scratch_dir dir;
  // The worker starts `sleep 1000` as its own child (in its process group),
  // then becomes the real worker with the same arguments (same pid).
  auto wrapper = dir.write("worker_with_grandchild.py",
                           "import os, subprocess, sys\n"
                           "subprocess.Popen(['sleep', '1000'], stdin=subprocess.DEVNULL,\n"
                           "                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
                           "os.execv(sys.executable, [sys.executable, "
                             + nlohmann::json(std::string{DSPEX_TEST_WORKER_SCRIPT}).dump()
                             + "] + sys.argv[1:])\n");
  // Orphans of the killed program come to us, so that we can see them end
  // (and reap them) whatever the container's init does.
  REQUIRE(::prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0);
  // Whatever fails below, nothing is left behind and we stop being a subreaper.
  std::vector<pid_t> all;
  struct cleanup {
    std::vector<pid_t>& pids;
    ~cleanup() {
      for (auto p : pids)
        if (!process_gone(p) && process_state(p) != 'Z')
          ::kill(p, SIGKILL);
      poll_for(10s, [&] {
        reap_any();
        return std::all_of(pids.begin(), pids.end(), [](pid_t p) { return process_gone(p); });
      });
      ::prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0);
    }
  } guard{all};

  std::vector<std::string> args = {DSPEX_CLI,
                                   "run",
                                   "--requests=100000",
                                   "--quiet",
                                   "--pool.size=3",
                                   std::string("--worker.python=") + DSPEX_TEST_PYTHON,
                                   "--worker.script=" + wrapper.string(),
                                   "--log.level=warn"};
  std::vector<char*> argv;
  for (auto& a : args)
    argv.push_back(a.data());
  argv.push_back(nullptr);
  auto out = (dir.path / "dspex.out").string();
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&fa, STDOUT_FILENO, out.c_str(), O_WRONLY | O_CREAT | O_TRUNC,
                                   0644);
  posix_spawn_file_actions_adddup2(&fa, STDOUT_FILENO, STDERR_FILENO);
  pid_t dspex = 0;
  int rc = ::posix_spawn(&dspex, DSPEX_CLI, &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  REQUIRE(rc == 0);
  all.push_back(dspex);

  // Its 3 workers exist, each with its grandchild, and serve the workload.
  std::vector<pid_t> workers, grandchildren, guardians;
  bool up = poll_for(30s, [&] {
    workers = worker_children(dspex);
    if (workers.size() != 3)
      return false;
    grandchildren.clear();
    for (auto w : workers)
      for (auto g : children_named(w, "sleep"))
        grandchildren.push_back(g);
    return grandchildren.size() == 3;
  });
  all.insert(all.end(), workers.begin(), workers.end());
  all.insert(all.end(), grandchildren.begin(), grandchildren.end());
  if (!up)
    MESSAGE("dspex output:\n" << read_text(out));
  REQUIRE(up);
  std::map<pid_t, long> switches;
  for (auto w : workers)
    switches[w] = status_field(w, "voluntary_ctxt_switches");
  // Under load: each worker has blocked on its stdin hundreds of times since.
  bool loaded = poll_for(30s, [&] {
    for (auto w : workers)
      if (status_field(w, "voluntary_ctxt_switches") < switches[w] + 500)
        return false;
    return true;
  });
  if (!loaded)
    MESSAGE("dspex output:\n" << read_text(out));
  REQUIRE(loaded);
  REQUIRE(process_state(dspex).has_value());
  REQUIRE(process_state(dspex) != 'Z');  // still running the workload
  for (auto pid : child_pids(dspex))
    if (is_guardian(pid))
      guardians.push_back(pid);
  all.insert(all.end(), guardians.begin(), guardians.end());
  MESSAGE("dspex " << dspex << ", workers " << workers.size() << ", grandchildren "
                   << grandchildren.size() << ", guardians " << guardians.size());

  REQUIRE(::kill(dspex, SIGKILL) == 0);
  poll_for(20s, [&] {
    reap_any();
    return std::all_of(all.begin(), all.end(), [](pid_t p) { return process_gone(p); });
  });
  CHECK(process_gone(dspex));
  for (auto w : workers)
    CHECK_MESSAGE(process_gone(w), "worker " << w << " left (" << cmdline(w) << ")");
  for (auto g : grandchildren)
    CHECK_MESSAGE(process_gone(g), "grandchild " << g << " left (" << cmdline(g)
                                                 << "): its worker's process group was not killed");
  for (auto g : guardians)
    CHECK_MESSAGE(process_gone(g), "guardian " << g << " left");
}
