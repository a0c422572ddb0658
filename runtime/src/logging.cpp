#include "dspex/logging.hpp"

#include <chrono>
#include <ctime>
#include <memory>
#include <mutex>

#include <nlohmann/json.hpp>
#include <spdlog/formatter.h>
#include <spdlog/pattern_formatter.h>
#include <spdlog/sinks/rotating_file_sink.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>

#include "dspex/json_limits.hpp"
#include "dspex/settings.hpp"

namespace dspex {

namespace {

constexpr const char* text_pattern = "%Y-%m-%dT%H:%M:%S.%e %^%l%$ %v";

/// log.format=json: one object per line, {"time", "level", "msg"}, plus
/// "worker" for the lines about one worker (those that begin "[<id>] ": the
/// runtime's convention), so a machine needs no pattern to read them.
class json_formatter final : public spdlog::formatter {
public:
  void format(const spdlog::details::log_msg& msg, spdlog::memory_buf_t& dest) override {
    auto t = std::chrono::system_clock::to_time_t(msg.time);
    auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(msg.time.time_since_epoch())
                .count() % 1000;
    std::tm tm{};
    ::gmtime_r(&t, &tm);
    char stamp[96];  // room for any int the format could print
    std::snprintf(stamp, sizeof stamp, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900,
                  tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                  static_cast<int>(ms));
    std::string_view text{msg.payload.data(), msg.payload.size()};
    nlohmann::json line{{"time", stamp},
                        {"level", std::string{spdlog::level::to_string_view(msg.level).data(),
                                              spdlog::level::to_string_view(msg.level).size()}}};
    if (text.size() > 2 && text.front() == '[') {
      auto close = text.find("] ");
      if (close != std::string_view::npos && close > 1 && close < 64) {
        line["worker"] = sanitize_utf8(text.substr(1, close - 1));
        text.remove_prefix(close + 2);
      }
    }
    line["msg"] = sanitize_utf8(text);
    auto out = line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    out += '\n';
    dest.append(out.data(), out.data() + out.size());
  }
  std::unique_ptr<spdlog::formatter> clone() const override {
    return std::make_unique<json_formatter>();
  }
};

std::mutex config_mtx;                                  // configure_logging's, one at a time
std::shared_ptr<spdlog::sinks::sink> current_file_sink;  // the one log.file sink, if any

} // namespace

spdlog::logger& log() {
  // Built once; spdlog loggers are thread-safe with the _mt sink.
  static std::shared_ptr<spdlog::logger> instance = [] {
    auto sink = std::make_shared<spdlog::sinks::stderr_sink_mt>();
    auto l = std::make_shared<spdlog::logger>("dspex", sink);
    l->set_pattern(text_pattern);
    l->set_level(spdlog::level::info);
    return l;
  }();
  return *instance;
}

std::optional<spdlog::level::level_enum> log_level_of(std::string_view name) {
  auto lvl = spdlog::level::from_str(std::string{name});
  // from_str maps unknown names to "off": accept "off" only when asked for.
  if (lvl == spdlog::level::off && name != "off")
    return std::nullopt;
  return lvl;
}

bool set_log_level(std::string_view level) {
  auto lvl = log_level_of(level);
  if (!lvl)
    return false;
  log().set_level(*lvl);
  return true;
}

std::optional<error> configure_logging(const settings& s) {
  std::lock_guard<std::mutex> guard{config_mtx};
  std::shared_ptr<spdlog::sinks::sink> file;
  if (!s.log_file.empty()) {
    try {
      file = std::make_shared<spdlog::sinks::rotating_file_sink_mt>(s.log_file, s.log_file_max_bytes,
                                                                    s.log_file_count);
    } catch (const std::exception& e) {
      return make_error(error_category::configuration_error, "invalid_setting",
                        "log.file cannot be opened: " + sanitize_utf8(e.what()),
                        {{"key", "log.file"}, {"path", sanitize_utf8(s.log_file)}});
    }
  }
  auto& l = log();
  auto& sinks = l.sinks();
  if (current_file_sink)
    sinks.erase(std::remove(sinks.begin(), sinks.end(), current_file_sink), sinks.end());
  current_file_sink = file;
  if (file)
    sinks.push_back(file);
  // A file is read while it is written (and after a crash): every line is
  // flushed as it is written, not when a buffer fills.
  l.flush_on(file ? spdlog::level::trace : spdlog::level::off);
  // Every sink, a test's capture included, writes the same lines.
  if (s.log_format == "json")
    l.set_formatter(std::make_unique<json_formatter>());
  else
    l.set_pattern(text_pattern);
  set_log_level(s.log_level);
  return std::nullopt;
}

} // namespace dspex
