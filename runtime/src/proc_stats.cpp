#include "dspex/proc_stats.hpp"

#include <sstream>
#include <string>

#include "dspex/text_file.hpp"

namespace dspex {

std::optional<std::string> read_proc_file(int pid, const char* entry) {
  if (pid <= 0)
    return std::nullopt;
  // /proc files are small; the bound only keeps a reader's memory bounded.
  constexpr std::size_t max_proc_file_bytes = 1 << 20;
  return read_text_file("/proc/" + std::to_string(pid) + "/" + entry, max_proc_file_bytes);
}

std::optional<std::uint64_t> resident_bytes(int pid) {
  auto text = read_proc_file(pid, "status");
  if (!text)
    return std::nullopt;
  std::istringstream in{*text};
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmRSS:", 0) != 0)
      continue;
    std::istringstream fields{line.substr(6)};
    std::uint64_t kib = 0;
    if (fields >> kib)
      return kib * 1024;
    return std::nullopt;
  }
  return std::nullopt;
}

std::optional<process_stat> read_process_stat(int pid) {
  auto stat = read_proc_file(pid, "stat");
  if (!stat)
    return std::nullopt;
  // The command name (field 2) may contain ')' and spaces: the fields that
  // follow are parsed after the last ')'.
  auto close = stat->rfind(')');
  if (close == std::string::npos || close + 2 >= stat->size())
    return std::nullopt;
  std::istringstream fields{stat->substr(close + 2)};
  process_stat out;
  if (!(fields >> out.state >> out.ppid))
    return std::nullopt;
  return out;
}

std::optional<char> process_state_letter(int pid) {
  auto stat = read_process_stat(pid);
  if (!stat)
    return std::nullopt;
  return stat->state;
}

} // namespace dspex
