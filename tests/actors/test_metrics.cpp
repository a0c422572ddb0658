// runtime::metrics() and its exposition against a real pool (issue 12,
// item 3): every call counted by command and outcome, the latency
// histograms counting the same calls, removals by reason, live sessions.
#include <signal.h>

#include <string>

#include <doctest/doctest.h>

#include "dspex/prometheus.hpp"
#include "dspex/runtime.hpp"
#include "support/harness.hpp"
#include "support/proc.hpp"

using namespace dspex;
using namespace dspex::testing;

TEST_CASE("metrics count every call by command and outcome, and the histograms the same calls") {
  auto rt = start_runtime(test_settings(2));
  for (int i = 0; i < 5; ++i)
    REQUIRE(rt->execute_anonymous("ping").ok());
  CHECK_FALSE(rt->execute_anonymous("no_such_command").ok());      // python_error
  CHECK_FALSE(rt->execute_anonymous("", nlohmann::json::object()).ok());  // refused before any worker
  REQUIRE(rt->execute_in_session("s1", "ping").ok());
  auto m = rt->metrics();
  CHECK(m.calls[{"ping", "ok"}] == 6);
  CHECK(m.calls[{"no_such_command", "python_error"}] == 1);
  CHECK(m.calls[{"", "system_error"}] == 1);
  CHECK(m.sessions == 1);
  CHECK(m.size == 2);
  CHECK(m.workers_started == 2);
  // The whole-call histogram counted every call that reached the runtime's
  // path (the refused one never started).
  REQUIRE_FALSE(m.total.counts.empty());
  CHECK(m.total.counts.back() == 7);
  CHECK(m.total.sum_seconds > 0);
  CHECK(m.run.counts.back() >= 7);

  // A worker killed: removed with its reason, and a replacement started.
  auto st = rt->status();
  REQUIRE(::kill(st.workers.at(0).pid, SIGKILL) == 0);
  REQUIRE(wait_for_status(*rt, [](const pool_status& s) { return s.replaced >= 1 && full_and_idle(s); }).ok);
  m = rt->metrics();
  CHECK(m.workers_removed["worker_exited"] == 1);
  CHECK(m.workers_started == 3);

  auto text = render_prometheus(m);
  CHECK(text.find("dspex_calls_total{pool=\"default\",command=\"ping\",outcome=\"ok\"} 6\n")
        != std::string::npos);
  CHECK(text.find("dspex_call_duration_seconds_count{pool=\"default\"} 7\n") != std::string::npos);
  CHECK(text.find("dspex_workers_removed_total{pool=\"default\",reason=\"worker_exited\"} 1\n")
        != std::string::npos);
  stop_and_check_no_children(*rt);
}
