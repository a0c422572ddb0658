// One supervised child process: spawn, framed stdin/stdout, logged stderr,
// pidfd exit detection, stop sequence and reaping, all on one I/O thread; and
// the child's guardian, which kills its process group if the runtime dies.
//
// Measured facts this file relies on (ARCHITECTURE.md, "Child processes"):
// - PR_SET_PDEATHSIG is tied to the spawning *thread*: the I/O thread spawns
//   the child and lives until the child is reaped.
// - Boost.Process 1.74 pipes are inheritable, so every fd is created here with
//   O_CLOEXEC, and the child marks every fd >= 3 close-on-exec itself right
//   before exec (close_range). Not bp::limit_handles: Boost 1.74's is one
//   global const object whose mutable vector every spawn overwrites, so two
//   spawns on two threads corrupt the heap.
// - EOF on stdout can precede the exit: the exit is detected with a pidfd.
// - Reaping order: waitid(WNOWAIT) -> killpg -> waitpid, so the group is
//   signalled while its leader is still an unreaped zombie (pid not reusable).

#include "dspex/child_process.hpp"

#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#ifndef CLOSE_RANGE_CLOEXEC
#include <linux/close_range.h>
#endif

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <deque>
#include <future>
#include <limits>
#include <mutex>
#include <optional>
#include <system_error>
#include <thread>
#include <utility>

#include <boost/process/args.hpp>
#include <boost/process/child.hpp>
#include <boost/process/exe.hpp>
#include <boost/process/error.hpp>
#include <boost/process/extend.hpp>

#include "dspex/logging.hpp"

namespace bp = boost::process;

namespace dspex {

// -- child_observer ----------------------------------------------------------

child_observer::~child_observer() = default;

void child_observer::on_stderr_line(std::string_view) {
  // Default: the line has already been logged; nothing else to do.
}

void child_observer::on_alarm() {
}

// -- exit_status --------------------------------------------------------------

std::string exit_status::describe() const {
  if (!signaled)
    return "exit code " + std::to_string(code);
  std::string out = "signal " + std::to_string(code);
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 32))
  if (const char* abbrev = ::sigabbrev_np(code)) {
    out += " (SIG";
    out += abbrev;
    out += ')';
  }
#else
  if (const char* text = ::strsignal(code)) {
    out += " (";
    out += text;
    out += ')';
  }
#endif
  return out;
}

namespace {

using clock = std::chrono::steady_clock;

/// Read chunk of the I/O thread (on its stack; a pipe holds 64 KiB by default).
constexpr std::size_t read_chunk = 16 * 1024;
/// Reads per readiness event before going back to poll (fairness between fds).
constexpr int reads_per_wakeup = 4;
/// Writes of queued stdin bytes per readiness event (each fills the pipe at most).
constexpr int writes_per_wakeup = 4;
/// A stderr line longer than this (raw bytes) is logged in pieces of about this size.
constexpr std::size_t max_stderr_line = 64 * 1024;

std::string errno_text(int err) {
  return std::error_code(err, std::generic_category()).message();
}

void close_fd(int& fd) noexcept {
  if (fd >= 0) {
    ::close(fd);
    fd = -1;
  }
}

void set_nonblocking(int fd) {
  int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0 || ::fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0)
    throw std::system_error(errno, std::generic_category(), "fcntl(O_NONBLOCK)");
}

/// Moves `fd` to a number >= 3 (keeping O_CLOEXEC), so that the dup2() onto
/// 0/1/2 in the child can never overwrite a child end not yet duplicated.
int above_stdio(int fd) {
  if (fd > 2)
    return fd;
  int moved = ::fcntl(fd, F_DUPFD_CLOEXEC, 3);
  int err = errno;
  ::close(fd);
  if (moved < 0)
    throw std::system_error(err, std::generic_category(), "fcntl(F_DUPFD_CLOEXEC)");
  return moved;
}

/// A pipe with both ends close-on-exec: {read end, write end}.
std::pair<int, int> cloexec_pipe() {
  int p[2];
  if (::pipe2(p, O_CLOEXEC) != 0)
    throw std::system_error(errno, std::generic_category(), "pipe2");
  return {p[0], p[1]};
}

/// Finds `name` in PATH the way execvp does (first regular, executable file).
/// Deliberately not boost::process::search_path: that one needs the compiled
/// Boost.Filesystem library, which dspex_runtime does not link.
std::optional<std::string> find_in_path(const std::string& name) {
  const char* env = std::getenv("PATH");
  std::string path = env ? env : "/usr/local/bin:/usr/bin:/bin";
  std::size_t start = 0;
  for (;;) {
    std::size_t end = path.find(':', start);
    std::string dir = path.substr(start, end == std::string::npos ? std::string::npos : end - start);
    std::string candidate = (dir.empty() ? std::string(".") : dir) + "/" + name;
    struct stat st {};
    if (::stat(candidate.c_str(), &st) == 0 && S_ISREG(st.st_mode)
        && ::access(candidate.c_str(), X_OK) == 0)
      return candidate;
    if (end == std::string::npos)
      return std::nullopt;
    start = end + 1;
  }
}

/// What the child reports through the report pipe when it cannot exec.
enum class failed_step : int { exec, setpgid, prctl, dup2 };

const char* to_string(failed_step s) {
  switch (s) {
    case failed_step::exec: return "exec";
    case failed_step::setpgid: return "setpgid";
    case failed_step::prctl: return "prctl(PR_SET_PDEATHSIG)";
    case failed_step::dup2: return "dup2";
  }
  return "?";
}

/// The soft RLIMIT_NOFILE as an fd bound (async-signal-safe).
int fd_limit() noexcept {
  rlimit rl{};
  if (::getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur == RLIM_INFINITY || rl.rlim_cur > INT_MAX)
    return 65536;
  return static_cast<int>(rl.rlim_cur);
}

/// Marks every fd >= `lowest` close-on-exec. Runs in a forked child:
/// async-signal-safe. close_range(CLOSE_RANGE_CLOEXEC) needs Linux 5.11; on
/// older kernels (ENOSYS, or EINVAL for the flag) fd by fd up to the limit.
void cloexec_from(int lowest) noexcept {
  if (::close_range(static_cast<unsigned>(lowest), ~0U, CLOSE_RANGE_CLOEXEC) == 0)
    return;
  for (int fd = lowest, end = fd_limit(); fd < end; ++fd) {
    int flags = ::fcntl(fd, F_GETFD);
    if (flags >= 0 && !(flags & FD_CLOEXEC))
      ::fcntl(fd, F_SETFD, flags | FD_CLOEXEC);
  }
}

/// Closes every fd >= `lowest` (async-signal-safe; close_range needs 5.9).
void close_from(int lowest) noexcept {
  if (::close_range(static_cast<unsigned>(lowest), ~0U, 0) == 0)
    return;
  for (int fd = lowest, end = fd_limit(); fd < end; ++fd)
    ::close(fd);
}

/// Boost.Process initializer for everything the child does between fork and
/// exec, and for learning the pid of a child whose exec failed. Exec failures
/// are reported through our own close-on-exec report pipe (EOF means exec
/// succeeded), which also carries the failures of the steps before exec.
struct child_setup : bp::extend::handler {
  int stdin_src;   ///< child end of the stdin pipe (read end)
  int stdout_sink; ///< child end of the stdout pipe (write end)
  int stderr_sink; ///< child end of the stderr pipe (write end)
  int report_sink; ///< write end of the report pipe
  pid_t parent;    ///< getpid() of the runtime, to detect an already dead parent
  pid_t* forked;   ///< parent side: the pid Boost forked, also when it reports an error

  // Runs in the forked child: async-signal-safe calls only.
  [[noreturn]] void fail(failed_step step, int err) const {
    int msg[2] = {static_cast<int>(step), err};
    (void)!::write(report_sink, msg, sizeof msg);
    ::_exit(127);
  }

  template <class Executor>
  void on_exec_setup(Executor&) const {
    // The runtime ignores SIGPIPE (see spawn()); an ignored disposition would
    // survive exec, so give the child the default back. Also start the child
    // with no blocked signal, whatever the mask of the I/O thread.
    ::signal(SIGPIPE, SIG_DFL);
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    // Own process group: killpg(pid, ...) then reaches grandchildren too.
    if (::setpgid(0, 0) != 0)
      fail(failed_step::setpgid, errno);
    // Die with the runtime (with the spawning thread, precisely).
    if (::prctl(PR_SET_PDEATHSIG, SIGKILL) != 0)
      fail(failed_step::prctl, errno);
    if (::getppid() != parent)
      ::_exit(127); // the parent died before prctl took effect
    // dup2 clears FD_CLOEXEC on the copies; the originals (all >= 3 and
    // close-on-exec) disappear at exec.
    if (::dup2(stdin_src, STDIN_FILENO) < 0 || ::dup2(stdout_sink, STDOUT_FILENO) < 0
        || ::dup2(stderr_sink, STDERR_FILENO) < 0)
      fail(failed_step::dup2, errno);
    // Nothing else may reach the program: not the runtime's fds that a library
    // opened without O_CLOEXEC, nor a sibling's pipe that another thread's
    // spawn created between pipe() and fcntl(FD_CLOEXEC) (Boost's own error
    // pipe is such a one). Close-on-exec rather than closed: Boost's error
    // pipe and our report pipe must work until exec.
    cloexec_from(3);
  }

  template <class Executor>
  void on_exec_error(Executor&, const std::error_code& ec) const {
    int msg[2] = {static_cast<int>(failed_step::exec), ec.value()};
    (void)!::write(report_sink, msg, sizeof msg);
  }

  // Parent side: Boost forgets the pid of a child whose exec failed, but that
  // child must still be reaped.
  template <class Executor>
  void on_error(Executor& e, const std::error_code&) const {
    *forked = e.pid;
  }
  template <class Executor>
  void on_success(Executor& e) const {
    *forked = e.pid;
  }
};

// -- the guardian ---------------------------------------------------------------

/// What the guardian runs: /bin/sh, so that it holds none of the runtime's
/// memory (a process forked without exec keeps a copy-on-write image of the
/// runtime, which grows up to the runtime's whole RSS as the runtime writes).
/// `read` returns 0 on the disarm byte (a newline) and non-zero on EOF, i.e.
/// when the runtime is gone, even by SIGKILL. Its argv[0] names it in ps and
/// /proc/<pid>/cmdline; its environment is empty (no secret of the runtime's).
constexpr const char* guardian_shell = "/bin/sh";
constexpr const char* guardian_name = "dspex-guard";
constexpr const char* guardian_script =
  "IFS= read -r disarm && exit 0\n"
  "kill -s KILL -- \"-$1\"\n"
  "exit 0\n";
constexpr char guardian_disarm = '\n';

/// The fd the guardian watches (the read end of its pipe), its stdin: the
/// only fd it has.
constexpr int guardian_watch_fd = 0;

/// The guardian's whole life, in a process forked from the multi-threaded
/// runtime: async-signal-safe system calls only (no malloc, no logging, no
/// C++ library). `argv` was built before the fork. Execs the shell; only when
/// that fails does it watch the pipe itself. Never returns.
[[noreturn]] void guardian_main(int watch, pid_t pgid, char* const* argv) noexcept {
  // First thing: hold nothing of the runtime. A sibling's pipe kept open here
  // would keep that sibling from ever seeing EOF.
  // dup2 clears close-on-exec; a pipe that already is fd 0 needs it cleared.
  if (watch != guardian_watch_fd ? ::dup2(watch, guardian_watch_fd) < 0
                                 : ::fcntl(watch, F_SETFD, 0) < 0)
    ::_exit(1); // cannot watch: leave without touching the group
  close_from(guardian_watch_fd + 1); // nothing to write: no stdout, no stderr
  (void)!::chdir("/"); // pins no directory (or mount) of the runtime
  ::prctl(PR_SET_PDEATHSIG, 0, 0, 0, 0); // already cleared by fork; it must outlive the runtime
  // A Ctrl-C or a SIGTERM to the runtime's process group must not end the
  // guardian before the runtime: it is what cleans up after the runtime.
  // Ignored signals stay ignored across exec.
  struct sigaction ign {};
  ign.sa_handler = SIG_IGN;
  sigemptyset(&ign.sa_mask);
  for (int sig : {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGPIPE})
    ::sigaction(sig, &ign, nullptr);
  sigset_t none;
  sigemptyset(&none);
  ::sigprocmask(SIG_SETMASK, &none, nullptr);

  char* const no_env[] = {nullptr};
  ::execve(guardian_shell, argv, no_env);

  // No shell: the same watch in this (copy-on-write) process.
  ::prctl(PR_SET_NAME, guardian_name, 0, 0, 0);
  for (;;) {
    char byte;
    ssize_t n = ::read(guardian_watch_fd, &byte, 1);
    if (n > 0)
      ::_exit(0); // disarmed: the runtime reaps the child itself
    if (n == 0) {
      // EOF without a disarm: the runtime is gone. Its child may have been
      // killed by PDEATHSIG already; what it started has not.
      ::killpg(pgid, SIGKILL);
      ::_exit(0);
    }
    if (errno != EINTR)
      ::_exit(1); // cannot happen; never kill the group on a doubt
  }
}

/// A guardian as seen by the runtime.
struct guardian {
  pid_t pid = -1;
  int arm_fd = -1; ///< write end of its pipe (O_CLOEXEC); only the runtime holds it
};

/// Forks the guardian of process group `pgid`. On failure returns an empty
/// guardian and sets errno.
guardian start_guardian(pid_t pgid) {
  // Everything the forked side needs, allocated before the fork.
  std::string group = std::to_string(pgid);
  std::string name = guardian_name, dash_c = "-c", script = guardian_script;
  char* const argv[] = {name.data(), dash_c.data(), script.data(), name.data(), group.data(),
                        nullptr};
  int p[2];
  if (::pipe2(p, O_CLOEXEC) != 0)
    return {};
  pid_t pid = ::fork();
  if (pid == 0)
    guardian_main(p[0], pgid, argv);
  int err = errno;
  ::close(p[0]);
  if (pid < 0) {
    ::close(p[1]);
    errno = err;
    return {};
  }
  return {pid, p[1]};
}

// -- stderr lines as valid UTF-8 ---------------------------------------------

/// Length of an incomplete UTF-8 sequence at the end of `s` (0 when it ends
/// on a character boundary), so a line cut at the size cap is not cut inside
/// a character.
std::size_t incomplete_utf8_tail(std::string_view s) {
  for (std::size_t i = 1; i <= 3 && i <= s.size(); ++i) {
    auto c = static_cast<unsigned char>(s[s.size() - i]);
    if ((c & 0xC0) == 0x80)
      continue; // continuation byte: look further back for the lead
    std::size_t need = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC2 ? 2 : 1;
    return need > i && c <= 0xF4 ? i : 0;
  }
  return 0;
}

/// `line` as valid UTF-8 without control characters other than tab: each
/// maximal invalid subpart becomes U+FFFD (Unicode's recommended practice,
/// what Python's "replace" does); C0 controls, DEL and C1 controls are dropped.
std::string sanitize_line(std::string_view line) {
  auto plain = [](unsigned char c) { return (c >= 0x20 && c < 0x7F) || c == '\t'; };
  if (std::all_of(line.begin(), line.end(), [&](char c) { return plain(static_cast<unsigned char>(c)); }))
    return std::string(line); // the common case: printable ASCII
  static constexpr char replacement[] = "\xEF\xBF\xBD"; // U+FFFD
  std::string out;
  out.reserve(line.size());
  const auto* p = reinterpret_cast<const unsigned char*>(line.data());
  const std::size_t n = line.size();
  std::size_t i = 0;
  while (i < n) {
    unsigned char c = p[i];
    if (c < 0x80) {
      if (plain(c))
        out += static_cast<char>(c);
      ++i;
      continue;
    }
    // Well-formed sequences (Unicode, table 3-7): the lead byte decides the
    // length and the range of the second byte; later bytes are 80..BF.
    std::size_t len = 0;
    unsigned char lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) len = 2;
    else if (c == 0xE0) { len = 3; lo = 0xA0; }
    else if (c >= 0xE1 && c <= 0xEC) len = 3;
    else if (c == 0xED) { len = 3; hi = 0x9F; } // no surrogates
    else if (c >= 0xEE && c <= 0xEF) len = 3;
    else if (c == 0xF0) { len = 4; lo = 0x90; } // no overlong forms
    else if (c >= 0xF1 && c <= 0xF3) len = 4;
    else if (c == 0xF4) { len = 4; hi = 0x8F; } // nothing above U+10FFFF
    std::size_t good = 1; // bytes of a valid prefix, the lead included
    if (len > 0) {
      while (good < len && i + good < n) {
        unsigned char b = p[i + good];
        if (good == 1 ? (b < lo || b > hi) : (b < 0x80 || b > 0xBF))
          break;
        ++good;
      }
    }
    if (len == 0 || good < len) {
      out += replacement; // one per maximal subpart
      i += good;
      continue;
    }
    bool c1_control = c == 0xC2 && p[i + 1] <= 0x9F; // U+0080..U+009F
    if (!c1_control)
      out.append(line.data() + i, len);
    i += len;
  }
  return out;
}

/// Calls into the observer; an exception escaping it must not kill the I/O
/// thread (that would std::terminate the runtime), so it is logged.
template <class F>
void notify(const std::string& label, const char* what, F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    log().error("[{}] observer {} threw: {}", label, what, e.what());
  } catch (...) {
    log().error("[{}] observer {} threw", label, what);
  }
}

// -- the shared state ---------------------------------------------------------

/// Everything the I/O thread and the owner share. Held by shared_ptr: the I/O
/// thread keeps it alive when the owner destroys the child_process from an
/// observer callback.
struct io_state {
  io_state(process_spec s, std::shared_ptr<child_observer> o)
    : spec(std::move(s)), observer(std::move(o)), decoder(spec.max_frame_bytes) {
    wake_fd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (wake_fd < 0)
      throw spawn_error(spec.program + ": eventfd: " + errno_text(errno));
    direct_abort_fd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (direct_abort_fd < 0)
      throw spawn_error(spec.program + ": eventfd: " + errno_text(errno));
  }

  ~io_state() {
    close_fd(guard.arm_fd);
    close_fd(stdin_fd);
    close_fd(stdout_fd);
    close_fd(stderr_fd);
    close_fd(pid_fd);
    close_fd(wake_fd);
    close_fd(direct_abort_fd);
  }

  io_state(const io_state&) = delete;
  io_state& operator=(const io_state&) = delete;

  const process_spec spec;
  const std::shared_ptr<child_observer> observer;
  pid_t pid = -1; // set before spawn() returns, constant afterwards

  // stdin, guarded by send_mtx. Only the I/O thread opens and closes stdin_fd
  // (so the fd it polls can never be closed and reused under it); senders
  // write to it while nothing is queued, the I/O thread writes the queue.
  std::mutex send_mtx;
  int stdin_fd = -1;
  bool stdin_accepting = false;     // send() may write or queue a frame
  bool stdin_close_wanted = false;  // close once the queue is written
  std::deque<std::string> pending;  // whole frames, the front one partly written
  std::size_t pending_off = 0;      // bytes of pending.front() already written
  std::atomic<bool> stdin_pending{false}; // !pending.empty(), read by the I/O thread unlocked

  // Guards signalling against reaping: a reaped pid is never signalled.
  std::mutex signal_mtx;
  bool reaped = false;

  // Commands for the I/O thread, guarded by cmd_mtx.
  std::mutex cmd_mtx;
  bool stop_requested = false;
  std::chrono::milliseconds shutdown_grace{0};
  std::chrono::milliseconds kill_grace{0};

  std::atomic<bool> exited{false};
  int wake_fd = -1;

  // The observer's alarm (set_alarm), in steady-clock nanoseconds; none =
  // no alarm. `sleeps_until` is when the I/O thread's current wait ends
  // (none: it sleeps until an fd is ready): set_alarm wakes it only when
  // the alarm comes sooner. Both seq_cst: either set_alarm sees the I/O
  // thread's new wait, or the I/O thread sees the new alarm (see run()).
  static constexpr std::int64_t none = std::numeric_limits<std::int64_t>::max();
  std::atomic<std::int64_t> alarm_ns{none};
  std::atomic<std::int64_t> sleeps_until{none};

  // Direct reads (child_process::begin_direct_read). `stdout_owner` is held
  // by whoever reads stdout: the I/O thread while it reads, a direct read
  // from its begin to its end; only its holder closes stdout_fd. A direct
  // read may begin on one thread and be read and ended on another (a
  // blocking caller whose frame the previous caller wrote), so it is an
  // ownership token, not a mutex (which only its locking thread may unlock). `direct_reading`: the
  // I/O thread leaves stdout out of its wait; `polls_stdout`: its current
  // wait includes stdout (a sender that needs it there wakes it: same
  // handshake as the alarm). `stdout_idle`: the I/O thread's decoder holds
  // no partial frame and the stream is intact (written by stdout's owner).
  // `stdout_poisoned`: a direct read stopped mid-frame; the rest is noise.
  class ownership_token {
  public:
    bool try_acquire() {
      std::lock_guard<std::mutex> lk{mtx_};
      return !std::exchange(held_, true);
    }
    void acquire() {
      std::unique_lock<std::mutex> lk{mtx_};
      free_.wait(lk, [this] { return !held_; });
      held_ = true;
    }
    void release() {
      {
        std::lock_guard<std::mutex> lk{mtx_};
        held_ = false;
      }
      free_.notify_all();
    }

  private:
    std::mutex mtx_;
    std::condition_variable free_;
    bool held_ = false;
  };
  /// Releases an ownership_token it holds when it goes.
  struct token_guard {
    ownership_token* token;
    ~token_guard() {
      if (token)
        token->release();
    }
  };
  ownership_token stdout_owner;
  std::atomic<bool> direct_reading{false};
  std::atomic<bool> polls_stdout{true};
  std::atomic<bool> stdout_idle{true};
  std::atomic<bool> stdout_poisoned{false};
  int direct_abort_fd = -1;  // eventfd: the process exited, stop reading

  // Touched by the I/O thread only (and by spawn_child before spawn() returns).
  guardian guard;
  int stdout_fd = -1;
  int stderr_fd = -1;
  int pid_fd = -1;
  frame_decoder decoder;
  std::vector<std::string> frames;
  bool protocol_failed = false;
  bool stdout_eof = false;
  std::string stderr_line;
  enum class stop_phase { none, grace, term, killed } phase = stop_phase::none;
  std::optional<clock::time_point> deadline; // of the current stop phase

  const std::string& label() const { return spec.label; }

  /// Signals the whole group, unless the leader has been reaped already.
  void signal_group(int sig) {
    std::lock_guard<std::mutex> lk(signal_mtx);
    if (reaped || pid <= 0)
      return;
    if (::killpg(pid, sig) != 0 && errno != ESRCH)
      log().warn("[{}] killpg({}, {}) failed: {}", label(), pid, sig, errno_text(errno));
  }

  void wake() {
    std::uint64_t one = 1;
    (void)!::write(wake_fd, &one, sizeof one);
  }

  static std::int64_t ns_of(clock::time_point t) {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count();
  }

  void set_alarm(clock::time_point when) {
    auto at = ns_of(when);
    alarm_ns.store(at);
    if (at < sleeps_until.load())
      wake();
  }

  /// On the I/O thread, after every wait: a due alarm is taken (once) and
  /// reported.
  void fire_alarm_if_due() {
    auto at = alarm_ns.load();
    if (at == none || at > ns_of(clock::now()))
      return;
    // Replaced meanwhile by set_alarm: that newer alarm is checked next round.
    if (alarm_ns.compare_exchange_strong(at, none))
      notify(label(), "on_alarm", [&] { observer->on_alarm(); });
  }

  // -- stdin --

  /// No frame is accepted any more; what is queued is still written, then
  /// the I/O thread closes stdin. Any thread.
  void request_stdin_close() {
    {
      std::lock_guard<std::mutex> lk(send_mtx);
      if (stdin_close_wanted)
        return;
      stdin_accepting = false;
      stdin_close_wanted = true;
    }
    wake();
  }

  /// Closes stdin now and drops the queue. I/O thread, send_mtx held.
  void close_stdin_locked() {
    stdin_accepting = false;
    stdin_close_wanted = true;
    pending.clear(); // frees the frames
    pending_off = 0;
    stdin_pending.store(false);
    close_fd(stdin_fd);
  }

  void close_stdin() {
    std::lock_guard<std::mutex> lk(send_mtx);
    close_stdin_locked();
  }

  /// Writes queued bytes while the pipe takes them; closes stdin when asked
  /// and nothing is left, or when a write fails. I/O thread only.
  void service_stdin() {
    std::lock_guard<std::mutex> lk(send_mtx);
    if (stdin_fd < 0)
      return;
    for (int i = 0; i < writes_per_wakeup && !pending.empty();) {
      const std::string& frame = pending.front();
      ssize_t n = ::write(stdin_fd, frame.data() + pending_off, frame.size() - pending_off);
      if (n > 0) {
        ++i;
        pending_off += static_cast<std::size_t>(n);
        if (pending_off == frame.size()) {
          pending.pop_front();
          pending_off = 0;
        }
        continue;
      }
      if (n < 0 && errno == EINTR)
        continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
        break; // full again: poll for POLLOUT
      // EPIPE (the child closed its stdin or exited) or another error. Part
      // of a frame may be in the pipe: stdin can never carry a frame again.
      const int err = errno;
      log().warn("[{}] write to stdin failed ({} of {} bytes of a frame written, {} frame(s) "
                 "queued): {}; closing stdin",
                 label(), pending_off, frame.size(), pending.size(), errno_text(err));
      close_stdin_locked();
      return;
    }
    if (pending.empty()) {
      stdin_pending.store(false);
      if (stdin_close_wanted)
        close_fd(stdin_fd); // after the last queued byte: EOF for the child
    }
  }

  // -- spawning (on the I/O thread) --

  void spawn_child() {
    const std::string& program = spec.program;
    if (program.empty())
      throw spawn_error("empty program name");
    std::string exe = program;
    if (program.find('/') == std::string::npos) {
      auto found = find_in_path(program);
      if (!found)
        throw spawn_error(program + ": not found in PATH");
      exe = *found;
    }

    int child_in = -1, child_out = -1, child_err = -1, report_src = -1, report_sink = -1;
    auto cleanup = [&] {
      close_fd(child_in);
      close_fd(child_out);
      close_fd(child_err);
      close_fd(report_src);
      close_fd(report_sink);
      close_fd(stdin_fd);
      close_fd(stdout_fd);
      close_fd(stderr_fd);
    };
    try {
      {
        std::lock_guard<std::mutex> lk(send_mtx);
        std::tie(child_in, stdin_fd) = cloexec_pipe();
      }
      std::tie(stdout_fd, child_out) = cloexec_pipe();
      std::tie(stderr_fd, child_err) = cloexec_pipe();
      std::tie(report_src, report_sink) = cloexec_pipe();
      child_in = above_stdio(child_in);
      child_out = above_stdio(child_out);
      child_err = above_stdio(child_err);
      report_sink = above_stdio(report_sink);
      set_nonblocking(stdin_fd);
      set_nonblocking(stdout_fd);
      set_nonblocking(stderr_fd);
    } catch (const std::system_error& e) {
      cleanup();
      throw spawn_error(program + ": " + e.what());
    }

    pid_t forked = -1;
    child_setup setup{{}, child_in, child_out, child_err, report_sink, ::getpid(), &forked};
    std::error_code boost_error; // reported here instead of thrown, so `forked` is reaped
    try {
      bp::child c(bp::exe = exe, bp::args = spec.args, setup, boost_error);
      if (!boost_error)
        c.detach(); // we own the pid and reap it ourselves
    } catch (const std::exception& e) {
      if (!boost_error)
        boost_error = std::make_error_code(std::errc::io_error);
      log().error("[{}] spawn of {} threw: {}", label(), exe, e.what());
    }
    pid = forked;

    // The parent's copies of the child ends must go now, or EOF never comes.
    close_fd(child_in);
    close_fd(child_out);
    close_fd(child_err);
    close_fd(report_sink);

    // Blocks until exec (close-on-exec closes the report pipe: EOF) or a report.
    int msg[2] = {0, 0};
    std::size_t got = 0;
    while (got < sizeof msg) {
      ssize_t n = ::read(report_src, reinterpret_cast<char*>(msg) + got, sizeof msg - got);
      if (n > 0)
        got += static_cast<std::size_t>(n);
      else if (n == 0 || errno != EINTR)
        break;
    }
    close_fd(report_src);
    if (got > 0 || boost_error || pid <= 0) {
      if (pid > 0) {
        // Without a report the exec may have succeeded (Boost failed on its
        // side only): end the child before waiting for it.
        if (got == 0 && ::killpg(pid, SIGKILL) != 0)
          ::kill(pid, SIGKILL);
        int status = 0;
        while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
        }
      }
      {
        std::lock_guard<std::mutex> lk(signal_mtx);
        reaped = true;
      }
      cleanup();
      if (got == sizeof msg) {
        auto step = static_cast<failed_step>(msg[0]);
        std::string reason = errno_text(msg[1]);
        if (step == failed_step::exec)
          throw spawn_error(program + ": " + reason);
        throw spawn_error(program + ": " + to_string(step) + ": " + reason);
      }
      // No report from the child: Boost failed before or at the fork.
      throw spawn_error(program + ": " + (boost_error ? boost_error.message()
                                                      : std::string("spawn failed")));
    }

    pid_fd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
    if (pid_fd < 0) {
      int err = errno;
      ::killpg(pid, SIGKILL);
      int status = 0;
      while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
      }
      {
        std::lock_guard<std::mutex> lk(signal_mtx);
        reaped = true;
      }
      cleanup();
      throw spawn_error(program + ": pidfd_open: " + errno_text(err));
    }
    {
      std::lock_guard<std::mutex> lk(send_mtx);
      stdin_accepting = true;
    }

    // Right after the spawn, from this thread, before anyone can be told the
    // pid: the guardian of the new process group.
    guard = start_guardian(pid);
    if (guard.pid < 0) {
      const int err = errno;
      log().warn("[{}] cannot start the guardian ({}); pid {} runs without one: its "
                 "process group would survive a SIGKILL of the runtime",
                 label(), errno_text(err), pid);
    }
    log().info("[{}] spawned pid {} ({})", label(), pid, exe);
  }

  /// Disarms the guardian (it exits without touching the group) and reaps it.
  void release_guardian() {
    if (guard.pid < 0)
      return;
    while (::write(guard.arm_fd, &guardian_disarm, 1) < 0 && errno == EINTR) {
    }
    close_fd(guard.arm_fd);
    int ws = 0;
    while (::waitpid(guard.pid, &ws, 0) < 0 && errno == EINTR) {
    }
    if (!WIFEXITED(ws) || WEXITSTATUS(ws) != 0)
      log().warn("[{}] guardian {} ended abnormally (status {:#x})", label(), guard.pid, ws);
    guard.pid = -1;
  }

  // -- stdout --

  void report(protocol_error err) {
    protocol_failed = true;
    log().warn("[{}] protocol error: {}: {}", label(), to_string(err.code), err.message);
    notify(label(), "on_protocol_error", [&] { observer->on_protocol_error(std::move(err)); });
  }

  void on_stdout_bytes(const char* data, std::size_t n) {
    if (protocol_failed || stdout_poisoned.load())
      return; // the stream cannot be trusted any more: read and discard
    frames.clear();
    auto err = decoder.feed(std::string_view(data, n), frames);
    for (auto& f : frames)
      notify(label(), "on_frame", [&] { observer->on_frame(std::move(f)); });
    frames.clear();
    if (err)
      report(std::move(*err));
  }

  void on_stdout_end() {
    stdout_eof = true;
    close_fd(stdout_fd);
    if (!protocol_failed)
      if (auto err = decoder.finish())
        report(std::move(*err));
  }

  // -- stderr --

  /// Logs and reports stderr_line, sanitised (see child_observer::on_stderr_line),
  /// keeping its last `carry` bytes for the next line.
  void emit_stderr_line(std::size_t carry = 0) {
    std::string carried = stderr_line.substr(stderr_line.size() - carry);
    stderr_line.resize(stderr_line.size() - carry);
    // The bytes are the child's: invalid UTF-8 would make a JSON encoder throw
    // downstream, and a CR or ESC could forge log lines.
    std::string line = sanitize_line(stderr_line);
    // One worker id per line: a child that names itself ("[w1] ...", as the
    // bundled worker does) is not named twice.
    std::string_view own = line;
    if (own.size() > label().size() + 3 && own[0] == '[' && own.compare(1, label().size(), label()) == 0
        && own.compare(1 + label().size(), 2, "] ") == 0)
      own.remove_prefix(label().size() + 3);
    if (log().should_log(spec.stderr_level))
      log().log(spec.stderr_level, "[{}] {}", label(), own);
    notify(label(), "on_stderr_line", [&] { observer->on_stderr_line(line); });
    stderr_line.clear();
    if (stderr_line.capacity() > 4096)
      std::string().swap(stderr_line); // give a long line's memory back
    stderr_line = std::move(carried);
  }

  void on_stderr_bytes(const char* data, std::size_t n) {
    std::string_view rest(data, n);
    while (!rest.empty()) {
      std::size_t nl = rest.find('\n');
      std::size_t len = nl == std::string_view::npos ? rest.size() : nl;
      std::size_t room = max_stderr_line - stderr_line.size();
      if (len > room) {
        stderr_line.append(rest.data(), room);
        rest.remove_prefix(room);
        // Over the cap: flush the piece, go on with the rest; a character
        // cut at the cap goes whole into the next piece (at most 3 bytes, so
        // the next piece still has room).
        emit_stderr_line(incomplete_utf8_tail(stderr_line));
        continue;
      }
      stderr_line.append(rest.data(), len);
      if (nl == std::string_view::npos)
        break;
      rest.remove_prefix(len + 1);
      emit_stderr_line();
    }
  }

  void on_stderr_end() {
    close_fd(stderr_fd);
    if (!stderr_line.empty())
      emit_stderr_line();
  }

  /// Reads `fd` up to `max_reads` times, until it would block or ends.
  template <class OnBytes, class OnEnd>
  void read_some(int& fd, int max_reads, OnBytes on_bytes, OnEnd on_end) {
    char buf[read_chunk];
    for (int i = 0; i < max_reads && fd >= 0; ++i) {
      ssize_t n = ::read(fd, buf, sizeof buf);
      if (n > 0) {
        on_bytes(buf, static_cast<std::size_t>(n));
        // A pipe's read returns all it holds up to the count asked: a short
        // one drained it, and another would only say EAGAIN (one syscall per
        // reply saved; anything written meanwhile wakes the next poll).
        if (static_cast<std::size_t>(n) < sizeof buf)
          return;
        continue;
      }
      if (n < 0 && errno == EINTR) {
        --i;
        continue;
      }
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
        return;
      if (n < 0)
        log().warn("[{}] read failed: {}", label(), errno_text(errno));
      on_end();
      return;
    }
  }

  /// As stdout's owner: a direct read that holds it has the stream.
  void read_stdout(int max_reads) {
    if (!stdout_owner.try_acquire())
      return;  // a direct read is open: its reader takes the frame
    token_guard owned{&stdout_owner};
    read_some(stdout_fd, max_reads, [this](const char* d, std::size_t n) { on_stdout_bytes(d, n); },
              [this] { on_stdout_end(); });
    stdout_idle.store(stdout_fd >= 0 && !protocol_failed && decoder.buffered() == 0);
  }

  bool begin_direct_read() {
    if (!stdout_owner.try_acquire())
      return false;
    if (!stdout_idle.load() || stdout_poisoned.load() || stdout_fd < 0 || exited.load()) {
      stdout_owner.release();
      return false;
    }
    direct_reading.store(true);
    return true;
  }

  void end_direct_read() {
    direct_reading.store(false);
    stdout_owner.release();
    // The I/O thread reads stdout again; if its wait leaves stdout out, it
    // learns of it at its next wake-up (any frame sent meanwhile wakes it).
  }

  /// Waits (poll) for stdout or the abort, until `deadline`: true when stdout is readable.
  child_process::direct_read wait_stdout(clock::time_point deadline) {
    for (;;) {
      auto left = deadline - clock::now();
      if (left <= clock::duration::zero())
        return child_process::direct_read::timeout;
      auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(left).count() + 1;
      pollfd fds[2] = {{stdout_fd, POLLIN, 0}, {direct_abort_fd, POLLIN, 0}};
      int r = ::poll(fds, 2, static_cast<int>(std::min<long long>(ms, 60'000)));
      if (r < 0 && errno == EINTR)
        continue;
      // What the process wrote before it went is read first: a frame it cut
      // off is then named (truncated), as the I/O thread would name it.
      if (r > 0 && fds[0].revents)
        return child_process::direct_read::frame;  // readable (or hung up: read says)
      if (r < 0 || fds[1].revents)
        return child_process::direct_read::ended;
    }
  }

  /// Reads exactly n bytes into `out` (nonblocking fd, waiting as needed);
  /// `got` counts what it read.
  child_process::direct_read read_exactly(char* out, std::size_t n, clock::time_point deadline,
                                          std::size_t& got) {
    while (n > 0) {
      ssize_t r = ::read(stdout_fd, out, n);
      if (r > 0) {
        out += r;
        n -= static_cast<std::size_t>(r);
        got += static_cast<std::size_t>(r);
        continue;
      }
      if (r < 0 && errno == EINTR)
        continue;
      if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        auto w = wait_stdout(deadline);
        if (w != child_process::direct_read::frame)
          return w;
        continue;
      }
      return child_process::direct_read::ended;  // EOF or an error
    }
    return child_process::direct_read::frame;
  }

  child_process::direct_read read_frame(std::string& payload, clock::time_point deadline) {
    unsigned char header[4];
    std::size_t got = 0;
    auto r = read_exactly(reinterpret_cast<char*>(header), 4, deadline, got);
    if (r == child_process::direct_read::frame) {
      std::uint32_t n = (std::uint32_t{header[0]} << 24) | (std::uint32_t{header[1]} << 16)
                        | (std::uint32_t{header[2]} << 8) | std::uint32_t{header[3]};
      if (n == 0) {
        r = child_process::direct_read::zero_length;
      } else if (n > spec.max_frame_bytes) {
        r = child_process::direct_read::oversize;
      } else {
        payload.resize(n);
        r = read_exactly(payload.data(), n, deadline, got);
      }
    }
    if (r == child_process::direct_read::ended && got > 0)
      r = child_process::direct_read::truncated;
    // Cut inside a frame (or after a header it cannot follow), the stream is
    // noise from here on; at a frame boundary it is intact for the I/O thread.
    if (r != child_process::direct_read::frame && got > 0)
      stdout_poisoned.store(true);
    return r;
  }

  void read_stderr(int max_reads) {
    read_some(stderr_fd, max_reads, [this](const char* d, std::size_t n) { on_stderr_bytes(d, n); },
              [this] { on_stderr_end(); });
  }

  /// Bound of the final drain: what a pipe can hold, twice (a grandchild that
  /// keeps writing must not keep the I/O thread from reaping).
  int drain_reads(int fd) const {
    int size = fd >= 0 ? ::fcntl(fd, F_GETPIPE_SZ) : 0;
    if (size <= 0)
      size = 64 * 1024;
    return static_cast<int>(2 * static_cast<std::size_t>(size) / read_chunk + 1);
  }

  // -- stop sequence --

  void on_wake() {
    std::uint64_t count = 0;
    (void)!::read(wake_fd, &count, sizeof count);
    service_stdin(); // a first queued frame, or a close request
    std::lock_guard<std::mutex> lk(cmd_mtx);
    if (stop_requested && phase == stop_phase::none) {
      phase = stop_phase::grace;
      deadline = clock::now() + shutdown_grace;
      log().debug("[{}] stop: stdin closed (after the queued frames), waiting up to {} ms for "
                  "the exit", label(), shutdown_grace.count());
    }
  }

  void advance_stop_sequence() {
    if (!deadline || clock::now() < *deadline)
      return;
    if (phase == stop_phase::grace) {
      log().debug("[{}] stop: no exit within shutdown_grace, SIGTERM to the group", label());
      signal_group(SIGTERM);
      phase = stop_phase::term;
      deadline = clock::now() + kill_grace;
    } else if (phase == stop_phase::term) {
      log().debug("[{}] stop: no exit within kill_grace, SIGKILL to the group", label());
      signal_group(SIGKILL);
      phase = stop_phase::killed;
      deadline.reset();
    } else {
      deadline.reset();
    }
  }

  // -- the loop --

  void run() {
    for (;;) {
      // stdin only while bytes are queued (a negative fd is ignored by poll);
      // stdout only while no direct read has it (published, then checked
      // again: a sender racing this either is seen or sees it and wakes us).
      const bool draining = stdin_pending.load() && stdin_fd >= 0;
      const bool want_stdout = !direct_reading.load();
      polls_stdout.store(want_stdout);
      if (direct_reading.load() == want_stdout)
        continue;  // changed meanwhile: read it again
      pollfd fds[5] = {{want_stdout ? stdout_fd : -1, POLLIN, 0},
                       {stderr_fd, POLLIN, 0},
                       {pid_fd, POLLIN, 0},
                       {wake_fd, POLLIN, 0},
                       {draining ? stdin_fd : -1, POLLOUT, 0}};
      timespec ts{};
      timespec* timeout = nullptr; // idle: no timer at all
      // The wait ends at the stop phase's deadline or the observer's alarm.
      // Published before the alarm is read again: a set_alarm racing this
      // either is seen here or sees this wait and wakes it.
      auto alarm = alarm_ns.load();
      sleeps_until.store(alarm);
      if (alarm_ns.load() != alarm)
        continue;  // replaced meanwhile: read it again
      std::optional<clock::time_point> until = deadline;
      if (alarm != none) {
        auto at = clock::time_point{std::chrono::duration_cast<clock::duration>(
          std::chrono::nanoseconds{alarm})};
        if (!until || at < *until)
          until = at;
      }
      if (until) {
        auto left = std::max(clock::duration::zero(), *until - clock::now());
        auto secs = std::chrono::duration_cast<std::chrono::seconds>(left);
        ts.tv_sec = static_cast<time_t>(secs.count());
        ts.tv_nsec = static_cast<long>(
          std::chrono::duration_cast<std::chrono::nanoseconds>(left - secs).count());
        timeout = &ts;
      }
      // Awake, sleeps_until keeps its value: the next round reads the alarm
      // again before it sleeps, so a set_alarm meanwhile needs no wake.
      int r = ::ppoll(fds, 5, timeout, nullptr);
      if (r < 0) {
        if (errno == EINTR)
          continue;
        // Cannot happen with valid arguments; do not spin: end the child.
        log().error("[{}] poll failed: {}; killing the child", label(), errno_text(errno));
        signal_group(SIGKILL);
        finish();
        return;
      }
      if (fds[3].revents)
        on_wake();
      if (fds[4].revents)
        service_stdin(); // room again, or POLLERR: the write says EPIPE
      if (fds[0].revents)
        read_stdout(reads_per_wakeup);
      if (fds[1].revents)
        read_stderr(reads_per_wakeup);
      if (fds[2].revents) {
        finish();
        return;
      }
      fire_alarm_if_due();
      advance_stop_sequence();
    }
  }

  /// The child has exited (or is about to, after SIGKILL): drain, reap, report.
  void finish() {
    // A direct reader stops (its caller's call is then handed to the owner),
    // and gives stdout back before it is drained and closed here.
    std::uint64_t one = 1;
    (void)!::write(direct_abort_fd, &one, sizeof one);
    stdout_owner.acquire();
    token_guard owned{&stdout_owner};
    // What is in the pipes now; no waiting for EOF (grandchildren may hold them).
    if (!stdout_poisoned.load())
      read_some(stdout_fd, drain_reads(stdout_fd),
                [this](const char* d, std::size_t n) { on_stdout_bytes(d, n); },
                [this] { on_stdout_end(); });
    read_stderr(drain_reads(stderr_fd));

    exit_status status{};
    siginfo_t info{};
    int rc;
    while ((rc = ::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED | WNOWAIT)) < 0
           && errno == EINTR) {
    }
    const int wait_err = errno;
    // The guardian goes first: disarmed, it exits without a kill, and it must
    // never signal the group once the leader is reaped (the id could be reused).
    release_guardian();
    if (rc == 0) {
      // The leader is a zombie: its pid (= the group id) cannot be reused yet.
      signal_group(SIGKILL); // grandchildren left in the group
      int ws = 0;
      std::lock_guard<std::mutex> lk(signal_mtx);
      while ((rc = ::waitpid(pid, &ws, 0)) < 0 && errno == EINTR) {
      }
      reaped = true;
      if (rc == pid && WIFSIGNALED(ws))
        status = exit_status{true, WTERMSIG(ws)};
      else if (rc == pid && WIFEXITED(ws))
        status = exit_status{false, WEXITSTATUS(ws)};
      else
        status = exit_status{false, -1};
    } else {
      // ECHILD: somebody else reaped it (SIGCHLD set to SIG_IGN, or a
      // waitpid(-1) elsewhere). The pid may be reused: never signal it again.
      log().error("[{}] cannot reap pid {}: {} (was it reaped elsewhere?)", label(), pid,
                  errno_text(wait_err));
      std::lock_guard<std::mutex> lk(signal_mtx);
      reaped = true;
      status = exit_status{false, -1};
    }

    if (!stderr_line.empty())
      emit_stderr_line(); // a last line without its newline
    // A frame the child had begun can no longer be completed.
    if (!stdout_eof && !protocol_failed && !stdout_poisoned.load())
      if (auto err = decoder.finish())
        report(std::move(*err));

    close_stdin();
    close_fd(stdout_fd);
    close_fd(stderr_fd);
    close_fd(pid_fd);

    if (status.clean())
      log().info("[{}] exited: {}", label(), status.describe());
    else
      log().warn("[{}] exited: {}", label(), status.describe());
    exited.store(true);
    notify(label(), "on_exit", [&] { observer->on_exit(status); });
  }
};

} // namespace

struct child_process::impl {
  std::shared_ptr<io_state> state;
  std::thread thread;
};

child_process::child_process(std::unique_ptr<impl> p) : impl_(std::move(p)) {}

std::unique_ptr<child_process> child_process::spawn(process_spec spec,
                                                    std::shared_ptr<child_observer> observer) {
  if (!observer)
    throw std::invalid_argument("child_process::spawn: no observer");

  // A write to a pipe whose reader has gone must give EPIPE, not kill the
  // runtime. Pipes have no MSG_NOSIGNAL, so SIGPIPE is ignored process-wide
  // (once; children get the default back before exec, see child_setup).
  static std::once_flag sigpipe_once;
  std::call_once(sigpipe_once, [] { ::signal(SIGPIPE, SIG_IGN); });

  auto state = std::make_shared<io_state>(std::move(spec), std::move(observer));
  std::promise<void> started;
  auto started_future = started.get_future();

  auto p = std::make_unique<impl>();
  p->state = state;
  try {
    // The I/O thread spawns the child itself (PDEATHSIG follows the spawning
    // thread) and lives until the child is reaped.
    p->thread = std::thread([state, started = std::move(started)]() mutable {
      try {
        state->spawn_child();
      } catch (...) {
        started.set_exception(std::current_exception());
        return;
      }
      started.set_value();
      state->run();
    });
  } catch (const std::system_error& e) {
    throw spawn_error(state->spec.program + ": cannot start the I/O thread: " + e.what());
  }
  {
    std::string name = "io:" + state->spec.label;
    name.resize(std::min<std::size_t>(name.size(), 15));
    ::pthread_setname_np(p->thread.native_handle(), name.c_str());
  }

  try {
    started_future.get();
  } catch (...) {
    p->thread.join();
    throw;
  }
  return std::unique_ptr<child_process>(new child_process(std::move(p)));
}

child_process::~child_process() {
  if (!impl_)
    return;
  if (!impl_->state->exited.load())
    kill();
  if (impl_->thread.joinable()) {
    // Destroyed from an observer callback on its own I/O thread: that thread
    // holds the state and finishes (reaps, reports on_exit) on its own.
    if (impl_->thread.get_id() == std::this_thread::get_id())
      impl_->thread.detach();
    else
      impl_->thread.join();
  }
}

pid_t child_process::pid() const noexcept { return impl_->state->pid; }

const std::string& child_process::label() const noexcept { return impl_->state->spec.label; }

bool child_process::exited() const noexcept { return impl_->state->exited.load(); }

bool child_process::send(std::string_view payload) {
  std::string frame = encode_frame(payload);
  io_state& st = *impl_->state;
  std::lock_guard<std::mutex> lk(st.send_mtx);
  if (!st.stdin_accepting || st.stdin_fd < 0)
    return false;
  if (!st.pending.empty()) {
    // Behind the queue, never beside it: frames must not interleave. The I/O
    // thread is already waiting for room.
    st.pending.push_back(std::move(frame));
    return true;
  }
  std::size_t off = 0;
  while (off < frame.size()) {
    ssize_t n = ::write(st.stdin_fd, frame.data() + off, frame.size() - off);
    if (n > 0) {
      off += static_cast<std::size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR)
      continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
      break; // the pipe is full: the I/O thread writes the rest
    // EPIPE (the child closed its stdin or exited) or another error: stdin
    // is done; the I/O thread closes it (it alone closes the fd it polls).
    int err = errno;
    st.stdin_accepting = false;
    st.stdin_close_wanted = true;
    st.wake();
    if (off == 0) {
      log().debug("[{}] send: {}; stdin closed", st.label(), errno_text(err));
      return false; // nothing of this frame reached the process
    }
    log().warn("[{}] send: {} after {} of {} bytes; stdin closed", st.label(), errno_text(err),
               off, frame.size());
    return true; // part of it did: the owner learns the end through on_exit
  }
  if (off == frame.size()) {
    // Its reply is the I/O thread's unless a direct read is open: the I/O
    // thread's wait must include stdout (it left it out for a direct read).
    if (!st.direct_reading.load() && !st.polls_stdout.load())
      st.wake();
    return true;
  }
  st.pending.push_back(std::move(frame));
  st.pending_off = off;
  st.stdin_pending.store(true);
  st.wake(); // poll stdin for POLLOUT from now on
  return true;
}

void child_process::stop(std::chrono::milliseconds shutdown_grace,
                         std::chrono::milliseconds kill_grace) {
  io_state& st = *impl_->state;
  st.request_stdin_close();
  {
    std::lock_guard<std::mutex> lk(st.cmd_mtx);
    if (st.stop_requested)
      return;
    st.stop_requested = true;
    st.shutdown_grace = std::max(shutdown_grace, std::chrono::milliseconds::zero());
    st.kill_grace = std::max(kill_grace, std::chrono::milliseconds::zero());
  }
  log().debug("[{}] stop requested (shutdown_grace {} ms, kill_grace {} ms)", st.label(),
              shutdown_grace.count(), kill_grace.count());
  st.wake();
}

void child_process::set_alarm(std::chrono::steady_clock::time_point when) {
  impl_->state->set_alarm(when);
}

bool child_process::begin_direct_read() {
  return impl_->state->begin_direct_read();
}

child_process::direct_read child_process::read_frame(std::string& payload,
                                                     std::chrono::steady_clock::time_point deadline) {
  return impl_->state->read_frame(payload, deadline);
}

void child_process::end_direct_read() {
  impl_->state->end_direct_read();
}

void child_process::abort_direct_read() {
  std::uint64_t one = 1;
  (void)!::write(impl_->state->direct_abort_fd, &one, sizeof one);
}

void child_process::kill() {
  io_state& st = *impl_->state;
  log().debug("[{}] kill: SIGKILL to the group", st.label());
  st.signal_group(SIGKILL);
}

} // namespace dspex
