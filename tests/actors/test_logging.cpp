// Logs people can read and machines can parse (issue 12, item 6): one line
// per event, one worker id per worker line, log.format=json, the workers'
// stderr at its own level, and log.file rotated.
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include "dspex/logging.hpp"
#include "dspex/runtime.hpp"
#include "support/harness.hpp"
#include "support/scratch_dir.hpp"

using namespace dspex;
using namespace dspex::testing;

namespace {

std::vector<std::string> lines_of(const std::filesystem::path& file) {
  std::vector<std::string> out;
  std::ifstream in{file};
  for (std::string line; std::getline(in, line);)
    out.push_back(line);
  return out;
}

std::size_t count_containing(const std::vector<std::string>& lines, const std::string& what) {
  std::size_t n = 0;
  for (auto& l : lines)
    n += l.find(what) != std::string::npos ? 1 : 0;
  return n;
}

/// Puts the process-wide logger back as the other suites expect it.
struct restore_logging {
  ~restore_logging() { (void)configure_logging(test_settings(1)); }
};

} // namespace

TEST_CASE("log.file in text: one line per event and one worker id per worker line") {
  restore_logging restore;
  scratch_dir dir;
  auto s = test_settings(2);
  s.log_level = "info";  // test_settings' is warn
  s.log_file = (dir.path / "dspex.log").string();
  {
    auto rt = start_runtime(s);
    REQUIRE(rt->execute_anonymous("ping").ok());
    stop_and_check_no_children(*rt);
  }
  auto lines = lines_of(dir.path / "dspex.log");
  REQUIRE_FALSE(lines.empty());
  // The supervisor's view of the pool starting and stopping, once each.
  CHECK(count_containing(lines, "to=child_started child_id=pool restarts") == 1);
  CHECK(count_containing(lines, "to=child_started child_id=pool.default restarts") == 1);
  CHECK(count_containing(lines, "event=child_started") == 0);
  CHECK(count_containing(lines, "child_id=pool killed=false") == 1);
  CHECK(count_containing(lines, "child_id=pool.default killed=false") == 1);
  CHECK(count_containing(lines, "event=child_stopped") == 0);
  // The worker's own lines name it once ("[w1] started ...", not "[w1] [w1] started ...").
  CHECK(count_containing(lines, "[w1] started (mode=pool-worker") == 1);
  CHECK(count_containing(lines, "[w1] [w1]") == 0);
  CHECK(count_containing(lines, "[w2] [w2]") == 0);
}

TEST_CASE("log.format=json: every line is one object with time, level and msg, and worker lines "
          "name their worker") {
  restore_logging restore;
  scratch_dir dir;
  auto s = test_settings(1);
  s.log_level = "info";
  s.log_format = "json";
  s.log_file = (dir.path / "dspex.log").string();
  {
    auto rt = start_runtime(s);
    REQUIRE(rt->execute_anonymous("ping").ok());
    stop_and_check_no_children(*rt);
  }
  auto lines = lines_of(dir.path / "dspex.log");
  REQUIRE(lines.size() >= 5);
  std::size_t worker_lines = 0;
  for (auto& l : lines) {
    CAPTURE(l);
    auto j = nlohmann::json::parse(l, nullptr, false);
    REQUIRE_FALSE(j.is_discarded());
    CHECK(j["time"].is_string());
    CHECK(j["level"].is_string());
    CHECK(j["msg"].is_string());
    if (j.contains("worker")) {
      CHECK(j["worker"] == "w1");
      CHECK(j["msg"].get<std::string>().rfind("[w1]", 0) == std::string::npos);
      ++worker_lines;
    }
  }
  CHECK(worker_lines >= 3);  // spawned, started, ready, LM configured, ...
}

TEST_CASE("log.worker_level: the workers' stderr lines at their own level") {
  restore_logging restore;
  scratch_dir dir;
  auto s = test_settings(1);
  s.log_level = "info";
  s.log_file = (dir.path / "dspex.log").string();
  s.log_worker_level = "debug";  // below log.level=info: not written
  {
    auto rt = start_runtime(s);
    stop_and_check_no_children(*rt);
  }
  auto lines = lines_of(dir.path / "dspex.log");
  CHECK(count_containing(lines, "spawned pid") == 1);            // the runtime's own line
  CHECK(count_containing(lines, "started (mode=pool-worker") == 0);  // the worker's, at debug
  s.log_worker_level = "warn";
  s.log_level = "warn";
  s.log_file = (dir.path / "warn.log").string();
  {
    auto rt = start_runtime(s);
    REQUIRE(rt->execute_anonymous("stderr", {{"text", "from the worker"}, {"lines", 1}}).ok());
    stop_and_check_no_children(*rt);
  }
  auto warn_lines = lines_of(dir.path / "warn.log");
  CHECK(count_containing(warn_lines, "warning [w1] from the worker") == 1);
  CHECK(count_containing(warn_lines, "spawned pid") == 0);
}

TEST_CASE("log.file rotates at log.file_max_bytes and keeps log.file_count files") {
  restore_logging restore;
  scratch_dir dir;
  auto s = test_settings(1);
  s.log_level = "debug";
  s.log_file = (dir.path / "dspex.log").string();
  s.log_file_max_bytes = 4096;
  s.log_file_count = 2;
  {
    auto rt = start_runtime(s);
    // 3 files of 4 KiB: ~12 KiB of lines and more, from a worker's stderr.
    REQUIRE(rt->execute_anonymous("stderr", {{"text", std::string(100, 'x')}, {"lines", 300}}).ok());
    REQUIRE(wait_for_status(*rt, [](const pool_status& st) { return st.idle == 1; }).ok);
    stop_and_check_no_children(*rt);
  }
  CHECK(std::filesystem::exists(dir.path / "dspex.log"));
  CHECK(std::filesystem::exists(dir.path / "dspex.1.log"));
  CHECK(std::filesystem::exists(dir.path / "dspex.2.log"));
  CHECK_FALSE(std::filesystem::exists(dir.path / "dspex.3.log"));
  for (auto* name : {"dspex.log", "dspex.1.log", "dspex.2.log"})
    CHECK(std::filesystem::file_size(dir.path / name) <= 4096 + 1024);  // a line may end past it
}

TEST_CASE("a log.file that cannot be opened refuses the start, naming the key") {
  restore_logging restore;
  auto s = test_settings(1);
  s.log_file = "/proc/no-such-dir/dspex.log";
  try {
    auto never = runtime::start(s);
    FAIL("the start should fail");
  } catch (const start_error& e) {
    CHECK(e.details().category == error_category::configuration_error);
    CHECK(e.details().context["key"] == "log.file");
  }
}
