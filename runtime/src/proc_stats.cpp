#include "dspex/proc_stats.hpp"

#include <fstream>
#include <iterator>
#include <sstream>
#include <string>

namespace dspex {

std::optional<std::uint64_t> resident_bytes(int pid) {
  if (pid <= 0)
    return std::nullopt;
  std::ifstream in{"/proc/" + std::to_string(pid) + "/status"};
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

std::optional<char> process_state_letter(int pid) {
  if (pid <= 0)
    return std::nullopt;
  std::ifstream in{"/proc/" + std::to_string(pid) + "/stat"};
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  // The command name (field 2) may contain ')' and spaces: the state is the
  // first field after the last ')'.
  auto close = text.rfind(')');
  if (close == std::string::npos || close + 2 >= text.size())
    return std::nullopt;
  return text[close + 2];
}

} // namespace dspex
