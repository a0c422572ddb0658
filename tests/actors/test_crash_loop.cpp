// The crash-loop guard, recycling and worker supervision of the pool actor
// (issue 4, items 2 and 5), with real failing interpreters and scripts.
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <csignal>
#include <map>
#include <set>
#include <thread>

#include <doctest/doctest.h>

#include "support/event_recorder.hpp"
#include "support/scratch_dir.hpp"
#include "support/test_pool.hpp"

using namespace dspex;
using namespace dspex::testing;
namespace fs = std::filesystem;

namespace {

settings guarded_settings(std::size_t size) {
  auto s = test_settings(size);
  s.pool.restart_backoff_base = 20ms;
  s.pool.restart_backoff_max = 200ms;
  s.pool.broken_after = 3;
  return s;
}

bool is_start_failed(const event& e) {
  return e.kind == event_kind::worker_start_failed;
}

std::size_t python_children() {
  return child_pids(::getpid()).size();
}

} // namespace

TEST_CASE("a missing interpreter: backoff, broken, fast failure naming it, recovery when fixed") {
  scratch_dir dir;
  auto python = dir.path / "python3";  // does not exist yet
  test_pool_options opts;
  opts.config = guarded_settings(2);
  opts.config.worker.python = python.string();
  test_pool pool{std::move(opts)};
  event_recorder events{pool.events()};

  REQUIRE(events.wait_for(kind_is(event_kind::pool_health_changed, "broken")));
  CHECK(events.count(kind_is(event_kind::restart_scheduled)) >= 1);
  auto st = pool.status();
  CHECK(st.health == "broken");
  REQUIRE(st.last_start_failure);
  CHECK(st.last_start_failure->category == error_category::initialization_error);
  CHECK(st.consecutive_start_failures >= 3);

  // Callers fail at once with the reason instead of waiting for their deadline.
  auto r = pool.execute("ping", {}, 30s);
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().category == error_category::resource_error);
  CHECK(r.error().type == "pool_unavailable");
  CHECK(r.error().message.find(python.string()) != std::string::npos);
  CHECK(r.error().context.contains("last_start_failure"));
  CHECK(r.error().severity() == error_severity::critical);
  // A session's call: its error names the session.
  auto in_session = pool.execute("ping", {}, 30s, checkout_type::session("s9"));
  REQUIRE_FALSE(in_session.ok());
  CHECK(in_session.error().type == "pool_unavailable");
  CHECK(in_session.error().context.value("session_id", "") == "s9");

  // The delays grow (exponential with jitter, bounded by restart_backoff_max).
  std::vector<std::chrono::milliseconds> delays;
  for (auto& e : events.all())
    if (e.kind == event_kind::restart_scheduled)
      delays.push_back(e.delay);
  REQUIRE(delays.size() >= 2);
  CHECK(delays.back() >= delays.front());
  for (auto d : delays)
    CHECK(d <= 200ms);

  // Fixed: the interpreter appears; the next start succeeds and the pool heals.
  fs::create_symlink(DSPEX_TEST_PYTHON, python);
  REQUIRE(events.wait_for(kind_is(event_kind::pool_health_changed, "healthy")));
  REQUIRE(pool.wait_for_pool_ready());
  st = pool.status();
  CHECK(st.health == "healthy");
  CHECK_FALSE(st.last_start_failure);
  CHECK(pool.execute("ping").ok());
}

TEST_CASE("a script that exits at once: every respawn waits out a growing backoff (no busy loop)") {
  scratch_dir dir;
  auto script = dir.write("worker.py", "import sys\nsys.exit(3)\n");
  test_pool_options opts;
  opts.config = test_settings(2);  // the default backoff: 200 ms doubling to 5 s
  opts.config.worker.script = script.string();
  test_pool pool{std::move(opts)};
  event_recorder events{pool.events()};
  // 2 at once, then one probe per delay (200, 400, 800, 1600 ms): six spawns.
  // Load can only lengthen the gaps checked below, never shorten them.
  REQUIRE(events.wait_for(kind_is(event_kind::worker_started), 6, 30s));
  std::vector<event> scheduled, respawns;
  std::size_t starts = 0;
  for (auto& e : events.all()) {
    if (e.kind == event_kind::restart_scheduled)
      scheduled.push_back(e);
    else if (e.kind == event_kind::worker_started && ++starts > 2)
      respawns.push_back(e);
  }
  // Each respawn follows its own scheduled restart, and not before its delay
  // has passed: a spawn the crash-loop guard did not pay for is a busy loop.
  REQUIRE(scheduled.size() >= respawns.size());
  for (std::size_t i = 0; i < respawns.size(); ++i) {
    CAPTURE(i);
    CHECK(scheduled[i].at <= respawns[i].at);
    CHECK(respawns[i].at - scheduled[i].at >= scheduled[i].delay);
    if (i > 0)
      CHECK(scheduled[i].delay > scheduled[i - 1].delay);  // growing
  }
  CHECK(scheduled.front().delay >= 100ms);  // the base, less any jitter
  auto r = pool.execute("ping", {}, 30s);
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().type == "pool_unavailable");
  CHECK(r.error().message.find("exit code 3") != std::string::npos);
}

TEST_CASE("a script that prints a traceback: the last line names the failure, fixed, it recovers") {
  scratch_dir dir;
  auto script = dir.write("worker.py", "raise RuntimeError('boom: settings.toml missing')\n");
  test_pool_options opts;
  opts.config = guarded_settings(2);
  opts.config.worker.script = script.string();
  test_pool pool{std::move(opts)};
  event_recorder events{pool.events()};
  REQUIRE(events.wait_for(kind_is(event_kind::pool_health_changed, "broken")));
  auto r = pool.execute("ping", {}, 30s);
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().type == "pool_unavailable");
  CHECK(r.error().message.find("RuntimeError: boom: settings.toml missing")
        != std::string::npos);
  for (auto& e : events.all())
    if (is_start_failed(e)) {
      REQUIRE(e.err);
      CHECK(e.err->category == error_category::initialization_error);
    }

  fs::copy_file(DSPEX_TEST_WORKER_SCRIPT, script, fs::copy_options::overwrite_existing);
  REQUIRE(events.wait_for(kind_is(event_kind::pool_health_changed, "healthy")));
  REQUIRE(pool.wait_for_pool_ready());
  CHECK(pool.execute("ping").ok());
}

TEST_CASE("failing restarts make the pool degraded, not broken, while a worker still serves") {
  scratch_dir dir;
  auto python = dir.path / "python3";
  fs::create_symlink(DSPEX_TEST_PYTHON, python);
  test_pool_options opts;
  opts.config = guarded_settings(2);
  opts.config.worker.python = python.string();
  test_pool pool{std::move(opts)};
  event_recorder events{pool.events()};
  REQUIRE(pool.wait_for_pool_ready());
  CHECK(pool.status().health == "healthy");

  fs::remove(python);  // from now on every start fails
  auto victim = pool.status().workers.at(0).pid;
  REQUIRE(::kill(victim, SIGKILL) == 0);
  REQUIRE(events.wait_for(kind_is(event_kind::pool_health_changed, "degraded")));
  REQUIRE(events.wait_for(kind_is(event_kind::worker_start_failed), 4));
  auto st = pool.status();
  CHECK(st.health == "degraded");  // beyond broken_after, but one worker serves
  CHECK(st.consecutive_start_failures >= 4);
  CHECK(pool.execute("ping").ok());
  CHECK(events.count(kind_is(event_kind::pool_health_changed, "broken")) == 0);

  fs::create_symlink(DSPEX_TEST_PYTHON, python);
  REQUIRE(events.wait_for(kind_is(event_kind::pool_health_changed, "healthy")));
  REQUIRE(pool.wait_for_pool_ready());
}

TEST_CASE("recycling by request count: each worker serves at most max_requests") {
  test_pool_options opts;
  opts.config = test_settings(1);
  opts.config.pool.max_requests = 5;
  opts.config.pool.max_requests_jitter = 0;
  test_pool pool{std::move(opts)};
  event_recorder events{pool.events()};
  REQUIRE(pool.wait_for_pool_ready());
  std::set<std::string> served_by;
  for (int i = 0; i < 12; ++i) {
    auto r = pool.execute("ping");
    REQUIRE(r.ok());
    served_by.insert(r.value().value("worker_id", ""));
  }
  // Requests 1-5 on the first worker, 6-10 on the second, 11-12 on the third.
  CHECK(served_by.size() == 3);
  REQUIRE(events.wait_for(kind_is(event_kind::worker_recycled), 2));
  auto st = pool.status();
  CHECK(st.recycled == 2);
  CHECK(st.replaced == 0);  // recycling is not a failure
  CHECK(st.health == "healthy");
  for (auto& e : events.all())
    if (e.kind == event_kind::worker_recycled) {
      REQUIRE(e.err);
      CHECK(e.err->type == "recycled");
      CHECK(e.err->context["limit"] == "max_requests");
    }
}

TEST_CASE("recycling with jitter: limits differ per worker but never exceed max_requests") {
  test_pool_options opts;
  opts.config = test_settings(1);
  opts.config.pool.max_requests = 10;
  opts.config.pool.max_requests_jitter = 0.5;
  test_pool pool{std::move(opts)};
  REQUIRE(pool.wait_for_pool_ready());
  std::map<std::string, int> served;
  for (int i = 0; i < 40; ++i) {
    auto r = pool.execute("ping");
    REQUIRE(r.ok());
    ++served[r.value().value("worker_id", "")];
  }
  for (auto& [pid, n] : served)
    CHECK(n <= 10);
  CHECK(served.size() >= 4);  // at most 10 each
}

TEST_CASE("recycling by age: an idle worker past max_age is replaced") {
  test_pool_options opts;
  opts.config = test_settings(1);
  opts.config.pool.max_age = 300ms;
  test_pool pool{std::move(opts)};
  event_recorder events{pool.events()};
  REQUIRE(pool.wait_for_pool_ready());
  auto first = pool.status().workers.at(0).pid;
  REQUIRE(events.wait_for(kind_is(event_kind::worker_recycled)));
  REQUIRE(wait_gone(first, 10s));
  REQUIRE(pool.wait_for([&](const pool_status& s) {
    return s.idle == 1 && s.workers.at(0).pid != first && s.workers.at(0).pid != 0;
  }));
  CHECK(pool.execute("ping").ok());
}

TEST_CASE("recycling by resident memory read from /proc") {
  test_pool_options opts;
  opts.config = test_settings(1);
  opts.config.pool.max_rss_mb = 60;
  test_pool pool{std::move(opts)};
  event_recorder events{pool.events()};
  REQUIRE(pool.wait_for_pool_ready());
  auto first = pool.status().workers.at(0).pid;
  auto r = pool.execute("alloc", {{"mb", 80}});
  REQUIRE(r.ok());
  REQUIRE(events.wait_for(kind_is(event_kind::worker_recycled)));
  auto recycled = events.all();
  bool by_rss = false;
  for (auto& e : recycled)
    if (e.kind == event_kind::worker_recycled && e.err && e.err->context["limit"] == "max_rss_mb")
      by_rss = e.err->context["value"].get<std::uint64_t>() >= 60;
  CHECK(by_rss);
  CHECK(wait_gone(first, 10s));
  REQUIRE(pool.wait_for_pool_ready());
}

TEST_CASE("an actor-level kill of a worker does not take the pool down") {
  test_pool pool;
  event_recorder events{pool.events()};
  REQUIRE(pool.wait_for_pool_ready());
  test_caller caller{pool};
  auto reply = caller.checkout();
  REQUIRE(reply.grant);
  auto pid = 0;
  for (auto& w : pool.status().workers)
    if (w.id == reply.grant->worker_id)
      pid = w.pid;
  REQUIRE(pid > 0);
  caf::anon_send_exit(reply.grant->worker, caf::exit_reason::kill);
  REQUIRE(events.wait_for(kind_is(event_kind::worker_removed)));
  CHECK(wait_gone(pid, 10s));
  REQUIRE(pool.wait_for_pool_ready());
  CHECK(pool.execute("ping").ok());
  caller.die();
}

TEST_CASE("no Python process is left after pools with failing starts stop") {
  {
    scratch_dir dir;
    auto script = dir.write("worker.py", "import sys\nsys.exit(1)\n");
    test_pool_options opts;
    opts.config = guarded_settings(2);
    opts.config.worker.script = script.string();
    test_pool pool{std::move(opts)};
    event_recorder events{pool.events()};
    REQUIRE(events.wait_for(kind_is(event_kind::worker_start_failed), 4));
  }
  CHECK(wait_no_children(::getpid(), 10s).empty());
  CHECK(python_children() == 0);
}

// A worker stopped (SIGSTOP) while starting is reaped by the maintenance
// tick like one stopped while serving: the stop came from outside, so it is
// no start failure and costs the pool no backoff. Counted as one, a storm of
// stops during starts would empty the pool behind a growing backoff.
TEST_CASE("a worker stopped while starting is replaced at once, without backoff") {
  test_pool_options opts;
  opts.config = guarded_settings(1);
  opts.config.pool.init_timeout = 60s;           // only the stop ends this start
  opts.config.pool.health_interval = 100ms;      // the tick that reaps stopped processes
  opts.config.worker.extra_args = {"--test-init", "hang"};
  test_pool pool{std::move(opts)};
  event_recorder events{pool.events()};
  int victim = 0;
  REQUIRE(pool.wait_for([&](const pool_status& st) {
    for (auto& w : st.workers)
      if (w.state == "starting" && w.pid > 0)
        victim = w.pid;
    return victim > 0;
  }));
  REQUIRE(::kill(victim, SIGSTOP) == 0);
  // Reaped, and its replacement is starting.
  REQUIRE(pool.wait_for([&](const pool_status& st) {
    for (auto& w : st.workers)
      if (w.state == "starting" && w.pid > 0 && w.pid != victim)
        return true;
    return false;
  }, 15s));
  CHECK(wait_gone(victim, 10s));
  REQUIRE(events.wait_for(kind_is(event_kind::worker_removed)));
  CHECK(events.count(is_start_failed) == 0);
  CHECK(events.count(kind_is(event_kind::restart_scheduled)) == 0);
  auto st = pool.status();
  CHECK(st.start_failures == 0);
  CHECK(st.consecutive_start_failures == 0);
  CHECK(st.health != "broken");
}
