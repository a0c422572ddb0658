// What the tests know about processes, read from /proc (never kill(pid, 0),
// which succeeds on zombies).
#pragma once

#include <sys/types.h>
#include <unistd.h>

#include <chrono>
#include <optional>
#include <string>
#include <vector>

namespace dspex::testing {

/// State letter of /proc/<pid>/stat ('R', 'S', 'Z', ...), nullopt when there
/// is no such process (gone and reaped).
std::optional<char> process_state(pid_t pid);

/// True when the process is neither running nor a zombie.
bool process_gone(pid_t pid);

/// Direct children of `parent` (zombies included), from /proc/*/stat.
std::vector<pid_t> child_pids(pid_t parent);

/// Waits (polling /proc every 10 ms, bounded by `timeout`) until `pid` is gone.
bool wait_gone(pid_t pid, std::chrono::milliseconds timeout);

/// Waits until `parent` has no child left; returns the ones still there.
std::vector<pid_t> wait_no_children(pid_t parent, std::chrono::milliseconds timeout);

/// /proc/<pid>/comm without its newline ("" when the process is gone).
std::string comm(pid_t pid);

/// /proc/<pid>/cmdline with its NULs as spaces ("" when the process is gone).
std::string cmdline(pid_t pid);

/// True when `pid` is a child process's guardian (argv[0] "dspex-guard").
bool is_guardian(pid_t pid);

/// The fds a process has open, as the targets of /proc/<pid>/fd/* (e.g. "pipe:[123]").
std::vector<std::string> open_fd_targets(pid_t pid);

} // namespace dspex::testing
