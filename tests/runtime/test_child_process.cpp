// The child-process layer against real processes: /bin/cat (echoes frames),
// /bin/sh scripts, and the bundled Python worker. Every wait is on an event
// (condition variable) with a generous bound that only catches hangs.

#include <doctest/doctest.h>

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <condition_variable>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "dspex/child_process.hpp"
#include "support/proc.hpp"

using namespace std::chrono_literals;
using dspex::child_process;
using dspex::child_spec;
using dspex::exit_status;
using dspex::protocol_errc;
using dspex::protocol_error;
namespace proc = dspex::testing;

namespace {

constexpr auto hang_bound = 10s; // only catches hangs; never a performance assertion

/// Records every event of one child; tests wait on it.
class recorder : public dspex::child_observer {
public:
  void on_frame(std::string payload) override {
    std::lock_guard<std::mutex> lk(mtx_);
    check_not_exited();
    frames_.push_back(std::move(payload));
    cv_.notify_all();
  }
  void on_protocol_error(protocol_error err) override {
    std::lock_guard<std::mutex> lk(mtx_);
    check_not_exited();
    errors_.push_back(std::move(err));
    cv_.notify_all();
  }
  void on_stderr_line(std::string_view line) override {
    std::lock_guard<std::mutex> lk(mtx_);
    check_not_exited();
    lines_.emplace_back(line);
    cv_.notify_all();
  }
  void on_exit(exit_status status) override {
    std::lock_guard<std::mutex> lk(mtx_);
    ++exit_count_;
    exit_ = status;
    cv_.notify_all();
  }

  /// Waits until `pred` holds; `pred` runs under the lock: it reads the
  /// members directly (the public accessors would lock again).
  template <class Pred>
  bool wait(Pred pred, std::chrono::milliseconds bound = hang_bound) {
    std::unique_lock<std::mutex> lk(mtx_);
    return cv_.wait_for(lk, bound, [&] { return pred(); });
  }

  /// Waits for on_exit and returns the status (nullopt after the bound).
  std::optional<exit_status> wait_exit(std::chrono::milliseconds bound = hang_bound) {
    std::unique_lock<std::mutex> lk(mtx_);
    cv_.wait_for(lk, bound, [&] { return exit_count_ > 0; });
    return exit_;
  }
  bool wait_frames(std::size_t n) {
    return wait([&] { return frames_.size() >= n || exit_count_ > 0; }) && frames().size() >= n;
  }
  bool wait_errors(std::size_t n) {
    return wait([&] { return errors_.size() >= n || exit_count_ > 0; }) && errors().size() >= n;
  }
  bool wait_lines(std::size_t n) {
    return wait([&] { return lines_.size() >= n || exit_count_ > 0; }) && lines().size() >= n;
  }

  std::vector<std::string> frames() { return locked(frames_); }
  std::vector<protocol_error> errors() { return locked(errors_); }
  std::vector<std::string> lines() { return locked(lines_); }
  int exit_count() { return locked(exit_count_); }
  bool event_after_exit() { return locked(event_after_exit_); }

private:
  void check_not_exited() {
    if (exit_count_ > 0)
      event_after_exit_ = true;
  }
  template <class T>
  T locked(const T& v) {
    std::lock_guard<std::mutex> lk(mtx_);
    return v;
  }

  std::mutex mtx_;
  std::condition_variable cv_;
  std::vector<std::string> frames_;
  std::vector<protocol_error> errors_;
  std::vector<std::string> lines_;
  std::optional<exit_status> exit_;
  int exit_count_ = 0;
  bool event_after_exit_ = false;
};

struct started {
  std::shared_ptr<recorder> rec;
  std::unique_ptr<child_process> child;
};

started start(std::string program, std::vector<std::string> args, std::string label = "t") {
  auto rec = std::make_shared<recorder>();
  child_spec spec;
  spec.program = std::move(program);
  spec.args = std::move(args);
  spec.label = std::move(label);
  auto child = child_process::spawn(std::move(spec), rec);
  return {rec, std::move(child)};
}

started sh(const std::string& script, std::string label = "sh") {
  return start("/bin/sh", {"-c", script}, std::move(label));
}

/// After a test: the test process has no child left (no zombie, no orphan).
struct no_leftovers {
  no_leftovers() = default;
  no_leftovers(const no_leftovers&) = delete;
  ~no_leftovers() {
    auto left = proc::wait_no_children(::getpid(), 5000ms);
    CHECK_MESSAGE(left.empty(), "children left behind: " << left.size());
  }
};

/// Makes the test process a child subreaper while it lives.
struct subreaper {
  subreaper() { REQUIRE(::prctl(PR_SET_CHILD_SUBREAPER, 1) == 0); }
  ~subreaper() { ::prctl(PR_SET_CHILD_SUBREAPER, 0); }
  subreaper(const subreaper&) = delete;
};

/// waitpid() with a bound (polls every 10 ms); the wait status, or nullopt.
std::optional<int> wait_status(pid_t pid, std::chrono::milliseconds bound) {
  const auto deadline = std::chrono::steady_clock::now() + bound;
  for (;;) {
    int ws = 0;
    pid_t r = ::waitpid(pid, &ws, WNOHANG);
    if (r == pid)
      return ws;
    if (r < 0 || std::chrono::steady_clock::now() >= deadline)
      return std::nullopt;
    std::this_thread::sleep_for(10ms);
  }
}

/// Pipe inodes ("pipe:[123]") among a process's fds.
std::set<std::string> pipes_of(pid_t pid) {
  std::set<std::string> out;
  for (auto& t : proc::open_fd_targets(pid))
    if (t.rfind("pipe:", 0) == 0)
      out.insert(t);
  return out;
}

} // namespace

TEST_SUITE("child_process") {

TEST_CASE_FIXTURE(no_leftovers, "cat echoes frames back through the framed pipes") {
  auto [rec, child] = start("cat", {}, "cat"); // found in PATH
  CHECK(child->pid() > 0);
  CHECK(child->label() == "cat");
  CHECK_FALSE(child->exited());

  REQUIRE(child->send(R"({"id":1})", 1000ms));
  REQUIRE(rec->wait_frames(1));
  CHECK(rec->frames()[0] == R"({"id":1})");

  // Many small frames keep their order.
  for (int i = 2; i <= 200; ++i)
    REQUIRE(child->send(R"({"id":)" + std::to_string(i) + "}", 1000ms));
  REQUIRE(rec->wait_frames(200));
  auto frames = rec->frames();
  for (int i = 0; i < 200; ++i)
    CHECK(frames[i] == R"({"id":)" + std::to_string(i + 1) + "}");

  // A frame far larger than the pipe: send() waits for room while the I/O
  // thread reads the echo.
  std::string big = "\"" + std::string(3 << 20, 'x') + "\"";
  REQUIRE(child->send(big, 5000ms));
  REQUIRE(rec->wait_frames(201));
  CHECK(rec->frames()[200] == big);

  child->stop(5000ms, 5000ms);
  auto st = rec->wait_exit();
  REQUIRE(st);
  CHECK(st->clean());
  CHECK(rec->errors().empty());
  CHECK(child->exited());
  CHECK(proc::process_gone(child->pid()));
}

TEST_CASE_FIXTURE(no_leftovers, "spawn failures throw spawn_error naming the program") {
  auto rec = std::make_shared<recorder>();
  auto fails = [&](std::string program, std::string expected) {
    child_spec spec;
    spec.program = program;
    spec.label = "nope";
    try {
      child_process::spawn(spec, rec);
      FAIL("spawn of " << program << " succeeded");
    } catch (const dspex::spawn_error& e) {
      CHECK(std::string(e.what()) == expected);
    }
  };
  fails("nonexistent-python", "nonexistent-python: not found in PATH");
  fails("/nonexistent/python3", "/nonexistent/python3: No such file or directory");
  fails("/tmp", "/tmp: Permission denied"); // a directory

  char path[] = "/tmp/dspex-not-executable-XXXXXX";
  int fd = ::mkstemp(path); // mode 0600: not executable
  REQUIRE(fd >= 0);
  ::close(fd);
  fails(path, std::string(path) + ": Permission denied");
  REQUIRE(::chmod(path, 0700) == 0); // executable, but neither ELF nor script
  fails(path, std::string(path) + ": Exec format error");
  ::unlink(path);
  CHECK(rec->exit_count() == 0);
}

TEST_CASE_FIXTURE(no_leftovers, "exit code is reported") {
  auto [rec, child] = sh("exit 3");
  auto st = rec->wait_exit();
  REQUIRE(st);
  CHECK_FALSE(st->signaled);
  CHECK(st->code == 3);
  CHECK_FALSE(st->clean());
  CHECK(st->describe() == "exit code 3");
  CHECK(child->exited());
  CHECK(proc::process_gone(child->pid()));
  CHECK(rec->exit_count() == 1);
}

TEST_CASE_FIXTURE(no_leftovers, "kill() ends the child with SIGKILL; idempotent") {
  auto [rec, child] = start("/bin/cat", {});
  child->kill();
  child->kill();
  auto st = rec->wait_exit();
  REQUIRE(st);
  CHECK(st->signaled);
  CHECK(st->code == SIGKILL);
  CHECK(st->describe() == "signal 9 (SIGKILL)");
  child->kill();                     // after the reap: no signal to a reaped pid
  child->stop(10ms, 10ms);           // nor a stop sequence
  CHECK(child->exited());
  CHECK(proc::process_gone(child->pid()));
  CHECK(rec->exit_count() == 1);
}

TEST_CASE_FIXTURE(no_leftovers, "an external SIGKILL is reported") {
  auto [rec, child] = start("/bin/cat", {});
  REQUIRE(::kill(child->pid(), SIGKILL) == 0);
  auto st = rec->wait_exit();
  REQUIRE(st);
  CHECK(st->signaled);
  CHECK(st->code == SIGKILL);
  CHECK(proc::process_gone(child->pid()));
}

TEST_CASE_FIXTURE(no_leftovers, "stderr is read line by line") {
  SUBCASE("complete lines") {
    auto [rec, child] = sh("echo a >&2; echo b >&2");
    REQUIRE(rec->wait_exit());
    CHECK(rec->lines() == std::vector<std::string>{"a", "b"});
    CHECK(rec->frames().empty());
  }
  SUBCASE("a trailing partial line and an empty line") {
    auto [rec, child] = sh("printf 'one\\n\\nlast' >&2");
    REQUIRE(rec->wait_exit());
    CHECK(rec->lines() == std::vector<std::string>{"one", "", "last"});
  }
  SUBCASE("a line over 64 KiB comes in pieces") {
    auto [rec, child] = sh("head -c 150000 /dev/zero | tr '\\000' x >&2; echo >&2; echo end >&2");
    REQUIRE(rec->wait_exit());
    auto lines = rec->lines();
    REQUIRE(lines.size() == 4);
    CHECK(lines[0] == std::string(65536, 'x'));
    CHECK(lines[1] == std::string(65536, 'x'));
    CHECK(lines[2] == std::string(150000 - 2 * 65536, 'x'));
    CHECK(lines[3] == "end");
  }
  SUBCASE("stderr is never mixed into stdout") {
    auto [rec, child] = sh("echo noise >&2; exec cat");
    REQUIRE(rec->wait_lines(1));
    REQUIRE(child->send("{}", 1000ms));
    REQUIRE(rec->wait_frames(1));
    CHECK(rec->frames() == std::vector<std::string>{"{}"});
    CHECK(rec->errors().empty());
    child->stop(5000ms, 5000ms);
    REQUIRE(rec->wait_exit());
  }
}

TEST_CASE_FIXTURE(no_leftovers, "stop(): a child that exits on EOF ends cleanly") {
  auto [rec, child] = start("/bin/cat", {});
  REQUIRE(child->send(R"({"x":1})", 1000ms));
  REQUIRE(rec->wait_frames(1));
  // Graces far longer than the hang bound: a clean exit proves EOF did it.
  child->stop(60s, 60s);
  child->stop(60s, 60s); // idempotent
  auto st = rec->wait_exit();
  REQUIRE(st);
  CHECK(st->clean());
  CHECK_FALSE(child->send("{}", 100ms)); // stdin closed by stop
}

TEST_CASE_FIXTURE(no_leftovers, "stop(): a child ignoring EOF and SIGTERM ends by SIGKILL") {
  // The ignored disposition of TERM survives exec: sleep ignores it too.
  auto [rec, child] = sh("trap '' TERM; echo ready >&2; exec sleep 1000");
  REQUIRE(rec->wait_lines(1));
  child->stop(50ms, 50ms);
  auto st = rec->wait_exit();
  REQUIRE(st);
  CHECK(st->signaled);
  CHECK(st->code == SIGKILL);
  CHECK(proc::process_gone(child->pid()));
}

TEST_CASE_FIXTURE(no_leftovers, "stop(): a child ignoring EOF but not SIGTERM ends by SIGTERM") {
  auto [rec, child] = sh("echo ready >&2; exec sleep 1000");
  REQUIRE(rec->wait_lines(1));
  child->stop(50ms, 60s);
  auto st = rec->wait_exit();
  REQUIRE(st);
  CHECK(st->signaled);
  CHECK(st->code == SIGTERM);
  CHECK(st->describe() == "signal 15 (SIGTERM)");
}

TEST_CASE_FIXTURE(no_leftovers, "a kill() cuts a pending stop sequence short") {
  auto [rec, child] = sh("trap '' TERM; echo ready >&2; exec sleep 1000");
  REQUIRE(rec->wait_lines(1));
  child->stop(60s, 60s);
  child->kill();
  auto st = rec->wait_exit();
  REQUIRE(st);
  CHECK(st->signaled);
  CHECK(st->code == SIGKILL);
}

TEST_CASE_FIXTURE(no_leftovers, "exit is detected although stdout ended long before") {
  // Closes its stdout at once, then waits for EOF on stdin and exits 5.
  auto [rec, child] = sh("exec 1>&-; echo closed >&2; read x; exit 5");
  REQUIRE(rec->wait_lines(1));
  CHECK_FALSE(child->exited());
  child->stop(60s, 60s);
  auto st = rec->wait_exit();
  REQUIRE(st);
  CHECK_FALSE(st->signaled);
  CHECK(st->code == 5);
  CHECK(rec->errors().empty());
}

TEST_CASE_FIXTURE(no_leftovers, "grandchildren die with the group") {
  // Orphans go to PID 1, which here reaps them only a second or so later:
  // become a subreaper, so the killed grandchild is reparented to us and we
  // can check how it died (and reap it) without waiting on PID 1.
  subreaper guard;

  auto grandchild_of = [](recorder& rec) -> pid_t {
    REQUIRE(rec.wait_lines(1));
    return static_cast<pid_t>(std::stol(rec.lines()[0]));
  };
  auto check_killed = [](pid_t gc) {
    auto ws = wait_status(gc, hang_bound); // reparented to us, it ends by SIGKILL
    if (!ws) {
      ::kill(gc, SIGKILL);
      wait_status(gc, hang_bound);
      FAIL("grandchild " << gc << " survived its group");
    }
    CHECK(WIFSIGNALED(*ws));
    CHECK(WTERMSIG(*ws) == SIGKILL);
    CHECK(proc::process_gone(gc));
  };

  SUBCASE("kill() of the leader") {
    auto [rec, child] = sh("sleep 1000 & echo $! >&2; wait");
    pid_t gc = grandchild_of(*rec);
    CHECK(proc::process_state(gc).has_value());
    child->kill();
    auto st = rec->wait_exit();
    REQUIRE(st);
    CHECK(st->code == SIGKILL);
    check_killed(gc);
  }
  SUBCASE("the leader exits by itself; the grandchild still holds the pipes") {
    // The exit must be seen without EOF (sleep holds stdout and stderr), and
    // the reap kills what is left of the group.
    auto [rec, child] = sh("sleep 1000 & echo $! >&2; read x; exit 7");
    pid_t gc = grandchild_of(*rec);
    child->stop(60s, 60s); // EOF on stdin: the leader exits 7
    auto st = rec->wait_exit();
    REQUIRE(st);
    CHECK_FALSE(st->signaled);
    CHECK(st->code == 7);
    check_killed(gc);
  }
}

TEST_CASE_FIXTURE(no_leftovers, "the child dies with the runtime (PR_SET_PDEATHSIG)") {
  // A forked copy of this (at this point single-threaded) test process plays
  // the runtime: it spawns a child, reports its pid, and is SIGKILLed.
  subreaper guard; // the orphaned child is reparented to us
  int p[2];
  REQUIRE(::pipe2(p, O_CLOEXEC) == 0);
  pid_t runtime = ::fork();
  REQUIRE(runtime >= 0);
  if (runtime == 0) {
    ::close(p[0]);
    try {
      auto child = child_process::spawn({"/bin/sh", {"-c", "exec sleep 1000"}, "orphan"},
                                        std::make_shared<recorder>());
      pid_t pid = child->pid();
      if (::write(p[1], &pid, sizeof pid) != sizeof pid)
        ::_exit(2);
      for (;;)
        ::pause();
    } catch (...) {
      ::_exit(3);
    }
  }
  ::close(p[1]);
  pid_t pid = -1;
  bool got = ::read(p[0], &pid, sizeof pid) == sizeof pid;
  ::close(p[0]);
  REQUIRE(::kill(runtime, SIGKILL) == 0);
  auto runtime_ws = wait_status(runtime, hang_bound);
  REQUIRE(runtime_ws);
  CHECK(WIFSIGNALED(*runtime_ws));
  REQUIRE(got);
  auto ws = wait_status(pid, hang_bound);
  if (!ws) {
    ::kill(pid, SIGKILL);
    wait_status(pid, hang_bound);
    FAIL("the child outlived its runtime");
  }
  CHECK(WIFSIGNALED(*ws));
  CHECK(WTERMSIG(*ws) == SIGKILL);
}

TEST_CASE_FIXTURE(no_leftovers, "fd hygiene: siblings do not inherit each other's pipes") {
  const auto fds_before = proc::open_fd_targets(::getpid()).size();

  auto [rec_a, a] = start("/bin/cat", {}, "a");
  auto [rec_b, b] = start("/bin/cat", {}, "b");
  // Let both finish starting up (cat opens locale files briefly): one echo each.
  REQUIRE(a->send("{}", 1000ms));
  REQUIRE(b->send("{}", 1000ms));
  REQUIRE(rec_a->wait_frames(1));
  REQUIRE(rec_b->wait_frames(1));

  // A's pipes, as seen from A's fds 0/1/2 (the parent's ends share the inodes).
  auto pipes_a = pipes_of(a->pid());
  CHECK(pipes_a.size() == 3);
  // B holds exactly its own stdin/stdout/stderr, and none of A's pipes.
  auto targets_b = proc::open_fd_targets(b->pid());
  std::string all_b;
  for (auto& t : targets_b)
    all_b += t + " ";
  CHECK_MESSAGE(targets_b.size() == 3, "B's fds: " << all_b);
  for (auto& t : targets_b)
    CHECK_MESSAGE(pipes_a.count(t) == 0, "B holds A's " << t);
  // The test process holds 3 parent ends (+ eventfd, pidfd) per child, no child end.
  auto pipes_self = pipes_of(::getpid());
  auto pipes_b = pipes_of(b->pid());
  for (auto& t : pipes_a)
    CHECK(pipes_self.count(t) == 1);
  for (auto& t : pipes_b)
    CHECK(pipes_self.count(t) == 1);

  // Closing A's stdin makes A exit although B lives.
  a->stop(60s, 60s);
  auto st_a = rec_a->wait_exit();
  REQUIRE(st_a);
  CHECK(st_a->clean());
  CHECK_FALSE(b->exited());
  REQUIRE(b->send("{}", 1000ms));
  REQUIRE(rec_b->wait_frames(2));

  b->stop(60s, 60s);
  auto st_b = rec_b->wait_exit();
  REQUIRE(st_b);
  CHECK(st_b->clean());

  a.reset();
  b.reset();
  CHECK(proc::open_fd_targets(::getpid()).size() == fds_before); // no fd leaked
}

TEST_CASE_FIXTURE(no_leftovers, "protocol errors are reported once, later stdout is drained") {
  SUBCASE("zero-length header") {
    // After the bad header, a megabyte more: the child can only exit 0 if we
    // keep reading (and discarding) its stdout.
    auto [rec, child] = sh("printf '\\000\\000\\000\\000'; head -c 1000000 /dev/zero; exit 0");
    auto st = rec->wait_exit();
    REQUIRE(st);
    CHECK(st->clean());
    auto errs = rec->errors();
    REQUIRE(errs.size() == 1);
    CHECK(errs[0].code == protocol_errc::zero_length);
    CHECK(rec->frames().empty());
  }
  SUBCASE("noise that is no frame") {
    auto [rec, child] = sh("echo 'hello, this is not a frame'; echo more noise; exec cat");
    REQUIRE(rec->wait_errors(1));
    CHECK(rec->errors()[0].code == protocol_errc::oversize);
    child->kill(); // what the owner is expected to do
    REQUIRE(rec->wait_exit());
    CHECK(rec->errors().size() == 1);
  }
  SUBCASE("frames before the violation are delivered") {
    auto [rec, child] = sh("printf '\\000\\000\\000\\002{}\\000\\000\\000\\000'; exit 0");
    REQUIRE(rec->wait_exit());
    CHECK(rec->frames() == std::vector<std::string>{"{}"});
    REQUIRE(rec->errors().size() == 1);
    CHECK(rec->errors()[0].code == protocol_errc::zero_length);
  }
  SUBCASE("a frame over max_frame_bytes") {
    auto rec = std::make_shared<recorder>();
    child_spec spec{"/bin/sh", {"-c", "printf '\\000\\000\\000\\011{\"a\":123}'; exit 0"}, "small", 8};
    auto child = child_process::spawn(spec, rec);
    REQUIRE(rec->wait_exit());
    REQUIRE(rec->errors().size() == 1);
    CHECK(rec->errors()[0].code == protocol_errc::oversize);
  }
}

TEST_CASE_FIXTURE(no_leftovers, "a frame cut short is reported as truncated") {
  SUBCASE("EOF inside the body") {
    auto [rec, child] = sh("printf '\\000\\000\\000\\020abc'; exit 1");
    auto st = rec->wait_exit();
    REQUIRE(st);
    CHECK(st->code == 1);
    REQUIRE(rec->errors().size() == 1);
    CHECK(rec->errors()[0].code == protocol_errc::truncated);
  }
  SUBCASE("EOF inside the header") {
    auto [rec, child] = sh("printf '\\000\\000'; exit 0");
    REQUIRE(rec->wait_exit());
    REQUIRE(rec->errors().size() == 1);
    CHECK(rec->errors()[0].code == protocol_errc::truncated);
  }
  SUBCASE("a clean frame boundary at EOF is fine") {
    auto [rec, child] = sh("printf '\\000\\000\\000\\002{}'; exit 0");
    REQUIRE(rec->wait_exit());
    CHECK(rec->errors().empty());
    CHECK(rec->frames() == std::vector<std::string>{"{}"});
  }
}

TEST_CASE_FIXTURE(no_leftovers, "send() fails after the exit and when stdin stays full") {
  SUBCASE("after the exit") {
    auto [rec, child] = sh("exit 0");
    REQUIRE(rec->wait_exit());
    CHECK(child->exited());
    CHECK_FALSE(child->send("{}", 100ms));
  }
  SUBCASE("the child closed its stdin (EPIPE, not SIGPIPE)") {
    auto [rec, child] = sh("exec 0<&-; echo closed >&2; exec sleep 1000");
    REQUIRE(rec->wait_lines(1));
    CHECK_FALSE(child->send("{}", 1000ms));
    CHECK_FALSE(child->send("{}", 1000ms));
    child->kill();
    REQUIRE(rec->wait_exit());
  }
  SUBCASE("a child that never reads") {
    auto [rec, child] = sh("exec sleep 1000");
    std::string big(1 << 20, 'x');
    CHECK_FALSE(child->send(big, 50ms));
    // Half a frame went in: stdin can carry no more frames.
    CHECK_FALSE(child->send("{}", 50ms));
    child->kill();
    auto st = rec->wait_exit();
    REQUIRE(st);
    CHECK(st->code == SIGKILL);
  }
}

TEST_CASE_FIXTURE(no_leftovers, "the destructor kills and reaps a running child") {
  auto rec = std::make_shared<recorder>();
  pid_t pid = -1;
  {
    auto child = child_process::spawn({"/bin/sh", {"-c", "trap '' TERM; exec sleep 1000"}, "d"}, rec);
    pid = child->pid();
    CHECK(proc::process_state(pid).has_value());
  }
  // Joined and reaped by the time the destructor returned.
  CHECK(proc::process_gone(pid));
  CHECK(rec->exit_count() == 1);
  auto st = rec->wait_exit(0ms);
  REQUIRE(st);
  CHECK(st->code == SIGKILL);
}

TEST_CASE_FIXTURE(no_leftovers, "the child can be destroyed from its own observer") {
  // The observer owns the child and destroys it from on_frame, on the I/O
  // thread itself: the destructor must neither deadlock nor lose on_exit.
  struct self_destroying : recorder {
    std::mutex m;
    std::condition_variable handed_over;
    std::unique_ptr<child_process> owned;
    void on_frame(std::string payload) override {
      std::unique_ptr<child_process> doomed;
      {
        std::unique_lock<std::mutex> lk(m);
        handed_over.wait_for(lk, hang_bound, [&] { return owned != nullptr; });
        doomed = std::move(owned);
      }
      doomed.reset();
      recorder::on_frame(std::move(payload));
    }
  };
  auto rec = std::make_shared<self_destroying>();
  auto child = child_process::spawn({"/bin/cat", {}, "self"}, rec);
  pid_t pid = child->pid();
  REQUIRE(child->send("{}", 1000ms));
  {
    std::lock_guard<std::mutex> lk(rec->m);
    rec->owned = std::move(child);
  }
  rec->handed_over.notify_all();
  auto st = rec->wait_exit();
  REQUIRE(st);
  CHECK(st->code == SIGKILL);
  CHECK(rec->exit_count() == 1);
  CHECK(proc::wait_gone(pid, 5000ms));
}

TEST_CASE_FIXTURE(no_leftovers, "no event follows on_exit") {
  auto [rec, child] = sh("echo err >&2; printf '\\000\\000\\000\\002{}'; exit 0");
  REQUIRE(rec->wait_exit());
  CHECK(rec->exit_count() == 1);
  CHECK_FALSE(rec->event_after_exit());
  CHECK(rec->lines() == std::vector<std::string>{"err"});
  CHECK(rec->frames().size() == 1);
}

TEST_CASE_FIXTURE(no_leftovers, "the bundled Python worker: ping, then shutdown") {
  auto [rec, child] = start(DSPEX_TEST_PYTHON,
                            {DSPEX_TEST_WORKER_SCRIPT, "--mode", "pool-worker", "--worker-id", "w1"},
                            "w1");
  nlohmann::json ping = {{"id", 0},
                         {"command", "ping"},
                         {"args", {{"initialization", true}, {"worker_id", "w1"}}}};
  REQUIRE(child->send(ping.dump(), 1000ms));
  REQUIRE(rec->wait_frames(1));
  auto reply = nlohmann::json::parse(rec->frames()[0]);
  CHECK(reply["id"] == 0);
  CHECK(reply["success"] == true);
  CHECK(reply["result"]["worker_id"] == "w1");

  nlohmann::json shutdown = {{"id", 1}, {"command", "shutdown"}, {"args", nlohmann::json::object()}};
  REQUIRE(child->send(shutdown.dump(), 1000ms));
  REQUIRE(rec->wait_frames(2));
  CHECK(nlohmann::json::parse(rec->frames()[1])["id"] == 1);
  auto st = rec->wait_exit();
  REQUIRE(st);
  CHECK(st->clean());
  CHECK(rec->errors().empty());
}

TEST_CASE_FIXTURE(no_leftovers, "the bundled Python worker exits on EOF of stdin") {
  auto [rec, child] = start(DSPEX_TEST_PYTHON,
                            {DSPEX_TEST_WORKER_SCRIPT, "--mode", "pool-worker", "--worker-id", "w2"},
                            "w2");
  nlohmann::json ping = {{"id", 0}, {"command", "ping"}, {"args", {{"session_id", "anonymous"}}}};
  REQUIRE(child->send(ping.dump(), 1000ms));
  REQUIRE(rec->wait_frames(1));
  child->stop(60s, 60s);
  auto st = rec->wait_exit();
  REQUIRE(st);
  CHECK(st->clean());
}

} // TEST_SUITE
