// Configuration: the bundled INI file, command-line overrides, and bad values
// rejected at start with their key's name.
#include <unistd.h>

#include <cstdio>
#include <fstream>

#include <doctest/doctest.h>

#include "dspex/config.hpp"
#include "support/harness.hpp"

using namespace dspex;

namespace {

std::variant<settings, error> load(std::vector<std::string> args) {
  return load_settings(args, default_config_file);
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
}

TEST_CASE("an unknown option and an unreadable config file are errors") {
  CHECK(error_of({"--pool.sise=3"}).find("pool.sise") != std::string::npos);
  CHECK(error_of({"--config-file=/nonexistent/dspex.ini"}).find("/nonexistent/dspex.ini")
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
}

TEST_CASE("the settings documentation lists every group") {
  auto doc = describe_settings();
  for (auto key : {"pool.size", "pool.init_timeout", "worker.python", "lm.provider", "log.level"})
    CHECK(doc.find(key) != std::string::npos);
}
