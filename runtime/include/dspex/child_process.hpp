// One supervised child process with framed stdin/stdout and a logged stderr.
//
// Each child_process owns one I/O thread. That thread spawns the child (so the
// child's parent-death signal is tied to a thread that lives exactly as long
// as the child is supervised), writes what send() could not write at once,
// reads stdout frames and stderr lines, detects the exit through a pidfd, runs
// the stop sequence and reaps. The owner talks to it through send/stop/kill;
// the thread reports through child_observer.
//
// PR_SET_PDEATHSIG only kills the child itself when the runtime dies; what
// the child started (same process group) would survive. So each child also
// gets a guardian: a tiny /bin/sh process (argv[0] "dspex-guard") that blocks
// on a pipe whose only write end the runtime holds. When that pipe reports EOF
// without having been disarmed (the runtime died, even by SIGKILL), the
// guardian kills the child's whole process group.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include <spdlog/common.h>

#include "dspex/framing.hpp"

namespace dspex {

/// What to run. (Named process_spec: dspex::child_spec is the supervisor's.)
struct process_spec {
  std::string program;            ///< looked up in PATH when it has no '/'
  std::vector<std::string> args;  ///< arguments after the program name
  std::string label;              ///< worker id, used in every log line
  std::size_t max_frame_bytes = default_max_frame_bytes;
  /// The level at which the child's stderr lines are logged (log.worker_level).
  spdlog::level::level_enum stderr_level = spdlog::level::info;
};

/// How a child ended: an exit code or a signal.
struct exit_status {
  bool signaled = false;
  int code = 0;  ///< exit code, or the signal number when `signaled`

  bool clean() const noexcept { return !signaled && code == 0; }
  /// "exit code 3" or "signal 9 (SIGKILL)".
  std::string describe() const;
};

/// Thrown by child_process::spawn when the child cannot be started; what()
/// names the program and the OS reason, e.g. "python3-nope: No such file or directory".
class spawn_error : public std::runtime_error {
public:
  using std::runtime_error::runtime_error;
};

/// Receives the events of one child, always on that child's I/O thread, in
/// this order: any number of on_frame / on_protocol_error / on_stderr_line,
/// then exactly one on_exit (after the child is reaped). Must not block.
class child_observer {
public:
  virtual ~child_observer();
  /// One complete frame from stdout, its 4-byte length removed.
  virtual void on_frame(std::string payload) = 0;
  /// The stdout stream broke the framing rules (reported once; later stdout
  /// bytes are discarded). The owner is expected to kill the child.
  virtual void on_protocol_error(protocol_error err) = 0;
  /// One stderr line without its newline, already logged with the label.
  /// Always valid UTF-8: each invalid sequence is replaced by U+FFFD (one per
  /// maximal invalid subpart, as Python's "replace"), and control characters
  /// other than tab (C0, DEL, C1: CR, ESC, NUL, ...) are removed, so a line
  /// can be put into JSON as is and cannot forge log lines or terminal
  /// escapes. A line over 64 KiB (raw bytes) comes in pieces, each cut at a
  /// character boundary.
  virtual void on_stderr_line(std::string_view line);
  /// The time given to child_process::set_alarm has come (once per
  /// set_alarm; a later set_alarm replaces an earlier one). Default: nothing.
  virtual void on_alarm();
  /// The child was reaped: how it ended. The last call, exactly once.
  virtual void on_exit(exit_status status) = 0;
};

class child_process {
public:
  /// Starts the I/O thread, which spawns the child with Boost.Process in its
  /// own process group, with PR_SET_PDEATHSIG(SIGKILL), stdin/stdout/stderr
  /// bound to pipes and no other fd inherited (every fd >= 3 is made
  /// close-on-exec in the child right before exec, so spawns on several
  /// threads at once are safe), then forks the child's guardian. Blocks until
  /// the exec succeeded or failed; on failure throws spawn_error.
  /// @note When the guardian cannot be forked, a warning is logged and the
  ///       child runs without one (its grandchildren would then survive a
  ///       SIGKILL of the runtime).
  static std::unique_ptr<child_process> spawn(process_spec spec,
                                              std::shared_ptr<child_observer> observer);

  /// kill() if not yet reaped (even during a stop sequence: wait for on_exit
  /// first for a graceful end), then joins the I/O thread, so the child and
  /// its guardian are reaped and on_exit delivered when this returns. Called
  /// from an observer callback (on the I/O thread itself), it detaches
  /// instead of joining.
  ~child_process();

  child_process(const child_process&) = delete;
  child_process& operator=(const child_process&) = delete;

  /// @returns the child's pid (its process group's id too).
  pid_t pid() const noexcept;
  /// @returns the label of every log line about the child (the worker id).
  const std::string& label() const noexcept;

  /// Sends one frame (header + payload) to the child's stdin without ever
  /// blocking the calling thread. Thread-safe. What fits into the pipe now is
  /// written at once; the rest of the frame is queued and written by the I/O
  /// thread as the child reads. Frames are written whole and in the order of
  /// the send() calls, never interleaved.
  /// @returns false only when nothing of this frame reached the process:
  ///          stdin is already closed (stop() was called, the child exited, an
  ///          earlier write failed) or the first write failed (EPIPE: the child
  ///          closed its stdin). The caller may then hand the request to
  ///          another process. True means the frame was written or queued; a
  ///          later write failure (EPIPE while draining the queue) closes stdin
  ///          and is logged, and the owner learns of it through on_exit, or
  ///          through its own deadline for the reply (it then kills the child).
  /// @note Memory: queued bytes are the frames the child has not read yet;
  ///       nothing bounds them but the owner. The worker actor has one request
  ///       in flight per worker (plus a final `shutdown`), so in practice the
  ///       queue holds at most about one frame, freed as soon as it is written.
  /// @throws std::invalid_argument for an empty payload (see encode_frame).
  bool send(std::string_view payload);

  /// Graceful stop, asynchronous: no frame is accepted any more (send()
  /// returns false); frames already queued are still written, then stdin is
  /// closed (so a last `shutdown` request arrives whole before EOF). The
  /// shutdown_grace starts at once, queued bytes or not: up to it for the
  /// exit, then SIGTERM to the process group, `kill_grace`, then SIGKILL, so
  /// the sequence stays bounded even if the child never reads. Always reaps;
  /// on_exit reports the end. Idempotent.
  void stop(std::chrono::milliseconds shutdown_grace, std::chrono::milliseconds kill_grace);

  /// SIGKILL to the process group now, asynchronous; on_exit follows. Idempotent.
  void kill();

  /// Asks the I/O thread to call the observer's on_alarm at `when` (or at
  /// once, if it has passed), replacing the alarm set before. Thread-safe.
  /// @note Cheap on the request path: the I/O thread is woken only when it
  ///       sleeps past `when` (for a run of requests with one timeout, only
  ///       the first wakes it). A replaced alarm never fires.
  void set_alarm(std::chrono::steady_clock::time_point when);

  // -- direct reads: the thread that sent a request reads its reply ----------
  //
  // A blocking caller that wrote a request can read the reply frame from
  // stdout itself, instead of being woken by the I/O thread: one thread
  // hand-off less (issue 11). While a direct read is open the I/O thread
  // does not read stdout; everything else (stderr, the exit, alarms) stays
  // its own, and frames that nobody reads directly are its as before.

  /// Opens a direct read, before the request's frame is sent. The thread
  /// that reads it (read_frame, end_direct_read) may be another one: the
  /// read is handed over with the call (a blocking caller whose frame the
  /// previous caller wrote reads its own reply).
  /// @returns false when it cannot: the I/O thread is reading stdout, holds
  ///          part of a frame, or stdout is closed or broken; the I/O thread
  ///          then reads the reply as usual.
  bool begin_direct_read();
  enum class direct_read { frame, timeout, ended, truncated, oversize, zero_length };
  /// Reads one frame (header and body, nothing more) into `payload`, until
  /// `deadline`. `ended`: EOF, a read error, abort_direct_read, or the
  /// process exited, at a frame boundary (the I/O thread reports it).
  /// `truncated`: the same inside a frame. `oversize` / `zero_length`: the
  /// header announced more than max_frame_bytes, or nothing. These three
  /// the reader reports (as protocol_errc says), before end_direct_read: the
  /// I/O thread reports the exit only after it.
  /// After a read cut inside a frame (a timeout, or any of the errors) the
  /// I/O thread discards stdout from then on (the process is to be killed);
  /// cut at a frame boundary, the stream stays the I/O thread's as it was.
  /// @note Only between begin_direct_read and end_direct_read, by one thread at a time.
  direct_read read_frame(std::string& payload, std::chrono::steady_clock::time_point deadline);
  /// Gives stdout back to the I/O thread.
  void end_direct_read();
  /// Makes a direct read in progress return `ended` at once (any thread);
  /// every later one too.
  void abort_direct_read();

  /// True once the child has been reaped (set just before on_exit is called).
  bool exited() const noexcept;

  struct impl;

private:
  explicit child_process(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

} // namespace dspex
