#include "dspex/logging.hpp"

#include <mutex>

#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>

namespace dspex {

spdlog::logger& log() {
  // Built once; spdlog loggers are thread-safe with the _mt sink.
  static std::shared_ptr<spdlog::logger> instance = [] {
    auto sink = std::make_shared<spdlog::sinks::stderr_sink_mt>();
    auto l = std::make_shared<spdlog::logger>("dspex", sink);
    l->set_pattern("%Y-%m-%dT%H:%M:%S.%e %^%l%$ %v");
    l->set_level(spdlog::level::info);
    return l;
  }();
  return *instance;
}

bool set_log_level(std::string_view level) {
  auto lvl = spdlog::level::from_str(std::string{level});
  // from_str maps unknown names to "off": accept "off" only when asked for.
  if (lvl == spdlog::level::off && level != "off")
    return false;
  log().set_level(lvl);
  return true;
}

} // namespace dspex
