#include "dspex/settings.hpp"

#include <unistd.h>

#include <cstdlib>
#include <fstream>

#include <fmt/format.h>

namespace dspex {

namespace {

error bad(const std::string& key, const std::string& what) {
  return make_error(error_category::configuration_error, "invalid_setting",
                    fmt::format("{} {}", key, what), {{"key", key}});
}

bool positive(settings::ms d) {
  return d.count() > 0;
}

} // namespace

std::string find_executable(const std::string& program) {
  if (program.empty())
    return {};
  if (program.find('/') != std::string::npos)
    return ::access(program.c_str(), X_OK) == 0 ? program : std::string{};
  const char* path = std::getenv("PATH");
  std::string dirs = path ? path : "/usr/local/bin:/usr/bin:/bin";
  std::size_t start = 0;
  while (start <= dirs.size()) {
    auto end = dirs.find(':', start);
    if (end == std::string::npos)
      end = dirs.size();
    std::string dir = dirs.substr(start, end - start);
    if (dir.empty())
      dir = ".";
    std::string candidate = dir + "/" + program;
    if (::access(candidate.c_str(), X_OK) == 0)
      return candidate;
    start = end + 1;
  }
  return {};
}

std::optional<error> settings::validate() const {
  if (pool.size < 1 || pool.size > 1024)
    return bad("pool.size", fmt::format("must be between 1 and 1024 (got {})", pool.size));
  if (!positive(pool.init_timeout))
    return bad("pool.init_timeout", "must be positive");
  if (!positive(pool.request_timeout))
    return bad("pool.request_timeout", "must be positive");
  if (pool.max_frame_bytes < 64 || pool.max_frame_bytes > (std::size_t{1} << 30))
    return bad("pool.max_frame_bytes",
               fmt::format("must be between 64 and 1073741824 (got {})", pool.max_frame_bytes));
  if (pool.max_overflow > 1024)
    return bad("pool.max_overflow", fmt::format("must be between 0 and 1024 (got {})", pool.max_overflow));
  if (pool.overflow_idle_delay.count() < 0)
    return bad("pool.overflow_idle_delay", "must not be negative");
  if (pool.strategy != "fifo" && pool.strategy != "lifo")
    return bad("pool.strategy", fmt::format("must be 'fifo' or 'lifo' (got '{}')", pool.strategy));
  if (pool.max_queue < 1)
    return bad("pool.max_queue", "must be at least 1");
  if (pool.failure_threshold < 1)
    return bad("pool.failure_threshold", "must be at least 1");
  if (worker.python.empty())
    return bad("worker.python", "must name an interpreter");
  if (find_executable(worker.python).empty())
    return bad("worker.python", fmt::format("'{}' not found in PATH or not executable",
                                            worker.python));
  if (worker.script.empty())
    return bad("worker.script", "must name the worker script");
  if (!std::ifstream{worker.script})
    return bad("worker.script", fmt::format("cannot read '{}'", worker.script));
  if (worker.shutdown_grace.count() < 0)
    return bad("worker.shutdown_grace", "must not be negative");
  if (worker.kill_grace.count() < 0)
    return bad("worker.kill_grace", "must not be negative");
  if (!(lm.temperature >= 0.0 && lm.temperature <= 2.0))
    return bad("lm.temperature", fmt::format("must be between 0 and 2 (got {})", lm.temperature));
  if (!lm.provider.empty() && lm.model.empty())
    return bad("lm.model", "must be set when lm.provider is set");
  static const char* levels[] = {"trace", "debug", "info", "warn", "error", "critical", "off"};
  bool level_ok = false;
  for (auto* l : levels)
    level_ok = level_ok || log_level == l;
  if (!level_ok)
    return bad("log.level", fmt::format("must be one of trace, debug, info, warn, error, "
                                        "critical, off (got '{}')", log_level));
  if (scheduler_policy != "sharing" && scheduler_policy != "stealing")
    return bad("scheduler.policy",
               fmt::format("must be 'sharing' or 'stealing' (got '{}')", scheduler_policy));
  if (scheduler_max_threads > 256)
    return bad("scheduler.max-threads",
               fmt::format("must be between 0 and 256 (got {})", scheduler_max_threads));
  return std::nullopt;
}

std::vector<std::string> settings::worker_args(const std::string& worker_id,
                                               const std::string& mode) const {
  std::vector<std::string> args{worker.script, "--mode", mode, "--worker-id", worker_id};
  if (worker.test_commands)
    args.emplace_back("--test-commands");
  args.insert(args.end(), worker.extra_args.begin(), worker.extra_args.end());
  return args;
}

} // namespace dspex
