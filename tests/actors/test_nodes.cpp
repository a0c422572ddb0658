// Nodes (issue 13, items 2 and 5): three `dspex node` processes on this
// machine and a caller runtime in this process that lists them in
// remote.nodes. Calls on remote pools, sessions that keep their node, a node
// SIGKILLed under load (every call succeeds or fails with a structured
// error, the others serve on, none of its workers is left), the node
// restarted on its port and used again, and a node stopped with SIGSTOP (a
// partition: silent, not closed) lost by its silence. Real processes, real
// signals.
#include <atomic>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <future>
#include <csignal>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <sys/wait.h>

#include <doctest/doctest.h>

#include "dspex/prometheus.hpp"
#include "dspex/runtime.hpp"
#include "support/event_recorder.hpp"
#include "support/harness.hpp"
#include "support/scratch_dir.hpp"
#include "node_process.hpp"
#include "support/proc.hpp"

using namespace dspex;
using namespace dspex::testing;

namespace {

/// Every process below `pid` now (a node's workers and their helpers), from /proc.
std::vector<pid_t> descendants(pid_t pid) {
  std::vector<pid_t> all;
  std::vector<pid_t> todo{pid};
  while (!todo.empty()) {
    auto p = todo.back();
    todo.pop_back();
    for (auto c : child_pids(p)) {
      all.push_back(c);
      todo.push_back(c);
    }
  }
  return all;
}

/// A node with a default pool of one worker and the pool "qa" of `qa_size`,
/// and `extra` settings.
std::unique_ptr<node_process> start_node(std::size_t qa_size, std::uint16_t port = 0,
                                         std::vector<std::string> extra = {}) {
  std::vector<std::string> args{"--pool.size=1",
                                "--pools.qa.pool.size=" + std::to_string(qa_size),
                                std::string{"--worker.python="} + DSPEX_TEST_PYTHON,
                                "--worker.test_commands", "--log.level=warn",
                                "--node.port=" + std::to_string(port)};
  args.insert(args.end(), extra.begin(), extra.end());
  return std::make_unique<node_process>(DSPEX_CLI, std::move(args));
}

/// A caller runtime (one local worker) that uses `nodes`.
settings caller_of(const std::vector<const node_process*>& nodes) {
  auto s = test_settings(1);
  for (auto* n : nodes)
    s.remote.nodes.push_back(n->address());
  s.remote.status_interval = std::chrono::milliseconds{100};
  s.remote.reconnect_base = std::chrono::milliseconds{50};
  s.remote.reconnect_max = std::chrono::milliseconds{300};
  return s;
}

call_options on(const std::string& pool) {
  call_options o;
  o.pool = pool;
  return o;
}

/// "127.0.0.1:PORT" of the node that served `o` (served_by is "NODE/WORKER").
std::string node_of(const outcome& o) {
  return o.served_by().substr(0, o.served_by().find('/'));
}

bool structured(const error& e) {
  return !e.type.empty() && !e.message.empty() && e.context.is_object();
}

/// Stops the caller, then the nodes, and checks that no process is left:
/// neither a node nor any of their workers.
template <class... Nodes>
void stop_all(runtime& rt, Nodes&... given) {
  std::vector<std::unique_ptr<node_process>> nodes;
  (nodes.push_back(std::move(given)), ...);
  std::vector<pid_t> workers;
  for (auto& n : nodes)
    for (auto pid : descendants(n->pid()))
      workers.push_back(pid);
  rt.stop();
  nodes.clear();  // SIGTERM, reaped
  CHECK(wait_no_children(::getpid(), 10s).empty());
  for (auto pid : workers)
    CHECK_MESSAGE(wait_gone(pid, 20s), "worker " << pid << " outlived its node");
}

/// Stops the load's callers however the test ends (a failed REQUIRE too).
struct stop_callers {
  std::atomic<bool>& go;
  std::vector<std::thread>& callers;
  ~stop_callers() {
    go = false;
    for (auto& t : callers)
      if (t.joinable())
        t.join();
  }
};

/// Waits (bounded) until the remote pool `pool` is served by `n` nodes.
bool wait_nodes(runtime& rt, const std::string& pool, std::size_t n) {
  return wait_for_status(rt, [&](const pool_status& s) { return s.nodes.size() == n; }, 30s, pool)
    .ok;
}

} // namespace

TEST_CASE("calls on remote pools are served by the nodes, and a session keeps its node") {
  auto a = start_node(1);
  auto b = start_node(1);
  auto c = start_node(1);
  auto rt = runtime::start(caller_of({a.get(), b.get(), c.get()}));
  REQUIRE(wait_nodes(*rt, "qa", 3));
  auto names = rt->pools();
  CHECK(std::find(names.begin(), names.end(), "qa") != names.end());
  auto qa = rt->status("qa");
  CHECK(qa.pool == "qa");
  CHECK(qa.size == 3);  // one worker on each node
  CHECK(qa.health == "healthy");

  // Anonymous calls go round the equally loaded nodes.
  std::set<std::string> serving;
  for (int i = 0; i < 30; ++i) {
    auto r = rt->execute_anonymous("ping", nullptr, on("qa"));
    REQUIRE_MESSAGE(r.ok(), r.error().describe());
    CHECK(r.value()["worker_id"] == "qa.w1");
    serving.insert(node_of(r));
  }
  CHECK(serving == std::set<std::string>{a->address(), b->address(), c->address()});
  // The asynchronous form too; the caller's own default pool stays local.
  auto async = rt->execute_anonymous_async("ping", nullptr, on("qa")).get();
  REQUIRE(async.ok());
  auto local = rt->execute_anonymous("ping");
  REQUIRE(local.ok());
  CHECK(local.served_by() == "w1");

  // A session's calls all go to one node, which keeps its programs.
  session_call_options so;
  so.pool = "qa";
  nlohmann::json program{{"id", "p1"},
                         {"program_type", "predict"},
                         {"signature",
                          {{"inputs", {{{"name", "question"}, {"type", "str"}}}},
                           {"outputs", {{{"name", "answer"}, {"type", "str"}}}}}}};
  auto made = rt->execute_in_session("s1", "create_program", program, so);
  REQUIRE_MESSAGE(made.ok(), made.error().describe());
  std::set<std::string> session_nodes;
  for (int i = 0; i < 9; ++i) {
    auto r = rt->execute_in_session(
      "s1", "execute_program", {{"program_id", "p1"}, {"inputs", {{"question", "why?"}}}}, so);
    REQUIRE_MESSAGE(r.ok(), r.error().describe());
    session_nodes.insert(node_of(r));
  }
  CHECK(session_nodes.size() == 1);
  auto listed = rt->execute_in_session("s1", "list_programs", nullptr, so);
  REQUIRE(listed.ok());
  CHECK(listed.value()["total_count"] == 1);
  auto info = rt->get_session_info("s1", "qa");
  REQUIRE_MESSAGE(info.ok(), info.error().describe());
  CHECK(info.value()["operations"].get<int>() >= 10);
  REQUIRE(rt->end_session("s1", "qa").ok());

  // This side counts the remote pool's calls as a local pool counts its own:
  // 31 pings, then the session's create_program, 9 execute_program and
  // list_programs (the session's info and end are no calls of a command).
  auto m = rt->metrics("qa");
  CHECK(m.pool == "qa");
  CHECK(m.size == 3);  // the gauges its nodes publish
  CHECK(m.calls[{"ping", "ok"}] == 31);
  CHECK(m.calls[{"execute_program", "ok"}] == 9);
  CHECK(m.calls.size() == 4);
  CHECK(m.in_flight == 0);
  REQUIRE_FALSE(m.total.counts.empty());
  CHECK(m.total.counts.back() == 42);
  CHECK(rt->status("qa").metrics.total.count == 42);
  auto text = render_prometheus(std::vector<metrics_snapshot>{rt->metrics(), m});
  CHECK(text.find("dspex_calls_total{pool=\"qa\",command=\"ping\",outcome=\"ok\"} 31\n")
        != std::string::npos);
  CHECK(text.find("dspex_call_duration_seconds_count{pool=\"qa\"} 42\n") != std::string::npos);

  // A remote pool cannot be leased, and an unknown name is still unknown.
  checkout_options co;
  co.pool = "qa";
  auto leased = rt->checkout(checkout_type::anonymous(), co);
  REQUIRE(std::holds_alternative<error>(leased));
  CHECK(std::get<error>(leased).context["reason"] == "remote_pool");
  auto unknown = rt->execute_anonymous("ping", nullptr, on("nope"));
  REQUIRE_FALSE(unknown.ok());
  CHECK(unknown.error().context["reason"] == "unknown_pool");
  // Bad arguments are refused here, before anything crosses the network.
  auto bad = rt->execute_anonymous("ping", nlohmann::json::array(), on("qa"));
  REQUIRE_FALSE(bad.ok());
  CHECK(bad.error().type == "invalid_request");
  stop_all(*rt, a, b, c);
}

TEST_CASE("a node SIGKILLed under load: structured outcomes, the others serve on, it rejoins") {
  auto a = start_node(2);
  auto b = start_node(2);
  auto c = start_node(2);
  auto rt = runtime::start(caller_of({a.get(), b.get(), c.get()}));
  event_recorder rec{rt->events()};
  REQUIRE(wait_nodes(*rt, "qa", 3));
  const auto victim = b->address();
  const auto victim_port = b->port();
  auto victim_processes = descendants(b->pid());
  REQUIRE(victim_processes.size() >= 3);  // its workers (and their guardians)

  // Load: idempotent pings (retried on another node when theirs dies) and
  // non-idempotent sleeps (which fail with node_down if theirs dies).
  std::atomic<bool> go{true};
  std::mutex mtx;
  std::map<std::string, std::size_t> served;  // node -> successes
  std::vector<outcome> failures_ping, failures_sleep;
  std::atomic<std::size_t> done{0};
  std::vector<std::thread> callers;
  stop_callers stopper{go, callers};
  for (int t = 0; t < 4; ++t)
    callers.emplace_back([&, t] {
      while (go) {
        bool ping = t % 2 == 0;
        auto r = ping ? rt->execute_anonymous("ping", nullptr, on("qa"))
                      : rt->execute_anonymous("sleep", {{"ms", 20}}, on("qa"));
        std::lock_guard<std::mutex> lk{mtx};
        if (r.ok())
          ++served[node_of(r)];
        else
          (ping ? failures_ping : failures_sleep).push_back(r);
        ++done;
      }
    });
  auto wait_served = [&](const std::string& node, std::size_t at_least) {
    for (int i = 0; i < 6000; ++i) {  // bounded: 30 s
      {
        std::lock_guard<std::mutex> lk{mtx};
        if (served[node] >= at_least)
          return true;
      }
      std::this_thread::sleep_for(5ms);
    }
    return false;
  };
  REQUIRE(wait_served(a->address(), 5));
  REQUIRE(wait_served(victim, 5));
  REQUIRE(wait_served(c->address(), 5));

  REQUIRE(b->signal_and_reap(SIGKILL) != -1);
  auto down = [&](const event& e) { return e.kind == event_kind::node_down && e.source == victim; };
  REQUIRE(rec.wait_for(down));
  // The others serve on: both get calls after the loss.
  std::size_t a_before, c_before;
  {
    std::lock_guard<std::mutex> lk{mtx};
    a_before = served[a->address()];
    c_before = served[c->address()];
  }
  CHECK(wait_served(a->address(), a_before + 20));
  CHECK(wait_served(c->address(), c_before + 20));
  CHECK(wait_nodes(*rt, "qa", 2));
  // None of the dead node's workers is left.
  for (auto pid : victim_processes)
    CHECK_MESSAGE(wait_gone(pid, 20s), "process " << pid << " of the killed node is left");

  // Restarted on its port, the node is found again and used.
  auto again = start_node(2, victim_port);
  REQUIRE(again->address() == victim);
  auto up_again = [&](const event& e) { return e.kind == event_kind::node_up && e.source == victim; };
  REQUIRE(rec.wait_for(up_again));  // the rejoin (the first connection came before the recorder)
  REQUIRE(wait_nodes(*rt, "qa", 3));
  std::size_t victim_before;
  {
    std::lock_guard<std::mutex> lk{mtx};
    victim_before = served[victim];
  }
  CHECK(wait_served(victim, victim_before + 5));
  go = false;
  for (auto& t : callers)
    t.join();
  callers.clear();

  // Every failure is structured; pings never failed (retried elsewhere);
  // a sleep fails only as node_down (its node died with it in flight).
  CHECK(failures_ping.empty());
  for (auto& f : failures_ping)
    MESSAGE(f.error().describe());
  for (auto& f : failures_sleep) {
    CHECK(structured(f.error()));
    CHECK_MESSAGE(f.error().type == "node_down", f.error().describe());
  }
  CHECK(failures_sleep.size() <= 4);  // at most the sleeps in flight on the victim
  stop_all(*rt, a, c, again);
}

TEST_CASE("a killed node's idempotent calls are retried on another node, the others fail as node_down") {
  auto a = start_node(2);
  auto b = start_node(2);
  auto c = start_node(2);
  auto rt = runtime::start(caller_of({a.get(), b.get(), c.get()}));
  REQUIRE(wait_nodes(*rt, "qa", 3));
  auto all_busy = [](const pool_status& s) { return s.busy == 6; };
  // Six sleeps on six workers: all busy means two on every node.
  auto six_sleeps = [&](bool idempotent) {
    std::vector<std::future<outcome>> calls;
    for (int i = 0; i < 6; ++i) {
      call_options o = on("qa");
      o.idempotent = idempotent;
      o.timeout = std::chrono::seconds{20};
      calls.push_back(rt->execute_anonymous_async("sleep", {{"ms", 1500}}, o));
    }
    return calls;
  };
  {
    auto calls = six_sleeps(true);
    REQUIRE(wait_for_status(*rt, all_busy, 30s, "qa").ok);
    REQUIRE(b->signal_and_reap(SIGKILL) != -1);
    for (auto& f : calls) {
      auto r = f.get();
      REQUIRE_MESSAGE(r.ok(), r.error().describe());  // the two on b ran again elsewhere
      CHECK(node_of(r) != b->address());
    }
  }
  b = start_node(2, b->port());
  REQUIRE(wait_nodes(*rt, "qa", 3));
  REQUIRE(wait_for_status(*rt, [](const pool_status& s) { return s.busy == 0; }, 30s, "qa").ok);
  {
    auto calls = six_sleeps(false);
    REQUIRE(wait_for_status(*rt, all_busy, 30s, "qa").ok);
    REQUIRE(c->signal_and_reap(SIGKILL) != -1);
    std::size_t ok = 0, lost = 0;
    for (auto& f : calls) {
      auto r = f.get();
      if (r.ok()) {
        ++ok;
        CHECK(node_of(r) != c->address());
        continue;
      }
      ++lost;
      CHECK(r.error().category == error_category::communication_error);
      CHECK(r.error().type == "node_down");
      CHECK(r.error().context["node"] == c->address());
      CHECK(r.error().context["pool"] == "qa");
    }
    CHECK(ok == 4);
    CHECK(lost == 2);  // exactly the two in flight on c: never run twice
  }
  stop_all(*rt, a, b, c);
}

TEST_CASE("a caller starts while a node is down, and uses it once it is up") {
  auto a = start_node(1);
  // A port nothing listens on yet: the node of that port comes later.
  auto b = start_node(1);
  auto b_port = b->port();
  REQUIRE(b->signal_and_reap(SIGTERM) != -1);
  auto s = caller_of({a.get()});
  s.remote.nodes.push_back("127.0.0.1:" + std::to_string(b_port));
  s.remote.connect_timeout = std::chrono::seconds{2};
  auto rt = runtime::start(s);  // an unreachable node is no start failure
  event_recorder rec{rt->events()};
  REQUIRE(wait_nodes(*rt, "qa", 1));
  auto r = rt->execute_anonymous("ping", nullptr, on("qa"));
  REQUIRE(r.ok());
  CHECK(node_of(r) == a->address());
  auto b2 = start_node(1, b_port);
  REQUIRE(wait_nodes(*rt, "qa", 2));
  std::set<std::string> serving;
  for (int i = 0; i < 20 && serving.size() < 2; ++i) {
    auto x = rt->execute_anonymous("ping", nullptr, on("qa"));
    REQUIRE(x.ok());
    serving.insert(node_of(x));
  }
  CHECK(serving.count(b2->address()) == 1);
  // With every node of a pool gone, its calls fail with node_down.
  REQUIRE(a->signal_and_reap(SIGKILL) != -1);
  REQUIRE(b2->signal_and_reap(SIGKILL) != -1);
  REQUIRE(wait_nodes(*rt, "qa", 0));
  auto lost = rt->execute_anonymous("ping", nullptr, on("qa"));
  REQUIRE_FALSE(lost.ok());
  CHECK(lost.error().category == error_category::communication_error);
  CHECK(lost.error().type == "node_down");
  CHECK(rt->status("qa").health == "unavailable");
  stop_all(*rt, a, b, b2);
}

TEST_CASE("a stopped node (a silent partition) is lost by its silence, and rejoins once it runs") {
  // SIGSTOP: the node's connection stays open and says nothing, as behind a
  // cut cable. Only the middleman's heartbeats tell silence from a long call.
  // Each side's partition_timeout measures the other's heartbeats: both beat
  // every 100 ms here, and the caller gives a silent node 1 s.
  auto a = start_node(2, 0, {"--remote.heartbeat_interval=100ms", "--remote.partition_timeout=1s"});
  auto s = caller_of({a.get()});
  s.remote.heartbeat_interval = 100ms;
  s.remote.partition_timeout = 1s;
  auto rt = runtime::start(s);
  event_recorder rec{rt->events()};
  REQUIRE(wait_nodes(*rt, "qa", 1));
  call_options o = on("qa");
  o.idempotent = false;
  o.timeout = std::chrono::seconds{600};  // far beyond the hang guard below
  auto sleeping = rt->execute_anonymous_async("sleep", {{"ms", 30000}}, o);
  REQUIRE(wait_for_status(*rt, [](const pool_status& st) { return st.busy == 1; }, 30s, "qa").ok);
  a->signal(SIGSTOP);
  auto down = [&](const event& e) { return e.kind == event_kind::node_down && e.source == a->address(); };
  REQUIRE(rec.wait_for(down));
  // The call in flight ends with the link, not with its deadline.
  REQUIRE(sleeping.wait_for(60s) == std::future_status::ready);
  auto lost = sleeping.get();
  REQUIRE_FALSE(lost.ok());
  CHECK(lost.error().category == error_category::communication_error);
  CHECK(lost.error().type == "node_down");
  CHECK(lost.error().context["node"] == a->address());
  CHECK(rt->status("qa").health == "unavailable");
  auto refused = rt->execute_anonymous("ping", nullptr, on("qa"));
  REQUIRE_FALSE(refused.ok());
  CHECK(refused.error().type == "node_down");

  // Running again, the node is connected to anew and serves.
  a->signal(SIGCONT);
  auto up = [&](const event& e) { return e.kind == event_kind::node_up && e.source == a->address(); };
  REQUIRE(rec.wait_for(up));
  REQUIRE(wait_nodes(*rt, "qa", 1));
  auto back = rt->execute_anonymous("ping", nullptr, on("qa"));
  REQUIRE_MESSAGE(back.ok(), back.error().describe());
  CHECK(node_of(back) == a->address());
  stop_all(*rt, a);
}

namespace {

/// A `dspex call` process: another caller runtime, with its own process.
/// Killed and reaped however the test ends.
class caller_process {
public:
  explicit caller_process(std::vector<std::string> args) {
    args.insert(args.begin(), "call");
    pid_ = spawn_dspex(DSPEX_CLI, args, -1, "");
    REQUIRE(pid_ > 0);
  }
  ~caller_process() { kill(); }
  pid_t pid() const { return pid_; }
  /// SIGKILL, and reaped (bounded).
  void kill() {
    if (pid_ <= 0)
      return;
    ::kill(pid_, SIGKILL);
    for (int i = 0; i < 2000; ++i) {  // bounded: 20 s
      if (::waitpid(pid_, nullptr, WNOHANG) == pid_)
        break;
      std::this_thread::sleep_for(10ms);
    }
    pid_ = -1;
  }

private:
  pid_t pid_ = -1;
};

/// The pid of the node's worker whose id is `worker_id` (its command line names it), or -1.
pid_t worker_of(const node_process& node, const std::string& worker_id) {
  for (auto pid : descendants(node.pid()))
    if (!is_guardian(pid) && cmdline(pid).find(" " + worker_id + " ") != std::string::npos)
      return pid;
  return -1;
}

} // namespace

TEST_CASE("a lost caller's calls waiting on a node never run") {
  // The node's pool qa has one worker. This runtime holds it with a long
  // sleep; a second caller, a `dspex call` process, queues a 60 s sleep
  // behind it, and is SIGKILLed.
  auto a = start_node(1, 0, {"--log.level=info"});
  auto rt = runtime::start(caller_of({a.get()}));
  REQUIRE(wait_nodes(*rt, "qa", 1));
  call_options hold = on("qa");
  hold.idempotent = false;
  hold.timeout = std::chrono::seconds{600};
  auto holding = rt->execute_anonymous_async("sleep", {{"ms", 600000}}, hold);
  REQUIRE(wait_for_status(*rt, [](const pool_status& st) { return st.busy == 1; }, 30s, "qa").ok);
  std::vector<pid_t> other_workers;
  {
    caller_process other{{"sleep", R"({"ms": 60000})", "--pool=qa",
                          "--remote.nodes=[\"" + a->address() + "\"]", "--pool.size=1",
                          std::string{"--worker.python="} + DSPEX_TEST_PYTHON,
                          "--pool.request_timeout=300s", "--log.level=warn"}};
    REQUIRE(wait_for_status(*rt, [](const pool_status& st) { return st.queued == 1; }, 30s, "qa")
              .ok);
    other_workers = descendants(other.pid());
    other.kill();
  }
  // The node saw its caller go (its log says so), while the call waited.
  bool seen = false;
  for (int i = 0; i < 3000 && !seen; ++i) {  // bounded: 30 s
    seen = a->output().find("a caller was lost") != std::string::npos;
    if (!seen)
      std::this_thread::sleep_for(10ms);
  }
  REQUIRE_MESSAGE(seen, a->output());
  // Free the worker the hard way: SIGKILL it (the node replaces it, and
  // this runtime's sleep fails). The abandoned sleep is next in line, and
  // must not run: a ping then gets the new worker at once.
  auto held = worker_of(*a, "qa.w1");
  REQUIRE(held > 0);
  REQUIRE(::kill(held, SIGKILL) == 0);
  REQUIRE(holding.wait_for(60s) == std::future_status::ready);
  CHECK_FALSE(holding.get().ok());
  call_options quick = on("qa");
  quick.timeout = std::chrono::seconds{20};  // the abandoned sleep would hold the worker 60 s
  auto ping = rt->execute_anonymous("ping", nullptr, quick);
  CHECK_MESSAGE(ping.ok(), ping.error().describe() << "\n" << a->output());
  // Nor later: the pool empties (were the sleep to run, it would be busy 60 s).
  CHECK(wait_for_status(*rt, [](const pool_status& st) { return st.busy == 0 && st.queued == 0; },
                        20s, "qa")
          .ok);
  for (auto pid : other_workers)
    CHECK_MESSAGE(wait_gone(pid, 20s), "process " << pid << " of the killed caller is left");
  stop_all(*rt, a);
}

namespace {

/// Certificates made by Debian's openssl command: a CA with the node's and a
/// caller's certificates, and a foreign CA with an intruder's.
struct certificates {
  scratch_dir dir;
  std::string path(const std::string& name) const { return (dir.path / name).string(); }

  certificates() {
    auto run = [&](const std::string& cmd) {
      REQUIRE_MESSAGE(std::system((cmd + " >/dev/null 2>&1").c_str()) == 0, cmd);
    };
    for (std::string ca : {"good", "foreign"})
      run("openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=" + ca + "-ca -keyout "
          + path(ca + "-ca.key") + " -out " + path(ca + "-ca.pem"));
    for (auto [who, ca] : {std::pair<std::string, std::string>{"node", "good"},
                           {"caller", "good"},
                           {"intruder", "foreign"}}) {
      run("openssl req -newkey rsa:2048 -nodes -subj /CN=" + who + " -keyout " + path(who + ".key")
          + " -out " + path(who + ".csr"));
      run("openssl x509 -req -days 2 -in " + path(who + ".csr") + " -CA " + path(ca + "-ca.pem")
          + " -CAkey " + path(ca + "-ca.key") + " -CAcreateserial -out " + path(who + ".pem"));
    }
  }

  /// The settings of one side: its certificate and key, and the CA it trusts.
  std::vector<std::string> args(const std::string& who, const std::string& ca) const {
    return {"--node.tls.certificate=" + path(who + ".pem"), "--node.tls.key=" + path(who + ".key"),
            "--node.tls.ca_file=" + path(ca + "-ca.pem")};
  }
  void apply(settings& s, const std::string& who, const std::string& ca) const {
    s.node.tls.certificate = path(who + ".pem");
    s.node.tls.key = path(who + ".key");
    s.node.tls.ca_file = path(ca + "-ca.pem");
  }
};

} // namespace

TEST_CASE("TLS: a peer whose certificate the CA signed is served, a foreign or plaintext one is refused") {
  certificates certs;
  // With TLS a node may bind beyond loopback; the callers reach it on 127.0.0.1.
  auto node_args = certs.args("node", "good");
  for (std::string a : {"--pool.size=1", "--pools.qa.pool.size=1", "--worker.test_commands",
                        "--log.level=warn", "--node.bind=0.0.0.0"})
    node_args.push_back(a);
  node_args.push_back(std::string{"--worker.python="} + DSPEX_TEST_PYTHON);
  auto node = std::make_unique<node_process>(DSPEX_CLI, node_args);

  auto good = caller_of({node.get()});
  certs.apply(good, "caller", "good");
  auto rt = runtime::start(good);
  REQUIRE(wait_nodes(*rt, "qa", 1));
  auto r = rt->execute_anonymous("ping", nullptr, on("qa"));
  REQUIRE_MESSAGE(r.ok(), r.error().describe());
  CHECK(node_of(r) == node->address());

  event_recorder rec{rt->events()};
  // Other runtimes, each a process of its own (as a real peer would be): one
  // with a certificate of a foreign CA, one without TLS. The node refuses
  // both in the handshake; they log it and find no pool "qa".
  for (std::string who : {"intruder", "plaintext"}) {
    CAPTURE(who);
    std::string cmd = std::string{DSPEX_CLI} + " call ping --pool=qa --json --pool.size=1"
                      + " --worker.python=" + DSPEX_TEST_PYTHON + " --log.level=warn"
                      + " --remote.connect_timeout=3s --remote.nodes='[\"" + node->address() + "\"]'";
    if (who == "intruder")
      for (auto& a : certs.args("intruder", "foreign"))
        cmd += " " + a;
    auto out = certs.dir.path / (who + ".out");
    int status = std::system((cmd + " >" + out.string() + " 2>&1").c_str());
    REQUIRE(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 7);  // invalid_request: no pool "qa" here
    std::ifstream in{out};
    std::string text{std::istreambuf_iterator<char>{in}, {}};
    CHECK_MESSAGE(text.find("\"reason\":\"unknown_pool\"") != std::string::npos, text);
    CHECK_MESSAGE(text.find("unreachable") != std::string::npos, text);  // the refusal, logged
  }
  // The good caller was never disturbed: its link stayed up all along.
  CHECK(rec.count([](const event& e) { return e.kind == event_kind::node_down; }) == 0);
  auto after = rt->execute_anonymous("ping", nullptr, on("qa"));
  CHECK_MESSAGE(after.ok(), after.error().describe() << "\n" << node->output());
  stop_all(*rt, node);
}
