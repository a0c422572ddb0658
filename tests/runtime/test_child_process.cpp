// The child-process layer against real processes: /bin/cat (echoes frames),
// /bin/sh scripts, and the bundled Python worker. Every wait is on an event
// (condition variable) with a generous bound that only catches hangs.

#include <doctest/doctest.h>

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <fstream>
#include <future>
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
using dspex::process_spec;
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
  void on_alarm() override {
    std::lock_guard<std::mutex> lk(mtx_);
    alarms_.push_back(std::chrono::steady_clock::now());
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

  bool wait_alarms(std::size_t n) {
    return wait([&] { return alarms_.size() >= n || exit_count_ > 0; }) && alarms().size() >= n;
  }
  std::vector<std::chrono::steady_clock::time_point> alarms() { return locked(alarms_); }
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
  std::vector<std::chrono::steady_clock::time_point> alarms_;
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
  process_spec spec;
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

/// The fd numbers a process has open, from /proc/<pid>/fd.
std::set<int> fd_numbers(pid_t pid) {
  std::set<int> out;
  std::string dir = "/proc/" + std::to_string(pid) + "/fd";
  if (DIR* d = ::opendir(dir.c_str())) {
    while (auto* ent = ::readdir(d))
      if (ent->d_name[0] != '.')
        out.insert(std::stoi(ent->d_name));
    ::closedir(d);
  }
  return out;
}

/// The guardians among the test process's children.
std::vector<pid_t> guardians() {
  std::vector<pid_t> out;
  for (pid_t p : proc::child_pids(::getpid()))
    if (proc::is_guardian(p))
      out.push_back(p);
  return out;
}

/// A start line for a group of threads, reusable round after round.
class start_line {
public:
  explicit start_line(int parties) : parties_(parties) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lk(mtx_);
    auto gen = generation_;
    if (++waiting_ == parties_) {
      waiting_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    cv_.wait(lk, [&] { return generation_ != gen; });
  }

private:
  std::mutex mtx_;
  std::condition_variable cv_;
  int parties_;
  int waiting_ = 0;
  long generation_ = 0;
};

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

  REQUIRE(child->send(R"({"id":1})"));
  REQUIRE(rec->wait_frames(1));
  CHECK(rec->frames()[0] == R"({"id":1})");

  // Many small frames keep their order.
  for (int i = 2; i <= 200; ++i)
    REQUIRE(child->send(R"({"id":)" + std::to_string(i) + "}"));
  REQUIRE(rec->wait_frames(200));
  auto frames = rec->frames();
  for (int i = 0; i < 200; ++i)
    CHECK(frames[i] == R"({"id":)" + std::to_string(i + 1) + "}");

  // A frame far larger than the pipe: send() queues what does not fit, the
  // I/O thread writes it as cat reads, and reads the echo meanwhile.
  std::string big = "\"" + std::string(3 << 20, 'x') + "\"";
  REQUIRE(child->send(big));
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
    process_spec spec;
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

TEST_CASE_FIXTURE(no_leftovers, "kill() ends the child with SIGKILL, idempotent") {
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
    REQUIRE(child->send("{}"));
    REQUIRE(rec->wait_frames(1));
    CHECK(rec->frames() == std::vector<std::string>{"{}"});
    CHECK(rec->errors().empty());
    child->stop(5000ms, 5000ms);
    REQUIRE(rec->wait_exit());
  }
}

TEST_CASE_FIXTURE(no_leftovers, "stop(): a child that exits on EOF ends cleanly") {
  auto [rec, child] = start("/bin/cat", {});
  REQUIRE(child->send(R"({"x":1})"));
  REQUIRE(rec->wait_frames(1));
  // Graces far longer than the hang bound: a clean exit proves EOF did it.
  child->stop(60s, 60s);
  child->stop(60s, 60s); // idempotent
  auto st = rec->wait_exit();
  REQUIRE(st);
  CHECK(st->clean());
  CHECK_FALSE(child->send("{}")); // stdin closed by stop
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
  // The child's guardian, orphaned too (our only other child: maybe still
  // the runtime's forked image, maybe the shell, maybe a zombie already),
  // killed the (empty) group and exited.
  for (pid_t g : proc::child_pids(::getpid()))
    CHECK(wait_status(g, hang_bound).has_value());
}

TEST_CASE_FIXTURE(no_leftovers, "fd hygiene: siblings do not inherit each other's pipes") {
  const auto fds_before = proc::open_fd_targets(::getpid()).size();

  auto [rec_a, a] = start("/bin/cat", {}, "a");
  auto [rec_b, b] = start("/bin/cat", {}, "b");
  // Let both finish starting up (cat opens locale files briefly): one echo each.
  REQUIRE(a->send("{}"));
  REQUIRE(b->send("{}"));
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
  REQUIRE(b->send("{}"));
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
    process_spec spec{"/bin/sh", {"-c", "printf '\\000\\000\\000\\011{\"a\":123}'; exit 0"}, "small", 8};
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

TEST_CASE_FIXTURE(no_leftovers, "send() fails when nothing can reach the process") {
  SUBCASE("after the exit") {
    auto [rec, child] = sh("exit 0");
    REQUIRE(rec->wait_exit());
    CHECK(child->exited());
    CHECK_FALSE(child->send("{}"));
  }
  SUBCASE("the child closed its stdin (EPIPE, not SIGPIPE)") {
    auto [rec, child] = sh("exec 0<&-; echo closed >&2; exec sleep 1000");
    REQUIRE(rec->wait_lines(1));
    CHECK_FALSE(child->send("{}"));
    CHECK_FALSE(child->send("{}"));
    child->kill();
    REQUIRE(rec->wait_exit());
  }
  SUBCASE("after stop()") {
    auto [rec, child] = sh("echo ready >&2; exec sleep 1000");
    REQUIRE(rec->wait_lines(1));
    child->stop(50ms, 60s);
    CHECK_FALSE(child->send("{}"));
    REQUIRE(rec->wait_exit());
  }
}

TEST_CASE_FIXTURE(no_leftovers, "send() never blocks on a child that never reads") {
  // A worker that stopped reading used to block the sender (a CAF scheduler
  // thread) for up to the request's deadline.
  auto [rec, child] = sh("echo ready >&2; exec sleep 1000");
  REQUIRE(rec->wait_lines(1));
  const std::string big(1 << 20, 'x');
  // On another thread only so that a blocking send() fails the test instead
  // of hanging it; that thread is free again as soon as send() returns.
  auto sent = std::async(std::launch::async, [&] {
    bool first = child->send(big);
    bool second = child->send("{}"); // queued behind the first
    return first && second;
  });
  if (sent.wait_for(hang_bound) != std::future_status::ready) {
    child->kill(); // unblocks a blocked write (EPIPE)
    FAIL("send() blocked on a full pipe");
  }
  CHECK(sent.get());

  // The child has still read nothing: the pipe is full, the rest is queued.
  // (Not its state letter: it may still be between `exec` and its sleep.)
  int peek = ::open(("/proc/" + std::to_string(child->pid()) + "/fd/0").c_str(),
                    O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  REQUIRE(peek >= 0);
  int in_pipe = -1;
  REQUIRE(::ioctl(peek, FIONREAD, &in_pipe) == 0);
  int capacity = ::fcntl(peek, F_GETPIPE_SZ);
  ::close(peek);
  CHECK(in_pipe == capacity);
  CHECK(static_cast<std::size_t>(capacity) < big.size());

  child->kill();
  auto st = rec->wait_exit();
  REQUIRE(st);
  CHECK(st->code == SIGKILL);
  CHECK(rec->frames().empty());
  CHECK(rec->errors().empty());
  CHECK_FALSE(child->send("{}")); // stdin went with the child
}

TEST_CASE_FIXTURE(no_leftovers, "a large frame is written whole while the echo is read") {
  auto [rec, child] = start("/bin/cat", {}, "cat");
  std::string big(8 << 20, '\0');
  for (std::size_t i = 0; i < big.size(); ++i)
    big[i] = static_cast<char>('a' + i % 26);
  REQUIRE(child->send(big));
  REQUIRE(child->send("{}")); // queued behind it
  REQUIRE(rec->wait_frames(2));
  CHECK(rec->frames()[0] == big);
  CHECK(rec->frames()[1] == "{}");
  child->stop(60s, 60s);
  auto st = rec->wait_exit();
  REQUIRE(st);
  CHECK(st->clean());
  CHECK(rec->errors().empty());
}

TEST_CASE_FIXTURE(no_leftovers, "frames sent from two threads at once never interleave") {
  auto [rec, child] = start("/bin/cat", {}, "cat");
  constexpr int per_thread = 3;
  auto frame_of = [](int t, int k) { return std::string(4 << 20, static_cast<char>('a' + t * per_thread + k)); };
  start_line line(2);
  std::atomic<int> refused{0};
  std::vector<std::thread> senders;
  for (int t = 0; t < 2; ++t)
    senders.emplace_back([&, t] {
      line.arrive_and_wait();
      for (int k = 0; k < per_thread; ++k)
        if (!child->send(frame_of(t, k)))
          ++refused;
    });
  for (auto& th : senders)
    th.join();
  CHECK(refused.load() == 0);
  REQUIRE(rec->wait_frames(2 * per_thread));
  auto frames = rec->frames();
  REQUIRE(frames.size() == 2 * per_thread);
  // Each frame is one thread's frame, whole; each thread's frames keep their order.
  std::vector<int> next(2, 0);
  for (auto& f : frames) {
    REQUIRE(f.size() == std::size_t{4} << 20);
    int id = f[0] - 'a';
    int t = id / per_thread;
    REQUIRE((t == 0 || t == 1));
    CHECK(f == frame_of(t, next[t]));
    ++next[t];
  }
  CHECK(next == std::vector<int>{per_thread, per_thread});
  child->stop(60s, 60s);
  REQUIRE(rec->wait_exit());
  CHECK(rec->errors().empty());
}

TEST_CASE_FIXTURE(no_leftovers, "stop() writes the queued frames, then closes stdin") {
  auto [rec, child] = start("/bin/cat", {}, "cat");
  const std::string big(4 << 20, 'y');
  REQUIRE(child->send(big));
  child->stop(60s, 60s); // at once: most of the frame is still queued
  auto st = rec->wait_exit();
  REQUIRE(st);
  CHECK(st->clean()); // cat saw EOF after the whole frame
  REQUIRE(rec->frames().size() == 1);
  CHECK(rec->frames()[0] == big);
  CHECK(rec->errors().empty());
}

TEST_CASE_FIXTURE(no_leftovers, "stop() stays bounded when the queue never drains") {
  auto [rec, child] = sh("echo ready >&2; exec sleep 1000");
  REQUIRE(rec->wait_lines(1));
  REQUIRE(child->send(std::string(1 << 20, 'z')));
  child->stop(50ms, 60s); // no EOF can come: SIGTERM after the grace
  auto st = rec->wait_exit();
  REQUIRE(st);
  CHECK(st->signaled);
  CHECK(st->code == SIGTERM);
}

TEST_CASE_FIXTURE(no_leftovers, "a write failure while draining closes stdin") {
  // The child reads a little, then closes its stdin with most of the frame queued.
  auto [rec, child] = sh("head -c 1 >/dev/null; exec 0<&-; echo closed >&2; exec sleep 1000");
  REQUIRE(child->send(std::string(1 << 20, 'w'))); // the first bytes went in
  REQUIRE(rec->wait_lines(1));
  // The I/O thread met EPIPE (POLLERR on stdin, handled before the stderr
  // line of the same wakeup): stdin is closed, no frame is taken any more.
  CHECK_FALSE(child->send("{}"));
  CHECK_FALSE(child->exited());
  child->kill();
  auto st = rec->wait_exit();
  REQUIRE(st);
  CHECK(st->code == SIGKILL);
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
  REQUIRE(child->send("{}"));
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
  REQUIRE(child->send(ping.dump()));
  REQUIRE(rec->wait_frames(1));
  auto reply = nlohmann::json::parse(rec->frames()[0]);
  CHECK(reply["id"] == 0);
  CHECK(reply["success"] == true);
  CHECK(reply["result"]["worker_id"] == "w1");

  nlohmann::json shutdown = {{"id", 1}, {"command", "shutdown"}, {"args", nlohmann::json::object()}};
  REQUIRE(child->send(shutdown.dump()));
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
  REQUIRE(child->send(ping.dump()));
  REQUIRE(rec->wait_frames(1));
  child->stop(60s, 60s);
  auto st = rec->wait_exit();
  REQUIRE(st);
  CHECK(st->clean());
}

TEST_CASE_FIXTURE(no_leftovers, "concurrent spawns: every child inherits exactly fds 0, 1 and 2") {
  // Boost 1.74's bp::limit_handles was one global object every spawn wrote
  // to: spawns on several threads at once corrupted the heap. Many threads
  // spawn at the same instant, round after round; each child must hold its
  // own three pipes and nothing else, not even a descriptor the runtime
  // opened without O_CLOEXEC (as a careless library would).
  int leak[2];
  REQUIRE(::pipe(leak) == 0); // deliberately inheritable
  const auto leak_targets = [&] {
    std::set<std::string> t;
    for (int fd : leak) {
      char buf[64];
      ssize_t n = ::readlink(("/proc/self/fd/" + std::to_string(fd)).c_str(), buf, sizeof buf);
      REQUIRE(n > 0);
      t.emplace(buf, static_cast<std::size_t>(n));
    }
    return t;
  }();

  constexpr int threads = 8;
  constexpr int rounds = 30;
  start_line line(threads);
  std::mutex mtx;
  std::vector<std::string> problems;
  auto problem = [&](std::string what) {
    std::lock_guard<std::mutex> lk(mtx);
    problems.push_back(std::move(what));
  };
  std::atomic<int> checked{0};

  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      for (int r = 0; r < rounds; ++r) {
        line.arrive_and_wait();
        std::string label = "c" + std::to_string(t) + "." + std::to_string(r);
        try {
          auto [rec, child] = start("/bin/cat", {}, label);
          // One echo: cat is past its start-up (it opens locale files briefly).
          if (!child->send("{}") || !rec->wait_frames(1)) {
            problem(label + ": no echo");
            continue;
          }
          auto fds = fd_numbers(child->pid());
          if (fds != std::set<int>{0, 1, 2}) {
            std::string all;
            for (int fd : fds)
              all += std::to_string(fd) + " ";
            problem(label + ": fds " + all);
          }
          for (auto& target : proc::open_fd_targets(child->pid()))
            if (leak_targets.count(target))
              problem(label + ": inherited the runtime's " + target);
          child->stop(60s, 60s);
          auto st = rec->wait_exit();
          if (!st || !st->clean())
            problem(label + ": " + (st ? st->describe() : std::string("no exit")));
          ++checked;
        } catch (const std::exception& e) {
          problem(label + ": " + e.what());
        }
      }
    });
  for (auto& th : pool)
    th.join();
  ::close(leak[0]);
  ::close(leak[1]);
  CHECK(checked.load() == threads * rounds);
  for (auto& p : problems)
    FAIL_CHECK(p);
}

TEST_CASE_FIXTURE(no_leftovers, "stderr lines arrive as valid UTF-8 without control characters") {
  // Invalid bytes once reached nlohmann::json and dump() threw (type_error
  // 316) in the worker actor; control characters could forge log lines.
  auto [rec, child] = sh(R"(printf '\377\376 abc\n' >&2
printf 'caf\303\251 \360\237\230\200\n' >&2
printf 'a\033[31mb\tc\r\n' >&2
printf '\300\257|\355\240\200|\342\202\n' >&2
printf 'x\302\205y\177z\000w\001\n' >&2
printf '\364\220\200\200|\360\200|\340\237\200|\361\200\200' >&2)");
  REQUIRE(rec->wait_exit());
  const std::string fffd = "\xEF\xBF\xBD";
  auto lines = rec->lines();
  REQUIRE(lines.size() == 6);
  CHECK(lines[0] == fffd + fffd + " abc");
  CHECK(lines[1] == "caf\xC3\xA9 \xF0\x9F\x98\x80"); // valid UTF-8 is kept as is
  CHECK(lines[2] == "a[31mb\tc");                     // ESC and CR gone, tab kept
  // Each maximal invalid subpart is one U+FFFD (as Python's "replace" does).
  CHECK(lines[3] == fffd + fffd + "|" + fffd + fffd + fffd + "|" + fffd);
  CHECK(lines[4] == "xyzw"); // C1 (U+0085), DEL, NUL and other C0 controls removed
  CHECK(lines[5] == fffd + fffd + fffd + fffd + "|" + fffd + fffd + "|" + fffd + fffd + fffd + "|" + fffd);
  for (auto& l : lines) {
    std::string dumped;
    CHECK_NOTHROW(dumped = nlohmann::json(l).dump());
    CHECK(nlohmann::json::parse(dumped) == l);
  }
}

TEST_CASE_FIXTURE(no_leftovers, "a stderr line cut at 64 KiB is not cut inside a character") {
  // 65535 ASCII bytes, then a 2-byte character across the 64 KiB boundary.
  auto [rec, child] = sh("head -c 65535 /dev/zero | tr '\\000' x >&2; printf '\\303\\251end\\n' >&2");
  REQUIRE(rec->wait_exit());
  auto lines = rec->lines();
  REQUIRE(lines.size() == 2);
  CHECK(lines[0] == std::string(65535, 'x'));
  CHECK(lines[1] == "\xC3\xA9" "end");
}

TEST_CASE_FIXTURE(no_leftovers, "no grandchild survives a SIGKILL of the runtime") {
  // PR_SET_PDEATHSIG kills the worker, not what the worker started. A forked
  // copy of this (single-threaded at this point) test process plays the
  // runtime: it spawns a shell with two background sleeps, reports the pids
  // (worker, both grandchildren, the guardian), and is SIGKILLed.
  subreaper guard; // orphans are reparented to us: we see how they died and reap them
  int p[2];
  REQUIRE(::pipe2(p, O_CLOEXEC) == 0);
  pid_t runtime = ::fork();
  REQUIRE(runtime >= 0);
  if (runtime == 0) {
    ::close(p[0]);
    try {
      auto rec = std::make_shared<recorder>();
      auto child = child_process::spawn(
        {"/bin/sh", {"-c", "sleep 1000 & a=$!; sleep 1000 & echo $a $! >&2; wait"}, "doomed"}, rec);
      if (!rec->wait_lines(1))
        ::_exit(4);
      pid_t pids[4] = {child->pid(), -1, -1, -1};
      auto line = rec->lines()[0];
      auto space = line.find(' ');
      pids[1] = static_cast<pid_t>(std::stol(line.substr(0, space)));
      pids[2] = static_cast<pid_t>(std::stol(line.substr(space + 1)));
      for (pid_t k : proc::child_pids(::getpid()))
        if (k != child->pid())
          pids[3] = k;
      if (::write(p[1], pids, sizeof pids) != sizeof pids)
        ::_exit(2);
      for (;;)
        ::pause();
    } catch (...) {
      ::_exit(3);
    }
  }
  ::close(p[1]);
  pid_t pids[4] = {-1, -1, -1, -1};
  bool got = ::read(p[0], pids, sizeof pids) == sizeof pids;
  ::close(p[0]);
  REQUIRE(::kill(runtime, SIGKILL) == 0);
  auto runtime_ws = wait_status(runtime, hang_bound);
  REQUIRE(runtime_ws);
  CHECK(WIFSIGNALED(*runtime_ws));
  REQUIRE(got);
  const pid_t worker = pids[0], guardian = pids[3];
  CHECK(guardian > 0); // the runtime's only other child

  for (pid_t pid : {worker, pids[1], pids[2]}) {
    auto ws = wait_status(pid, hang_bound);
    if (!ws) {
      ::kill(pid, SIGKILL);
      wait_status(pid, hang_bound);
      FAIL_CHECK("pid " << pid << " outlived its runtime");
      continue;
    }
    CHECK(WIFSIGNALED(*ws));
    CHECK(WTERMSIG(*ws) == SIGKILL);
    CHECK(proc::process_gone(pid));
  }
  if (guardian > 0) {
    // It killed the group, then left on its own.
    auto ws = wait_status(guardian, hang_bound);
    REQUIRE(ws);
    CHECK(WIFEXITED(*ws));
    CHECK(WEXITSTATUS(*ws) == 0);
    CHECK(proc::process_gone(guardian));
  }
}

TEST_CASE_FIXTURE(no_leftovers, "each child has a guardian holding nothing but its own pipe") {
  auto [rec_a, a] = start("/bin/cat", {}, "a");
  auto [rec_b, b] = start("/bin/cat", {}, "b");
  // A guardian closes what it inherited and execs the shell first thing after
  // its fork, but that runs on its own schedule: wait for it (bounded), until
  // the shell sleeps in its `read` of the pipe. (Between the close and the
  // exec a guardian holds only fd 0 but is not the shell yet; right after the
  // exec the dynamic loader briefly holds libc open.)
  std::vector<pid_t> guards;
  auto settled = [&] {
    guards = guardians();
    return guards.size() == 2
           && std::all_of(guards.begin(), guards.end(), [](pid_t g) {
                return proc::comm(g) == "sh" && proc::process_state(g) == std::optional<char>{'S'}
                       && fd_numbers(g) == std::set<int>{0};
              });
  };
  for (auto until = std::chrono::steady_clock::now() + hang_bound;
       !settled() && std::chrono::steady_clock::now() < until;)
    std::this_thread::sleep_for(5ms);
  REQUIRE(guards.size() == 2);
  auto pipes_a = pipes_of(a->pid());
  auto pipes_b = pipes_of(b->pid());
  std::set<std::string> pipes_self = pipes_of(::getpid());
  std::set<std::string> guard_pipes;
  for (pid_t g : guards) {
    // One fd (the read end of its own pipe, as stdin): no stdout or stderr,
    // no sibling's pipe.
    auto fds = fd_numbers(g);
    std::string listed;
    for (auto& t : proc::open_fd_targets(g))
      listed += t + " ";
    CHECK_MESSAGE(fds == std::set<int>{0}, "guardian " << g << " holds " << fds.size()
                                                       << " fds: " << listed);
    // The shell, not a copy-on-write image of the runtime.
    CHECK(proc::comm(g) == "sh");
    for (auto& t : proc::open_fd_targets(g)) {
      CHECK(pipes_a.count(t) == 0);
      CHECK(pipes_b.count(t) == 0);
      CHECK(pipes_self.count(t) == 1); // the runtime holds the write end
      guard_pipes.insert(t);
    }
  }
  CHECK(guard_pipes.size() == 2);
  // Neither child holds a guardian's pipe (the write end is close-on-exec).
  for (auto& t : guard_pipes) {
    CHECK(pipes_a.count(t) == 0);
    CHECK(pipes_b.count(t) == 0);
  }

  SUBCASE("stop") {
    a->stop(60s, 60s);
    b->stop(60s, 60s);
  }
  SUBCASE("kill") {
    a->kill();
    b->kill();
  }
  REQUIRE(rec_a->wait_exit());
  REQUIRE(rec_b->wait_exit());
  // Disarmed and reaped before on_exit: no guardian, no child left.
  for (pid_t g : guards)
    CHECK(proc::process_gone(g));
  CHECK(guardians().empty());
  CHECK(proc::child_pids(::getpid()).empty());
}

} // TEST_SUITE

// -- set_alarm: the I/O thread's timer for a request's deadline (issue 11) ----

TEST_CASE_FIXTURE(no_leftovers, "set_alarm: on_alarm comes once per alarm, never before its time") {
  auto [rec, child] = start("/bin/cat", {});
  auto first = std::chrono::steady_clock::now() + 30ms;
  child->set_alarm(first);
  REQUIRE(rec->wait_alarms(1));
  CHECK(rec->alarms().at(0) >= first);
  // A second alarm: had the first fired twice, the count would pass 2 or
  // the second entry would come before its time.
  auto second = std::chrono::steady_clock::now() + 30ms;
  child->set_alarm(second);
  REQUIRE(rec->wait_alarms(2));
  CHECK(rec->alarms().size() == 2);
  CHECK(rec->alarms().at(1) >= second);
  // One in the past fires at once.
  child->set_alarm(std::chrono::steady_clock::now() - 1s);
  REQUIRE(rec->wait_alarms(3));
  child->stop(60s, 60s);
  REQUIRE(rec->wait_exit());
}

TEST_CASE_FIXTURE(no_leftovers, "set_alarm: an earlier alarm wakes a thread that sleeps until a later one") {
  auto [rec, child] = start("/bin/cat", {});
  child->set_alarm(std::chrono::steady_clock::now() + 1h);
  // Let the I/O thread go to sleep until the far alarm: a frame through cat
  // comes back only after it went round its loop with that alarm.
  REQUIRE(child->send("{}"));
  REQUIRE(rec->wait_frames(1));
  auto soon = std::chrono::steady_clock::now() + 20ms;
  child->set_alarm(soon);
  REQUIRE(rec->wait_alarms(1));
  CHECK(rec->alarms().at(0) >= soon);
  child->stop(60s, 60s);
  REQUIRE(rec->wait_exit());
}

TEST_CASE_FIXTURE(no_leftovers, "set_alarm: a replaced alarm never fires") {
  auto [rec, child] = start("/bin/cat", {});
  auto replaced = std::chrono::steady_clock::now() + 20ms;
  child->set_alarm(replaced);
  child->set_alarm(std::chrono::steady_clock::now() + 1h);
  // The I/O thread may wake at the replaced time; it must not report it.
  // Past that time, a frame through cat is handled after any such wake-up.
  while (std::chrono::steady_clock::now() <= replaced + 5ms)
    std::this_thread::sleep_for(5ms);
  REQUIRE(child->send("{}"));
  REQUIRE(rec->wait_frames(1));
  CHECK(rec->alarms().empty());
  child->stop(60s, 60s);
  REQUIRE(rec->wait_exit());
  CHECK(rec->alarms().empty());
}

// -- direct reads: a blocking caller reads its own reply (issue 11) -------------

TEST_CASE_FIXTURE(no_leftovers, "direct read: the sender reads its reply, afterwards frames are the I/O thread's") {
  auto [rec, child] = start("/bin/cat", {});
  auto deadline = std::chrono::steady_clock::now() + hang_bound;
  REQUIRE(child->begin_direct_read());
  // An alarm makes the I/O thread go round its loop while the direct read is
  // open: it then waits without stdout (the case the send below must wake).
  child->set_alarm(std::chrono::steady_clock::now());
  REQUIRE(rec->wait_alarms(1));
  REQUIRE(child->send("{\"id\":1}"));
  std::string payload;
  CHECK(child->read_frame(payload, deadline) == child_process::direct_read::frame);
  CHECK(payload == "{\"id\":1}");
  child->end_direct_read();
  // The I/O thread left stdout out of its wait meanwhile: the next frame
  // sent for it must wake it, or this waits for the hang bound.
  REQUIRE(child->send("{\"id\":2}"));
  REQUIRE(rec->wait_frames(1));
  CHECK(rec->frames() == std::vector<std::string>{"{\"id\":2}"});
  child->stop(60s, 60s);
  REQUIRE(rec->wait_exit());
  CHECK(rec->errors().empty());
}


TEST_CASE_FIXTURE(no_leftovers, "direct read: one thread opens it and sends, another reads it and ends it") {
  auto [rec, child] = start("/bin/cat", {});
  auto deadline = std::chrono::steady_clock::now() + hang_bound;
  // The previous caller writes a queued caller's frame; the queued caller's
  // own thread reads the reply. Twice: the second open must find stdout
  // given back by the other thread.
  for (int i = 1; i <= 2; ++i) {
    REQUIRE(child->begin_direct_read());
    auto frame = "{\"id\":" + std::to_string(i) + "}";
    REQUIRE(child->send(frame));
    std::string payload;
    child_process::direct_read r = child_process::direct_read::ended;
    std::thread reader([&] {
      r = child->read_frame(payload, deadline);
      child->end_direct_read();
    });
    reader.join();
    CHECK(r == child_process::direct_read::frame);
    CHECK(payload == frame);
  }
  REQUIRE(child->send("{\"id\":3}"));
  REQUIRE(rec->wait_frames(1));
  CHECK(rec->frames() == std::vector<std::string>{"{\"id\":3}"});
  child->stop(60s, 60s);
  REQUIRE(rec->wait_exit());
  CHECK(rec->errors().empty());
}
TEST_CASE_FIXTURE(no_leftovers, "direct read: a broken stream is named as the I/O thread names it") {
  auto deadline = std::chrono::steady_clock::now() + hang_bound;
  struct kase {
    const char* name;
    const char* script;
    child_process::direct_read want;
  };
  for (auto k : {kase{"truncated", "read line; printf '\\000\\000\\000\\020abc'; exit 0",
                      child_process::direct_read::truncated},
                 kase{"oversize", "read line; printf '\\377\\377\\377\\377'; read line",
                      child_process::direct_read::oversize},
                 kase{"zero length", "read line; printf '\\000\\000\\000\\000'; read line",
                      child_process::direct_read::zero_length},
                 kase{"exit at a frame boundary", "read line; exit 0",
                      child_process::direct_read::ended}}) {
    CAPTURE(k.name);
    auto [rec, child] = sh(k.script);
    REQUIRE(child->begin_direct_read());
    REQUIRE(child->send("go\n"));
    std::string payload;
    CHECK(child->read_frame(payload, deadline) == k.want);
    child->end_direct_read();
    child->kill();
    REQUIRE(rec->wait_exit());
    // The reader had the stream: nothing of it reaches the observer.
    CHECK(rec->frames().empty());
    CHECK(rec->errors().empty());
  }
}

TEST_CASE_FIXTURE(no_leftovers, "direct read: a deadline ends it, abort_direct_read ends it at once") {
  std::string payload;
  {
    // Nothing read by the deadline: the stream is intact and the I/O
    // thread's again; the next frame reaches the observer.
    auto [rec, child] = start("/bin/cat", {});
    REQUIRE(child->begin_direct_read());
    auto soon = std::chrono::steady_clock::now() + 30ms;
    CHECK(child->read_frame(payload, soon) == child_process::direct_read::timeout);
    CHECK(std::chrono::steady_clock::now() >= soon);
    child->end_direct_read();
    REQUIRE(child->send("{\"id\":3}"));
    REQUIRE(rec->wait_frames(1));
    child->stop(60s, 60s);
    REQUIRE(rec->wait_exit());
  }
  {
    // Cut inside a frame: a direct read cannot start on the rest, which is
    // noise to be killed with the process, and it reaches nobody.
    auto [rec, child] = sh("read line; printf '\\000\\000\\000\\020ab'; read line");
    REQUIRE(child->begin_direct_read());
    REQUIRE(child->send("go\n"));
    auto soon = std::chrono::steady_clock::now() + 100ms;
    CHECK(child->read_frame(payload, soon) == child_process::direct_read::timeout);
    child->end_direct_read();
    CHECK_FALSE(child->begin_direct_read());
    child->kill();
    REQUIRE(rec->wait_exit());
    CHECK(rec->frames().empty());
    CHECK(rec->errors().empty());
  }

  auto [rec2, child2] = start("/bin/cat", {});
  REQUIRE(child2->begin_direct_read());
  std::thread aborter{[&c = child2] { c->abort_direct_read(); }};
  CHECK(child2->read_frame(payload, std::chrono::steady_clock::now() + hang_bound)
        == child_process::direct_read::ended);
  aborter.join();
  child2->end_direct_read();
  child2->stop(60s, 60s);
  REQUIRE(rec2->wait_exit());
}
