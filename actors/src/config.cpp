#include "dspex/config.hpp"

#include <sstream>

#include "dspex/json_limits.hpp"
#include "dspex/text_file.hpp"

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <memory>
#include <optional>

#include <caf/actor_system.hpp>
#include <caf/config_option_set.hpp>
#include <caf/settings.hpp>

#include "dspex/actors/system_config.hpp"

namespace dspex {

namespace {

error config_error(std::string type, std::string message, nlohmann::json ctx = {}) {
  return make_error(error_category::configuration_error, std::move(type), std::move(message),
                    ctx.is_object() ? std::move(ctx) : nlohmann::json::object());
}

/// The first duration literal in `text` ("<digits><unit>" after '=' or blank)
/// too long for CAF's timespan (int64 nanoseconds, ~292 years): CAF's parser
/// wraps it around silently, so "18446744074s" would become 290 ms.
std::optional<std::string> overflowing_duration(const std::string& text) {
  static const std::pair<const char*, std::uint64_t> units[] = {
    {"ns", 1}, {"us", 1000}, {"ms", 1000000}, {"min", 60000000000ULL},
    {"s", 1000000000ULL}, {"h", 3600000000000ULL}};
  constexpr auto max_ns = static_cast<std::uint64_t>(INT64_MAX);
  for (std::size_t i = 0; i < text.size(); ++i) {
    auto digit = [&](std::size_t k) { return k < text.size() && text[k] >= '0' && text[k] <= '9'; };
    bool starts = digit(i) && (i == 0 || text[i - 1] == '=' || text[i - 1] == ' '
                               || text[i - 1] == '\t');
    if (!starts)
      continue;
    std::size_t end = i;
    std::uint64_t value = 0;
    bool huge = false;
    for (; digit(end); ++end) {
      auto d = static_cast<std::uint64_t>(text[end] - '0');
      huge = huge || value > (UINT64_MAX - d) / 10;
      value = huge ? value : value * 10 + d;
    }
    for (auto& [name, factor] : units) {
      auto len = std::char_traits<char>::length(name);
      bool alnum_after = end + len < text.size() && std::isalnum(static_cast<unsigned char>(text[end + len]));
      if (text.compare(end, len, name) != 0 || alnum_after)
        continue;
      if (huge || value > max_ns / factor)
        return text.substr(i, end + len - i);
      break;
    }
    i = end;
  }
  return std::nullopt;
}

// CAF renders parser errors as e.g.
//   parser_error(not_an_option, ({"argument" = "--pool.sise=3"}))
// Turn that into one line that names the key.
error parse_failure(const caf::error& err, const std::string& path) {
  auto rendered = caf::to_string(err);
  std::string reason = rendered;
  if (auto open = rendered.find('('); open != std::string::npos) {
    auto end = rendered.find_first_of(",)", open + 1);
    reason = rendered.substr(open + 1, end - open - 1);
  }
  std::replace(reason.begin(), reason.end(), '_', ' ');
  static const std::string marker = "\"argument\" = \"";
  auto at = rendered.find(marker);
  if (at == std::string::npos) {
    // INI errors carry a position: ({"column" = 7, "line" = 2})
    auto number_after = [&](const std::string& name) -> std::string {
      auto p = rendered.find("\"" + name + "\" = ");
      if (p == std::string::npos)
        return "?";
      p += name.size() + 5;
      return rendered.substr(p, rendered.find_first_not_of("0123456789", p) - p);
    };
    return config_error("invalid_setting",
                        "invalid configuration in '" + path + "' at line " + number_after("line")
                          + ", column " + number_after("column") + " (" + reason + ")",
                        {{"path", path}});
  }
  auto arg_start = at + marker.size();
  auto argument = rendered.substr(arg_start, rendered.find('"', arg_start) - arg_start);
  auto key = argument.substr(0, argument.find('='));
  while (!key.empty() && key.front() == '-')
    key.erase(key.begin());
  auto message = reason == "not an option"
                   ? "unknown option " + key + " (in '" + argument + "')"
                   : key + " has an invalid value (" + reason + " in '" + argument + "')";
  return config_error("invalid_setting", message, {{"key", key}, {"argument", argument}});
}

// The groups a [pools.NAME] section may set; log and scheduler are the runtime's.
constexpr const char* pool_groups[] = {"pool", "worker", "retry", "circuit", "session", "lm"};

bool is_pool_group(const std::string& group) {
  return std::any_of(std::begin(pool_groups), std::end(pool_groups),
                     [&](const char* g) { return group == g; });
}

std::string type_name_of(const caf::config_option& opt) {
  auto t = opt.type_name();
  return std::string(t.data(), t.size());
}

/// One named pool being read: its options bound to a copy of the base settings.
struct pool_reader {
  std::string name;
  std::unique_ptr<system_config> cfg;
};

/// Stores `value` for `group.key` of pool `r` (checked by the option's type).
std::optional<error> store_pool_option(pool_reader& r, const std::string& group,
                                       const std::string& key, const caf::config_value& value,
                                       const std::string& where) {
  auto full = "pools." + r.name + "." + group + "." + key;
  if (!is_pool_group(group))
    return config_error("invalid_setting",
                        full + ": a pool sets only the groups pool, worker, retry, circuit, "
                               "session and lm (in '" + where + "')",
                        {{"key", full}});
  auto* opt = r.cfg->options().qualified_name_lookup(group, key);
  if (!opt)
    return config_error("invalid_setting", "unknown option " + full + " (in '" + where + "')",
                        {{"key", full}});
  if (auto err = opt->check(value))
    return config_error("invalid_setting",
                        full + " has an invalid value (expected " + type_name_of(*opt)
                          + ", in '" + where + "')",
                        {{"key", full}});
  opt->store(value);
  return std::nullopt;
}

/// Reads the [pools.NAME] sections of `content` and the --pools.NAME.group.key
/// arguments in `overrides` (applied after the file) into `base.pools`, each
/// pool starting from `base`'s values. @returns the first bad key, named.
std::optional<error> read_named_pools(const caf::settings& content,
                                      const std::vector<std::string>& overrides,
                                      const std::string& path, settings& base) {
  std::vector<pool_reader> readers;
  auto reader = [&](const std::string& name) -> std::optional<pool_reader*> {
    for (auto& r : readers)
      if (r.name == name)
        return &r;
    if (!valid_pool_name(name) || name == "default")
      return std::nullopt;
    readers.push_back(pool_reader{name, std::make_unique<system_config>(base)});
    return &readers.back();
  };
  auto bad_name = [](const std::string& name) {
    return config_error("invalid_setting",
                        "pools." + sanitize_utf8(name)
                          + ": a pool's name is 1 to 64 letters, digits, '_' or '-', and "
                            "'default' is the top-level pool",
                        {{"key", "pools." + sanitize_utf8(name)}});
  };
  // The file: [pools.NAME] sections of group maps, e.g. pool = { size = 2 }.
  const caf::config_value* pools_value = caf::get_if(&content, "pools");
  const auto* pools = pools_value ? caf::get_if<caf::settings>(pools_value) : nullptr;
  if (pools_value && !pools)
    return config_error("invalid_setting", "pools must hold [pools.NAME] sections (in '" + path + "')",
                        {{"key", "pools"}});
  if (pools) {
    for (auto& [name, section] : *pools) {
      auto r = reader(name);
      if (!r)
        return bad_name(name);
      auto* groups = caf::get_if<caf::settings>(&section);
      if (!groups)
        return config_error("invalid_setting",
                            "pools." + name + " must be a section of groups, e.g. [pools." + name
                              + "] with pool = { size = 2 } (in '" + path + "')",
                            {{"key", "pools." + name}});
      for (auto& [group, entries] : *groups) {
        auto* keys = caf::get_if<caf::settings>(&entries);
        if (!keys)
          return config_error("invalid_setting",
                              "pools." + name + "." + group + " must be a group of keys, e.g. "
                                + group + " = { ... } (in '" + path + "')",
                              {{"key", "pools." + name + "." + group}});
        for (auto& [key, value] : *keys)
          if (auto err = store_pool_option(**r, group, key, value, path))
            return err;
      }
    }
  }
  // The command line, after the file: --pools.NAME.group.key=value.
  for (const auto& a : overrides) {
    auto eq = a.find('=');
    auto dotted = a.substr(8, eq == std::string::npos ? std::string::npos : eq - 8);
    auto first = dotted.find('.');
    auto second = first == std::string::npos ? first : dotted.find('.', first + 1);
    if (second == std::string::npos || eq == std::string::npos)
      return config_error("invalid_setting",
                          "'" + sanitize_utf8(a) + "' is not --pools.NAME.group.key=value",
                          {{"argument", sanitize_utf8(a)}});
    auto name = dotted.substr(0, first);
    auto group = dotted.substr(first + 1, second - first - 1);
    auto key = dotted.substr(second + 1);
    auto r = reader(name);
    if (!r)
      return bad_name(name);
    auto text = a.substr(eq + 1);
    caf::config_value value{text};  // an empty string stays one
    if (is_pool_group(group) && !text.empty())
      if (auto* opt = (*r)->cfg->options().qualified_name_lookup(group, key)) {
        auto parsed = opt->parse(text);  // as CAF reads the option's type from a command line
        if (!parsed)
          return config_error("invalid_setting",
                              "pools." + name + "." + group + "." + key + " has an invalid value ('"
                                + sanitize_utf8(text) + "', expected "
                                + type_name_of(*opt) + ")",
                              {{"key", "pools." + name + "." + group + "." + key}});
        value = std::move(*parsed);
      }
    if (auto err = store_pool_option(**r, group, key, value, "command line"))
      return err;
  }
  for (auto& r : readers) {
    auto p = r.cfg->to_settings();
    p.pool_name = r.name;
    p.pools.clear();
    // Only pool groups were stored, so the runtime's own keys are base's,
    // but for the scheduler's: to_settings() reads those from CAF's content,
    // where system_config(settings) put the thread count it chose.
    p.scheduler_policy = base.scheduler_policy;
    p.scheduler_max_threads = base.scheduler_max_threads;
    base.pools.push_back(std::move(p));
  }
  std::sort(base.pools.begin(), base.pools.end(),
            [](const settings& a, const settings& b) { return a.pool_name < b.pool_name; });
  return std::nullopt;
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
  // Bounded so that naming /dev/zero or a huge file cannot exhaust memory.
  constexpr std::size_t max_config_file_bytes = 1 << 20;
  auto content = read_text_file(path, max_config_file_bytes);
  if (!content)
    return config_error("config_file_unreadable",
                        "cannot read config file '" + sanitize_utf8(path)
                          + "' (missing, not a regular file, unreadable or over "
                          + std::to_string(max_config_file_bytes) + " bytes)",
                        {{"key", "config-file"}, {"path", sanitize_utf8(path)}});
  const std::string& text = *content;
  // Checked before CAF sees them (found by fuzz_config): CAF's INI parser
  // recurses once per '[' or '{' (100k of them overflow the stack), and text
  // that is not UTF-8 would make every later dump() of the settings throw.
  constexpr std::size_t max_config_nesting = 32;
  if (!valid_utf8(text))
    return config_error("invalid_setting", "the config file '" + sanitize_utf8(path)
                                             + "' is not valid UTF-8",
                        {{"path", sanitize_utf8(path)}});
  if (json_text_depth(text, max_config_nesting) > max_config_nesting)
    return config_error("invalid_setting",
                        "the config file '" + sanitize_utf8(path) + "' nests lists or maps more than "
                          + std::to_string(max_config_nesting) + " levels deep",
                        {{"path", sanitize_utf8(path)}});
  system_config cfg;
  std::vector<std::string> cli;
  std::vector<std::string> pool_overrides;  // --pools.NAME.group.key=value
  std::vector<std::pair<const caf::config_option*, bool>> flags;  // applied after CAF's parse
  for (auto& a : args) {
    if (!valid_utf8(a))
      return config_error("invalid_setting",
                          "argument '" + sanitize_utf8(a) + "' is not valid UTF-8",
                          {{"argument", sanitize_utf8(a)}});
    if (json_text_depth(a, max_config_nesting) > max_config_nesting)
      return config_error("invalid_setting", "argument nests lists or maps too deeply",
                          {{"argument", sanitize_utf8(a.substr(0, 64))}});
    if (a.rfind("--config-file=", 0) == 0)
      continue;
    if (a.rfind("--pools.", 0) == 0) {  // CAF knows no such option: applied per pool below
      pool_overrides.push_back(a);
      continue;
    }
    // Every option takes every value of its type from the command line,
    // which CAF 0.17's own parser does not allow for two kinds: a boolean
    // is only a flag there (--circuit.enabled=false is refused), and an
    // empty value is a missing one (--lm.provider= is refused).
    auto cli_option = [&]() -> std::optional<std::pair<const caf::config_option*, std::string>> {
      if (a.rfind("--", 0) != 0)
        return std::nullopt;
      auto eq = a.find('=');
      auto name = a.substr(2, eq == std::string::npos ? std::string::npos : eq - 2);
      auto dot = name.find('.');
      if (dot == std::string::npos)
        return std::nullopt;
      auto* opt = cfg.options().qualified_name_lookup(name.substr(0, dot), name.substr(dot + 1));
      if (!opt)
        return std::nullopt;  // CAF names it: unknown option
      return std::make_pair(opt, eq == std::string::npos ? std::string{} : a.substr(eq));
    }();
    if (cli_option && cli_option->first->is_flag()) {
      const auto& value = cli_option->second;  // "", "=true" or "=false"
      if (value.empty() || value == "=true" || value == "=false") {
        flags.emplace_back(cli_option->first, value != "=false");
        continue;
      }
      auto key = a.substr(2, a.find('=') - 2);
      return config_error("invalid_setting",
                          key + " must be true or false (got '" + sanitize_utf8(value.substr(1))
                            + "')",
                          {{"key", key}, {"argument", sanitize_utf8(a)}});
    }
    if (cli_option && cli_option->second == "=" && cli_option->first->type_name() == "string") {
      cli.push_back(a + "\"\"");  // the empty string, quoted as CAF reads it
      continue;
    }
    cli.push_back(a);
  }
  {
    std::istringstream lines{text};
    std::vector<std::string> sources{cli};
    for (std::string line; std::getline(lines, line);)
      sources.push_back(line);
    for (auto& source : sources)
      if (auto literal = overflowing_duration(source))
        return config_error("invalid_setting",
                            "the duration " + *literal + " in '" + source
                              + "' is out of range (at most about 292 years)",
                            {{"value", *literal}, {"argument", source}});
  }
  std::istringstream ini{text};
  if (auto err = cfg.parse(cli, ini))
    return parse_failure(err, path);
  for (auto& [opt, on] : flags) {  // in the order given: the last one wins
    opt->store(caf::config_value{on});
    caf::put(cfg.content, opt->full_name(), on);
  }
  // CAF keeps unknown INI keys silently; a misspelled key must not be ignored.
  // A group's sub-group (node.tls) is checked as a group of its own.
  for (std::string group : {"pool", "worker", "lm", "log", "scheduler", "node", "node.tls",
                            "remote", "topology"}) {
    auto entries = caf::get_if<caf::settings>(&cfg.content, group);
    if (!entries)
      continue;
    for (auto& kv : *entries) {
      bool subgroup = caf::holds_alternative<caf::settings>(kv.second)
                      && group.find('.') == std::string::npos && group + "." + kv.first == "node.tls";
      if (!subgroup && !cfg.options().qualified_name_lookup(group, kv.first))
        return config_error("invalid_setting",
                            "unknown option " + group + "." + kv.first + " in '" + path + "'",
                            {{"key", group + "." + kv.first}, {"path", path}});
    }
  }
  if (remainder)
    *remainder = cfg.remainder;
  auto s = cfg.to_settings();
  if (auto err = read_named_pools(cfg.content, pool_overrides, path, s))
    return *err;
  if (auto err = s.validate())
    return *err;
  return s;
}

std::string describe_settings() {
  // CAF's help text covers all of its modules; keep the groups that matter here.
  system_config cfg;
  auto all = cfg.options().help_text(false);
  std::string out;
  std::size_t pos = 0;
  while (pos < all.size()) {
    auto end = all.find("\n\n", pos);
    if (end == std::string::npos)
      end = all.size();
    auto block = all.substr(pos, end - pos);
    for (auto group : {"pool options:", "worker options:", "lm options:", "log options:",
                       "retry options:", "circuit options:", "node options:",
                       "node.tls options:", "remote options:", "topology options:",
                       "scheduler options:"})
      if (block.rfind(group, 0) == 0)
        out += block + "\n\n";
    pos = end + 2;
  }
  return out;
}

} // namespace dspex
