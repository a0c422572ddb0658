// One supervised child process with framed stdin/stdout and a logged stderr.
//
// Each child_process owns one I/O thread. That thread spawns the child (so the
// child's parent-death signal is tied to a thread that lives exactly as long
// as the child is supervised), reads stdout frames and stderr lines, detects
// the exit through a pidfd, runs the stop sequence and reaps. The owner talks
// to it through send/stop/kill; the thread reports through child_observer.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "dspex/framing.hpp"

namespace dspex {

struct child_spec {
  std::string program;            ///< looked up in PATH when it has no '/'
  std::vector<std::string> args;  ///< arguments after the program name
  std::string label;              ///< worker id, used in every log line
  std::size_t max_frame_bytes = default_max_frame_bytes;
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
  virtual void on_frame(std::string payload) = 0;
  /// The stdout stream broke the framing rules (reported once; later stdout
  /// bytes are discarded). The owner is expected to kill the child.
  virtual void on_protocol_error(protocol_error err) = 0;
  /// One stderr line without its newline (already logged with the label).
  virtual void on_stderr_line(std::string_view line);
  virtual void on_exit(exit_status status) = 0;
};

class child_process {
public:
  /// Starts the I/O thread, which spawns the child with Boost.Process in its
  /// own process group, with PR_SET_PDEATHSIG(SIGKILL), stdin/stdout/stderr
  /// bound to close-on-exec pipes and no other fd inherited. Blocks until the
  /// exec succeeded or failed; on failure throws spawn_error.
  static std::unique_ptr<child_process> spawn(child_spec spec,
                                              std::shared_ptr<child_observer> observer);

  /// kill() if not yet reaped (even during a stop sequence: wait for on_exit
  /// first for a graceful end), then joins the I/O thread, so the child is
  /// reaped and on_exit delivered when this returns. Called from an observer
  /// callback (on the I/O thread itself), it detaches instead of joining.
  ~child_process();

  child_process(const child_process&) = delete;
  child_process& operator=(const child_process&) = delete;

  pid_t pid() const noexcept;
  const std::string& label() const noexcept;

  /// Writes one frame (header + payload) to the child's stdin. Thread-safe.
  /// Returns false when stdin is closed or broken, or when the whole frame
  /// could not be written within `timeout` (the pipe stayed full). A timeout
  /// that left part of the frame in the pipe also closes stdin (the stream is
  /// broken: the owner is expected to kill the child). Throws
  /// std::invalid_argument for an empty payload (see encode_frame). Senders
  /// and stop() wait for a send in progress (they share one mutex).
  bool send(std::string_view payload, std::chrono::milliseconds timeout);

  /// Graceful stop, asynchronous: closes stdin, waits up to `shutdown_grace`
  /// for the exit, then SIGTERM to the process group, waits `kill_grace`, then
  /// SIGKILL; always reaps. on_exit reports the end. Idempotent.
  void stop(std::chrono::milliseconds shutdown_grace, std::chrono::milliseconds kill_grace);

  /// SIGKILL to the process group now, asynchronous; on_exit follows. Idempotent.
  void kill();

  /// True once the child has been reaped (set just before on_exit is called).
  bool exited() const noexcept;

  struct impl;

private:
  explicit child_process(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

} // namespace dspex
