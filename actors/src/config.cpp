#include "dspex/config.hpp"

#include <fstream>

#include <caf/actor_system.hpp>
#include <caf/config_option_set.hpp>

#include "dspex/actors/system_config.hpp"

namespace dspex {

const char* const default_config_file = DSPEX_DEFAULT_CONFIG_FILE;

namespace {

error config_error(std::string type, std::string message, nlohmann::json ctx = {}) {
  return make_error(error_category::configuration_error, std::move(type), std::move(message),
                    ctx.is_object() ? std::move(ctx) : nlohmann::json::object());
}

} // namespace

std::variant<settings, error> load_settings(const std::vector<std::string>& args,
                                            const std::string& ini_file,
                                            std::vector<std::string>* remainder) {
  // CAF silently skips a config file it cannot open; a file the user named
  // explicitly must exist.
  std::string path = ini_file;
  for (auto& a : args)
    if (a.rfind("--config-file=", 0) == 0)
      path = a.substr(14);
  std::ifstream ini{path};
  if (!ini)
    return config_error("config_file_unreadable", "cannot read config file '" + path + "'",
                        {{"key", "config-file"}, {"path", path}});
  std::vector<std::string> cli;
  for (auto& a : args)
    if (a.rfind("--config-file=", 0) != 0)
      cli.push_back(a);
  system_config cfg;
  if (auto err = cfg.parse(cli, ini))
    return config_error("invalid_setting",
                        "invalid configuration: " + caf::to_string(err)
                          + (cfg.remainder.empty() ? "" : " near '" + cfg.remainder.front() + "'"),
                        {{"path", path}});
  if (remainder)
    *remainder = cfg.remainder;
  auto s = cfg.to_settings();
  if (auto err = s.validate())
    return *err;
  return s;
}

std::string describe_settings() {
  system_config cfg;
  return cfg.options().help_text(false);
}

} // namespace dspex
