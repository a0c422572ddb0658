#include "dspex/settings.hpp"

#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <fstream>

#include <fmt/format.h>

#include "dspex/backoff.hpp"
#include "dspex/json_limits.hpp"

namespace dspex {

namespace {

error bad(const std::string& key, const std::string& what) {
  return make_error(error_category::configuration_error, "invalid_setting",
                    fmt::format("{} {}", key, what), {{"key", key}});
}

bool positive(settings::ms d) {
  return d.count() > 0;
}

// POSIX's portable names: a letter or '_', then letters, digits and '_'.
bool valid_env_name(const std::string& name) {
  if (name.empty() || name.size() > 255 || (name[0] >= '0' && name[0] <= '9'))
    return false;
  for (char c : name)
    if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_'))
      return false;
  return true;
}

} // namespace

nlohmann::json to_json(const settings& s) {
  auto ms = [](settings::ms d) { return std::to_string(d.count()) + "ms"; };
  nlohmann::json j = {
    {"pool",
     {{"size", s.pool.size},
      {"init_timeout", ms(s.pool.init_timeout)},
      {"request_timeout", ms(s.pool.request_timeout)},
      {"max_frame_bytes", s.pool.max_frame_bytes},
      {"max_json_depth", s.pool.max_json_depth},
      {"max_overflow", s.pool.max_overflow},
      {"overflow_idle_delay", ms(s.pool.overflow_idle_delay)},
      {"lazy", s.pool.lazy},
      {"strategy", s.pool.strategy},
      {"max_queue", s.pool.max_queue},
      {"failure_threshold", s.pool.failure_threshold},
      {"use_safe_port_connect", s.pool.use_safe_port_connect},
      {"restart_backoff_base", ms(s.pool.restart_backoff_base)},
      {"restart_backoff_max", ms(s.pool.restart_backoff_max)},
      {"broken_after", s.pool.broken_after},
      {"health_interval", ms(s.pool.health_interval)},
      {"health_timeout", ms(s.pool.health_timeout)},
      {"health_max_failures", s.pool.health_max_failures},
      {"max_requests", s.pool.max_requests},
      {"max_requests_jitter", s.pool.max_requests_jitter},
      {"max_age", ms(s.pool.max_age)},
      {"max_rss_mb", s.pool.max_rss_mb}}},
    {"worker",
     {{"python", s.worker.python},
      {"script", s.worker.script},
      {"extra_args", s.worker.extra_args},
      {"test_commands", s.worker.test_commands},
      {"shutdown_grace", ms(s.worker.shutdown_grace)},
      {"kill_grace", ms(s.worker.kill_grace)}}},
    {"retry",
     {{"max_attempts", s.retry.max_attempts},
      {"strategy", s.retry.strategy},
      {"base_delay", ms(s.retry.base_delay)},
      {"max_delay", ms(s.retry.max_delay)},
      {"jitter", s.retry.jitter}}},
    {"circuit",
     {{"enabled", s.circuit.enabled},
      {"failure_threshold", s.circuit.failure_threshold},
      {"failure_window", ms(s.circuit.failure_window)},
      {"open_timeout", ms(s.circuit.open_timeout)},
      {"half_open_probes", s.circuit.half_open_probes},
      {"success_threshold", s.circuit.success_threshold}}},
    {"session",
     {{"ttl", ms(s.session.ttl)},
      {"sweep_interval", ms(s.session.sweep_interval)},
      {"max_sessions", s.session.max_sessions},
      {"affinity", s.session.affinity},
      {"max_anonymous_programs", s.session.max_anonymous_programs}}},
    {"lm",
     {{"provider", s.lm.provider},
      {"model", s.lm.model},
      {"temperature", s.lm.temperature},
      {"api_key_env", s.lm.api_key_env}}},
    {"log",
     {{"level", s.log_level},
      {"format", s.log_format},
      {"worker_level", s.log_worker_level},
      {"file", s.log_file},
      {"file_max_bytes", s.log_file_max_bytes},
      {"file_count", s.log_file_count}}},
    {"scheduler", {{"policy", s.scheduler_policy}, {"max-threads", s.scheduler_max_threads}}},
    {"node",
     {{"publish", s.node.publish},
      {"bind", s.node.bind},
      {"port", s.node.port},
      {"tls",
       {{"certificate", s.node.tls.certificate},
        {"key", s.node.tls.key},
        {"ca_file", s.node.tls.ca_file}}}}},
    {"topology", {{"nodes", s.topology_nodes}}},
    {"remote",
     {{"nodes", s.remote.nodes},
      {"status_interval", ms(s.remote.status_interval)},
      {"connect_timeout", ms(s.remote.connect_timeout)},
      {"reconnect_base", ms(s.remote.reconnect_base)},
      {"reconnect_max", ms(s.remote.reconnect_max)},
      {"heartbeat_interval", ms(s.remote.heartbeat_interval)},
      {"partition_timeout", ms(s.remote.partition_timeout)}}},
  };
  // A named pool shows its own groups only (log and scheduler are the runtime's).
  if (!s.pools.empty()) {
    auto& pools = j["pools"] = nlohmann::json::object();
    for (const auto& p : s.pools) {
      auto full = to_json(p);
      full.erase("log");
      full.erase("scheduler");
      full.erase("node");
      full.erase("remote");
      full.erase("topology");
      pools[p.pool_name] = std::move(full);
    }
  }
  return j;
}

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
  if (pool.max_json_depth < 2 || pool.max_json_depth > max_json_depth_limit)
    return bad("pool.max_json_depth", fmt::format("must be between 2 and {} (got {})",
                                                  max_json_depth_limit, pool.max_json_depth));
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
  if (pool.restart_backoff_base.count() < 0)
    return bad("pool.restart_backoff_base", "must not be negative");
  if (pool.restart_backoff_max < pool.restart_backoff_base)
    return bad("pool.restart_backoff_max", "must not be below pool.restart_backoff_base");
  if (pool.broken_after < 1)
    return bad("pool.broken_after", "must be at least 1");
  if (pool.health_interval.count() < 0)
    return bad("pool.health_interval", "must not be negative (0 turns health checks off)");
  if (!positive(pool.health_timeout))
    return bad("pool.health_timeout", "must be positive");
  if (pool.health_max_failures < 1)
    return bad("pool.health_max_failures", "must be at least 1");
  if (pool.max_requests_jitter < 0 || pool.max_requests_jitter > 1)
    return bad("pool.max_requests_jitter",
               fmt::format("must be between 0 and 1 (got {})", pool.max_requests_jitter));
  if (pool.max_age.count() < 0)
    return bad("pool.max_age", "must not be negative (0 turns it off)");
  if (retry.max_attempts < 1 || retry.max_attempts > 100)
    return bad("retry.max_attempts",
               fmt::format("must be between 1 and 100 (got {})", retry.max_attempts));
  if (!backoff_kind_from_string(retry.strategy))
    return bad("retry.strategy",
               fmt::format("must be exponential, linear, fibonacci or decorrelated_jitter (got '{}')",
                           retry.strategy));
  if (retry.base_delay.count() < 0)
    return bad("retry.base_delay", "must not be negative");
  if (retry.max_delay < retry.base_delay)
    return bad("retry.max_delay", "must not be below retry.base_delay");
  if (retry.jitter < 0 || retry.jitter > 1)
    return bad("retry.jitter", fmt::format("must be between 0 and 1 (got {})", retry.jitter));
  if (circuit.failure_threshold < 1)
    return bad("circuit.failure_threshold", "must be at least 1");
  if (circuit.failure_window.count() < 0)
    return bad("circuit.failure_window", "must not be negative (0 = no window)");
  if (circuit.open_timeout.count() < 0)
    return bad("circuit.open_timeout", "must not be negative");
  if (circuit.half_open_probes < 1)
    return bad("circuit.half_open_probes", "must be at least 1");
  if (circuit.success_threshold < 1)
    return bad("circuit.success_threshold", "must be at least 1");
  if (!positive(session.ttl))
    return bad("session.ttl", "must be positive");
  if (!positive(session.sweep_interval))
    return bad("session.sweep_interval", "must be positive");
  if (session.max_sessions < 1 || session.max_sessions > 10'000'000)
    return bad("session.max_sessions",
               fmt::format("must be between 1 and 10000000 (got {})", session.max_sessions));
  if (session.max_anonymous_programs < 1 || session.max_anonymous_programs > 10'000'000)
    return bad("session.max_anonymous_programs",
               fmt::format("must be between 1 and 10000000 (got {})",
                           session.max_anonymous_programs));
  if (session.affinity != "hint" && session.affinity != "strict_queue"
      && session.affinity != "strict_fail_fast")
    return bad("session.affinity",
               fmt::format("must be 'hint', 'strict_queue' or 'strict_fail_fast' (got '{}')",
                           session.affinity));
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
  if (!lm.api_key_env.empty()) {
    // A name only: its value is never read here, only whether there is one.
    if (!valid_env_name(lm.api_key_env))
      return bad("lm.api_key_env",
                 fmt::format("must name an environment variable (letters, digits, '_'; got '{}')",
                             sanitize_utf8(lm.api_key_env)));
    const char* value = std::getenv(lm.api_key_env.c_str());
    if (value == nullptr || *value == '\0')
      return bad("lm.api_key_env",
                 fmt::format("names {}, which is not set in this process's environment (the "
                             "workers read the LM's key from it)",
                             lm.api_key_env));
  }
  // A pair, not a structured binding: C++17 lambdas may not capture bindings (clang refuses).
  for (const auto& entry : {std::pair<const char*, const std::string*>{"log.level", &log_level},
                            {"log.worker_level", &log_worker_level}}) {
    static const char* levels[] = {"trace", "debug", "info", "warn", "error", "critical", "off"};
    const std::string& level = *entry.second;
    if (std::none_of(std::begin(levels), std::end(levels), [&](const char* l) { return level == l; }))
      return bad(entry.first, fmt::format("must be one of trace, debug, info, warn, error, critical, off "
                                          "(got '{}')", level));
  }
  if (log_format != "text" && log_format != "json")
    return bad("log.format", fmt::format("must be 'text' or 'json' (got '{}')", log_format));
  if (log_file_max_bytes < 4096 || log_file_max_bytes > (std::size_t{1} << 40))
    return bad("log.file_max_bytes",
               fmt::format("must be between 4096 and 1099511627776 (got {})", log_file_max_bytes));
  if (log_file_count < 1 || log_file_count > 100)
    return bad("log.file_count", fmt::format("must be between 1 and 100 (got {})", log_file_count));
  if (scheduler_policy != "sharing" && scheduler_policy != "stealing")
    return bad("scheduler.policy",
               fmt::format("must be 'sharing' or 'stealing' (got '{}')", scheduler_policy));
  if (scheduler_max_threads > 256)
    return bad("scheduler.max-threads",
               fmt::format("must be between 0 and 256 (got {})", scheduler_max_threads));
  {
    const auto& t = node.tls;
    auto set = !t.certificate.empty() + !t.key.empty() + !t.ca_file.empty();
    if (set != 0 && set != 3)
      return bad("node.tls", "needs certificate, key and ca_file together (or none of them)");
    for (auto [key, path] : {std::pair<const char*, const std::string*>{"node.tls.certificate", &t.certificate},
                             {"node.tls.key", &t.key},
                             {"node.tls.ca_file", &t.ca_file}})
      if (!path->empty() && ::access(path->c_str(), R_OK) != 0)
        return bad(key, fmt::format("names '{}', which cannot be read", sanitize_utf8(*path)));
  }
  if (node.publish && !node.tls_enabled() && !is_loopback(node.bind))
    return bad("node.bind",
               fmt::format("is '{}', not a loopback address: a node serves other machines only over "
                           "TLS with mutual certificates (set node.tls.certificate, key and "
                           "ca_file), or bind to 127.0.0.1",
                           sanitize_utf8(node.bind)));
  for (const auto& peer : remote.nodes) {
    auto colon = peer.rfind(':');
    auto host = colon == std::string::npos ? std::string{} : peer.substr(0, colon);
    auto port = colon == std::string::npos ? std::string{} : peer.substr(colon + 1);
    bool port_ok = !port.empty() && port.size() <= 5
                   && std::all_of(port.begin(), port.end(), [](char c) { return c >= '0' && c <= '9'; })
                   && std::stoul(port) >= 1 && std::stoul(port) <= 65535;
    if (host.empty() || !port_ok)
      return bad("remote.nodes", fmt::format("must list \"host:port\" entries (got '{}')",
                                             sanitize_utf8(peer)));
    if (!node.tls_enabled() && !is_loopback(host))
      return bad("remote.nodes",
                 fmt::format("names '{}', not a loopback address: other machines are reached only "
                             "over TLS with mutual certificates (set node.tls.certificate, key and "
                             "ca_file)",
                             sanitize_utf8(peer)));
  }
  if (!positive(remote.status_interval))
    return bad("remote.status_interval", "must be positive");
  if (!positive(remote.connect_timeout))
    return bad("remote.connect_timeout", "must be positive");
  if (remote.reconnect_base.count() < 0)
    return bad("remote.reconnect_base", "must not be negative");
  if (remote.reconnect_max < remote.reconnect_base)
    return bad("remote.reconnect_max", "must not be below remote.reconnect_base");
  if (remote.heartbeat_interval.count() < 0)
    return bad("remote.heartbeat_interval", "must not be negative (0 = no heartbeats)");
  if (remote.partition_timeout.count() < 0)
    return bad("remote.partition_timeout", "must not be negative (0 = never)");
  // Silence is measured between heartbeats: without them every quiet link
  // would look partitioned, and one late heartbeat must not drop a link.
  if (positive(remote.partition_timeout) && !positive(remote.heartbeat_interval))
    return bad("remote.partition_timeout", "needs remote.heartbeat_interval (it is 0)");
  if (positive(remote.partition_timeout) && remote.partition_timeout < 2 * remote.heartbeat_interval)
    return bad("remote.partition_timeout", "must be at least twice remote.heartbeat_interval");
  if (!pools.empty() && pool_name != "default")
    return bad("pools", "may only be declared at the top level (a named pool has no pools)");
  std::vector<std::string> seen;
  for (const auto& p : pools) {
    auto key = "pools." + sanitize_utf8(p.pool_name);
    if (!valid_pool_name(p.pool_name))
      return bad(key, "is not a valid pool name (1 to 64 letters, digits, '_' or '-')");
    if (p.pool_name == "default")
      return bad(key, "is reserved: the top-level keys configure the pool 'default'");
    if (std::find(seen.begin(), seen.end(), p.pool_name) != seen.end())
      return bad(key, "is declared twice");
    seen.push_back(p.pool_name);
    if (!p.pools.empty())
      return bad(key, "must not declare pools of its own");
    if (auto err = p.validate()) {
      // The error names the key as written in the file: pools.NAME.group.key.
      auto e = *err;
      auto inner = e.context.value("key", std::string{});
      e.context["key"] = key + "." + inner;
      e.context["pool"] = p.pool_name;
      e.message = key + "." + e.message;
      return e;
    }
  }
  return std::nullopt;
}

bool settings::is_loopback(const std::string& host) noexcept {
  if (host == "localhost" || host == "::1" || host == "[::1]")
    return true;
  // 127.0.0.0/8, written as four decimal parts.
  if (host.rfind("127.", 0) != 0)
    return false;
  int parts = 0;
  std::size_t pos = 0;
  while (pos <= host.size()) {
    auto end = host.find('.', pos);
    auto part = host.substr(pos, end == std::string::npos ? std::string::npos : end - pos);
    if (part.empty() || part.size() > 3
        || !std::all_of(part.begin(), part.end(), [](char c) { return c >= '0' && c <= '9'; })
        || std::stoi(part) > 255)
      return false;
    ++parts;
    if (end == std::string::npos)
      break;
    pos = end + 1;
  }
  return parts == 4;
}

bool valid_pool_name(const std::string& name) noexcept {
  if (name.empty() || name.size() > 64)
    return false;
  return std::all_of(name.begin(), name.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-';
  });
}

const settings* settings::find_pool(const std::string& name) const noexcept {
  if (name.empty() || name == pool_name)
    return this;
  for (const auto& p : pools)
    if (p.pool_name == name)
      return &p;
  return nullptr;
}

std::vector<std::string> settings::pool_names() const {
  std::vector<std::string> names{pool_name};
  for (const auto& p : pools)
    names.push_back(p.pool_name);
  return names;
}

std::vector<std::string> settings::worker_args(const std::string& worker_id,
                                               const std::string& mode) const {
  // The worker enforces the same frame and nesting bounds on what it reads.
  std::vector<std::string> args{worker.script,
                                "--mode",
                                mode,
                                "--worker-id",
                                worker_id,
                                "--max-frame-bytes",
                                std::to_string(pool.max_frame_bytes),
                                "--max-json-depth",
                                std::to_string(pool.max_json_depth)};
  if (worker.test_commands)
    args.emplace_back("--test-commands");
  args.insert(args.end(), worker.extra_args.begin(), worker.extra_args.end());
  return args;
}

} // namespace dspex
