// Configuration: the bundled INI file, command-line overrides, and bad values
// rejected at start with their key's name.
#include <unistd.h>

#include <cstdio>
#include <fstream>

#include <doctest/doctest.h>

#include "dspex/actors/system_config.hpp"
#include "dspex/config.hpp"
#include "support/harness.hpp"

using namespace dspex;

namespace {

std::variant<settings, error> load(std::vector<std::string> args) {
  return load_settings(args, bundled_config_file());
}

std::string error_of(std::vector<std::string> args) {
  auto r = load(std::move(args));
  auto* err = std::get_if<error>(&r);
  REQUIRE(err != nullptr);
  CHECK(err->category == error_category::configuration_error);
  return err->message;
}

} // namespace

TEST_CASE("the bundled config file gives the documented defaults") {
  auto r = load({});
  REQUIRE(std::holds_alternative<settings>(r));
  auto& s = std::get<settings>(r);
  settings builtin;
  CHECK(s.pool.size == 4);
  CHECK(s.pool.size == builtin.pool.size);
  CHECK(s.pool.init_timeout == builtin.pool.init_timeout);
  CHECK(s.pool.request_timeout == builtin.pool.request_timeout);
  CHECK(s.pool.max_frame_bytes == builtin.pool.max_frame_bytes);
  CHECK(s.worker.python == builtin.worker.python);
  CHECK(s.worker.script == builtin.worker.script);
  CHECK(s.worker.shutdown_grace == builtin.worker.shutdown_grace);
  CHECK(s.worker.kill_grace == builtin.worker.kill_grace);
  CHECK(s.lm.provider == "mock");
  CHECK(s.log_level == "info");
  CHECK(s.scheduler_policy == "sharing");
}

TEST_CASE("command-line overrides win over the file") {
  auto r = load({"--pool.size=8", "--pool.init_timeout=2500ms", "--scheduler.policy=stealing",
                 "--worker.extra_args=[\"--test-commands\"]", "--lm.provider=\"\""});
  REQUIRE(std::holds_alternative<settings>(r));
  auto& s = std::get<settings>(r);
  CHECK(s.pool.size == 8);
  CHECK(s.pool.init_timeout == std::chrono::milliseconds{2500});
  CHECK(s.scheduler_policy == "stealing");
  REQUIRE(s.worker.extra_args.size() == 1);
  CHECK(s.worker.extra_args[0] == "--test-commands");
  CHECK(s.lm.provider.empty());
}

TEST_CASE("bad values are rejected with the key's name") {
  CHECK(error_of({"--pool.size=0"}).find("pool.size") != std::string::npos);
  CHECK(error_of({"--pool.size=5000"}).find("pool.size") != std::string::npos);
  CHECK(error_of({"--pool.size=abc"}).find("pool.size") != std::string::npos);
  CHECK(error_of({"--pool.init_timeout=0s"}).find("pool.init_timeout") != std::string::npos);
  CHECK(error_of({"--worker.python=\"/nonexistent/python3\""}).find("worker.python")
        != std::string::npos);
  CHECK(error_of({"--worker.script=\"/nonexistent/w.py\""}).find("worker.script")
        != std::string::npos);
  CHECK(error_of({"--log.level=\"loud\""}).find("log.level") != std::string::npos);
  CHECK(error_of({"--scheduler.policy=fastest"}).find("scheduler.policy") != std::string::npos);
  CHECK(error_of({"--lm.temperature=9.5"}).find("lm.temperature") != std::string::npos);
  // CAF wraps an int64-nanosecond overflow around (this was 290 ms).
  CHECK(error_of({"--pool.init_timeout=18446744074s"}).find("pool.init_timeout=18446744074s")
        != std::string::npos);
  CHECK(error_of({"--pool.health_interval=99999999999999999999999h"}).find("out of range")
        != std::string::npos);
  // The longest that fits is still accepted, and read as written.
  auto longest = load({"--pool.max_age=2562047h"});
  REQUIRE(std::holds_alternative<settings>(longest));
  CHECK(std::get<settings>(longest).pool.max_age == std::chrono::hours{2562047});
}

TEST_CASE("an unknown option and an unreadable config file are errors") {
  CHECK(error_of({"--pool.sise=3"}).find("pool.sise") != std::string::npos);
  CHECK(error_of({"--config-file=/nonexistent/dspex.ini"}).find("/nonexistent/dspex.ini")
        != std::string::npos);
  // A directory opens but cannot be read: refused, not thrown (EISDIR out of
  // std::istreambuf_iterator used to escape load_settings).
  CHECK(error_of({"--config-file=/tmp"}).find("cannot read config file '/tmp'")
        != std::string::npos);
  // Larger than any config file: refused before it is read whole.
  CHECK(error_of({"--config-file=/dev/zero"}).find("cannot read config file")
        != std::string::npos);
}

namespace {

std::string error_of_file(const std::string& content) {
  auto path = std::string{"/tmp/dspex-test-config-"} + std::to_string(::getpid()) + ".ini";
  {
    std::ofstream out{path};
    out << content;
  }
  auto msg = error_of({"--config-file=" + path});
  std::remove(path.c_str());
  return msg;
}

} // namespace

TEST_CASE("a config file with a bad value, a misspelled key or bad syntax is rejected") {
  CHECK(error_of_file("[pool]\nsize=0\n").find("pool.size") != std::string::npos);
  CHECK(error_of_file("[pool]\nsise=3\n").find("pool.sise") != std::string::npos);
  CHECK(error_of_file("[lm]\nprovider=mock\n").find("line 2") != std::string::npos);
  CHECK(error_of_file("[pool]\ninit_timeout = 300000000000min\n").find("out of range")
        != std::string::npos);
}

TEST_CASE("the settings documentation lists every group") {
  auto doc = describe_settings();
  for (auto key : {"pool.size", "pool.init_timeout", "worker.python", "lm.provider", "log.level"})
    CHECK(doc.find(key) != std::string::npos);
}

TEST_CASE("the bundled config file states every built-in default of the issue-4 keys") {
  auto r = load({});
  REQUIRE(std::holds_alternative<settings>(r));
  // The whole settings, key by key: the file and the built-in defaults agree.
  CHECK(to_json(std::get<settings>(r)) == to_json(settings{}));
}

TEST_CASE("supervision, health, recycling, retry and circuit keys are read and checked") {
  auto r = load({"--pool.restart_backoff_base=50ms", "--pool.restart_backoff_max=1s",
                 "--pool.broken_after=5", "--pool.health_interval=2s",
                 "--pool.health_timeout=250ms", "--pool.health_max_failures=2",
                 "--pool.max_requests=1000", "--pool.max_requests_jitter=0.25",
                 "--pool.max_age=1h", "--pool.max_rss_mb=512", "--retry.max_attempts=5",
                 "--retry.strategy=\"fibonacci\"", "--retry.base_delay=10ms",
                 "--retry.max_delay=300ms", "--retry.jitter=0",
                 "--circuit.failure_threshold=7", "--circuit.open_timeout=500ms",
                 "--circuit.failure_window=0s", "--circuit.half_open_probes=2",
                 "--circuit.success_threshold=3"});
  REQUIRE(std::holds_alternative<settings>(r));
  auto& s = std::get<settings>(r);
  CHECK(s.pool.restart_backoff_base == std::chrono::milliseconds{50});
  CHECK(s.pool.restart_backoff_max == std::chrono::seconds{1});
  CHECK(s.pool.broken_after == 5);
  CHECK(s.pool.health_interval == std::chrono::seconds{2});
  CHECK(s.pool.health_timeout == std::chrono::milliseconds{250});
  CHECK(s.pool.health_max_failures == 2);
  CHECK(s.pool.max_requests == 1000);
  CHECK(s.pool.max_requests_jitter == doctest::Approx(0.25));
  CHECK(s.pool.max_age == std::chrono::hours{1});
  CHECK(s.pool.max_rss_mb == 512);
  CHECK(s.retry.max_attempts == 5);
  CHECK(s.retry.strategy == "fibonacci");
  CHECK(s.retry.base_delay == std::chrono::milliseconds{10});
  CHECK(s.retry.max_delay == std::chrono::milliseconds{300});
  CHECK(s.retry.jitter == 0);
  CHECK(s.circuit.failure_threshold == 7);
  CHECK(s.circuit.open_timeout == std::chrono::milliseconds{500});
  CHECK(s.circuit.failure_window == std::chrono::milliseconds{0});
  CHECK(s.circuit.half_open_probes == 2);
  CHECK(s.circuit.success_threshold == 3);

  CHECK(error_of({"--retry.strategy=\"random\""}).find("retry.strategy") != std::string::npos);
  CHECK(error_of({"--pool.max_requests_jitter=2"}).find("pool.max_requests_jitter")
        != std::string::npos);
  CHECK(error_of({"--pool.restart_backoff_max=10ms"}).find("pool.restart_backoff_max")
        != std::string::npos);
  CHECK(error_of({"--pool.health_timeout=0s"}).find("pool.health_timeout") != std::string::npos);
  CHECK(error_of({"--pool.broken_after=0"}).find("pool.broken_after") != std::string::npos);
  CHECK(error_of({"--retry.max_attempts=0"}).find("retry.max_attempts") != std::string::npos);
  CHECK(error_of({"--circuit.success_threshold=0"}).find("circuit.success_threshold")
        != std::string::npos);
}

TEST_CASE("every option takes every value of its type from the command line") {
  // A boolean both ways, in the order given (CAF's own parser only knows the bare flag).
  auto r = load({"--circuit.enabled=false", "--pool.use_safe_port_connect=false"});
  REQUIRE(std::holds_alternative<settings>(r));
  CHECK_FALSE(std::get<settings>(r).circuit.enabled);
  CHECK_FALSE(std::get<settings>(r).pool.use_safe_port_connect);
  r = load({"--circuit.enabled=false", "--circuit.enabled=true"});
  REQUIRE(std::holds_alternative<settings>(r));
  CHECK(std::get<settings>(r).circuit.enabled);
  r = load({"--circuit.enabled=false", "--circuit.enabled"});
  REQUIRE(std::holds_alternative<settings>(r));
  CHECK(std::get<settings>(r).circuit.enabled);
  r = load({"--worker.test_commands"});
  REQUIRE(std::holds_alternative<settings>(r));
  CHECK(std::get<settings>(r).worker.test_commands);
  auto bad = error_of({"--circuit.enabled=maybe"});
  CHECK(bad.find("circuit.enabled must be true or false") != std::string::npos);
  CHECK(bad.find("maybe") != std::string::npos);

  // An empty string, unquoted as a shell passes it.
  r = load({"--lm.provider="});
  REQUIRE(std::holds_alternative<settings>(r));
  CHECK(std::get<settings>(r).lm.provider.empty());

  // Every boolean and every string option of every group: a false, a true
  // and an empty value are read (an empty one may still be refused by the
  // option's own rule, with its name, but never as a missing argument).
  system_config probe;
  std::size_t flags = 0;
  std::size_t strings = 0;
  for (auto& opt : probe.options()) {
    std::string name{opt.full_name().data(), opt.full_name().size()};
    if (name.rfind("pool.", 0) != 0 && name.rfind("worker.", 0) != 0 && name.rfind("lm.", 0) != 0
        && name.rfind("log.", 0) != 0 && name.rfind("retry.", 0) != 0
        && name.rfind("circuit.", 0) != 0 && name.rfind("session.", 0) != 0)
      continue;
    CAPTURE(name);
    if (opt.is_flag()) {
      ++flags;
      CHECK(std::holds_alternative<settings>(load({"--" + name + "=false"})));
      CHECK(std::holds_alternative<settings>(load({"--" + name + "=true"})));
    } else if (opt.type_name() == "string") {
      ++strings;
      auto empty = load({"--" + name + "="});
      if (auto* err = std::get_if<error>(&empty)) {
        CHECK(err->message.find(name) != std::string::npos);
        CHECK(err->message.find("missing argument") == std::string::npos);
      }
    }
  }
  CHECK(flags >= 3);    // circuit.enabled, pool.use_safe_port_connect, worker.test_commands, ...
  CHECK(strings >= 5);  // worker.python, worker.script, lm.provider, lm.model, log.level, ...
}

namespace {

/// Loads `content` as the config file, with `args` after it.
std::variant<settings, error> load_file(const std::string& content, std::vector<std::string> args = {}) {
  auto path = std::string{"/tmp/dspex-test-pools-"} + std::to_string(::getpid()) + ".ini";
  {
    std::ofstream out{path};
    out << content;
  }
  args.push_back("--config-file=" + path);
  auto r = load(std::move(args));
  std::remove(path.c_str());
  return r;
}

std::string pool_error(const std::string& content, std::vector<std::string> args = {}) {
  auto r = load_file(content, std::move(args));
  auto* err = std::get_if<error>(&r);
  REQUIRE_MESSAGE(err != nullptr, "accepted: " << content);
  CHECK(err->category == error_category::configuration_error);
  return err->message;
}

} // namespace

TEST_CASE("[pools.NAME] sections declare named pools that start from the default pool's values") {
  auto r = load_file("[pool]\nsize=2\nmax_requests=500\n[lm]\nmodel=\"fast\"\n[log]\nlevel=\"warn\"\n"
                     "[pools.qa]\npool={size=3, request_timeout=5s}\nlm={temperature=0.0}\n"
                     "session={affinity=\"strict_queue\"}\n"
                     "[pools.batch]\nworker={extra_args=[\"--x\"]}\n",
                     {"--pools.qa.pool.size=4", "--pools.cli.lm.provider=", "--pools.batch.circuit.enabled=false"});
  REQUIRE_MESSAGE(std::holds_alternative<settings>(r), std::get<error>(r).message);
  auto& s = std::get<settings>(r);
  CHECK(s.pool_name == "default");
  CHECK(s.pool_names() == std::vector<std::string>{"default", "batch", "cli", "qa"});
  const auto* qa = s.find_pool("qa");
  REQUIRE(qa != nullptr);
  CHECK(qa->pool_name == "qa");
  CHECK(qa->pool.size == 4);  // the command line wins over the file
  CHECK(qa->pool.request_timeout == std::chrono::seconds{5});
  CHECK(qa->pool.max_requests == 500);  // not set: the default pool's value
  CHECK(qa->lm.model == "fast");
  CHECK(qa->lm.temperature == 0.0);
  CHECK(qa->session.affinity == "strict_queue");
  CHECK(qa->log_level == "warn");  // the runtime's
  CHECK(qa->pools.empty());
  CHECK(s.find_pool("batch")->worker.extra_args == std::vector<std::string>{"--x"});
  CHECK_FALSE(s.find_pool("batch")->circuit.enabled);
  CHECK(s.find_pool("cli")->lm.provider.empty());
  CHECK(s.find_pool("cli")->pool.size == 2);
  CHECK(s.find_pool("") == &s);
  CHECK(s.find_pool("default") == &s);
  CHECK(s.find_pool("nope") == nullptr);
  CHECK(s.pool.size == 2);  // the default pool is untouched
  CHECK(s.session.affinity == "hint");
  auto j = to_json(s);
  CHECK(j["pools"]["qa"]["pool"]["size"] == 4);
  CHECK_FALSE(j["pools"]["qa"].contains("log"));
}

TEST_CASE("a bad [pools.NAME] key, group, value or name is refused with its full key") {
  CHECK(pool_error("[pools.qa]\npool={sise=3}\n").find("unknown option pools.qa.pool.sise")
        != std::string::npos);
  CHECK(pool_error("[pools.qa]\npool={size=0}\n").find("pools.qa.pool.size must be between")
        != std::string::npos);
  CHECK(pool_error("[pools.qa]\npool={size=\"big\"}\n").find("pools.qa.pool.size has an invalid value")
        != std::string::npos);
  CHECK(pool_error("[pools.qa]\nlog={level=\"debug\"}\n").find("a pool sets only the groups")
        != std::string::npos);
  CHECK(pool_error("[pools.qa]\nsize=3\n").find("pools.qa.size must be a group of keys")
        != std::string::npos);
  CHECK(pool_error("[pools.default]\npool={size=3}\n").find("'default' is the top-level pool")
        != std::string::npos);
  CHECK(pool_error("[pools]\nqa=3\n").find("pools.qa must be a section of groups")
        != std::string::npos);
  CHECK(pool_error("", {"--pools.qa.pool.size=abc"}).find("pools.qa.pool.size has an invalid value")
        != std::string::npos);
  CHECK(pool_error("", {"--pools.qa.size=3"}).find("is not --pools.NAME.group.key=value")
        != std::string::npos);
  CHECK(pool_error("", {"--pools.qa.pool.size"}).find("is not --pools.NAME.group.key=value")
        != std::string::npos);
  CHECK(pool_error("", {"--pools.q$a.pool.size=2"}).find("a pool's name is 1 to 64")
        != std::string::npos);
  CHECK(pool_error("", {"--pools.qa.worker.python=/nonexistent/py"}).find("pools.qa.worker.python")
        != std::string::npos);
}

TEST_CASE("nodes: plaintext only on loopback, remote.nodes as host:port, bounds checked") {
  auto r = load({"--node.publish", "--node.port=4242", "--remote.nodes=[\"127.0.0.1:4243\", \"localhost:1\"]",
                 "--remote.status_interval=250ms"});
  REQUIRE_MESSAGE(std::holds_alternative<settings>(r), std::get<error>(r).message);
  auto& s = std::get<settings>(r);
  CHECK(s.node.publish);
  CHECK(s.node.port == 4242);
  CHECK(s.node.bind == "127.0.0.1");
  CHECK(s.remote.nodes == std::vector<std::string>{"127.0.0.1:4243", "localhost:1"});
  CHECK(s.remote.status_interval == std::chrono::milliseconds{250});
  CHECK(to_json(s)["remote"]["nodes"].size() == 2);
  CHECK(error_of({"--node.publish", "--node.bind=0.0.0.0"}).find("not a loopback address")
        != std::string::npos);
  CHECK(error_of({"--node.publish", "--node.bind=10.1.2.3"}).find("TLS") != std::string::npos);
  CHECK(error_of({"--remote.nodes=[\"10.0.0.5:4242\"]"}).find("not a loopback address")
        != std::string::npos);
  CHECK(error_of({"--remote.nodes=[\"127.0.0.1\"]"}).find("host:port") != std::string::npos);
  CHECK(error_of({"--remote.nodes=[\"127.0.0.1:0\"]"}).find("host:port") != std::string::npos);
  CHECK(error_of({"--remote.nodes=[\"127.0.0.1:99999\"]"}).find("host:port") != std::string::npos);
  CHECK(error_of({"--remote.nodes=[\"127.0.0.1:x\"]"}).find("host:port") != std::string::npos);
  CHECK(error_of({"--remote.status_interval=0s"}).find("remote.status_interval") != std::string::npos);
  CHECK(error_of({"--remote.reconnect_base=2s", "--remote.reconnect_max=1s"}).find("remote.reconnect_max")
        != std::string::npos);
  // Partition detection: on by default, and never quicker than two heartbeats.
  CHECK(s.remote.heartbeat_interval == std::chrono::seconds{1});
  CHECK(s.remote.partition_timeout == std::chrono::seconds{5});
  auto beats = load({"--remote.heartbeat_interval=200ms", "--remote.partition_timeout=400ms"});
  REQUIRE_MESSAGE(std::holds_alternative<settings>(beats), std::get<error>(beats).message);
  CHECK(std::get<settings>(beats).remote.heartbeat_interval == std::chrono::milliseconds{200});
  CHECK(std::get<settings>(beats).remote.partition_timeout == std::chrono::milliseconds{400});
  CHECK(to_json(std::get<settings>(beats))["remote"]["partition_timeout"] == "400ms");
  auto never = load({"--remote.heartbeat_interval=0s", "--remote.partition_timeout=0s"});
  CHECK(std::holds_alternative<settings>(never));
  CHECK(error_of({"--remote.heartbeat_interval=200ms", "--remote.partition_timeout=399ms"})
          .find("at least twice remote.heartbeat_interval")
        != std::string::npos);
  CHECK(error_of({"--remote.heartbeat_interval=0s"}).find("needs remote.heartbeat_interval")
        != std::string::npos);
  CHECK(settings::is_loopback("127.0.0.1"));
  CHECK(settings::is_loopback("127.255.0.9"));
  CHECK(settings::is_loopback("::1"));
  CHECK(settings::is_loopback("localhost"));
  CHECK_FALSE(settings::is_loopback("127.0.0.256"));
  CHECK_FALSE(settings::is_loopback("127.0.0"));
  CHECK_FALSE(settings::is_loopback("127.0.0.1.example.com"));
  CHECK_FALSE(settings::is_loopback("128.0.0.1"));
  CHECK_FALSE(settings::is_loopback(""));
}
