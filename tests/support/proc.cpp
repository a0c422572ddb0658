#include "support/proc.hpp"

#include "dspex/proc_stats.hpp"

#include <dirent.h>
#include <limits.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <thread>

namespace dspex::testing {

namespace {

/// Numeric entries of a /proc directory.
template <class F>
void for_each_number(const std::string& dir, F&& f) {
  std::unique_ptr<DIR, int (*)(DIR*)> d(::opendir(dir.c_str()), &::closedir);
  if (!d)
    return;
  while (auto* ent = ::readdir(d.get())) {
    char* end = nullptr;
    long n = std::strtol(ent->d_name, &end, 10);
    if (ent->d_name[0] != '\0' && *end == '\0' && n >= 0)
      f(static_cast<long>(n), std::string(ent->d_name));
  }
}

template <class Pred>
bool poll_until(std::chrono::milliseconds timeout, Pred&& done) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    if (done())
      return true;
    if (std::chrono::steady_clock::now() >= deadline)
      return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

} // namespace

std::optional<char> process_state(pid_t pid) {
  return process_state_letter(pid);
}

bool process_gone(pid_t pid) {
  auto state = process_state(pid);
  // 'X' (dead) is the instant between zombie and gone.
  return !state || *state == 'X';
}

std::vector<pid_t> child_pids(pid_t parent) {
  std::vector<pid_t> out;
  for_each_number("/proc", [&](long pid, const std::string&) {
    auto stat = read_process_stat(static_cast<int>(pid));
    if (stat && stat->ppid == parent) // no stat: gone meanwhile
      out.push_back(static_cast<pid_t>(pid));
  });
  return out;
}

bool wait_gone(pid_t pid, std::chrono::milliseconds timeout) {
  return poll_until(timeout, [&] { return process_gone(pid); });
}

std::vector<pid_t> wait_no_children(pid_t parent, std::chrono::milliseconds timeout) {
  std::vector<pid_t> left;
  poll_until(timeout, [&] {
    left = child_pids(parent);
    return left.empty();
  });
  return left;
}

std::string comm(pid_t pid) {
  auto text = read_proc_file(pid, "comm").value_or("");
  if (!text.empty() && text.back() == '\n')
    text.pop_back();
  return text;
}

std::string cmdline(pid_t pid) {
  auto text = read_proc_file(pid, "cmdline").value_or("");
  std::replace(text.begin(), text.end(), '\0', ' ');
  return text;
}

bool is_guardian(pid_t pid) {
  // The shell it runs shows as "sh" in comm; its fallback names itself.
  return cmdline(pid).rfind("dspex-guard ", 0) == 0 || comm(pid) == "dspex-guard";
}

std::vector<std::string> open_fd_targets(pid_t pid) {
  std::vector<std::string> out;
  const std::string dir = "/proc/" + std::to_string(pid) + "/fd";
  for_each_number(dir, [&](long, const std::string& name) {
    char buf[PATH_MAX];
    ssize_t n = ::readlink((dir + "/" + name).c_str(), buf, sizeof buf);
    if (n >= 0)
      out.emplace_back(buf, static_cast<std::size_t>(n));
  });
  return out;
}

} // namespace dspex::testing
