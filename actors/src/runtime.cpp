// runtime: the public embedding API (dspex/runtime.hpp) and its CAF side
// (runtime_access): the runtime object, which validates calls, picks the
// direct lane or the pool client for each, and starts and stops the actor
// system. The concepts it drives live in their own files: the pool client
// (pool_client.cpp), the direct lane (direct_lane.cpp), leases (lease.cpp),
// the supervision tree (runtime_tree.cpp); what they share with this file
// about answering a caller is in api_support.hpp.
#include "dspex/runtime.hpp"

#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <shared_mutex>
#include <thread>
#include <variant>

#include <caf/all.hpp>
#include <caf/io/middleman.hpp>
#include <caf/openssl/publish.hpp>
#include <caf/openssl/manager.hpp>
#include <caf/logger.hpp>

#include "dspex/actors/messages.hpp"
#include "dspex/actors/runtime_access.hpp"
#include "dspex/actors/service.hpp"
#include "dspex/actors/session_actor.hpp"
#include "dspex/actors/supervisor.hpp"
#include "dspex/actors/system_config.hpp"
#include "dspex/json_limits.hpp"
#include "dspex/logging.hpp"
#include "dspex/pool_metrics.hpp"
#include "api_support.hpp"
#include "direct_lane.hpp"
#include "dspy_adapter.hpp"
#include "lease.hpp"
#include "node_actor.hpp"
#include "pool_client.hpp"
#include "remote_router.hpp"
#include "runtime_tree.hpp"
#include "session_directory.hpp"

namespace dspex {

namespace {

using runtime_detail::answer_once;
using runtime_detail::await_bounded;
using runtime_detail::blocked_caller;
using runtime_detail::blocking_in_callback;
using runtime_detail::clock_type;
using runtime_detail::closing_atom;
using runtime_detail::direct_job;
using runtime_detail::direct_sinks;
using runtime_detail::from_caf_error;
using runtime_detail::sinks_to_client;
using runtime_detail::must_not_block;
using runtime_detail::reply_margin;
using runtime_detail::runtime_tree_parts;
using runtime_detail::spawn_lease_holder;
using runtime_detail::spawn_pool_client;
using runtime_detail::spawn_runtime_tree;
using runtime_detail::start_direct;
using runtime_detail::remote_call_atom;
using runtime_detail::remote_ready_atom;
using runtime_detail::spawn_remote_router;
using runtime_detail::stopped_error;

// CAF 0.17 pins the actor system's logger in a thread-local of every thread
// that spawns an actor or creates a scoped_actor, and ~actor_system() waits
// until every such thread lets go of it: forever, if that thread lives on
// while stop() runs on another one (measured: a stop begun in a callback
// hung on the main thread's earlier status()). Public calls that spawn or
// use a scoped_actor on the caller's thread let go before they return.
struct release_caf_thread_state {
  release_caf_thread_state() = default;
  release_caf_thread_state(const release_caf_thread_state&) = delete;
  release_caf_thread_state& operator=(const release_caf_thread_state&) = delete;
  ~release_caf_thread_state() { caf::logger::set_current_actor_system(nullptr); }
};

} // namespace

// The rule for a session id, local or remote: non-empty UTF-8.
std::optional<error> invalid_session_id(const std::string& session_id, const char* what) {
  if (!session_id.empty() && valid_utf8(session_id))
    return std::nullopt;
  return make_error(
    error_category::system_error, "invalid_request",
    session_id.empty() ? "session_id must not be empty" : "session_id is not valid UTF-8",
    {{"command", sanitize_utf8(what)},
     {"reason", session_id.empty() ? "empty_session_id" : "invalid_utf8"}});
}

// The whole-call accounting of `m` around `done`: the call's time from
// here to its outcome (pool_metrics::total), and the call by command and
// outcome (pool_metrics::calls).
completion timed(const std::shared_ptr<pool_metrics>& m, const std::string& command,
                 std::function<void(outcome)> done) {
  m->call_started();
  return completion{[m, started = clock_type::now(), command, fn = std::move(done)](outcome o) {
    m->call_finished(started);
    m->calls.count(command, o);
    fn(std::move(o));
  }};
}

// One pool of the runtime (issue 13): its settings, its event bus, its
// metrics and what serves its calls (the pool client, the direct lane's
// sinks, the session directory). Each pool is its own supervision subtree
// (runtime_tree.cpp); what the pools share (the actor system, the gate, the
// stop) is the runtime's (runtime::impl).
struct pool_unit {
  // The pool's settings; pool_name is its name.
  std::shared_ptr<const settings> config;
  // The pool's bus: every event published on it names the pool and goes on
  // to the runtime's bus.
  std::shared_ptr<event_bus> events;
  // Shared with every pool actor the subtree starts: it outlives a restart.
  std::shared_ptr<pool_metrics> metrics;
  // The current pool actor and what the client knows, for status() and checkout().
  std::shared_ptr<detail::client_shared> shared = std::make_shared<detail::client_shared>();
  runtime_detail::pool_client_handle client;  // every call not on the direct lane goes through it
  // What the runtime knows of anonymous calls' commands (DSPy's), shared
  // with the pool client.
  std::shared_ptr<detail::anonymous_adapter> anonymous;
  // The direct lane's way to the pool client (sinks_to_client), built once.
  std::shared_ptr<const direct_sinks> sinks;
  // Which actor serves each session of this pool (filled by its session
  // registry): a session's call goes there directly.
  std::shared_ptr<detail::session_directory> sessions
    = std::make_shared<detail::session_directory>();
  // The runtime's: set first by stop() (new calls fail fast without
  // touching the gate), and closed by stop() before the system goes.
  const std::atomic<bool>* stopped = nullptr;
  std::shared_ptr<detail::api_gate> gate;

  const std::string& name() const noexcept { return config->pool_name; }

  request_limits limits() const {
    request_limits l;
    l.max_json_depth = config->pool.max_json_depth;
    return l;
  }

  // Validates the arguments of one call and fixes its deadline.
  std::variant<call, outcome> make_call(const std::string& command, nlohmann::json args,
                                        std::optional<std::chrono::milliseconds> timeout) const {
    // A call refused here is counted as every answered call is (timed).
    auto refused = [&](error e) {
      auto o = outcome::failure(std::move(e));
      metrics->calls.count(command, o);
      return o;
    };
    if (auto invalid = validate_request(command, args, limits()))
      return refused(std::move(*invalid));
    if (args.is_null())
      args = nlohmann::json::object();
    if (*stopped)
      return refused(stopped_error(command));
    call c;
    c.command = command;
    c.args = std::move(args);
    c.deadline = clock_type::now() + timeout.value_or(config->pool.request_timeout);
    return c;
  }

  // -- the direct lane (issue 11) ------------------------------------------------------
  //
  // An anonymous call that finds an idle worker and no queue goes straight
  // to the worker's process: this thread writes the frame, the worker's I/O
  // thread answers (worker_channel), and the pool actor only learns of it
  // when it next looks at the worker. A failed attempt goes to the pool
  // client, whose retry policy and breaker decide as for its own calls.

  // Starts `c` on the direct lane (start_direct: a job, or null when the
  // call goes the usual way). A failed or rerouted attempt goes to the pool
  // client while the runtime lives (sinks), else fails with stopped_error.
  std::shared_ptr<direct_job> try_direct(call& c, const call_options& options,
                                         const completion& done,
                                         std::shared_ptr<blocked_caller> blocked = nullptr) {
    if (!anonymous->lane_may_take(c.command))
      return nullptr;
    return start_direct(shared, c,
                        detail::client_call_options{options.idempotent, options.max_attempts},
                        done, std::move(blocked), {}, sinks);
  }

  // The call's whole time counts from here to its outcome.
  completion timed(const std::string& command, std::function<void(outcome)> done) {
    return dspex::timed(metrics, command, std::move(done));
  }

  // Starts an anonymous call: the direct lane, else the pool client; `comp`
  // is answered whatever happens.
  void start_anonymous(call& c, const call_options& options, const completion& comp,
                       std::shared_ptr<blocked_caller> blocked = nullptr) {
    if (!try_direct(c, options, comp, std::move(blocked))
        && !send_to_client(execute_atom::value, std::move(c), comp,
                           detail::client_call_options{options.idempotent, options.max_attempts}))
      comp.fn(outcome::failure(stopped_error(c.command)));
  }

  // Sends one message to the pool client while the system is sure to live.
  // False once stop() closed the gate.
  template <class... Ts>
  bool send_to_client(Ts&&... xs) {
    std::shared_lock<std::shared_timed_mutex> lk{gate->mtx};
    if (gate->closed)
      return false;
    caf::anon_send(client, std::forward<Ts>(xs)...);
    return true;
  }

  // A session request: validated, with its deadline (op execute) and affinity.
  std::variant<session_request, outcome> make_session_request(
    session_op op, const std::string& session_id, const std::string& command, nlohmann::json args,
    const session_call_options& options) const {
    const char* what = session_op_name(op, command);
    if (op != session_op::list)
      if (auto bad = invalid_session_id(session_id, what))
        return outcome::failure(std::move(*bad));
    session_request r;
    r.op = op;
    r.session_id = session_id;
    if (op == session_op::execute) {
      auto made = make_call(command, std::move(args), options.timeout);
      if (auto* early = std::get_if<outcome>(&made)) {
        auto o = std::move(*early);
        if (!o) {
          auto e = o.error();
          e.context["session_id"] = session_id;
          return outcome::failure(std::move(e));
        }
        return o;
      }
      r.c = std::move(std::get<call>(made));
      r.c.args["session_id"] = session_id;
      r.c.type = checkout_type::session(session_id);
      r.c.affinity = options.affinity.value_or(
        affinity_mode_from_string(config->session.affinity).value_or(affinity_mode::hint));
      r.opts = detail::client_call_options{options.idempotent, options.max_attempts};
    } else {
      if (*stopped)
        return outcome::failure(stopped_error(what));
      r.c.command = what;
      r.c.deadline = clock_type::now() + config->pool.request_timeout;
    }
    return r;
  }

  // A session's call: straight to its session actor when the directory
  // knows it, else through the pool client to the registry (which creates
  // it). `done` is answered whatever happens to the messages on the way.
  void send_session_call(session_request r, completion done) {
    auto command = r.c.command;
    done = answer_once(std::move(done), session_lost_error(r.session_id, command));
    std::shared_lock<std::shared_timed_mutex> lk{gate->mtx};
    if (gate->closed) {
      lk.unlock();
      done.fn(outcome::failure(stopped_error(command)));
      return;
    }
    sessions->route(std::move(r), std::move(done), [this](session_request first, completion d) {
      caf::anon_send(client, session_op_atom::value, std::move(first), std::move(d));
    });
  }

  // Starts a session request: a call (timed) to its session, the other ops
  // through the client to the registry. `done` runs once.
  void start_session_request(session_request r, std::function<void(outcome)> done) {
    if (r.op == session_op::execute) {
      auto command = r.c.command;
      send_session_call(std::move(r), timed(command, std::move(done)));
      return;
    }
    completion comp{std::move(done)};
    auto command = r.c.command;
    if (!send_to_client(session_op_atom::value, std::move(r), comp))
      comp.fn(outcome::failure(stopped_error(command)));
  }

  // Starts an anonymous call (validated, timed, the lane or the client).
  // `abandoned`: see call::abandoned (a node's caller); null for the API's own calls.
  void anonymous_async(const std::string& command, nlohmann::json args, const call_options& options,
                       std::function<void(outcome)> done,
                       std::shared_ptr<const std::atomic<bool>> abandoned = nullptr) {
    auto made = make_call(command, std::move(args), options.timeout);
    if (auto* early = std::get_if<outcome>(&made)) {
      done(std::move(*early));
      return;
    }
    std::get<call>(made).abandoned = std::move(abandoned);
    start_anonymous(std::get<call>(made), options, timed(command, std::move(done)));
  }

  // Starts any session request: validated, then start_session_request.
  void session_async(session_op op, const std::string& session_id, const std::string& command,
                     nlohmann::json args, const session_call_options& options,
                     std::function<void(outcome)> done,
                     std::shared_ptr<const std::atomic<bool>> abandoned = nullptr) {
    auto made = make_session_request(op, session_id, command, std::move(args), options);
    if (auto* early = std::get_if<outcome>(&made)) {
      done(std::move(*early));
      return;
    }
    std::get<session_request>(made).c.abandoned = std::move(abandoned);
    start_session_request(std::move(std::get<session_request>(made)), std::move(done));
  }

  // Sends a session request through the client and blocks for its outcome
  // (bounded: its deadline, the end's cleanup, and the margin).
  outcome session_blocking(std::variant<session_request, outcome> made) {
    if (auto* early = std::get_if<outcome>(&made))
      return std::move(*early);
    auto& r = std::get<session_request>(made);
    auto command = r.c.command;
    if (must_not_block())
      return outcome::failure(blocking_in_callback(command));
    auto bound = r.c.deadline + reply_margin;
    if (r.op == session_op::end)
      bound += std::chrono::seconds{5};  // the workers' cleanup_session
    auto promise = std::make_shared<std::promise<outcome>>();
    auto future = promise->get_future();
    std::function<void(outcome)> deliver = [promise](outcome o) {
      promise->set_value(std::move(o));
    };
    start_session_request(std::move(r), std::move(deliver));
    return await_bounded(future, bound, [&](bool) {
      return outcome::failure(make_error(error_category::timeout_error, "caller_timeout",
                                         "no reply from the session layer in time",
                                         {{"command", command}}));
    });
  }

  // The error of a lease or a status query while there is no pool.
  error no_pool_error() const {
    if (auto gave_up = shared->gave_up_error())
      return *gave_up;
    return make_error(error_category::resource_error, "pool_unavailable",
                      "the pool is restarting", {{"pool", name()}});
  }

  static const char* session_op_name(session_op op, const std::string& command) {
    return op == session_op::execute ? command.c_str()
           : op == session_op::end   ? "end_session"
           : op == session_op::info  ? "get_session_info"
                                     : "list_sessions";
  }
};

struct runtime::impl : std::enable_shared_from_this<runtime::impl> {
  settings config;
  // actor_system keeps a reference to its config: it must outlive the system.
  std::unique_ptr<system_config> system_cfg;
  std::unique_ptr<caf::actor_system> system;
  // The runtime's event stream: every pool's bus forwards to it (and it
  // outlives the actor system: subscribers may keep using it after stop()).
  std::shared_ptr<event_bus> events = std::make_shared<event_bus>();
  // The pools, "default" first, then the named ones (settings::pools).
  std::vector<std::unique_ptr<pool_unit>> pools;
  // Nodes (issue 13). What the router knows of the nodes in remote.nodes
  // (empty without them), and the router itself.
  std::shared_ptr<detail::remote_directory> remote = std::make_shared<detail::remote_directory>();
  caf::actor router;
  // This side's accounting of each remote pool's calls (their whole time,
  // by command and outcome; queue waits and run times are the nodes'),
  // made on the pool's first call. Only names some node published get here.
  std::mutex remote_metrics_mtx;
  std::map<std::string, std::shared_ptr<pool_metrics>> remote_metrics;

  // @returns the accounting of remote pool `pool`; with `create`, made when missing, else null then
  std::shared_ptr<pool_metrics> remote_metrics_of(const std::string& pool, bool create) {
    std::lock_guard<std::mutex> guard{remote_metrics_mtx};
    auto it = remote_metrics.find(pool);
    if (it != remote_metrics.end())
      return it->second;
    if (!create)
      return nullptr;
    return remote_metrics[pool] = std::make_shared<pool_metrics>(1);
  }
  // This runtime as a node (node.publish): the published actor and its port.
  node_handle node;
  std::uint16_t node_port = 0;
  caf::actor root;    // the root supervisor "dspex.root"
  // Set first by stop(): new calls fail fast without touching the gate.
  std::atomic<bool> stopped{false};
  // Closed by stop() before the system goes (see api_gate); shared with leases.
  std::shared_ptr<detail::api_gate> gate = std::make_shared<detail::api_gate>();
  // stop() runs once; whoever calls it later waits for that one run.
  std::once_flag stop_once;
  std::promise<void> stop_done;
  std::shared_future<void> stop_finished = stop_done.get_future().share();

  // A pool served by other runtimes (remote.nodes), by its name.
  struct remote_pool {
    std::string name;
  };

  // A local pool's name, if it is one.
  pool_unit* local_pool(const std::string& name) {
    const auto& wanted = name.empty() ? pools.front()->name() : name;
    for (auto& p : pools)
      if (p->name() == wanted)
        return p.get();
    return nullptr;
  }

  // The pool a call names ("" = default): local first, then one a node
  // serves; else the structured error of a name the runtime does not know
  // (the caller's mistake: nothing else happens).
  std::variant<pool_unit*, error, remote_pool> route(const std::string& name,
                                                     const std::string& command) {
    if (auto* local = local_pool(name))
      return local;
    if (router && remote->knows(name))
      return remote_pool{name};
    std::string known;
    for (auto& p : pools)
      known += (known.empty() ? "" : ", ") + p->name();
    for (auto& r : remote->pools())
      known += ", " + r + " (remote)";
    return make_error(error_category::system_error, "invalid_request",
                      "no pool named '" + sanitize_utf8(name) + "' (pools: " + known + ")",
                      {{"command", sanitize_utf8(command)},
                       {"reason", "unknown_pool"},
                       {"pool", sanitize_utf8(name)}});
  }

  // A local pool only (checkout, metrics): a remote one is an error here.
  std::variant<pool_unit*, error> find_pool(const std::string& name, const std::string& command) {
    auto found = route(name, command);
    if (auto* local = std::get_if<pool_unit*>(&found))
      return *local;
    if (auto* e = std::get_if<error>(&found))
      return std::move(*e);
    return make_error(error_category::system_error, "invalid_request",
                      command + " works on this runtime's own pools; '" + name
                        + "' is served by other nodes",
                      {{"command", command}, {"reason", "remote_pool"}, {"pool", name}});
  }

  // -- calls on remote pools (issue 13) ------------------------------------------------

  // A remote call, validated as a local one is, with its deadline.
  std::variant<detail::remote_call, outcome> make_remote_call(
    node_op op, const std::string& pool, const std::string& session_id,
    const std::string& command, nlohmann::json args,
    std::optional<std::chrono::milliseconds> timeout) {
    const char* what = op == node_op::execute ? command.c_str() : to_string(op);
    if (stopped)
      return outcome::failure(stopped_error(what));
    if (op == node_op::execute) {
      request_limits limits;
      limits.max_json_depth = config.pool.max_json_depth;
      if (auto invalid = validate_request(command, args, limits))
        return outcome::failure(std::move(*invalid));
    }
    // An execute with no session id is anonymous; every other op names its session.
    bool in_session = op != node_op::execute || !session_id.empty();
    if (in_session && op != node_op::list_sessions)
      if (auto bad = invalid_session_id(session_id, what))
        return outcome::failure(std::move(*bad));
    detail::remote_call rc;
    rc.request.op = op;
    rc.request.pool = pool;
    rc.request.session_id = session_id;
    rc.request.command = command;
    rc.request.args = args.is_null() ? nlohmann::json::object() : std::move(args);
    rc.deadline = clock_type::now() + timeout.value_or(config.pool.request_timeout);
    return rc;
  }

  // An anonymous call on a remote pool, with the caller's options.
  std::variant<detail::remote_call, outcome> remote_anonymous(const std::string& pool,
                                                              const std::string& command,
                                                              nlohmann::json args,
                                                              const call_options& options) {
    auto made = make_remote_call(node_op::execute, pool, {}, command, std::move(args), options.timeout);
    if (auto* rc = std::get_if<detail::remote_call>(&made)) {
      rc->request.idempotent = options.idempotent;
      rc->request.max_attempts = options.max_attempts;
    }
    return made;
  }

  // A session's call on a remote pool, with the caller's options.
  std::variant<detail::remote_call, outcome> remote_in_session(const std::string& pool,
                                                               const std::string& session_id,
                                                               const std::string& command,
                                                               nlohmann::json args,
                                                               const session_call_options& options) {
    if (auto bad = invalid_session_id(session_id, command.c_str()))
      return outcome::failure(std::move(*bad));
    auto made = make_remote_call(node_op::execute, pool, session_id, command, std::move(args),
                                 options.timeout);
    if (auto* rc = std::get_if<detail::remote_call>(&made)) {
      rc->request.idempotent = options.idempotent;
      rc->request.max_attempts = options.max_attempts;
      if (options.affinity)
        rc->request.affinity = to_string(*options.affinity);
    }
    return made;
  }

  // Sends a remote call without waiting: `done` runs once.
  void remote_async(std::variant<detail::remote_call, outcome> made, std::function<void(outcome)> done) {
    if (auto* early = std::get_if<outcome>(&made)) {
      done(std::move(*early));
      return;
    }
    send_remote(std::move(std::get<detail::remote_call>(made)), completion{std::move(done)});
  }

  // Hands a remote call to the router; `done` is answered whatever happens.
  void send_remote(detail::remote_call rc, completion done) {
    auto command = rc.request.command;
    if (rc.request.op == node_op::execute)  // counted as a local pool counts its calls
      done = timed(remote_metrics_of(rc.request.pool, true), command, std::move(done.fn));
    rc.done = answer_once(std::move(done),
                          make_error(error_category::resource_error, "pool_stopping",
                                     "the runtime stopped before the call was answered",
                                     {{"command", command}}));
    std::shared_lock<std::shared_timed_mutex> lk{gate->mtx};
    if (gate->closed) {
      lk.unlock();
      rc.done.fn(outcome::failure(stopped_error(command)));
      return;
    }
    caf::anon_send(router, remote_call_atom::value, std::move(rc));
  }

  // A remote call, blocking for its outcome (bounded by its deadline and margins).
  outcome remote_blocking(std::variant<detail::remote_call, outcome> made) {
    if (auto* early = std::get_if<outcome>(&made))
      return std::move(*early);
    auto& rc = std::get<detail::remote_call>(made);
    auto command = rc.request.command.empty() ? std::string{to_string(rc.request.op)}
                                              : rc.request.command;
    if (must_not_block())
      return outcome::failure(blocking_in_callback(command));
    auto bound = rc.deadline + reply_margin + std::chrono::seconds{2};
    auto promise = std::make_shared<std::promise<outcome>>();
    auto future = promise->get_future();
    send_remote(std::move(rc), completion{[promise](outcome o) { promise->set_value(std::move(o)); }});
    return await_bounded(future, bound, [&](bool) {
      return outcome::failure(make_error(error_category::timeout_error, "caller_timeout",
                                         "no reply from the node in time", {{"command", command}}));
    });
  }

  // end_session, get_session_info, list_sessions: on the named pool.
  outcome session_op(session_op op, const std::string& session_id, const std::string& pool_name) {
    auto found = route(pool_name, pool_unit::session_op_name(op, {}));
    if (auto* e = std::get_if<error>(&found))
      return outcome::failure(std::move(*e));
    if (auto* r = std::get_if<remote_pool>(&found)) {
      auto remote_op = op == session_op::end    ? node_op::end_session
                       : op == session_op::info ? node_op::session_info
                                                : node_op::list_sessions;
      return remote_blocking(make_remote_call(remote_op, r->name, session_id, {}, nullptr, {}));
    }
    auto& pool = *std::get<pool_unit*>(found);
    return pool.session_blocking(pool.make_session_request(op, session_id, {}, nullptr, {}));
  }

  // -- serving other runtimes (this runtime as a node) --------------------------------

  // Runs a request a caller runtime sent on one of this runtime's own pools
  // (never on its remote ones: nodes do not forward). `done` runs once.
  // The node actor that calls this is stopped before the runtime goes.
  void serve_remote(node_request r, std::shared_ptr<const std::atomic<bool>> abandoned,
                    std::function<void(outcome)> done) {
    auto* pool = local_pool(r.pool);
    auto command = r.command.empty() ? std::string{to_string(r.op)} : r.command;
    if (!pool) {
      done(outcome::failure(make_error(error_category::system_error, "invalid_request",
                                       "this node has no pool named '" + sanitize_utf8(r.pool) + "'",
                                       {{"command", sanitize_utf8(command)},
                                        {"reason", "unknown_pool"},
                                        {"pool", sanitize_utf8(r.pool)}})));
      return;
    }
    auto timeout = std::chrono::milliseconds{static_cast<std::int64_t>(r.timeout_ms)};
    if (r.op == node_op::execute && r.session_id.empty()) {
      call_options o;
      o.timeout = timeout;
      o.idempotent = r.idempotent;
      o.max_attempts = r.max_attempts;
      pool->anonymous_async(r.command, std::move(r.args), o, std::move(done), std::move(abandoned));
      return;
    }
    session_call_options so;
    so.timeout = timeout;
    so.idempotent = r.idempotent;
    so.max_attempts = r.max_attempts;
    if (r.affinity)
      so.affinity = affinity_mode_from_string(*r.affinity);
    auto op = r.op == node_op::execute       ? session_op::execute
              : r.op == node_op::end_session ? session_op::end
              : r.op == node_op::session_info ? session_op::info
                                              : session_op::list;
    pool->session_async(op, r.session_id, r.command, std::move(r.args), so, std::move(done),
                        std::move(abandoned));
  }

  // Stops serving other runtimes, then stops using the nodes: a node's
  // callers see its port close; this runtime's remote calls fail with
  // pool_stopping (the router's exit).
  void stop_nodes(caf::scoped_actor& self, caf::duration bound) {
    if (node) {
      if (node_port != 0) {
        // Closed through the manager that opened it (CAF 0.17's
        // openssl::unpublish does not compile).
        auto mm = config.node.tls_enabled() ? system->openssl_manager().actor_handle()
                                            : system->middleman().actor_handle();
        self->send(mm, caf::close_atom::value, node_port);
      }
      self->monitor(node);
      self->send_exit(node, caf::exit_reason::user_shutdown);
      self->receive([](caf::down_msg&) {},
                    caf::after(bound) >> [&] { log().error("the node actor did not stop"); });
    }
    if (router) {
      self->monitor(router);
      self->send_exit(router, caf::exit_reason::user_shutdown);
      self->receive([](caf::down_msg&) {},
                    caf::after(bound) >> [&] { log().error("the remote router did not stop"); });
    }
  }

  // The stop itself (see runtime::stop for the thread it runs on).
  void run_stop() {
    auto& sys = *system;
    // No retries and no new attempts from now on; calls waiting for a retry
    // or for a pool fail with resource_error/pool_stopping.
    {
      caf::scoped_actor self{sys};
      stop_nodes(self, caf::duration{reply_margin});
    }
    for (auto& p : pools)
      caf::anon_send(p->client, closing_atom::value);
    // Service detection: no longer "dspexpool" (and a registry entry must not
    // outlive the system: ~actor_system() would wait for it forever).
    unregister_pool(sys);
    // The root stops its subtrees in reverse start order, each pool's
    // children bounded by their shutdown_timeout (the pool's: both graces +
    // 2 s; the sessions': 2 s); the margin covers reaping and message hops.
    caf::duration bound{reply_margin};
    {
      auto total = std::chrono::milliseconds{0};
      for (auto& p : pools) {
        const auto& w = p->config->worker;
        total += w.shutdown_grace + w.kill_grace + std::chrono::seconds{5};
      }
      bound = caf::duration{total + reply_margin};
    }
    {
      caf::scoped_actor self{sys};
      self->monitor(root);  // a root that already ended: down at once
      bool stopped_cleanly = false;
      self->request(root, bound, supervisor_stop_atom::value)
        .receive([&](bool) { stopped_cleanly = true; },
                 [&](caf::error& e) {
                   if (e != caf::sec::request_receiver_down)
                     log().error("the root supervisor did not stop in time ({}); killing it",
                                 sys.render(e));
                 });
      if (!stopped_cleanly)
        self->send_exit(root, caf::exit_reason::kill);  // it kills its children
      self->receive([](caf::down_msg&) {},
                    caf::after(bound) >> [&] { log().error("the root supervisor did not terminate"); });
      // No public call touches the system from here on: the ones under way
      // (each bounded) finish first, later ones see the gate closed.
      {
        std::unique_lock<std::shared_timed_mutex> lk{gate->mtx};
        gate->closed = true;
      }
      // Every call has its answer now (or fails on the pool's down); each
      // client quits once it passed the last one on.
      for (auto& p : pools) {
        self->monitor(p->client);
        self->send(p->client, stop_atom::value);
      }
      for (std::size_t i = 0; i < pools.size(); ++i)
        self->receive([](caf::down_msg&) {},
                      caf::after(bound) >> [&] {
                        log().error("a pool client did not finish its calls");
                        for (auto& p : pools)
                          self->send_exit(p->client, caf::exit_reason::kill);
                      });
    }
    // A restart racing with the unregistration above may have registered a
    // pool again; its entry goes with the pool, but leave nothing to chance.
    unregister_services(sys);
    for (auto& p : pools) {
      {
        std::lock_guard<std::mutex> guard{p->shared->mtx};
        p->shared->pool = nullptr;
      }
      p->client = nullptr;
    }
    root = nullptr;
    // ~actor_system() blocks while any actor lives; every actor of ours is
    // gone or going now (workers die with the pool, lease holders with it).
    log().debug("runtime stop: {} actors still running", sys.registry().running());
    system.reset();
    stop_done.set_value();
  }
};

runtime::runtime(std::shared_ptr<impl> p) : impl_(std::move(p)) {
}

runtime::~runtime() {
  // From a runtime thread, stop() continues on a thread of its own, which
  // holds the impl until it is done (see runtime::stop).
  stop();
}

std::unique_ptr<runtime> runtime::start(settings config) {
  if (auto err = config.validate())
    throw start_error(*err);
  release_caf_thread_state release;
  if (auto err = configure_logging(config))
    throw start_error(*err);
  auto p = std::make_shared<impl>();
  p->config = config;
  p->system_cfg = std::make_unique<system_config>(config);
  p->system = std::make_unique<caf::actor_system>(*p->system_cfg);
  auto& sys = *p->system;
  // Each pool's client first: its subtree supervisor's observer tells it
  // about every (re)started pool, from the first start on.
  std::vector<runtime_tree_parts> parts;
  auto add_pool = [&](const settings& pool_config) {
    auto u = std::make_unique<pool_unit>();
    u->config = std::make_shared<const settings>(pool_config);
    u->events = std::make_shared<event_bus>(p->events, pool_config.pool_name);
    u->metrics = std::make_shared<pool_metrics>(pool_config.pool.size);
    u->anonymous = detail::make_dspy_anonymous(pool_config.session.max_anonymous_programs);
    u->stopped = &p->stopped;
    u->gate = p->gate;
    u->client = spawn_pool_client(sys, u->config, u->events, u->shared, u->anonymous);
    u->sinks = sinks_to_client(p->gate, u->client.address());
    parts.push_back(runtime_tree_parts{u->config, u->events, u->metrics, u->shared, u->client,
                                       u->sessions, u->sinks});
    p->pools.push_back(std::move(u));
  };
  {
    auto default_pool = config;
    default_pool.pools.clear();  // each pool holds its own settings only
    add_pool(default_pool);
  }
  for (const auto& named : config.pools)
    add_pool(named);

  // The supervision tree (runtime_tree.cpp).
  p->root = spawn_runtime_tree(sys, p->events, parts);

  std::unique_ptr<runtime> rt{new runtime(std::move(p))};
  // Every pool must start: each client answers once it knows its pool (and
  // has registered it), then asks the pool. The pools start in parallel.
  std::optional<error> failed;
  {
    caf::scoped_actor self{*rt->impl_->system};
    auto longest = std::chrono::milliseconds{0};
    for (auto& u : rt->impl_->pools)
      longest = std::max(longest, u->config->pool.init_timeout);
    auto bound = caf::duration{longest + reply_margin};
    for (auto& u : rt->impl_->pools) {
      outcome ready;
      self->request(u->client, bound, await_ready_atom::value)
        .receive([&](outcome& o) { ready = std::move(o); },
                 [&](caf::error& e) { ready = from_caf_error(*rt->impl_->system, e, "start"); });
      if (!ready && !failed) {
        auto e = ready.error();
        e.context["pool"] = u->name();
        if (rt->impl_->pools.size() > 1)
          e.message = "pool '" + u->name() + "': " + e.message;
        failed = std::move(e);
      }
    }
  }
  auto& impl = *rt->impl_;
  // Issue 13: the nodes this runtime uses, then this runtime as a node.
  if (!failed && !config.remote.nodes.empty()) {
    impl.router = spawn_remote_router(*impl.system, std::make_shared<const settings>(config),
                                      impl.remote, impl.events);
    // Every node is tried once (each attempt bounded by remote.connect_timeout);
    // one that cannot be reached is no start failure: it is tried again.
    caf::scoped_actor self{*impl.system};
    self->request(impl.router, caf::duration{config.remote.connect_timeout + reply_margin},
                  remote_ready_atom::value)
      .receive([](bool) {}, [](caf::error&) {});
  }
  if (!failed && config.node.publish) {
    node_services services;
    services.limits = rt->impl_->pools.front()->limits();
    services.serve = [p = &impl](node_request r, std::shared_ptr<const std::atomic<bool>> abandoned,
                                 std::function<void(outcome)> done) {
      p->serve_remote(std::move(r), std::move(abandoned), std::move(done));
    };
    services.pools = [p = &impl] {
      std::vector<std::pair<std::string, pool_handle>> all;
      for (auto& u : p->pools)
        all.emplace_back(u->name(), u->shared->current_pool());
      return all;
    };
    impl.node = spawn_node_actor(*impl.system, services);
    // With TLS configured, only peers with a certificate signed by
    // node.tls.ca_file get past the handshake.
    auto port = config.node.tls_enabled()
                  ? caf::openssl::publish(impl.node, config.node.port, config.node.bind.c_str(), true)
                  : impl.system->middleman().publish(impl.node, config.node.port,
                                                     config.node.bind.c_str(), true);
    if (!port) {
      failed = make_error(error_category::initialization_error, "node_publish_failed",
                          "cannot serve as a node on " + config.node.bind + ":"
                            + std::to_string(config.node.port) + ": "
                            + impl.system->render(port.error()),
                          {{"bind", config.node.bind}, {"port", config.node.port}});
    } else {
      impl.node_port = *port;
      log().info("node: serving pools on {}:{} ({})", config.node.bind, impl.node_port,
                 config.node.tls_enabled() ? "TLS, mutual certificates" : "plaintext, loopback");
    }
  }
  if (failed) {
    rt->stop();
    throw start_error(*failed);
  }
  return rt;
}

outcome runtime::execute_anonymous(const std::string& command, nlohmann::json args,
                                   call_options options) {
  auto found = impl_->route(options.pool, command);
  if (auto* e = std::get_if<error>(&found))
    return outcome::failure(std::move(*e));
  if (auto* r = std::get_if<impl::remote_pool>(&found))
    return impl_->remote_blocking(impl_->remote_anonymous(r->name, command, std::move(args), options));
  auto& pool = *std::get<pool_unit*>(found);
  auto made = pool.make_call(command, std::move(args), options.timeout);
  if (auto* early = std::get_if<outcome>(&made))
    return std::move(*early);
  if (must_not_block())
    return outcome::failure(blocking_in_callback(command));
  auto& c = std::get<call>(made);
  // Through the runtime's long-lived caller actor: a scoped_actor per call
  // costs an actor spawn and several timer-thread wake-ups (measured).
  auto bound = c.deadline + reply_margin;
  auto blocked = std::make_shared<blocked_caller>(c.deadline);
  auto comp = pool.timed(command, blocked->completion());
  pool.start_anonymous(c, options, comp, blocked);
  comp = {};  // its last copy is the call's (see blocked_caller::completion)
  return blocked->wait(bound, [&](bool) {
    return outcome::failure(make_error(error_category::timeout_error, "caller_timeout",
                                       "no reply from the pool in time", {{"command", command}}));
  });
}

void runtime::execute_anonymous_async(const std::string& command, nlohmann::json args,
                                      call_options options, std::function<void(outcome)> done) {
  auto found = impl_->route(options.pool, command);
  if (auto* e = std::get_if<error>(&found))
    done(outcome::failure(std::move(*e)));
  else if (auto* r = std::get_if<impl::remote_pool>(&found))
    impl_->remote_async(impl_->remote_anonymous(r->name, command, std::move(args), options),
                        std::move(done));
  else
    std::get<pool_unit*>(found)->anonymous_async(command, std::move(args), options, std::move(done));
}

std::future<outcome> runtime::execute_anonymous_async(const std::string& command,
                                                      nlohmann::json args, call_options options) {
  auto promise = std::make_shared<std::promise<outcome>>();
  auto future = promise->get_future();
  execute_anonymous_async(command, std::move(args), options,
                          [promise](outcome o) { promise->set_value(std::move(o)); });
  return future;
}

outcome runtime::execute_in_session(const std::string& session_id, const std::string& command,
                                    nlohmann::json args, session_call_options options) {
  auto found = impl_->route(options.pool, command);
  if (auto* e = std::get_if<error>(&found))
    return outcome::failure(std::move(*e));
  if (auto* r = std::get_if<impl::remote_pool>(&found))
    return impl_->remote_blocking(
      impl_->remote_in_session(r->name, session_id, command, std::move(args), options));
  auto& pool = *std::get<pool_unit*>(found);
  return pool.session_blocking(pool.make_session_request(session_op::execute, session_id, command,
                                                         std::move(args), options));
}

void runtime::execute_in_session_async(const std::string& session_id, const std::string& command,
                                       nlohmann::json args, session_call_options options,
                                       std::function<void(outcome)> done) {
  auto found = impl_->route(options.pool, command);
  if (auto* e = std::get_if<error>(&found))
    done(outcome::failure(std::move(*e)));
  else if (auto* r = std::get_if<impl::remote_pool>(&found))
    impl_->remote_async(
      impl_->remote_in_session(r->name, session_id, command, std::move(args), options),
      std::move(done));
  else
    std::get<pool_unit*>(found)->session_async(session_op::execute, session_id, command,
                                               std::move(args), options, std::move(done));
}

std::future<outcome> runtime::execute_in_session_async(const std::string& session_id,
                                                       const std::string& command,
                                                       nlohmann::json args,
                                                       session_call_options options) {
  auto promise = std::make_shared<std::promise<outcome>>();
  auto future = promise->get_future();
  execute_in_session_async(session_id, command, std::move(args), options,
                           [promise](outcome o) { promise->set_value(std::move(o)); });
  return future;
}

outcome runtime::end_session(const std::string& session_id, const std::string& pool) {
  return impl_->session_op(session_op::end, session_id, pool);
}

outcome runtime::get_session_info(const std::string& session_id, const std::string& pool) {
  return impl_->session_op(session_op::info, session_id, pool);
}

outcome runtime::list_sessions(const std::string& pool) {
  return impl_->session_op(session_op::list, {}, pool);
}

std::variant<std::unique_ptr<lease>, error> runtime::checkout(checkout_type type,
                                                             checkout_options options) {
  if (impl_->stopped)
    return stopped_error("checkout");
  auto found = impl_->find_pool(options.pool, "checkout");
  if (auto* e = std::get_if<error>(&found))
    return std::move(*e);
  auto& unit = *std::get<pool_unit*>(found);
  if (must_not_block())
    return blocking_in_callback("checkout");
  static std::atomic<std::uint64_t> next_token{1};
  release_caf_thread_state release;  // the holder is spawned on this thread
  auto timeout = options.timeout.value_or(unit.config->pool.request_timeout);
  auto deadline = clock_type::now() + timeout;
  auto promise = std::make_shared<std::promise<checkout_reply>>();
  auto future = promise->get_future();
  caf::actor holder;
  pool_handle pool;
  {
    std::shared_lock<std::shared_timed_mutex> lk{impl_->gate->mtx};
    if (impl_->gate->closed)
      return stopped_error("checkout");
    pool = unit.shared->current_pool();
    if (!pool)
      return unit.no_pool_error();
    holder = spawn_lease_holder(*impl_->system, pool);
    caf::anon_send(holder, checkout_atom::value,
                   checkout_request{std::move(type), next_token++, deadline, options.block},
                   detail::checkout_sink{
                     [promise](checkout_reply r) { promise->set_value(std::move(r)); }});
  }
  // Bounded: the holder answers by the deadline, or quits when the pool
  // goes (a restart while the checkout waits), which drops the promise.
  auto reply = await_bounded(future, deadline + reply_margin, [&](bool dropped) {
    return checkout_reply{
      std::nullopt,
      dropped ? make_error(error_category::resource_error, "pool_unavailable",
                           "the pool terminated while the checkout waited; try again")
              : make_error(error_category::timeout_error, "caller_timeout",
                           "no answer to the checkout in time")};
  });
  if (!reply.grant) {
    std::shared_lock<std::shared_timed_mutex> lk{impl_->gate->mtx};
    if (!impl_->gate->closed)
      caf::anon_send(holder, stop_atom::value);
    return reply.err;
  }
  auto p = std::make_unique<lease::impl>();
  p->holder = holder;
  p->grant = std::move(*reply.grant);
  p->gate = impl_->gate;
  p->limits = unit.limits();
  return std::make_unique<lease>(std::move(p));
}

std::vector<std::string> runtime::pools() const {
  std::vector<std::string> names;
  for (auto& p : impl_->pools)
    names.push_back(p->name());
  for (auto& r : impl_->remote->pools())
    if (std::find(names.begin(), names.end(), r) == names.end())
      names.push_back(r);
  return names;
}

std::uint16_t runtime::node_port() const noexcept {
  return impl_->node_port;
}

pool_status runtime::status(const std::string& pool_name) {
  pool_status result;
  auto found = impl_->route(pool_name, "status");
  if (std::holds_alternative<error>(found))
    return result;  // pool_status::pool stays empty: no such pool
  if (auto* r = std::get_if<impl::remote_pool>(&found)) {
    result = impl_->remote->status(r->name).value_or(result);
    if (auto m = impl_->remote_metrics_of(r->name, false))
      result.metrics = m->summary();
    return result;
  }
  auto& unit = *std::get<pool_unit*>(found);
  result.pool = unit.name();
  if (impl_->stopped || must_not_block())
    return result;
  std::shared_lock<std::shared_timed_mutex> lk{impl_->gate->mtx};
  if (impl_->gate->closed)
    return result;
  auto pool = unit.shared->current_pool();
  if (!pool) {
    result.size = unit.config->pool.size;
    result.health = unit.shared->gave_up_error() ? "unavailable" : "restarting";
  } else {
    // Bounded (10 s); stop() waits for it before the system goes.
    release_caf_thread_state release;
    caf::scoped_actor self{*impl_->system};
    self->request(pool, caf::duration{std::chrono::seconds{10}}, status_atom::value)
      .receive([&](pool_status& s) { result = std::move(s); },
               [&](caf::error& e) { log().warn("status: {}", impl_->system->render(e)); });
  }
  result.pool = unit.name();
  result.circuit = to_string(unit.shared->circuit.load());
  result.metrics = unit.metrics->summary();  // also while the pool restarts
  return result;
}

metrics_snapshot runtime::metrics(const std::string& pool_name) {
  auto st = status(pool_name);
  metrics_snapshot m;
  m.pool = st.pool;  // empty: no such pool
  m.size = st.size;
  m.idle = st.idle;
  m.busy = st.busy;
  m.leased = st.leased;
  m.queued = st.queued;
  m.starting = st.starting;
  m.overflow = st.overflow;
  m.in_flight = st.metrics.in_flight;
  m.utilisation = st.metrics.utilisation;
  m.circuit = st.circuit;
  m.health = st.health;
  const auto& bounds = latency_bucket_bounds();
  static const std::vector<std::uint64_t> bounds_ns = [&] {
    std::vector<std::uint64_t> ns;
    for (auto b : bounds)
      ns.push_back(static_cast<std::uint64_t>(std::llround(b * 1e9)));
    return ns;
  }();
  auto histogram = [&](const latency_histogram& h) {
    return histogram_snapshot{bounds, h.counts_at_or_below(bounds_ns),
                              static_cast<double>(h.sum_ns()) / 1e9};
  };
  auto found = impl_->find_pool(pool_name, "metrics");
  if (std::holds_alternative<error>(found)) {
    // A remote pool: the gauges its nodes publish, and this side's calls
    // (the nodes count their queue waits and run times). No such pool: empty.
    if (auto remote = impl_->remote_metrics_of(m.pool, false)) {
      m.calls = remote->calls.snapshot();
      m.total = histogram(remote->total);
    }
    return m;
  }
  auto& unit = *std::get<pool_unit*>(found);
  m.sessions = unit.sessions->live();
  m.workers_started = st.workers_started;
  m.workers_removed = st.removed_by_reason;
  m.workers_recycled = st.recycled;
  m.worker_start_failures = st.start_failures;
  m.health_check_failures = st.health_check_failures;
  m.pool_restarts = unit.shared->pool_restarts.load(std::memory_order_relaxed);
  m.calls = unit.metrics->calls.snapshot();
  m.queue_wait = histogram(unit.metrics->queue_wait);
  m.run = histogram(unit.metrics->run);
  m.total = histogram(unit.metrics->total);
  return m;
}

std::uint64_t runtime::subscribe(std::function<void(const event&)> handler) {
  return impl_->events->subscribe(std::move(handler));
}

void runtime::unsubscribe(std::uint64_t id) {
  impl_->events->unsubscribe(id);
}

event_bus& runtime::events() noexcept {
  return *impl_->events;
}

void runtime::stop() {
  auto p = impl_;
  // On a runtime thread the stop cannot wait for the actors it stops (that
  // thread may be the one they need): it runs on a thread of its own, which
  // keeps the impl alive, and this call returns at once. Anywhere else it
  // runs here, and a second caller waits for the first one's run.
  bool here = !must_not_block();
  std::call_once(p->stop_once, [&] {
    p->stopped = true;
    if (here) {
      p->run_stop();
      return;
    }
    log().info("runtime::stop() called on a runtime thread: stopping on a thread of its own");
    std::thread([p] { p->run_stop(); }).detach();
  });
  if (here)
    p->stop_finished.wait();
}

const settings& runtime::config() const noexcept {
  return impl_->config;
}

} // namespace dspex

namespace dspex {

caf::actor_system& runtime_access::system(runtime& rt) {
  return *rt.impl_->system;
}

pool_handle runtime_access::pool(runtime& rt, const std::string& name) {
  for (auto& p : rt.impl_->pools)
    if (p->name() == (name.empty() ? std::string{"default"} : name))
      return p->shared->current_pool();
  return {};
}

caf::actor runtime_access::pool_supervisor(runtime& rt, const std::string& name) {
  caf::actor found;
  if (!rt.impl_->root)
    return found;
  release_caf_thread_state release;
  caf::scoped_actor self{*rt.impl_->system};
  self->request(rt.impl_->root, caf::duration{std::chrono::seconds{10}}, which_children_atom::value)
    .receive(
      [&](std::vector<child_info>& children) {
        for (auto& c : children)
          if (c.id == "pool." + (name.empty() ? std::string{"default"} : name))
            found = c.actor;
      },
      [&](caf::error&) {});
  return found;
}

caf::actor runtime_access::root(runtime& rt) {
  return rt.impl_->root;
}

caf::actor runtime_access::client(runtime& rt, const std::string& name) {
  for (auto& p : rt.impl_->pools)
    if (p->name() == (name.empty() ? std::string{"default"} : name))
      return caf::actor_cast<caf::actor>(p->client);
  return nullptr;
}

} // namespace dspex
