// The OTP-style supervisor with real child actors: strategies, restart types,
// restart intensity, nesting, and the ordered, bounded shutdown.
//
// Every wait is on an event (the supervisor's observer), a reply or a
// down_msg, with a generous limit that only catches hangs. The order of
// events is asserted only where the supervisor itself makes it so (it stops
// one child at a time and waits for its down_msg) or where causality does
// (a nested supervisor's events before its parent sees it end); never on the
// relative order of down/exit messages from unrelated actors.
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <caf/all.hpp>
#include <doctest/doctest.h>

#include "dspex/actors/supervisor.hpp"

using namespace dspex;
using namespace std::chrono_literals;

namespace {

using tping_atom = caf::atom_constant<caf::atom("tping")>;  // () → generation
using crash_atom = caf::atom_constant<caf::atom("crash")>;  // (reason): quit with it

constexpr auto wait_limit = std::chrono::seconds{10};  // catches hangs only
using kind = supervisor_event_kind;

// -- what the supervisors and the children report --------------------------------------

struct recorder {
  std::mutex mtx;
  std::condition_variable cv;
  std::vector<supervisor_event> events;
  std::vector<std::string> notes;
  std::map<std::string, int> generations;

  void push(const supervisor_event& e) {
    std::lock_guard<std::mutex> guard{mtx};
    events.push_back(e);
    cv.notify_all();
  }

  void note(std::string x) {
    std::lock_guard<std::mutex> guard{mtx};
    notes.push_back(std::move(x));
    cv.notify_all();
  }

  int next_generation(const std::string& id) {
    std::lock_guard<std::mutex> guard{mtx};
    return ++generations[id];
  }

  std::size_t mark() {
    std::lock_guard<std::mutex> guard{mtx};
    return events.size();
  }

  std::size_t count_locked(kind k, const std::string& child, std::size_t from,
                           const std::string& sup) const {
    std::size_t n = 0;
    for (auto i = from; i < events.size(); ++i)
      if (events[i].kind == k && events[i].child_id == child
          && (sup.empty() || events[i].supervisor == sup))
        ++n;
    return n;
  }

  /// Waits until at least `n` events `k` for `child` were recorded since `from`.
  bool wait_event(kind k, const std::string& child, std::size_t n = 1, std::size_t from = 0,
                  const std::string& sup = "") {
    std::unique_lock<std::mutex> guard{mtx};
    return cv.wait_for(guard, wait_limit, [&] { return count_locked(k, child, from, sup) >= n; });
  }

  bool wait_note(const std::string& x) {
    std::unique_lock<std::mutex> guard{mtx};
    return cv.wait_for(guard, wait_limit, [&] {
      return std::find(notes.begin(), notes.end(), x) != notes.end();
    });
  }

  /// Events since `from` as "kind child" (or "sup/kind child" with `with_sup`).
  std::string trace(std::size_t from = 0, bool with_sup = false) {
    std::lock_guard<std::mutex> guard{mtx};
    std::string out;
    for (auto i = from; i < events.size(); ++i) {
      auto& e = events[i];
      if (!out.empty())
        out += ", ";
      if (with_sup)
        out += e.supervisor + "/";
      std::string k = to_string(e.kind);
      out += k.rfind("child_", 0) == 0 ? k.substr(6) : k;
      out += " " + e.child_id;
    }
    return out;
  }

  std::vector<supervisor_event> find(kind k, const std::string& child) {
    std::lock_guard<std::mutex> guard{mtx};
    std::vector<supervisor_event> xs;
    for (auto& e : events)
      if (e.kind == k && e.child_id == child)
        xs.push_back(e);
    return xs;
  }
};

// -- the children ------------------------------------------------------------------------

/// A child: answers tping with its generation, quits with the reason it is
/// sent in a crash. While its generation is at most `stubborn_gens`, it traps
/// exits and ignores them (only kill ends it), noting each one it sees.
caf::behavior test_child(caf::event_based_actor* self, std::string id, int generation,
                         int stubborn_gens, std::shared_ptr<recorder> rec) {
  if (generation <= stubborn_gens)
    self->set_exit_handler([=](caf::exit_msg& em) {
      rec->note("exit_seen:" + id + ":" + caf::to_string(em.reason));
    });
  return {
    [=](tping_atom) { return generation; },
    [=](crash_atom, caf::error& reason) { self->quit(std::move(reason)); },
  };
}

caf::error boom(const std::string& what) {
  return caf::make_error(caf::sec::runtime_error, "boom " + what);
}

/// Spawns a linked supervisor, keeps its handle, reports it, and quits with
/// the reason it is sent in a crash.
caf::behavior parent_actor(caf::event_based_actor* self, supervisor_flags flags,
                           std::vector<child_spec> specs, caf::actor report) {
  auto sup = spawn_linked_supervisor(self, std::move(flags), std::move(specs));
  self->send(report, sup);
  return {
    [=](crash_atom, caf::error& reason) {
      (void) sup;  // held: an actor nobody references is terminated
      self->quit(std::move(reason));
    },
  };
}

// -- the fixture -------------------------------------------------------------------------

struct harness {
  caf::actor_system_config cfg;
  caf::actor_system sys{cfg};
  caf::scoped_actor self{sys};
  std::shared_ptr<recorder> rec = std::make_shared<recorder>();
  std::map<caf::actor_addr, caf::error> downs;
  caf::actor sup;

  ~harness() {
    // Only after a failed assertion: nothing may outlive the test, or
    // ~actor_system() would block.
    if (sup) {
      self->send_exit(sup, caf::exit_reason::kill);
      await_down_of(sup);
    }
  }

  supervisor_flags flags(std::string name, restart_strategy strategy,
                         std::size_t max_restarts = 5,
                         std::chrono::milliseconds max_seconds = 30s) {
    supervisor_flags f;
    f.name = std::move(name);
    f.strategy = strategy;
    f.max_restarts = max_restarts;
    f.max_seconds = max_seconds;
    f.observer = [r = rec](const supervisor_event& e) { r->push(e); };
    return f;
  }

  child_spec child(std::string id, restart_type restart = restart_type::permanent,
                   std::chrono::milliseconds shutdown_timeout = 5s, int stubborn_gens = 0) {
    child_spec s;
    s.id = id;
    s.restart = restart;
    s.shutdown_timeout = shutdown_timeout;
    s.start = [r = rec, id, stubborn_gens](caf::event_based_actor* sup) {
      return sup->spawn<caf::linked>(test_child, id, r->next_generation(id), stubborn_gens, r);
    };
    return s;
  }

  /// A child whose start fails from generation `fail_from` on.
  child_spec failing_child(std::string id, int fail_from) {
    auto s = child(id);
    s.start = [r = rec, id, fail_from](caf::event_based_actor* sup) -> caf::actor {
      auto gen = r->next_generation(id);
      if (gen >= fail_from)
        throw std::runtime_error("cannot start " + id);
      return sup->spawn<caf::linked>(test_child, id, gen, 0, r);
    };
    return s;
  }

  void start(supervisor_flags f, std::vector<child_spec> specs) {
    sup = spawn_supervisor(sys, std::move(f), std::move(specs));
    self->monitor(sup);
  }

  std::vector<child_info> children_of(const caf::actor& who) {
    std::vector<child_info> xs;
    bool answered = false;
    self->request(who, wait_limit, which_children_atom::value)
      .receive(
        [&](std::vector<child_info>& ys) {
          xs = std::move(ys);
          answered = true;
        },
        [&](caf::error& err) { FAIL_CHECK("which_children failed: " << sys.render(err)); });
    REQUIRE(answered);
    return xs;
  }

  std::vector<child_info> children() { return children_of(sup); }

  static std::string ids(const std::vector<child_info>& xs) {
    std::string out;
    for (auto& x : xs)
      out += (out.empty() ? "" : ",") + x.id;
    return out;
  }

  static std::string restarts(const std::vector<child_info>& xs) {
    std::string out;
    for (auto& x : xs)
      out += (out.empty() ? "" : ",") + std::to_string(x.restarts);
    return out;
  }

  caf::actor actor_of(const std::vector<child_info>& xs, const std::string& id) {
    for (auto& x : xs)
      if (x.id == id)
        return x.actor;
    FAIL("no child " << id);
    return nullptr;
  }

  caf::actor child_actor(const std::string& id) { return actor_of(children(), id); }

  int ping(const caf::actor& who) {
    int gen = -1;
    self->request(who, wait_limit, tping_atom::value)
      .receive([&](int g) { gen = g; },
               [&](caf::error& err) { FAIL_CHECK("ping failed: " << sys.render(err)); });
    return gen;
  }

  std::string generations() {
    std::string out;
    for (auto& x : children())
      out += (out.empty() ? "" : ",") + (x.actor ? std::to_string(ping(x.actor)) : "-");
    return out;
  }

  void crash(const std::string& id, caf::error reason) {
    self->send(child_actor(id), crash_atom::value, std::move(reason));
  }

  /// Waits for the down_msg of `who` and returns its reason. Down messages
  /// of other actors read meanwhile are kept for their own wait.
  caf::error await_down_of(caf::actor& who) {
    auto addr = who.address();
    auto deadline = std::chrono::steady_clock::now() + wait_limit;
    while (downs.count(addr) == 0 && std::chrono::steady_clock::now() < deadline) {
      self->receive([&](caf::down_msg& dm) { downs.emplace(dm.source, std::move(dm.reason)); },
                    caf::after(std::chrono::milliseconds{100}) >> [] {});
    }
    REQUIRE_MESSAGE(downs.count(addr) == 1, "no down_msg within the limit");
    who = nullptr;
    return downs[addr];
  }

  caf::error await_down() { return await_down_of(sup); }

  /// The stop message: answered with true, then the supervisor goes down.
  caf::error stop() {
    bool answer = false;
    self->request(sup, wait_limit, supervisor_stop_atom::value)
      .receive([&](bool b) { answer = b; },
               [&](caf::error& err) { FAIL_CHECK("stop failed: " << sys.render(err)); });
    CHECK(answer);
    return await_down();
  }
};

std::string str(const caf::error& e) {
  return caf::to_string(e);
}

} // namespace

// -- strategies ----------------------------------------------------------------------------

TEST_CASE("one_for_one restarts only the failed child") {
  harness h;
  h.start(h.flags("sup", restart_strategy::one_for_one),
          {h.child("a"), h.child("b"), h.child("c")});
  REQUIRE(h.rec->wait_event(kind::child_started, "c"));
  CHECK(h.rec->trace() == "started a, started b, started c");
  auto before = h.children();
  CHECK(h.ids(before) == "a,b,c");
  CHECK(h.generations() == "1,1,1");

  auto m = h.rec->mark();
  h.crash("b", boom("b"));
  REQUIRE(h.rec->wait_event(kind::child_restarted, "b", 1, m));
  CHECK(h.rec->trace(m) == "exited b, restarted b");
  auto exited = h.rec->find(kind::child_exited, "b");
  REQUIRE(exited.size() == 1);
  CHECK(str(exited[0].reason) == str(boom("b")));

  auto after = h.children();
  CHECK(h.ids(after) == "a,b,c");
  CHECK(h.restarts(after) == "0,1,0");
  CHECK(after[0].actor == before[0].actor);
  CHECK(after[1].actor != before[1].actor);
  CHECK(after[2].actor == before[2].actor);
  CHECK(h.generations() == "1,2,1");
  before.clear();
  after.clear();

  m = h.rec->mark();
  CHECK(!h.stop());
  CHECK(h.rec->trace(m) == "stopped c, stopped b, stopped a");
}

TEST_CASE("one_for_all stops the others in reverse order and restarts all in start order") {
  harness h;
  h.start(h.flags("sup", restart_strategy::one_for_all),
          {h.child("a"), h.child("b"), h.child("c")});
  REQUIRE(h.rec->wait_event(kind::child_started, "c"));

  auto m = h.rec->mark();
  h.crash("b", boom("b"));
  REQUIRE(h.rec->wait_event(kind::child_restarted, "c", 1, m));
  CHECK(h.rec->trace(m)
        == "exited b, stopped c, stopped a, restarted a, restarted b, restarted c");
  for (auto& e : h.rec->find(kind::child_stopped, "a")) {
    CHECK(e.reason == caf::exit_reason::user_shutdown);
    CHECK(!e.killed);
  }
  auto xs = h.children();
  CHECK(h.ids(xs) == "a,b,c");
  CHECK(h.restarts(xs) == "1,1,1");
  CHECK(h.generations() == "2,2,2");
  xs.clear();

  // The first child fails: the same for all.
  m = h.rec->mark();
  h.crash("a", boom("a"));
  REQUIRE(h.rec->wait_event(kind::child_restarted, "c", 1, m));
  CHECK(h.rec->trace(m)
        == "exited a, stopped c, stopped b, restarted a, restarted b, restarted c");
  CHECK(h.generations() == "3,3,3");

  CHECK(!h.stop());
}

TEST_CASE("rest_for_one restarts the failed child and those started after it") {
  harness h;
  h.start(h.flags("sup", restart_strategy::rest_for_one),
          {h.child("a"), h.child("b"), h.child("c")});
  REQUIRE(h.rec->wait_event(kind::child_started, "c"));
  auto a_before = h.child_actor("a");

  auto m = h.rec->mark();
  h.crash("b", boom("b"));
  REQUIRE(h.rec->wait_event(kind::child_restarted, "c", 1, m));
  CHECK(h.rec->trace(m) == "exited b, stopped c, restarted b, restarted c");
  CHECK(h.child_actor("a") == a_before);
  CHECK(h.restarts(h.children()) == "0,1,1");
  CHECK(h.generations() == "1,2,2");

  SUBCASE("the first child: all of them") {
    m = h.rec->mark();
    h.crash("a", boom("a"));
    REQUIRE(h.rec->wait_event(kind::child_restarted, "c", 1, m));
    CHECK(h.rec->trace(m)
          == "exited a, stopped c, stopped b, restarted a, restarted b, restarted c");
    CHECK(h.generations() == "2,3,3");
  }
  SUBCASE("the last child: only itself") {
    m = h.rec->mark();
    h.crash("c", boom("c"));
    REQUIRE(h.rec->wait_event(kind::child_restarted, "c", 1, m));
    CHECK(h.rec->trace(m) == "exited c, restarted c");
    CHECK(h.generations() == "1,2,3");
  }
  a_before = nullptr;
  CHECK(!h.stop());
}

TEST_CASE("group restarts: a child that ended normally stays down, a temporary one is removed") {
  harness h;
  h.start(h.flags("sup", restart_strategy::one_for_all),
          {h.child("a", restart_type::transient), h.child("b"),
           h.child("t", restart_type::temporary), h.child("c")});
  REQUIRE(h.rec->wait_event(kind::child_started, "c"));
  h.crash("a", caf::error{});
  REQUIRE(h.rec->wait_event(kind::child_exited, "a"));
  auto m = h.rec->mark();
  h.crash("b", boom("b"));
  REQUIRE(h.rec->wait_event(kind::child_restarted, "c", 1, m));
  CHECK(h.rec->trace(m) == "exited b, stopped c, stopped t, restarted b, restarted c");
  auto xs = h.children();
  CHECK(h.ids(xs) == "a,b,c");
  CHECK(!static_cast<bool>(xs[0].actor));
  CHECK(h.restarts(xs) == "0,1,1");
  xs.clear();
  CHECK(h.generations() == "-,2,2");
  m = h.rec->mark();
  CHECK(!h.stop());
  CHECK(h.rec->trace(m) == "stopped c, stopped b");
}

// -- restart types -------------------------------------------------------------------------

TEST_CASE("restart types: permanent always, transient after abnormal exits, temporary never") {
  harness h;
  h.start(h.flags("sup", restart_strategy::one_for_one, 10),
          {h.child("perm", restart_type::permanent), h.child("tr_ok", restart_type::transient),
           h.child("tr_bad", restart_type::transient),
           h.child("tr_shut", restart_type::transient),
           h.child("tmp_ok", restart_type::temporary),
           h.child("tmp_bad", restart_type::temporary)});
  REQUIRE(h.rec->wait_event(kind::child_started, "tmp_bad"));

  // Each exit is handled in full before the supervisor reads its next message,
  // so which_children after the child_exited event shows the decision.
  auto exit_and_settle = [&](const std::string& id, caf::error reason) {
    auto m = h.rec->mark();
    h.crash(id, std::move(reason));
    REQUIRE(h.rec->wait_event(kind::child_exited, id, 1, m));
    auto xs = h.children();
    return std::make_pair(h.rec->trace(m), xs);
  };

  SUBCASE("permanent: restarted after a normal exit too") {
    auto [trace, xs] = exit_and_settle("perm", caf::error{});
    CHECK(trace == "exited perm, restarted perm");
    CHECK(static_cast<bool>(h.actor_of(xs, "perm")));
    CHECK(xs[0].restarts == 1);
    auto [trace2, ys] = exit_and_settle("perm", boom("perm"));
    CHECK(trace2 == "exited perm, restarted perm");
    CHECK(ys[0].restarts == 2);
  }
  SUBCASE("transient: a normal exit is final") {
    auto [trace, xs] = exit_and_settle("tr_ok", caf::error{});
    CHECK(trace == "exited tr_ok");
    CHECK(h.ids(xs) == "perm,tr_ok,tr_bad,tr_shut,tmp_ok,tmp_bad");
    CHECK(!static_cast<bool>(h.actor_of(xs, "tr_ok")));
    CHECK(xs[1].restarts == 0);
  }
  SUBCASE("transient: an abnormal exit restarts it") {
    auto [trace, xs] = exit_and_settle("tr_bad", boom("tr_bad"));
    CHECK(trace == "exited tr_bad, restarted tr_bad");
    CHECK(static_cast<bool>(h.actor_of(xs, "tr_bad")));
    CHECK(xs[2].restarts == 1);
  }
  SUBCASE("transient: user_shutdown counts as normal, as OTP's shutdown") {
    auto m = h.rec->mark();
    h.self->send_exit(h.child_actor("tr_shut"), caf::exit_reason::user_shutdown);
    REQUIRE(h.rec->wait_event(kind::child_exited, "tr_shut", 1, m));
    auto xs = h.children();
    CHECK(h.rec->trace(m) == "exited tr_shut");
    CHECK(!static_cast<bool>(h.actor_of(xs, "tr_shut")));
  }
  SUBCASE("temporary: never restarted, and removed") {
    auto [trace, xs] = exit_and_settle("tmp_ok", caf::error{});
    CHECK(trace == "exited tmp_ok");
    CHECK(h.ids(xs) == "perm,tr_ok,tr_bad,tr_shut,tmp_bad");
    auto [trace2, ys] = exit_and_settle("tmp_bad", boom("tmp_bad"));
    CHECK(trace2 == "exited tmp_bad");
    CHECK(h.ids(ys) == "perm,tr_ok,tr_bad,tr_shut");
  }
  // The children that are still running stop in reverse order; the others
  // are skipped.
  auto running = h.children();
  std::vector<std::string> expected;
  for (auto it = running.rbegin(); it != running.rend(); ++it)
    if (it->actor)
      expected.push_back("stopped " + it->id);
  running.clear();
  std::string joined;
  for (auto& x : expected)
    joined += (joined.empty() ? "" : ", ") + x;
  auto m = h.rec->mark();
  CHECK(!h.stop());
  CHECK(h.rec->trace(m) == joined);
}

TEST_CASE("a child killed by a third party is restarted, and the supervisor survives the kill") {
  // In CAF 0.17 an exit_msg with reason kill through a link is fatal even to
  // an actor that traps exits: the supervisor must not stay linked.
  harness h;
  h.start(h.flags("sup", restart_strategy::one_for_one), {h.child("a"), h.child("b")});
  REQUIRE(h.rec->wait_event(kind::child_started, "b"));
  auto m = h.rec->mark();
  h.self->send_exit(h.child_actor("b"), caf::exit_reason::kill);
  REQUIRE(h.rec->wait_event(kind::child_restarted, "b", 1, m));
  CHECK(h.rec->trace(m) == "exited b, restarted b");
  auto ev = h.rec->find(kind::child_exited, "b");
  REQUIRE(ev.size() == 1);
  CHECK(ev[0].reason == caf::exit_reason::kill);
  CHECK(h.generations() == "1,2");
  CHECK(!h.stop());
}

// -- restart intensity ---------------------------------------------------------------------

TEST_CASE("intensity exceeded: the supervisor gives up and its monitor sees why") {
  harness h;
  h.start(h.flags("sup", restart_strategy::one_for_one, 2, 30s),
          {h.child("a"), h.child("b"), h.child("c")});
  REQUIRE(h.rec->wait_event(kind::child_started, "c"));
  for (std::size_t i = 1; i <= 2; ++i) {
    h.crash("b", boom("b" + std::to_string(i)));
    REQUIRE(h.rec->wait_event(kind::child_restarted, "b", i));
  }
  auto m = h.rec->mark();
  h.crash("b", boom("b3"));
  auto reason = h.await_down();
  CHECK(h.rec->trace(m) == "exited b, gave_up b, stopped c, stopped a");

  auto info = decode_supervisor_exit(reason);
  REQUIRE(info);
  CHECK(info->code == supervisor_exit::gave_up);
  CHECK(info->supervisor == "sup");
  CHECK(info->child_id == "b");
  CHECK(str(info->child_reason) == str(boom("b3")));
  CHECK(info->restarts == 3);
  auto gave_up = h.rec->find(kind::gave_up, "b");
  REQUIRE(gave_up.size() == 1);
  CHECK(str(gave_up[0].reason) == str(reason));
  auto err = to_error(*info);
  CHECK(err.category == error_category::resource_error);
  CHECK(err.type == "supervisor_gave_up");
  CHECK(err.context["child_id"] == "b");
  CHECK(err.message.find("'b'") != std::string::npos);
}

TEST_CASE("max_restarts 0: the first failure is too many") {
  harness h;
  h.start(h.flags("sup", restart_strategy::one_for_all, 0), {h.child("a"), h.child("b")});
  REQUIRE(h.rec->wait_event(kind::child_started, "b"));
  auto m = h.rec->mark();
  h.crash("a", boom("a"));
  auto info = decode_supervisor_exit(h.await_down());
  REQUIRE(info);
  CHECK(info->child_id == "a");
  CHECK(h.rec->trace(m) == "exited a, gave_up a, stopped b");
}

TEST_CASE("restarts older than max_seconds do not count") {
  harness h;
  h.start(h.flags("sup", restart_strategy::one_for_one, 1, 100ms), {h.child("a")});
  REQUIRE(h.rec->wait_event(kind::child_started, "a"));
  h.crash("a", boom("a1"));
  REQUIRE(h.rec->wait_event(kind::child_restarted, "a", 1));
  // Not waiting for something to happen: letting the window pass.
  std::this_thread::sleep_for(300ms);
  h.crash("a", boom("a2"));
  REQUIRE(h.rec->wait_event(kind::child_restarted, "a", 2));
  CHECK(h.rec->find(kind::gave_up, "a").empty());
  CHECK(h.restarts(h.children()) == "2");
  CHECK(!h.stop());
}

TEST_CASE("a failing restart is retried, each retry counting against the intensity") {
  harness h;
  h.start(h.flags("sup", restart_strategy::one_for_one, 2, 30s),
          {h.child("a"), h.failing_child("b", 2), h.child("c")});
  REQUIRE(h.rec->wait_event(kind::child_started, "c"));
  auto m = h.rec->mark();
  h.crash("b", boom("b"));
  auto info = decode_supervisor_exit(h.await_down());
  CHECK(h.rec->trace(m)
        == "exited b, start_failed b, start_failed b, gave_up b, stopped c, stopped a");
  REQUIRE(info);
  CHECK(info->child_id == "b");
  CHECK(info->child_reason == caf::sec::runtime_error);
  CHECK(str(info->child_reason).find("cannot start b") != std::string::npos);
}

TEST_CASE("a child that cannot start at first makes the supervisor stop the others and exit") {
  harness h;
  h.start(h.flags("sup", restart_strategy::one_for_one),
          {h.child("a"), h.failing_child("b", 1), h.child("c")});
  auto reason = h.await_down();
  CHECK(h.rec->trace() == "started a, start_failed b, stopped a");
  auto info = decode_supervisor_exit(reason);
  REQUIRE(info);
  CHECK(info->code == supervisor_exit::start_failed);
  CHECK(info->child_id == "b");
  CHECK(str(info->child_reason).find("cannot start b") != std::string::npos);
  CHECK(to_error(*info).category == error_category::initialization_error);
}

// -- nesting -------------------------------------------------------------------------------

TEST_CASE("nested supervisors: a child supervisor giving up is an abnormal exit of that child") {
  harness h;
  auto inner_flags = h.flags("inner", restart_strategy::one_for_one, 0);
  h.start(h.flags("root", restart_strategy::one_for_one, 3),
          {h.child("x"), supervisor_child("inner", inner_flags, {h.child("i1"), h.child("i2")}),
           h.child("y")});
  REQUIRE(h.rec->wait_event(kind::child_started, "y", 1, 0, "root"));
  REQUIRE(h.rec->wait_event(kind::child_started, "i2", 1, 0, "inner"));
  auto inner = h.child_actor("inner");
  auto x_before = h.child_actor("x");
  auto y_before = h.child_actor("y");

  auto m = h.rec->mark();
  h.self->send(h.actor_of(h.children_of(inner), "i1"), crash_atom::value, boom("i1"));
  REQUIRE(h.rec->wait_event(kind::child_restarted, "inner", 1, m, "root"));
  REQUIRE(h.rec->wait_event(kind::child_started, "i2", 2, 0, "inner"));
  // Causal order up to the parent seeing the inner supervisor end; the new
  // inner supervisor starts its children concurrently with the parent's event.
  auto trace = h.rec->trace(m, true);
  auto prefix = std::string{"inner/exited i1, inner/gave_up i1, inner/stopped i2, "
                            "root/exited inner, "};
  CHECK(trace.substr(0, prefix.size()) == prefix);
  auto rest = trace.substr(std::min(prefix.size(), trace.size()));
  CHECK(rest.find("root/restarted inner") != std::string::npos);
  CHECK(rest.find("inner/started i1") != std::string::npos);
  CHECK(rest.find("inner/started i2") != std::string::npos);
  CHECK(rest.find("inner/started i1") < rest.find("inner/started i2"));

  auto exited = h.rec->find(kind::child_exited, "inner");
  REQUIRE(exited.size() == 1);
  auto info = decode_supervisor_exit(exited[0].reason);
  REQUIRE(info);
  CHECK(info->supervisor == "inner");
  CHECK(info->child_id == "i1");
  CHECK(str(info->child_reason) == str(boom("i1")));

  // The siblings of the inner supervisor are untouched; it has new children.
  CHECK(h.child_actor("x") == x_before);
  CHECK(h.child_actor("y") == y_before);
  CHECK(h.restarts(h.children()) == "0,1,0");
  inner = h.child_actor("inner");
  auto inner_children = h.children_of(inner);
  CHECK(h.ids(inner_children) == "i1,i2");
  CHECK(h.ping(inner_children[0].actor) == 2);
  CHECK(h.ping(inner_children[1].actor) == 2);
  inner = x_before = y_before = nullptr;
  inner_children.clear();

  // Ordered shutdown through the tree: the inner supervisor stops its own
  // children before the root sees it end.
  m = h.rec->mark();
  CHECK(!h.stop());
  CHECK(h.rec->trace(m, true)
        == "root/stopped y, inner/stopped i2, inner/stopped i1, root/stopped inner, "
           "root/stopped x");
  auto stopped = h.rec->find(kind::child_stopped, "inner");
  REQUIRE(stopped.size() == 1);
  CHECK(stopped[0].reason == caf::exit_reason::user_shutdown);
  CHECK(!stopped[0].killed);
}

TEST_CASE("nested supervisors: giving up travels up the tree with every reason inside") {
  harness h;
  h.start(h.flags("root", restart_strategy::one_for_one, 0),
          {h.child("x"),
           supervisor_child("inner", h.flags("inner", restart_strategy::one_for_one, 0),
                            {h.child("i1")})});
  REQUIRE(h.rec->wait_event(kind::child_started, "i1", 1, 0, "inner"));
  REQUIRE(h.rec->wait_event(kind::child_started, "inner", 1, 0, "root"));
  auto inner = h.child_actor("inner");
  auto m = h.rec->mark();
  h.self->send(h.actor_of(h.children_of(inner), "i1"), crash_atom::value, boom("i1"));
  inner = nullptr;
  auto reason = h.await_down();
  auto outer = decode_supervisor_exit(reason);
  REQUIRE(outer);
  CHECK(outer->supervisor == "root");
  CHECK(outer->child_id == "inner");
  auto nested = decode_supervisor_exit(outer->child_reason);
  REQUIRE(nested);
  CHECK(nested->supervisor == "inner");
  CHECK(nested->child_id == "i1");
  CHECK(str(nested->child_reason) == str(boom("i1")));
  auto err = to_error(*outer);
  REQUIRE(err.context.contains("cause"));
  CHECK(err.context["cause"]["context"]["child_id"] == "i1");
  CHECK(h.rec->trace(m, true)
        == "inner/exited i1, inner/gave_up i1, root/exited inner, root/gave_up inner, "
           "root/stopped x");
}

// -- ordered, bounded shutdown -------------------------------------------------------------

TEST_CASE("shutdown in reverse start order, a child ignoring shutdown killed after its timeout") {
  harness h;
  // b and d trap exits and ignore them: b is killed after 300 ms, d (timeout
  // 0) at once, without ever seeing user_shutdown.
  h.start(h.flags("sup", restart_strategy::one_for_one),
          {h.child("a"), h.child("b", restart_type::permanent, 300ms, 1), h.child("c"),
           h.child("d", restart_type::permanent, 0ms, 1)});
  REQUIRE(h.rec->wait_event(kind::child_started, "d"));
  auto m = h.rec->mark();
  auto t0 = std::chrono::steady_clock::now();
  CHECK(!h.stop());
  auto elapsed = std::chrono::steady_clock::now() - t0;
  CHECK(h.rec->trace(m) == "stopped d, stopped c, stopped b, stopped a");
  auto b = h.rec->find(kind::child_stopped, "b");
  auto d = h.rec->find(kind::child_stopped, "d");
  auto c = h.rec->find(kind::child_stopped, "c");
  REQUIRE(b.size() == 1);
  REQUIRE(c.size() == 1);
  REQUIRE(d.size() == 1);
  CHECK(b[0].killed);
  CHECK(b[0].reason == caf::exit_reason::kill);
  CHECK(d[0].killed);
  CHECK(d[0].reason == caf::exit_reason::kill);
  CHECK(!c[0].killed);
  CHECK(c[0].reason == caf::exit_reason::user_shutdown);
  CHECK(h.rec->wait_note("exit_seen:b:" + str(caf::exit_reason::user_shutdown)));
  {
    std::lock_guard<std::mutex> guard{h.rec->mtx};
    for (auto& n : h.rec->notes)
      CHECK(n.rfind("exit_seen:d:", 0) != 0);
  }
  // b's timeout was waited for in full (load only lengthens it), and the
  // whole shutdown ended (a hang guard, not a speed limit).
  CHECK(elapsed >= 300ms);
  CHECK(elapsed < 30s);
}

TEST_CASE("shutdown by an exit message: ordered, and the supervisor quits with that reason") {
  harness h;
  h.start(h.flags("sup", restart_strategy::one_for_one), {h.child("a"), h.child("b")});
  REQUIRE(h.rec->wait_event(kind::child_started, "b"));
  auto m = h.rec->mark();
  h.self->send_exit(h.sup, caf::exit_reason::user_shutdown);
  CHECK(h.await_down() == caf::exit_reason::user_shutdown);
  CHECK(h.rec->trace(m) == "stopped b, stopped a");
}

TEST_CASE("a child exiting during an ordered shutdown is not restarted") {
  harness h;
  // b ignores the shutdown until the test tells it to quit: while the
  // supervisor waits for b, a crashes.
  h.start(h.flags("sup", restart_strategy::one_for_all),
          {h.child("a"), h.child("b", restart_type::permanent, 30s, 1)});
  REQUIRE(h.rec->wait_event(kind::child_started, "b"));
  auto b = h.child_actor("b");
  auto a = h.child_actor("a");
  auto m = h.rec->mark();
  h.self->send_exit(h.sup, caf::exit_reason::user_shutdown);
  REQUIRE(h.rec->wait_note("exit_seen:b:" + str(caf::exit_reason::user_shutdown)));
  h.self->send(a, crash_atom::value, boom("a"));
  REQUIRE(h.rec->wait_event(kind::child_exited, "a", 1, m));
  h.self->send(b, crash_atom::value, caf::error{});
  a = b = nullptr;
  CHECK(h.await_down() == caf::exit_reason::user_shutdown);
  CHECK(h.rec->trace(m) == "exited a, stopped b");
  auto stopped = h.rec->find(kind::child_stopped, "b");
  REQUIRE(stopped.size() == 1);
  CHECK(!stopped[0].killed);
}

TEST_CASE("a stop during a group restart wins: nothing is restarted") {
  harness h;
  h.start(h.flags("sup", restart_strategy::one_for_all),
          {h.child("a"), h.child("b", restart_type::permanent, 30s, 1), h.child("c")});
  REQUIRE(h.rec->wait_event(kind::child_started, "c"));
  auto b = h.child_actor("b");
  auto m = h.rec->mark();
  h.crash("c", boom("c"));
  // The group restart is stopping b, which holds out.
  REQUIRE(h.rec->wait_note("exit_seen:b:" + str(caf::exit_reason::user_shutdown)));
  h.self->send(h.sup, supervisor_stop_atom::value);
  // The supervisor has read the stop once it answers which_children after it.
  auto xs = h.children();
  CHECK(xs.size() == 3);
  xs.clear();
  h.self->send(b, crash_atom::value, caf::error{});
  b = nullptr;
  CHECK(!h.await_down());
  CHECK(h.rec->trace(m) == "exited c, stopped b, stopped a");
}

TEST_CASE("a failure outside a group restart in progress is handled after it") {
  harness h;
  // c (first generation only) holds out against the stop of the group b, c;
  // meanwhile a fails, before them in start order.
  h.start(h.flags("sup", restart_strategy::rest_for_one),
          {h.child("a"), h.child("b"), h.child("c", restart_type::permanent, 30s, 1)});
  REQUIRE(h.rec->wait_event(kind::child_started, "c"));
  auto c = h.child_actor("c");
  auto m = h.rec->mark();
  h.crash("b", boom("b"));
  REQUIRE(h.rec->wait_note("exit_seen:c:" + str(caf::exit_reason::user_shutdown)));
  h.crash("a", boom("a"));
  REQUIRE(h.rec->wait_event(kind::child_exited, "a", 1, m));
  h.self->send(c, crash_atom::value, caf::error{});
  c = nullptr;
  REQUIRE(h.rec->wait_event(kind::child_restarted, "a", 1, m));
  REQUIRE(h.rec->wait_event(kind::child_restarted, "c", 2, m));
  CHECK(h.rec->trace(m)
        == "exited b, exited a, stopped c, restarted b, restarted c, "
           "stopped c, stopped b, restarted a, restarted b, restarted c");
  CHECK(h.generations() == "2,3,3");
  CHECK(h.restarts(h.children()) == "1,2,2");
  CHECK(!h.stop());
}

TEST_CASE("a killed supervisor takes every child with it, even one that traps exits") {
  harness h;
  h.start(h.flags("sup", restart_strategy::one_for_one),
          {h.child("a"), h.child("b", restart_type::permanent, 30s, 1)});
  REQUIRE(h.rec->wait_event(kind::child_started, "b"));
  auto a = h.child_actor("a");
  auto b = h.child_actor("b");
  h.self->monitor(a);
  h.self->monitor(b);
  h.self->send_exit(h.sup, caf::exit_reason::kill);
  CHECK(h.await_down() == caf::exit_reason::kill);
  CHECK(h.await_down_of(a) == caf::exit_reason::kill);
  CHECK(h.await_down_of(b) == caf::exit_reason::kill);
}

TEST_CASE("a supervisor linked to a parent shuts down in order when the parent exits") {
  harness h;
  auto reason = caf::make_error(caf::sec::runtime_error, "parent gone");
  auto parent = h.sys.spawn(parent_actor, h.flags("sup", restart_strategy::one_for_one),
                            std::vector<child_spec>{h.child("a"), h.child("b")},
                            caf::actor{h.self});
  h.self->monitor(parent);
  h.self->receive([&](caf::actor& s) { h.sup = s; },
                  caf::after(wait_limit) >> [&] { FAIL("no supervisor reported"); });
  h.self->monitor(h.sup);
  REQUIRE(h.rec->wait_event(kind::child_started, "b"));
  auto m = h.rec->mark();
  h.self->send(parent, crash_atom::value, reason);
  CHECK(str(h.await_down_of(parent)) == str(reason));
  CHECK(str(h.await_down()) == str(reason));
  CHECK(h.rec->trace(m) == "stopped b, stopped a");
}

TEST_CASE("an empty supervisor stops at once") {
  harness h;
  h.start(h.flags("sup", restart_strategy::one_for_one), {});
  CHECK(h.children().empty());
  CHECK(!h.stop());
  CHECK(h.rec->trace().empty());
}

// -- helpers -------------------------------------------------------------------------------

TEST_CASE("exit reason helpers") {
  auto r = make_supervisor_exit(supervisor_exit::gave_up, "s", "c", boom("c"), 4);
  CHECK(is_supervisor_exit(r));
  auto info = decode_supervisor_exit(r);
  REQUIRE(info);
  CHECK(info->code == supervisor_exit::gave_up);
  CHECK(info->supervisor == "s");
  CHECK(info->child_id == "c");
  CHECK(info->restarts == 4);
  CHECK(describe(*info).find("supervisor 's' gave up") == 0);
  CHECK(!decode_supervisor_exit(caf::error{}));
  CHECK(!decode_supervisor_exit(caf::make_error(caf::exit_reason::kill)));
  CHECK(!decode_supervisor_exit(boom("x")));
  CHECK(is_normal_exit(caf::error{}));
  CHECK(is_normal_exit(caf::make_error(caf::exit_reason::user_shutdown)));
  CHECK(!is_normal_exit(caf::make_error(caf::exit_reason::kill)));
  CHECK(!is_normal_exit(boom("x")));
}

TEST_CASE("invalid child specs are refused before anything is spawned") {
  caf::actor_system_config cfg;
  caf::actor_system sys{cfg};
  child_spec ok;
  ok.id = "a";
  ok.start = [](caf::event_based_actor* s) { return s->spawn<caf::linked>([] {
                                                      return caf::behavior{[](int) {}};
                                                    }); };
  child_spec no_start;
  no_start.id = "b";
  child_spec no_id = ok;
  no_id.id.clear();
  CHECK_THROWS_AS(spawn_supervisor(sys, {}, {ok, ok}), std::invalid_argument);
  CHECK_THROWS_AS(spawn_supervisor(sys, {}, {ok, no_start}), std::invalid_argument);
  CHECK_THROWS_AS(spawn_supervisor(sys, {}, {no_id}), std::invalid_argument);
}
