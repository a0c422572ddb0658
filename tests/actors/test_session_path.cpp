// The session path (issue 11): caller → session actor → direct lane, with the
// pool client out of the way. The registry runs against a scripted pool
// client, which fails the test on any message it was not scripted for, and a
// scripted lane: a test fails when a call takes a hop the path must not take
// (a session's call through the client while the lane takes it), when the
// session's state (its worker) is not carried from call to call, or when a
// caller is left unanswered.
#include <chrono>
#include <condition_variable>
#include <future>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <caf/all.hpp>
#include <doctest/doctest.h>

#include "dspex/actors/messages.hpp"
#include "dspex/actors/session_actor.hpp"
#include "api_support.hpp"
#include "command_adapter.hpp"
#include "dspy_adapter.hpp"
#include "session_directory.hpp"
#include "support/harness.hpp"

using namespace dspex;
using namespace std::chrono_literals;

namespace {

constexpr auto hang_guard = std::chrono::seconds{10};

/// What the scripted lane and pool client saw.
struct script {
  std::mutex mtx;
  std::condition_variable cv;
  std::vector<call> lane_calls;      ///< calls the lane took
  std::vector<std::thread::id> lane_threads;  ///< the thread that gave each to the lane
  std::vector<call> client_calls;    ///< execute_atom calls the pool client got
  std::vector<std::string> unscripted;  ///< anything else the client got
  bool lane_answers = true;          ///< false: the lane takes calls and keeps them
  std::vector<completion> kept;      ///< their completions, never answered

  void wait_client_calls(std::size_t n) {
    std::unique_lock<std::mutex> lk{mtx};
    REQUIRE(cv.wait_for(lk, hang_guard, [&] { return client_calls.size() >= n; }));
  }
};

outcome served(const std::string& worker) {
  auto o = outcome::success({{"status", "ok"}});
  o.set_served_by(worker);
  return o;
}

/// A pool client that answers execute_atom as worker "w9" and records
/// everything; any other message is unscripted.
caf::behavior scripted_client(caf::event_based_actor* self, script* sc) {
  self->set_default_handler([sc](caf::scheduled_actor*, caf::message_view& x) -> caf::result<caf::message> {
    std::lock_guard<std::mutex> lk{sc->mtx};
    sc->unscripted.push_back(caf::to_string(x.copy_content_to_message()));
    sc->cv.notify_all();
    return caf::message{};
  });
  return {
    [sc](execute_atom, call& c, completion& done, detail::client_call_options&) {
      {
        std::lock_guard<std::mutex> lk{sc->mtx};
        sc->client_calls.push_back(c);
        sc->cv.notify_all();
      }
      done.fn(served("w9"));
    },
  };
}

struct session_path {
  caf::actor_system_config cfg;
  caf::actor_system sys{cfg};
  script sc;
  std::shared_ptr<detail::session_directory> directory
    = std::make_shared<detail::session_directory>();
  caf::actor client = sys.spawn(scripted_client, &sc);
  caf::actor parent;  ///< the registry's supervisor, here: it only spawns it
  caf::actor registry;

  explicit session_path(detail::session_adapter_factory adapter = detail::make_dspy_session) {
    auto config = std::make_shared<settings>(dspex::testing::test_settings(1));
    session_lane lane = [this](call& c, const detail::client_call_options&,
                               const completion& done) {
      if (c.affinity != affinity_mode::hint)
        return false;  // the pool client's
      bool answer;
      {
        std::lock_guard<std::mutex> lk{sc.mtx};
        sc.lane_calls.push_back(c);
        sc.lane_threads.push_back(std::this_thread::get_id());
        answer = sc.lane_answers;
        if (!answer)
          sc.kept.push_back(done);
        sc.cv.notify_all();
      }
      if (answer)
        done.fn(served("w1"));
      return true;
    };
    auto spawned = std::make_shared<std::promise<caf::actor>>();
    auto got = spawned->get_future();
    parent = sys.spawn([=](caf::event_based_actor* self) -> caf::behavior {
      spawned->set_value(spawn_linked_session_registry(self, config, client, directory, lane,
                                                       adapter));
      return {[](int) {}};
    });
    REQUIRE(got.wait_for(hang_guard) == std::future_status::ready);
    registry = got.get();
  }

  ~session_path() {
    {
      std::lock_guard<std::mutex> lk{sc.mtx};
      sc.kept.clear();  // before the system goes: they send to its actors
    }
    caf::anon_send_exit(parent, caf::exit_reason::user_shutdown);
    caf::anon_send_exit(registry, caf::exit_reason::user_shutdown);
    caf::anon_send_exit(client, caf::exit_reason::user_shutdown);
  }

  session_request execute(const std::string& session, const std::string& command,
                          affinity_mode mode = affinity_mode::hint) {
    session_request r;
    r.op = session_op::execute;
    r.session_id = session;
    r.c.command = command;
    r.c.args = {{"session_id", session}};
    r.c.deadline = std::chrono::steady_clock::now() + 30s;
    r.c.type = checkout_type::session(session);
    r.c.affinity = mode;
    return r;
  }

  /// A completion as the API makes it (answer_once), and its future.
  std::pair<completion, std::future<outcome>> answer(const session_request& r) {
    auto p = std::make_shared<std::promise<outcome>>();
    auto f = p->get_future();
    return {runtime_detail::answer_once(completion{[p](outcome o) { p->set_value(std::move(o)); }},
                        session_lost_error(r.session_id, r.c.command)),
            std::move(f)};
  }

  /// A session's call as the runtime makes it (session_directory::route).
  void route(session_request r, completion done) {
    directory->route(std::move(r), std::move(done), [this](session_request first, completion d) {
      caf::anon_send(registry, session_exec_atom::value, std::move(first), std::move(d));
    });
  }

  /// One call of `session` made and awaited as the runtime makes it (route).
  outcome call_and_wait(const std::string& session, const std::string& command) {
    auto r = execute(session, command);
    auto [done, f] = answer(r);
    route(std::move(r), std::move(done));
    return wait(f);
  }

  outcome wait(std::future<outcome>& f) {
    REQUIRE(f.wait_for(hang_guard) == std::future_status::ready);
    return f.get();
  }
};

} // namespace

TEST_CASE("session path: the first call creates the session, the next go straight to it and take the lane") {
  session_path t;
  // First call: no entry in the directory, so through the registry.
  auto first = t.execute("s1", "ping");
  auto [done1, f1] = t.answer(first);
  CHECK_FALSE(t.directory->send_call("s1", first.c, first.opts, done1));
  caf::anon_send(t.registry, session_exec_atom::value, first, done1);
  done1 = {};
  auto r1 = t.wait(f1);
  REQUIRE(r1.ok());
  // Next calls: straight to the session's actor, which keeps its worker.
  for (int i = 0; i < 3; ++i) {
    auto next = t.execute("s1", "ping");
    auto [done, f] = t.answer(next);
    REQUIRE(t.directory->send_call("s1", next.c, next.opts, done));
    done = {};
    CHECK(t.wait(f).ok());
  }
  std::lock_guard<std::mutex> lk{t.sc.mtx};
  REQUIRE(t.sc.lane_calls.size() == 4);
  CHECK(t.sc.lane_calls.at(0).preferred_worker.empty());
  for (std::size_t i = 1; i < 4; ++i) {
    CHECK(t.sc.lane_calls.at(i).preferred_worker == "w1");  // the session's worker
    CHECK(t.sc.lane_calls.at(i).args.at("session_id") == "s1");
  }
  CHECK(t.sc.client_calls.empty());  // the lane took every call
  CHECK(t.sc.unscripted.empty());
}

TEST_CASE("session path: a call the lane does not take goes to the pool client, and its worker is remembered") {
  session_path t;
  auto strict = t.execute("s2", "ping", affinity_mode::strict_queue);
  auto [done, f] = t.answer(strict);
  caf::anon_send(t.registry, session_exec_atom::value, strict, done);
  done = {};
  auto r = t.wait(f);
  REQUIRE(r.ok());
  CHECK(r.served_by() == "w9");
  auto hint = t.execute("s2", "ping");
  auto [done2, f2] = t.answer(hint);
  REQUIRE(t.directory->send_call("s2", hint.c, hint.opts, done2));
  done2 = {};
  CHECK(t.wait(f2).ok());
  std::lock_guard<std::mutex> lk{t.sc.mtx};
  REQUIRE(t.sc.client_calls.size() == 1);
  CHECK(t.sc.client_calls.at(0).type.session_id() == "s2");
  REQUIRE(t.sc.lane_calls.size() == 1);
  CHECK(t.sc.lane_calls.at(0).preferred_worker == "w9");
  CHECK(t.sc.unscripted.empty());
}

TEST_CASE("session path: after end_session the directory sends nothing to the old actor, a new call makes a new session") {
  session_path t;
  auto first = t.execute("s3", "ping");
  auto [done, f] = t.answer(first);
  caf::anon_send(t.registry, session_exec_atom::value, first, done);
  done = {};
  REQUIRE(t.wait(f).ok());
  session_request end;
  end.op = session_op::end;
  end.session_id = "s3";
  end.c.command = "end_session";
  end.c.deadline = std::chrono::steady_clock::now() + 30s;
  caf::scoped_actor self{t.sys};
  // The end cleans up the session's worker through the pool client
  // (strict_queue: never the lane).
  self->request(t.registry, hang_guard, session_op_atom::value, end)
    .receive([&](outcome& o) { CHECK(o.ok()); },
             [&](caf::error& e) { FAIL(t.sys.render(e)); });
  {
    std::lock_guard<std::mutex> lk{t.sc.mtx};
    REQUIRE(t.sc.client_calls.size() == 1);
    CHECK(t.sc.client_calls.at(0).command == "cleanup_session");
    CHECK(t.sc.client_calls.at(0).preferred_worker == "w1");
  }
  auto again = t.execute("s3", "ping");
  auto [done2, f2] = t.answer(again);
  CHECK_FALSE(t.directory->send_call("s3", again.c, again.opts, done2));
  caf::anon_send(t.registry, session_exec_atom::value, again, done2);
  done2 = {};
  REQUIRE(t.wait(f2).ok());
  std::lock_guard<std::mutex> lk{t.sc.mtx};
  REQUIRE(t.sc.lane_calls.size() == 2);
  CHECK(t.sc.lane_calls.at(1).preferred_worker.empty());  // a new session: no worker yet
  CHECK(t.sc.unscripted.empty());
}

TEST_CASE("session path: calls a dying session layer took are answered sessions_unavailable") {
  session_path t;
  t.sc.lane_answers = false;  // the first call stays in flight
  auto first = t.execute("s4", "sleep");
  auto [done, f] = t.answer(first);
  caf::anon_send(t.registry, session_exec_atom::value, first, done);
  done = {};
  {
    std::unique_lock<std::mutex> lk{t.sc.mtx};
    REQUIRE(t.sc.cv.wait_for(lk, hang_guard, [&] { return !t.sc.kept.empty(); }));
  }
  // The first runs as its caller's call would (session_card.hpp): a call
  // routed now waits behind it on the card, one sent to the actor waits there.
  auto waiting = t.execute("s4", "ping");
  auto [done3, f3] = t.answer(waiting);
  t.route(std::move(waiting), std::move(done3));
  auto second = t.execute("s4", "ping");
  auto [done2, f2] = t.answer(second);
  REQUIRE(t.directory->send_call("s4", second.c, second.opts, done2));
  done2 = {};
  {
    std::lock_guard<std::mutex> lk{t.sc.mtx};
    CHECK(t.sc.lane_calls.size() == 1);  // neither started
  }
  caf::anon_send_exit(t.registry, caf::exit_reason::kill);
  for (auto* fut : {&f, &f2, &f3}) {
    auto r = t.wait(*fut);
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().type == "sessions_unavailable");
    CHECK(r.error().context.at("session_id") == "s4");
  }
}

/// A session actor that only reports the calls it gets (their args.n) to `to`.
static session_actor_handle::behavior_type reporting_session(session_actor_handle::pointer,
                                                      caf::actor to) {
  return {
    [to](session_call_atom, call& c, detail::client_call_options&, completion&) {
      caf::anon_send(to, c.args.at("n").get<int>());
    },
    [](session_info_atom) { return outcome::success(nlohmann::json::object()); },
    [](session_idle_atom) { return false; },
    [](session_end_atom) { return outcome::success(nlohmann::json::object()); },
    [](session_reply_atom, std::uint64_t, outcome&) {},
    [](session_qtmo_atom, std::uint64_t) {},
    [](session_card_atom) {},
    [](session_watch_atom) {},
    [](session_adopt_atom, std::shared_ptr<detail::session_handover>&) {},
  };
}

TEST_CASE("session directory: a call through the registry holds the session's later calls behind it") {
  session_path t;
  caf::scoped_actor self{t.sys};
  auto actor = t.sys.spawn(reporting_session, caf::actor_cast<caf::actor>(self));
  // Its own directory: the fixture's registry clears the fixture's when it starts.
  detail::session_directory dir;
  auto send = [&](const std::string& id, int n) {
    call c;
    c.args = {{"n", n}};
    completion none;
    return dir.send_call(id, c, detail::client_call_options{}, none);
  };
  auto card = std::make_shared<detail::session_card>();  // only counted here
  dir.add("s6", actor, card);
  CHECK(send("s6", 1));
  auto token = dir.in_transit("s6");
  CHECK_FALSE(send("s6", 2));
  auto second = dir.in_transit("s6");
  dir.arrived("s6", token);
  CHECK_FALSE(send("s6", 3));  // one still on its way
  dir.arrived("s6", second);
  CHECK(send("s6", 4));
  // A session removed while a call is on its way: the call makes a new one.
  auto third = dir.in_transit("s6");
  dir.remove("s6", actor.address());
  CHECK_FALSE(send("s6", 5));
  dir.arrived("s6", third);
  CHECK_FALSE(send("s6", 6));
  // Counts from before a clear() (the registry restarted) are forgotten.
  auto stale = dir.in_transit("s7");
  dir.clear();
  dir.add("s7", actor, card);
  CHECK(send("s7", 7));
  dir.arrived("s7", stale);
  CHECK(send("s7", 8));
  auto fresh = dir.in_transit("s7");
  CHECK_FALSE(send("s7", 9));
  dir.arrived("s7", fresh);
  CHECK(send("s7", 10));
  std::vector<int> got;
  for (int i = 0; i < 5; ++i)
    self->receive([&](int x) { got.push_back(x); },
                  caf::after(hang_guard) >> [&] { FAIL("a sent message did not arrive"); });
  CHECK(got == std::vector<int>{1, 4, 7, 8, 10});
  caf::anon_send_exit(actor, caf::exit_reason::user_shutdown);
}

TEST_CASE("session path: one caller's calls reach the session in the order they were made") {
  session_path t;
  // The first call of each session goes through the registry, the next ones
  // right after it from the same thread: none may overtake it.
  constexpr int sessions = 200, per_session = 4;
  std::vector<std::future<outcome>> answers;
  for (int s = 0; s < sessions; ++s)
    for (int k = 0; k < per_session; ++k) {
      auto r = t.execute("order-" + std::to_string(s), "ping");
      r.c.args["k"] = k;
      auto [done, f] = t.answer(r);
      answers.push_back(std::move(f));
      t.directory->route(std::move(r), std::move(done), [&](session_request first, completion d) {
        caf::anon_send(t.registry, session_exec_atom::value, std::move(first), std::move(d));
      });
    }
  for (auto& f : answers)
    REQUIRE(t.wait(f).ok());
  std::lock_guard<std::mutex> lk{t.sc.mtx};
  REQUIRE(t.sc.lane_calls.size() == sessions * per_session);
  std::map<std::string, int> next;
  for (auto& c : t.sc.lane_calls) {
    auto sid = c.args.at("session_id").get<std::string>();
    CHECK(c.args.at("k") == next[sid]);
    ++next[sid];
  }
  CHECK(t.sc.client_calls.empty());
}

// -- the session card: a session's call run by its caller (session_card.hpp) ---------------

TEST_CASE("session card: an idle session's call is run by its caller, the next waits on the card and is started by the one before it") {
  session_path t;
  REQUIRE(t.call_and_wait("s8", "ping").ok());
  // Idle: this thread starts the next call on the lane itself.
  REQUIRE(t.call_and_wait("s8", "ping").ok());
  const auto me = std::this_thread::get_id();
  {
    std::lock_guard<std::mutex> lk{t.sc.mtx};
    REQUIRE(t.sc.lane_calls.size() == 2);
    CHECK(t.sc.lane_threads.at(0) != me);  // the first: through the registry and the actor
    CHECK(t.sc.lane_threads.at(1) == me);
    CHECK(t.sc.lane_calls.at(1).preferred_worker == "w1");  // the session's worker, as before
    CHECK(t.sc.lane_calls.at(1).args.at("session_id") == "s8");
    t.sc.lane_answers = false;  // the next call stays in flight, its caller holding the card
  }
  auto a = t.execute("s8", "sleep");
  a.c.args["k"] = 1;
  auto [done3, f3] = t.answer(a);
  t.route(std::move(a), std::move(done3));
  completion kept;
  {
    std::lock_guard<std::mutex> lk{t.sc.mtx};
    REQUIRE(t.sc.kept.size() == 1);  // started on this thread, before route returned
    CHECK(t.sc.lane_threads.back() == me);
    kept = t.sc.kept.front();
    t.sc.kept.clear();
    t.sc.lane_answers = true;
  }
  // Busy: this call waits on the card (one call in flight per session).
  auto b = t.execute("s8", "ping");
  b.c.args["k"] = 2;
  auto [done4, f4] = t.answer(b);
  t.route(std::move(b), std::move(done4));
  {
    std::lock_guard<std::mutex> lk{t.sc.mtx};
    CHECK(t.sc.lane_calls.size() == 3);  // not on the lane while the first holds the card
  }
  // The first is answered (here): it passes the card to the second and starts it.
  kept.fn(served("w1"));
  kept = {};
  REQUIRE(t.wait(f3).ok());
  REQUIRE(t.wait(f4).ok());
  std::lock_guard<std::mutex> lk{t.sc.mtx};
  REQUIRE(t.sc.lane_calls.size() == 4);
  CHECK(t.sc.lane_calls.at(3).args.at("k") == 2);
  CHECK(t.sc.lane_threads.at(3) == me);
  CHECK(t.sc.client_calls.empty());
  CHECK(t.sc.unscripted.empty());
}

TEST_CASE("session card: a call the session answers itself waits for the card, and the calls after it go through the actor") {
  session_path t;
  REQUIRE(t.call_and_wait("s10", "ping").ok());
  {
    std::lock_guard<std::mutex> lk{t.sc.mtx};
    t.sc.lane_answers = false;
  }
  auto a = t.execute("s10", "sleep");
  auto [done2, f2] = t.answer(a);
  t.route(std::move(a), std::move(done2));  // run here, kept in flight: this caller holds the card
  completion kept;
  {
    std::lock_guard<std::mutex> lk{t.sc.mtx};
    REQUIRE(t.sc.kept.size() == 1);
    kept = t.sc.kept.front();
    t.sc.kept.clear();
    t.sc.lane_answers = true;
  }
  // list_programs is the session's own answer: the actor's, once it has the card.
  auto list = t.execute("s10", "list_programs");
  auto [done3, f3] = t.answer(list);
  t.route(std::move(list), std::move(done3));
  // The actor waits for the card: this call follows it there, not on the card.
  auto c = t.execute("s10", "ping");
  c.c.args["k"] = 3;
  auto [done4, f4] = t.answer(c);
  t.route(std::move(c), std::move(done4));
  kept.fn(served("w1"));
  kept = {};
  REQUIRE(t.wait(f2).ok());
  auto listed = t.wait(f3);
  REQUIRE(listed.ok());
  CHECK(listed.value().at("total_count") == 0);
  REQUIRE(t.wait(f4).ok());
  const auto me = std::this_thread::get_id();
  {
    std::lock_guard<std::mutex> lk{t.sc.mtx};
    REQUIRE(t.sc.lane_calls.size() == 3);  // list_programs never reached a worker
    CHECK(t.sc.lane_calls.at(2).args.at("k") == 3);
    CHECK(t.sc.lane_threads.at(2) != me);  // the actor's: it had the card
  }
  // Idle again: the card went back to the callers.
  REQUIRE(t.call_and_wait("s10", "ping").ok());
  std::lock_guard<std::mutex> lk{t.sc.mtx};
  REQUIRE(t.sc.lane_calls.size() == 4);
  CHECK(t.sc.lane_threads.at(3) == me);
  CHECK(t.sc.client_calls.empty());
  CHECK(t.sc.unscripted.empty());
}

namespace {

// An adapter whose "needs_repair" reply asks for one repair ("fix" on the
// worker that answered); it answers nothing itself.
class repairing_adapter : public detail::session_adapter {
public:
  std::optional<local_answer> answer_locally(const call&) override { return std::nullopt; }
  bool may_answer_locally(const call&) const override { return false; }
  void complete(call&, detail::client_call_options&) const override {}
  std::optional<repair> on_reply(const call& c, const outcome& o, int repairs) override {
    if (c.command != "needs_repair" || repairs > 0)
      return std::nullopt;
    return repair{o.served_by(), "fix", {{"why", "test"}}};
  }
  worker_sweep end_sweep() const override { return {"cleanup_session", {}}; }
  void note_sweep_answer(const outcome&, nlohmann::json&) const override {}
  nlohmann::json info() const override { return nlohmann::json::object(); }
  nlohmann::json end_summary(const nlohmann::json&) const override {
    return nlohmann::json::object();
  }
};

} // namespace

TEST_CASE("session card: a reply its caller got that asks for a repair goes to the actor, with the card") {
  session_path t{[](const std::string&) { return std::make_unique<repairing_adapter>(); }};
  REQUIRE(t.call_and_wait("s9", "ping").ok());
  auto r = t.execute("s9", "needs_repair");
  auto [done2, f2] = t.answer(r);
  t.route(std::move(r), std::move(done2));
  auto o = t.wait(f2);
  REQUIRE(o.ok());
  const auto me = std::this_thread::get_id();
  {
    std::lock_guard<std::mutex> lk{t.sc.mtx};
    // The repair (strict_queue: the pool client), on the worker that answered.
    REQUIRE(t.sc.client_calls.size() == 1);
    CHECK(t.sc.client_calls.at(0).command == "fix");
    CHECK(t.sc.client_calls.at(0).preferred_worker == "w1");
    // The call: first by its caller, then again by the actor.
    REQUIRE(t.sc.lane_calls.size() == 3);
    CHECK(t.sc.lane_calls.at(1).command == "needs_repair");
    CHECK(t.sc.lane_threads.at(1) == me);
    CHECK(t.sc.lane_calls.at(2).command == "needs_repair");
    CHECK(t.sc.lane_threads.at(2) != me);
    CHECK(t.sc.unscripted.empty());
  }
  // The card came back to the callers: the next call is this thread's again.
  REQUIRE(t.call_and_wait("s9", "ping").ok());
  std::lock_guard<std::mutex> lk{t.sc.mtx};
  REQUIRE(t.sc.lane_calls.size() == 4);
  CHECK(t.sc.lane_threads.at(3) == me);
}

TEST_CASE("session card: a call waiting on the card is answered at its deadline when it comes before the running call's end") {
  session_path t;
  REQUIRE(t.call_and_wait("s11", "ping").ok());
  {
    std::lock_guard<std::mutex> lk{t.sc.mtx};
    t.sc.lane_answers = false;
  }
  auto slow = t.execute("s11", "sleep");  // runs here and stays in flight (30 s deadline)
  auto [done2, f2] = t.answer(slow);
  t.route(std::move(slow), std::move(done2));
  auto quick = t.execute("s11", "ping");
  quick.c.deadline = std::chrono::steady_clock::now() + 200ms;
  auto [done3, f3] = t.answer(quick);
  t.route(std::move(quick), std::move(done3));  // waits on the card behind it
  auto r = t.wait(f3);  // while the first is still in flight
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().category == error_category::timeout_error);
  CHECK(r.error().type == "checkout_timeout");
  CHECK(r.error().context.at("session_id") == "s11");
  std::lock_guard<std::mutex> lk{t.sc.mtx};
  CHECK(t.sc.lane_calls.size() == 2);  // it never reached a worker
  REQUIRE(t.sc.kept.size() == 1);
}
