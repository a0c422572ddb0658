// A `dspex node` process on this machine (issue 13), for `dspex run
// --topology` and the tests of topologies: started with its stdout on a
// pipe, ready once it printed "dspex node: serving POOLS on HOST:PORT",
// stopped with real signals, and always reaped.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace dspex {

/// Starts `dspex_cli` with `args` (its argv after argv[0]): stdin from
/// /dev/null, stdout to `stdout_fd` (-1: /dev/null), stderr to the file
/// `stderr_path` (empty: /dev/null). The caller reaps it.
/// @returns its pid, or -1 when it could not be started
pid_t spawn_dspex(const std::string& dspex_cli, const std::vector<std::string>& args, int stdout_fd,
                  const std::string& stderr_path);

class node_process {
public:
  /// Starts `dspex_cli node` with `args` (settings such as --pool.size=1)
  /// and waits (bounded by `ready_within`) for its "serving" line.
  /// @throws std::runtime_error when it does not get there (its output in the message)
  node_process(const std::string& dspex_cli, std::vector<std::string> args,
               std::chrono::milliseconds ready_within = std::chrono::seconds{60});
  /// SIGTERM, then SIGKILL after a bound; always reaped.
  ~node_process();
  node_process(const node_process&) = delete;
  node_process& operator=(const node_process&) = delete;

  /// @returns the port it serves on
  std::uint16_t port() const noexcept { return port_; }
  /// @returns "127.0.0.1:PORT", as remote.nodes and served_by name it
  std::string address() const;
  /// @returns its pid
  pid_t pid() const noexcept { return pid_; }
  /// Sends `sig` and, for SIGKILL and SIGTERM, waits (bounded) until it is reaped.
  /// @returns its wait status, or -1 when it did not end in time
  int signal_and_reap(int sig, std::chrono::milliseconds within = std::chrono::seconds{20});
  /// Sends `sig` and returns at once (SIGSTOP and SIGCONT: a partition and its end).
  void signal(int sig);
  /// @returns what it wrote to stdout and stderr so far (for a failing test's message)
  std::string output() const;

private:
  pid_t pid_ = -1;
  bool reaped_ = false;
  std::uint16_t port_ = 0;
  std::string log_path_;
};

} // namespace dspex
