// Named pools in one runtime (issue 13, item 1): the API addresses a pool by
// name, sessions belong to one pool, status, events and metrics carry the
// pool's name, and each pool is its own supervision subtree (one pool's
// crash loop never touches another). Real workers, real signals.
#include <csignal>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include <caf/all.hpp>

#include "dspex/actors/runtime_access.hpp"
#include "support/event_recorder.hpp"
#include "support/harness.hpp"
#include "support/proc.hpp"

using namespace dspex;
using namespace dspex::testing;

namespace {

/// The default pool with `default_size` workers and the pool "qa" with
/// `qa_size`, which differs in its LM model and its session affinity.
settings two_pools(std::size_t default_size = 1, std::size_t qa_size = 2) {
  auto s = test_settings(default_size);
  auto qa = s;
  qa.pool_name = "qa";
  qa.pool.size = qa_size;
  qa.lm.model = "careful";
  qa.session.affinity = "strict_queue";
  s.pools.push_back(qa);
  return s;
}

call_options on(const std::string& pool) {
  call_options o;
  o.pool = pool;
  return o;
}

session_call_options in(const std::string& pool) {
  session_call_options o;
  o.pool = pool;
  return o;
}

bool starts_with(const std::string& s, const std::string& prefix) {
  return s.rfind(prefix, 0) == 0;
}

void check_unknown_pool(const outcome& o, const std::string& name) {
  REQUIRE_FALSE(o.ok());
  CHECK(o.error().category == error_category::system_error);
  CHECK(o.error().type == "invalid_request");
  CHECK(o.error().context["reason"] == "unknown_pool");
  CHECK(o.error().context["pool"] == name);
}

} // namespace

TEST_CASE("named pools: each call runs on the pool it names, each pool with its own workers") {
  auto rt = start_runtime(two_pools(1, 2));
  CHECK(rt->pools() == std::vector<std::string>{"default", "qa"});

  auto d = rt->status();
  auto q = rt->status("qa");
  CHECK(d.pool == "default");
  CHECK(q.pool == "qa");
  CHECK(d.size == 1);
  CHECK(q.size == 2);
  CHECK(rt->status("default").pool == "default");
  for (auto& w : q.workers)
    CHECK(starts_with(w.id, "qa.w"));
  for (auto qpid : worker_pids(q))
    for (auto dpid : worker_pids(d))
      CHECK(qpid != dpid);

  for (int i = 0; i < 6; ++i) {
    auto r = rt->execute_anonymous("ping", nullptr, on("qa"));
    REQUIRE_MESSAGE(r.ok(), r.error().describe());
    CHECK(starts_with(r.served_by(), "qa.w"));
    auto r2 = rt->execute_anonymous("ping");
    REQUIRE_MESSAGE(r2.ok(), r2.error().describe());
    CHECK(r2.served_by() == "w1");
  }
  // The asynchronous form and an explicit checkout take the name too.
  auto async = rt->execute_anonymous_async("ping", nullptr, on("qa")).get();
  REQUIRE(async.ok());
  CHECK(starts_with(async.served_by(), "qa.w"));
  checkout_options co;
  co.pool = "qa";
  auto leased = rt->checkout(checkout_type::anonymous(), co);
  REQUIRE(std::holds_alternative<std::unique_ptr<lease>>(leased));
  auto& l = std::get<std::unique_ptr<lease>>(leased);
  CHECK(starts_with(l->worker_id(), "qa.w"));
  CHECK(rt->status("qa").leased == 1);
  CHECK(rt->status().leased == 0);
  CHECK(l->checkin());
  // Each pool counts its own calls.
  CHECK(rt->status("qa").metrics.total.count == 7);
  CHECK(rt->status().metrics.total.count == 6);
  stop_and_check_no_children(*rt);
}

TEST_CASE("an unknown pool name is a structured error and nothing else happens") {
  auto rt = start_runtime(two_pools(1, 1));
  auto before_default = worker_pids(rt->status());
  auto before_qa = worker_pids(rt->status("qa"));

  check_unknown_pool(rt->execute_anonymous("ping", nullptr, on("nope")), "nope");
  check_unknown_pool(rt->execute_anonymous_async("ping", nullptr, on("nope")).get(), "nope");
  check_unknown_pool(rt->execute_in_session("s1", "ping", nullptr, in("nope")), "nope");
  check_unknown_pool(rt->end_session("s1", "nope"), "nope");
  check_unknown_pool(rt->get_session_info("s1", "nope"), "nope");
  check_unknown_pool(rt->list_sessions("nope"), "nope");
  checkout_options co;
  co.pool = "nope";
  auto leased = rt->checkout(checkout_type::anonymous(), co);
  REQUIRE(std::holds_alternative<error>(leased));
  CHECK(std::get<error>(leased).context["reason"] == "unknown_pool");
  CHECK(rt->status("nope").pool.empty());
  CHECK(rt->metrics("nope").pool.empty());
  // Bytes that are not UTF-8 in the name come back replaced, never raw.
  auto weird = rt->execute_anonymous("ping", nullptr, on(std::string{"\xff\xfe"}));
  REQUIRE_FALSE(weird.ok());
  CHECK_NOTHROW(weird.error().to_json().dump());

  // Nothing else happened: the same workers, and both pools serve.
  CHECK(worker_pids(rt->status()) == before_default);
  CHECK(worker_pids(rt->status("qa")) == before_qa);
  CHECK(rt->execute_anonymous("ping").ok());
  CHECK(rt->execute_anonymous("ping", nullptr, on("qa")).ok());
  CHECK(rt->status().metrics.total.count == 1);
  stop_and_check_no_children(*rt);
}

TEST_CASE("sessions belong to one pool: the same id on two pools names two sessions") {
  auto rt = start_runtime(two_pools(1, 2));
  nlohmann::json program{{"id", "p1"},
                         {"program_type", "predict"},
                         {"signature",
                          {{"inputs", {{{"name", "question"}, {"type", "str"}}}},
                           {"outputs", {{{"name", "answer"}, {"type", "str"}}}}}}};
  auto made = rt->execute_in_session("s1", "create_program", program);
  REQUIRE_MESSAGE(made.ok(), made.error().describe());
  auto listed_default = rt->execute_in_session("s1", "list_programs", nullptr);
  REQUIRE(listed_default.ok());
  CHECK(listed_default.value()["total_count"] == 1);
  // The session s1 of "qa" is another session: it has no program.
  auto listed_qa = rt->execute_in_session("s1", "list_programs", nullptr, in("qa"));
  REQUIRE_MESSAGE(listed_qa.ok(), listed_qa.error().describe());
  CHECK(listed_qa.value()["total_count"] == 0);
  auto ran = rt->execute_in_session("s1", "ping", nullptr, in("qa"));
  REQUIRE(ran.ok());
  CHECK(starts_with(ran.served_by(), "qa.w"));

  auto info = rt->get_session_info("s1", "qa");
  REQUIRE(info.ok());
  CHECK(starts_with(info.value()["preferred_worker"].get<std::string>(), "qa.w"));
  CHECK(info.value()["affinity"] == "strict_queue");  // the qa pool's own setting
  auto info_default = rt->get_session_info("s1");
  REQUIRE(info_default.ok());
  CHECK(info_default.value()["affinity"] == "hint");

  // Ending s1 on qa leaves s1 on default.
  REQUIRE(rt->end_session("s1", "qa").ok());
  auto gone = rt->get_session_info("s1", "qa");
  REQUIRE_FALSE(gone.ok());
  CHECK(gone.error().type == "session_not_found");
  CHECK(rt->get_session_info("s1").ok());
  auto all = rt->list_sessions();
  REQUIRE(all.ok());
  CHECK(all.value()["total_count"] == 1);
  CHECK(rt->list_sessions("qa").value()["total_count"] == 0);
  CHECK(rt->metrics().sessions == 1);
  CHECK(rt->metrics("qa").sessions == 0);
  stop_and_check_no_children(*rt);
}

TEST_CASE("events and metrics carry the pool's name") {
  auto rt = start_runtime(two_pools(1, 2));
  event_recorder rec{rt->events()};
  auto victim = worker_pids(rt->status("qa")).front();
  REQUIRE(::kill(victim, SIGKILL) == 0);
  auto removed_from_qa = [](const event& e) {
    return e.kind == event_kind::worker_removed && e.pool == "qa";
  };
  REQUIRE(rec.wait_for(removed_from_qa));
  auto removed = rec.all();
  for (auto& e : removed)
    if (e.kind == event_kind::worker_removed) {
      CHECK(e.pool == "qa");  // no event of the default pool's workers
      CHECK(starts_with(e.worker_id, "qa.w"));
      CHECK(e.to_json()["pool"] == "qa");
      CHECK(e.describe().find("pool=qa") != std::string::npos);
    }
  CHECK(wait_gone(victim, 10s));
  REQUIRE(wait_for_status(*rt, full_and_idle, 15s, "qa").ok);
  CHECK(rt->status("qa").replaced == 1);
  CHECK(rt->status().replaced == 0);

  REQUIRE(rt->execute_anonymous("ping", nullptr, on("qa")).ok());
  auto mq = rt->metrics("qa");
  auto md = rt->metrics();
  CHECK(mq.pool == "qa");
  CHECK(md.pool == "default");
  CHECK(mq.size == 2);
  CHECK(mq.workers_removed.size() == 1);
  CHECK(md.workers_removed.empty());
  auto text = render_prometheus(std::vector<metrics_snapshot>{md, mq});
  CHECK(text.find("dspex_pool_size{pool=\"default\"} 1\n") != std::string::npos);
  CHECK(text.find("dspex_pool_size{pool=\"qa\"} 2\n") != std::string::npos);
  CHECK(text.find("dspex_calls_total{pool=\"qa\",command=\"ping\",outcome=\"ok\"} 1\n")
        != std::string::npos);
  // Each family once: one HELP and one TYPE line however many pools.
  auto count = [&](const std::string& needle) {
    std::size_t n = 0;
    for (auto at = text.find(needle); at != std::string::npos; at = text.find(needle, at + 1))
      ++n;
    return n;
  };
  CHECK(count("# HELP dspex_pool_size ") == 1);
  CHECK(count("# TYPE dspex_call_duration_seconds histogram") == 1);
  // The qa samples of a family follow the default ones, before the next family.
  auto size_default = text.find("dspex_pool_size{pool=\"default\"}");
  auto size_qa = text.find("dspex_pool_size{pool=\"qa\"}");
  auto next_family = text.find("# HELP", size_default);
  CHECK(size_default < size_qa);
  CHECK(size_qa < next_family);
  stop_and_check_no_children(*rt);
}

TEST_CASE("one pool's crash loop never touches another: its supervisor gives up alone") {
  auto rt = start_runtime(two_pools(1, 1));
  event_recorder rec{rt->events()};
  auto default_pids = worker_pids(rt->status());
  auto default_pool = runtime_access::pool(*rt);
  auto default_supervisor = runtime_access::pool_supervisor(*rt);
  REQUIRE(default_supervisor);
  auto restarted_qa = [](const event& e) {
    return e.kind == event_kind::supervisor && e.to == "child_restarted" && e.pool == "qa"
           && e.fields.value("child_id", std::string{}) == "pool";
  };
  // dspex.pool.qa allows 3 restarts within 5 s: the 4th kill makes it give up.
  for (std::size_t i = 1; i <= 4; ++i) {
    auto pool = runtime_access::pool(*rt, "qa");
    REQUIRE(pool);
    caf::anon_send_exit(pool, caf::exit_reason::kill);
    if (i < 4)
      REQUIRE(rec.wait_for(restarted_qa, i));
  }
  auto gave_up = [](const event& e) {
    return e.kind == event_kind::supervisor && e.to == "gave_up";
  };
  REQUIRE(rec.wait_for(gave_up));
  for (auto& e : rec.all())
    if (gave_up(e)) {
      CHECK(e.pool == "qa");
      CHECK(e.source == "dspex.pool.qa");
    }
  // The root lets the subtree go (temporary): were it restarted, every
  // give-up of qa would use up the root's own restarts, and the root's
  // give-up would end the default pool too.
  auto root_saw_qa_end = [](const event& e) {
    return e.kind == event_kind::supervisor && e.source == "dspex.root"
           && e.to == "child_exited" && e.pool == "qa";
  };
  REQUIRE(rec.wait_for(root_saw_qa_end));
  CHECK_FALSE(runtime_access::pool_supervisor(*rt, "qa"));
  CHECK(rec.count([](const event& e) {
          return e.kind == event_kind::supervisor && e.source == "dspex.root"
                 && e.to == "child_restarted";
        })
        == 0);
  auto r = rt->execute_anonymous("ping", nullptr, on("qa"));
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().type == "supervisor_gave_up");
  CHECK(r.error().context["supervisor"] == "dspex.pool.qa");
  CHECK(wait_for_status(*rt, [](const pool_status& s) { return s.health == "unavailable"; }, 15s,
                        "qa")
          .ok);

  // The default pool never noticed: same actor, same workers, no restart.
  CHECK(runtime_access::pool(*rt) == default_pool);
  CHECK(runtime_access::pool_supervisor(*rt) == default_supervisor);
  CHECK(worker_pids(rt->status()) == default_pids);
  CHECK(rt->status().health == "healthy");
  CHECK(rt->metrics().pool_restarts == 0);
  CHECK(rt->metrics("qa").pool_restarts == 3);
  for (int i = 0; i < 5; ++i)
    CHECK(rt->execute_anonymous("ping").ok());
  CHECK(rec.count([](const event& e) {
          return e.kind == event_kind::supervisor && e.pool == "default"
                 && (e.to == "child_restarted" || e.to == "gave_up" || e.to == "child_exited");
        })
        == 0);
  stop_and_check_no_children(*rt);
}

TEST_CASE("a pool that cannot start fails the runtime's start, naming the pool, and leaves no child") {
  auto s = two_pools(1, 1);
  s.pools[0].worker.python = "/bin/false";  // exits at once: every start fails
  s.pools[0].pool.init_timeout = std::chrono::seconds{5};
  try {
    auto rt = runtime::start(s);
    FAIL("the runtime started with a pool that cannot");
  } catch (const start_error& e) {
    CHECK(e.details().category != error_category::configuration_error);
    CHECK(e.details().context["pool"] == "qa");
    CHECK(e.details().message.find("pool 'qa'") != std::string::npos);
  }
  CHECK(wait_no_children(::getpid(), 10s).empty());
}

TEST_CASE("a named pool's bad setting is refused before anything starts, naming the key") {
  auto s = two_pools(1, 1);
  s.pools[0].worker.python = "/nonexistent/python3";
  try {
    auto rt = runtime::start(s);
    FAIL("the runtime started with a bad setting");
  } catch (const start_error& e) {
    CHECK(e.details().category == error_category::configuration_error);
    CHECK(e.details().context["key"] == "pools.qa.worker.python");
    CHECK(e.details().context["pool"] == "qa");
  }
  auto dup = two_pools(1, 1);
  dup.pools.push_back(dup.pools[0]);
  auto err = dup.validate();
  REQUIRE(err);
  CHECK(err->message.find("declared twice") != std::string::npos);
  auto reserved = two_pools(1, 1);
  reserved.pools[0].pool_name = "default";
  REQUIRE(reserved.validate());
  CHECK(reserved.validate()->message.find("reserved") != std::string::npos);
  auto odd = two_pools(1, 1);
  odd.pools[0].pool_name = "a b";
  REQUIRE(odd.validate());
  CHECK(odd.validate()->context["key"] == "pools.a b");
  CHECK(wait_no_children(::getpid(), 10s).empty());
}
