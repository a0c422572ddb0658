// What /proc says about a child process, for recycling decisions.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

namespace dspex {

/// The whole text of /proc/<pid>/<entry> ("stat", "status", "comm", ...);
/// nothing when the process is gone or the file cannot be read (see
/// read_text_file: never throws, also when the process is reaped meanwhile).
std::optional<std::string> read_proc_file(int pid, const char* entry);

/// Resident set size of `pid` in bytes (VmRSS of /proc/<pid>/status);
/// nothing when the process is gone or the line is missing.
std::optional<std::uint64_t> resident_bytes(int pid);

/// The fields of /proc/<pid>/stat that supervision and its tests look at.
struct process_stat {
  char state = 0;  ///< 'R', 'S', 'T' stopped, 'Z' zombie, 'X' dead, ...
  long ppid = -1;  ///< the parent's pid
};

/// /proc/<pid>/stat, parsed; nothing when the process is gone.
std::optional<process_stat> read_process_stat(int pid);

/// The state letter of /proc/<pid>/stat ('R', 'S', 'T' stopped, 'Z', ...);
/// nothing when the process is gone.
std::optional<char> process_state_letter(int pid);

} // namespace dspex
