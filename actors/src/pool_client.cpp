// The pool client.
//
// One long-lived actor per runtime (= per pool) through which every
// execute_anonymous call goes, blocking and asynchronous alike: no spawn on
// the hot path, and calls made from one thread reach the pool in the order
// they were made. It is also the runtime's second line of defence (the pool
// itself re-queues calls that never reached a worker):
//  - retries with backoff (retry.*): a failed attempt is sent again, after a
//    delayed message to itself, when retry_policy::decide allows it: the
//    request never reached a worker, or the worker failed mid-request and the
//    call is idempotent; never a python_error; all attempts within the
//    caller's one deadline;
//  - the circuit breaker (circuit.*) in front of the pool: it only answers
//    (allow before each attempt, record after); a rejection is returned at
//    once and never retried;
//  - it always talks to the CURRENT pool: the root supervisor's observer
//    forwards every (re)started pool to it; calls that arrive while the pool
//    restarts wait for the new one (parked), calls that were in flight on a
//    pool that died fail like a dead worker's (and may be retried).
// Everything here runs on the client's thread; state needs no locks.
#include "pool_client.hpp"

#include <algorithm>
#include <cstdint>
#include <deque>
#include <unordered_map>

#include <caf/all.hpp>

#include "dspex/actors/messages.hpp"
#include "dspex/actors/service.hpp"
#include "dspex/actors/session_actor.hpp"
#include "dspex/actors/supervisor.hpp"
#include "dspex/backoff.hpp"
#include "dspex/circuit_breaker.hpp"
#include "dspex/logging.hpp"
#include "api_support.hpp"
#include "command_adapter.hpp"

namespace dspex::runtime_detail {

namespace {

using client_retry_atom = caf::atom_constant<caf::atom("cretry")>;      // (id, attempt): resend
using circuit_tick_atom = caf::atom_constant<caf::atom("ctick")>;       // (generation): open -> half_open due
using park_timeout_atom = caf::atom_constant<caf::atom("parktmo")>;     // (id, attempt): deadline while parked

enum class call_phase { waiting, parked, in_flight };

struct pending_call {
  call c;                  ///< kept for resends (its deadline bounds every attempt)
  completion done;
  std::size_t attempt = 0;  ///< the attempt running or last run (1 = the first)
  std::size_t max_attempts = 1;
  bool idempotent = false;
  std::uint64_t seed = 0;
  std::optional<retry_policy> policy;  ///< built at the first failure: the hot path needs none
  std::optional<circuit_permit> permit;
  caf::actor_addr pool;     ///< where the attempt in flight went
  call_phase phase = call_phase::waiting;
  std::string served_by;    ///< the worker that answered the last attempt (outcome::served_by)
};

struct pool_client_state {
  std::shared_ptr<const settings> config;
  std::shared_ptr<event_bus> events;
  std::shared_ptr<detail::client_shared> shared;
  retry_settings retry;  ///< the template of every call's policy
  bool breaker = false;  ///< circuit.enabled: shared->breaker is set
  std::uint64_t tick_generation = 0;
  pool_handle pool;
  caf::actor_addr root;  ///< monitored: its end (other than by stop) fails every call
  std::unordered_map<std::uint64_t, pending_call> calls;
  std::deque<std::uint64_t> parked;  ///< waiting for a pool, in arrival order
  std::vector<caf::response_promise> ready_waiters;
  std::optional<error> gave_up;
  // The session layer (issue 5): the current session registry (the root's
  // child "sessions"), the session requests waiting for it, and how many
  // were forwarded and not yet answered.
  caf::actor sessions;
  std::vector<std::pair<session_request, completion>> sessions_parked;
  struct session_op_entry {
    completion done;
    caf::actor_addr registry;  ///< where it went: its end fails it
  };
  std::unordered_map<std::uint64_t, session_op_entry> session_ops;  ///< forwarded, not yet answered
  std::uint64_t next_session_op = 1;
  // What anonymous calls' commands need (DSPy: the anonymous programs'
  // definitions, so an execute_program carries program_data and any worker
  // serves it).
  std::shared_ptr<detail::anonymous_adapter> anonymous;
  std::uint64_t next_id = 1;
  std::uint64_t seed_base = 0;
  bool closing = false;   ///< runtime::stop began: no retries, no new attempts
  bool stopping = false;  ///< quit once the last call is answered

  static inline const char* name = "dspex.pool_client";
};

/// Its whole interface: the public one and its own timers'.
using pool_client_type = pool_client_handle::extend<
  caf::reacts_to<client_retry_atom, std::uint64_t, std::size_t>,
  caf::reacts_to<park_timeout_atom, std::uint64_t, std::size_t>,
  caf::reacts_to<circuit_tick_atom, std::uint64_t>>;

using pool_client_t = pool_client_type::stateful_pointer<pool_client_state>;

retry_settings make_retry_settings(const settings& cfg) {
  retry_settings r;
  r.max_attempts = std::max<std::size_t>(cfg.retry.max_attempts, 1);
  r.backoff.kind = backoff_kind_from_string(cfg.retry.strategy).value_or(backoff_kind::exponential);
  r.backoff.base = cfg.retry.base_delay;
  r.backoff.max_delay = cfg.retry.max_delay;
  r.backoff.jitter = cfg.retry.jitter;
  return r;
}

circuit_breaker_config make_circuit_config(const settings& cfg) {
  circuit_breaker_config c;
  c.name = "pool";
  c.failure_threshold = cfg.circuit.failure_threshold;
  c.failure_window = cfg.circuit.failure_window;
  c.open_timeout = cfg.circuit.open_timeout;
  c.half_open_max_probes = cfg.circuit.half_open_probes;
  c.success_threshold = cfg.circuit.success_threshold;
  return c;
}

error with_call_context(error e, const pending_call& pc) {
  if (!e.context.is_object())
    e.context = nlohmann::json::object();
  e.context["command"] = pc.c.command;
  e.context["attempt"] = pc.attempt;
  return e;
}

error stopping_error(const std::string& command) {
  return make_error(error_category::resource_error, "pool_stopping", "the runtime is stopping",
                    {{"command", command}});
}

void publish(pool_client_t self, event e) {
  e.source = "client";
  self->state.events->publish(e);
}

// No exception escapes a handler of the client: it holds every pending
// call, and an actor whose handler throws quits, which would leave every
// later call unanswered. What threw is logged; the caller of the call being
// handled gets system_error/internal_error (see internal_error below).
template <class F>
bool guarded(const char* what, F&& f) noexcept {
  try {
    f();
    return true;
  } catch (const std::exception& e) {
    log().error("pool client: {} threw: {}", what, e.what());
  } catch (...) {
    log().error("pool client: {} threw", what);
  }
  return false;
}

error internal_error(const std::string& command) {
  return make_error(error_category::system_error, "internal_error",
                    "the runtime failed to handle the call (logged); nothing else is affected",
                    {{"command", command}});
}

// A stopping client quits once nothing is pending.
void quit_when_drained(pool_client_t self) {
  auto& st = self->state;
  if (st.stopping && st.calls.empty() && st.session_ops.empty())
    self->quit();
}

// Answers the entry `id` of `pending` (calls or session operations) and forgets it.
template <class Pending>
void answer_and_forget(pool_client_t self, Pending& pending, std::uint64_t id, outcome o) {
  auto it = pending.find(id);
  if (it == pending.end())
    return;
  auto done = std::move(it->second.done);
  pending.erase(it);
  run_callback(done, std::move(o));
  quit_when_drained(self);
}

// Answers the call and forgets it.
void finish(pool_client_t self, std::uint64_t id, outcome o) {
  answer_and_forget(self, self->state.calls, id, std::move(o));
}

void fail_final(pool_client_t self, std::uint64_t id, error e) {
  auto& pc = self->state.calls.at(id);
  auto o = outcome::failure(with_call_context(std::move(e), pc));
  o.set_served_by(pc.served_by);  // e.g. a python_error: the session learns its worker
  finish(self, id, std::move(o));
}

void arm_circuit_tick(pool_client_t self, circuit_breaker::time_point at) {
  using namespace std::chrono;
  auto left = at - clock_type::now();
  // Rounded up, so the tick never comes before the breaker's own deadline.
  auto delay = left > clock_type::duration::zero()
                 ? duration_cast<milliseconds>(left) + milliseconds{1}
                 : milliseconds{0};
  self->delayed_send(self, delay, circuit_tick_atom::value, ++self->state.tick_generation);
}

void on_circuit_transition(pool_client_t self, const circuit_transition& t) {
  event e;
  e.kind = event_kind::circuit_changed;
  e.from = to_string(t.from);
  e.to = to_string(t.to);
  e.reason = t.reason;
  e.fields = {{"circuit", "pool"}};
  publish(self, std::move(e));
  // Publish open -> half_open when it is due, not at the next request.
  if (t.to == circuit_state::open)
    arm_circuit_tick(self, t.at + self->state.shared->breaker->config().open_timeout);
}

// A failed attempt: retry it, or answer the caller.
void handle_failure(pool_client_t self, std::uint64_t id, const error& err) {
  auto& st = self->state;
  auto& pc = st.calls.at(id);
  pc.phase = call_phase::waiting;
  if (!pc.policy) {
    auto rs = st.retry;
    rs.max_attempts = std::max<std::size_t>(pc.max_attempts, 1);
    pc.policy.emplace(std::move(rs), pc.seed);
  }
  retry_decision d;
  if (st.closing) {
    d.why = retry_reason::not_retryable;
    d.reason = "the runtime is stopping";
  } else if (pc.c.affinity == affinity_mode::strict_fail_fast
             && pc.c.type.what() == checkout_type::kind::session
             && err.category == error_category::resource_error && err.type == "worker_busy") {
    // The caller asked to fail at once when its session's worker is busy.
    d.why = retry_reason::not_retryable;
    d.reason = "strict_fail_fast: the session's worker is busy";
  } else {
    d = pc.policy->decide(err, pc.attempt, clock_type::now(), pc.c.deadline, pc.idempotent);
  }
  if (d.retry) {
    event e;
    e.kind = event_kind::retry_scheduled;
    e.attempt = pc.attempt + 1;
    e.delay = d.delay;
    e.reason = d.reason;
    e.err = err;
    e.fields = {{"command", pc.c.command}, {"why", to_string(d.why)},
                {"max_attempts", pc.policy->settings().max_attempts}};
    publish(self, std::move(e));
    if (d.delay.count() > 0)
      self->delayed_send(self, d.delay, client_retry_atom::value, id, pc.attempt);
    else
      self->send(self, client_retry_atom::value, id, pc.attempt);
    return;
  }
  // A retryable error whose retry was refused, or any end after retries.
  bool refused = d.why == retry_reason::not_idempotent || d.why == retry_reason::attempts_exhausted
                 || d.why == retry_reason::deadline;
  if (pc.attempt > 1 || refused || (st.closing && pc.policy->classify(err) != retry_class::never)) {
    event e;
    e.kind = event_kind::retry_gave_up;
    e.attempt = pc.attempt;
    e.reason = d.reason;
    e.err = err;
    e.fields = {{"command", pc.c.command}, {"why", st.closing ? "stopping" : to_string(d.why)}};
    publish(self, std::move(e));
  }
  fail_final(self, id, err);
}

void on_circuit_transition(pool_client_t self, const circuit_transition& t);

// Runs `f` on the breaker under its lock, then publishes what changed.
template <class F>
auto with_breaker(pool_client_t self, F&& f) {
  auto& sh = *self->state.shared;
  std::vector<circuit_transition> changes;
  auto result = [&] {
    std::lock_guard<std::mutex> guard{sh.breaker_mtx};
    auto r = f(*sh.breaker);
    changes.swap(sh.transitions);
    return r;
  }();
  for (auto& t : changes)
    on_circuit_transition(self, t);
  return result;
}

void settle_permit(pool_client_t self, pending_call& pc, const outcome& o) {
  if (!pc.permit || !self->state.breaker)
    return;
  auto permit = *pc.permit;
  pc.permit.reset();
  with_breaker(self, [&](circuit_breaker& b) {
    if (o)
      b.record_success(permit);
    else
      b.record_failure(permit, o.error());
    return 0;
  });
}

outcome from_request_error(caf::actor_system& sys, const caf::error& e, const std::string& command) {
  if (e == caf::sec::request_receiver_down)
    // The pool was gone before it took the call: nothing ran anywhere.
    return outcome::failure(make_error(error_category::connection_error, "pool_down",
                                       "the pool terminated before it received the call",
                                       {{"command", command}}));
  return from_caf_error(sys, e, command);
}

// The answer of attempt `attempt` of call `id` (stale answers are dropped).
void on_answer(pool_client_t self, std::uint64_t id, std::size_t attempt, outcome o) {
  auto& st = self->state;
  auto it = st.calls.find(id);
  if (it == st.calls.end() || it->second.attempt != attempt
      || it->second.phase != call_phase::in_flight)
    return;
  auto& pc = it->second;
  pc.pool = caf::actor_addr{};
  pc.served_by = o.served_by();
  settle_permit(self, pc, o);
  if (o) {
    finish(self, id, std::move(o));
    return;
  }
  handle_failure(self, id, o.error());
}

void park(pool_client_t self, std::uint64_t id) {
  auto& pc = self->state.calls.at(id);
  pc.phase = call_phase::parked;
  self->state.parked.push_back(id);
  auto left = pc.c.deadline - clock_type::now();
  auto delay = left > clock_type::duration::zero()
                 ? std::chrono::duration_cast<std::chrono::milliseconds>(left)
                 : std::chrono::milliseconds{0};
  self->delayed_send(self, delay, park_timeout_atom::value, id, pc.attempt);
}

void send_to_pool(pool_client_t self, std::uint64_t id, std::size_t attempt, call c);

// Runs the current attempt of call `id`: on the current pool, if the breaker
// allows it; parked while there is no pool.
void dispatch(pool_client_t self, std::uint64_t id) {
  auto& st = self->state;
  auto& pc = st.calls.at(id);
  if (st.closing) {
    fail_final(self, id, stopping_error(pc.c.command));
    return;
  }
  if (st.gave_up) {
    fail_final(self, id, *st.gave_up);
    return;
  }
  if (!st.pool) {
    park(self, id);
    return;
  }
  if (st.breaker) {
    auto admission = with_breaker(self, [](circuit_breaker& b) { return b.allow(); });
    if (!admission) {
      handle_failure(self, id, *admission.rejection);  // circuit_open: never retried
      return;
    }
    pc.permit = admission.permit;
  }
  pc.phase = call_phase::in_flight;
  pc.pool = st.pool.address();
  // The attempt is the whole call (a field listed by hand here once lost
  // call::abandoned); its args are copied only when another attempt may
  // need them.
  auto args = std::move(pc.c.args);
  call c = pc.c;
  if (pc.max_attempts > 1) {
    c.args = args;
    pc.c.args = std::move(args);
  } else {
    c.args = std::move(args);
  }
  send_to_pool(self, id, pc.attempt, std::move(c));
}

// The attempt `attempt` of call `id`, through the current pool.
void send_to_pool(pool_client_t self, std::uint64_t id, std::size_t attempt, call c) {
  auto& st = self->state;
  // No CAF timeout: the pool and the worker answer every call by its
  // deadline, and a lost answer (the pool died) is caught by the down
  // handler; a timed request costs wake-ups of CAF's timer thread on every
  // call. The blocking form bounds its own wait.
  self->request(st.pool, caf::infinite, execute_atom::value, std::move(c))
    .then([=](outcome& o) { on_answer(self, id, attempt, std::move(o)); },
          [=](caf::error& e) {
            auto command = self->state.calls.count(id) ? self->state.calls.at(id).c.command
                                                       : std::string{};
            on_answer(self, id, attempt, from_request_error(self->system(), e, command));
          });
}

void start_attempt(pool_client_t self, std::uint64_t id) {
  ++self->state.calls.at(id).attempt;
  dispatch(self, id);
}

void deliver_ready(pool_client_t self, caf::response_promise rp) {
  auto& st = self->state;
  if (st.gave_up) {
    rp.deliver(outcome::failure(*st.gave_up));
    return;
  }
  self->request(st.pool, caf::infinite, await_ready_atom::value)
    .then([rp](outcome& o) mutable { rp.deliver(std::move(o)); },
          [=](caf::error& e) mutable {
            rp.deliver(from_caf_error(self->system(), e, "start"));
          });
}

void fail_waiting(pool_client_t self, const error& err, bool parked_only) {
  auto& st = self->state;
  std::vector<std::uint64_t> ids;
  for (auto& [id, pc] : st.calls)
    if (pc.phase == call_phase::parked || (!parked_only && pc.phase == call_phase::waiting))
      ids.push_back(id);
  st.parked.clear();
  for (auto id : ids)
    if (st.calls.count(id))
      fail_final(self, id, err);
  for (auto& rp : st.ready_waiters)
    rp.deliver(outcome::failure(err));
  st.ready_waiters.clear();
}

void fail_sessions_parked(pool_client_t self, const error& err);

// The root supervisor gave up (or ended otherwise, outside stop): every call
// fails at once from now on.
void root_gone(pool_client_t self, error err) {
  auto& st = self->state;
  if (st.gave_up)
    return;
  st.gave_up = std::move(err);
  {
    std::lock_guard<std::mutex> guard{st.shared->mtx};
    st.shared->gave_up = st.gave_up;
  }
  fail_waiting(self, *st.gave_up, true);
  fail_sessions_parked(self, *st.gave_up);
}

void set_pool(pool_client_t self, pool_handle pool) {
  auto& st = self->state;
  if (!pool || pool == st.pool)
    return;
  st.pool = pool;
  self->monitor(pool);
  {
    std::lock_guard<std::mutex> guard{st.shared->mtx};
    st.shared->pool = pool;
  }
  // Service detection (seed Fix 5): the current pool is "dspexpool".
  // A named pool is "dspexpool.NAME" in the dspex registry (a CAF registry
  // name is an atom of at most 10 characters).
  if (!st.closing) {
    auto untyped = caf::actor_cast<caf::actor>(pool);  // the registries are untyped
    if (st.config->pool_name == "default")
      register_pool(self->system(), untyped);
    else
      register_service("dspexpool." + st.config->pool_name, service_kind::pool, untyped);
  }
  for (auto& rp : st.ready_waiters)
    deliver_ready(self, std::move(rp));
  st.ready_waiters.clear();
  auto parked = std::move(st.parked);
  st.parked.clear();
  for (auto id : parked) {
    auto it = st.calls.find(id);
    if (it != st.calls.end() && it->second.phase == call_phase::parked)
      dispatch(self, id);
  }
}

// -- the session layer's front door (issue 5) ------------------------------------------------
//
// Session requests go caller → client → the current session registry (the
// root's child "sessions"); the registry's sessions send their calls back
// through the client (execute_atom), so they too use the current pool, with
// retries and the circuit breaker. While the registry restarts, requests wait
// for the new one (parked); once the root gave up or stop began they fail.

void session_op_done(pool_client_t self, std::uint64_t op, outcome o) {
  answer_and_forget(self, self->state.session_ops, op, std::move(o));
}

void forward_session_op(pool_client_t self, session_request r, completion done) {
  auto& st = self->state;
  if (st.closing) {
    run_callback(done, outcome::failure(stopping_error(r.c.command)));
    return;
  }
  if (st.gave_up) {
    run_callback(done, outcome::failure(*st.gave_up));
    return;
  }
  if (!st.sessions) {
    st.sessions_parked.emplace_back(std::move(r), std::move(done));
    return;
  }
  if (r.op == session_op::execute) {
    // Answered by the session through the completion (answer_once: a
    // registry or session that goes away with it still answers).
    caf::anon_send(st.sessions, session_exec_atom::value, std::move(r), std::move(done));
    return;
  }
  auto op = st.next_session_op++;
  st.session_ops.emplace(op, pool_client_state::session_op_entry{std::move(done),
                                                                 st.sessions.address()});
  auto command = r.c.command;
  auto session_id = r.session_id;
  self->request(st.sessions, caf::infinite, session_op_atom::value, std::move(r))
    .then([=](outcome& o) { session_op_done(self, op, std::move(o)); },
          [=](caf::error& e) {
            nlohmann::json ctx{{"session_id", session_id}};
            if (!command.empty())
              ctx["command"] = command;
            auto err = e == caf::sec::request_receiver_down
                         ? make_error(error_category::resource_error, "sessions_unavailable",
                                      "the session layer terminated while serving the request",
                                      std::move(ctx))
                         : make_error(error_category::system_error, "actor_error",
                                      self->system().render(e), std::move(ctx));
            session_op_done(self, op, outcome::failure(std::move(err)));
          });
}

void fail_sessions_parked(pool_client_t self, const error& err) {
  auto parked = std::move(self->state.sessions_parked);
  self->state.sessions_parked.clear();
  for (auto& [r, done] : parked)
    run_callback(done, outcome::failure(err));
}

void set_sessions(pool_client_t self, caf::actor registry) {
  auto& st = self->state;
  if (!registry || registry == st.sessions)
    return;
  st.sessions = registry;
  self->monitor(registry);
  auto parked = std::move(st.sessions_parked);
  st.sessions_parked.clear();
  for (auto& [r, done] : parked)
    forward_session_op(self, std::move(r), std::move(done));
}

// The root or a pool (current or former) terminated. Calls in flight on a
// pool lost their answer: they fail as on a dead worker (retried if idempotent).
void on_down(pool_client_t self, const caf::down_msg& dm) {
  auto& st = self->state;
  if (dm.source == st.root) {
    // Normally the gave_up event came first; this covers a root that could
    // not start its pool, or was killed, while the runtime was not stopping.
    if (!st.closing) {
      auto info = decode_supervisor_exit(dm.reason);
      root_gone(self, info ? to_error(*info)
                           : make_error(error_category::resource_error, "supervisor_gave_up",
                                        "the root supervisor terminated: "
                                          + self->system().render(dm.reason)));
    }
    return;
  }
  // A session registry (current or former) terminated: the root restarts it
  // (child_restarted brings the new one). Requests it had taken have no
  // answer coming: they fail now.
  std::vector<std::uint64_t> ops;
  for (auto& [op, entry] : st.session_ops)
    if (entry.registry == dm.source)
      ops.push_back(op);
  bool was_registry = st.sessions && st.sessions.address() == dm.source;
  if (was_registry)
    st.sessions = nullptr;
  for (auto op : ops)
    session_op_done(self, op,
                    outcome::failure(
                      st.closing ? stopping_error("")
                                 : make_error(error_category::resource_error,
                                              "sessions_unavailable",
                                              "the session layer terminated while serving the "
                                              "request: " + self->system().render(dm.reason))));
  if (was_registry || !ops.empty())
    return;
  if (st.pool && st.pool.address() == dm.source) {
    st.pool = nullptr;
    std::lock_guard<std::mutex> guard{st.shared->mtx};
    if (st.shared->pool && st.shared->pool.address() == dm.source)
      st.shared->pool = nullptr;
  }
  auto why = dm.reason ? self->system().render(dm.reason) : std::string{"normal"};
  std::vector<std::uint64_t> lost;
  for (auto& [id, pc] : st.calls)
    if (pc.phase == call_phase::in_flight && pc.pool == dm.source)
      lost.push_back(id);
  for (auto id : lost) {
    auto& pc = st.calls.at(id);
    auto err = is_normal_exit(dm.reason)
                 ? stopping_error(pc.c.command)
                 : make_error(error_category::communication_error, "worker_exited",
                              "the pool terminated while the call was in flight",
                              {{"command", pc.c.command}, {"exit", "pool: " + why}});
    pc.pool = caf::actor_addr{};
    settle_permit(self, pc, outcome::failure(err));
    handle_failure(self, id, err);
  }
}

pool_client_type::behavior_type pool_client(pool_client_t self, std::shared_ptr<const settings> config,
                          std::shared_ptr<event_bus> events,
                          std::shared_ptr<detail::client_shared> shared,
                          std::shared_ptr<detail::anonymous_adapter> anonymous) {
  auto& st = self->state;
  st.config = config;
  st.events = std::move(events);
  st.shared = std::move(shared);
  st.retry = make_retry_settings(*config);
  st.anonymous = std::move(anonymous);
  st.seed_base = static_cast<std::uint64_t>(clock_type::now().time_since_epoch().count())
                 ^ reinterpret_cast<std::uintptr_t>(self);
  if (config->circuit.enabled) {
    auto cfg = make_circuit_config(*config);
    auto& sh = *st.shared;
    std::lock_guard<std::mutex> guard{sh.breaker_mtx};
    sh.breaker.emplace(std::move(cfg));
    // Runs inside allow()/record_*()/update(), under breaker_mtx, on any
    // thread: it records; with_breaker publishes (never under the lock,
    // where an event handler calling the runtime would deadlock).
    sh.breaker->set_observer([&sh](const circuit_transition& t) {
      sh.circuit = t.to;
      sh.transitions.push_back(t);
    });
    st.breaker = true;
  }
  self->set_down_handler([=](caf::down_msg& dm) { guarded("down", [&] { on_down(self, dm); }); });
  // The last line of defence (every handler above is guarded): log it.
  self->set_exception_handler([](caf::scheduled_actor*, std::exception_ptr& ptr) -> caf::error {
    try {
      std::rethrow_exception(ptr);
    } catch (const std::exception& e) {
      log().critical("pool client terminated by an exception: {}", e.what());
    } catch (...) {
      log().critical("pool client terminated by an exception");
    }
    return caf::exit_reason::unhandled_exception;
  });
  return {
    [=](execute_atom, call& c, completion& done, detail::client_call_options& opts) {
      auto& st = self->state;
      auto id = st.next_id++;
      auto command = c.command;
      if (guarded("execute", [&] {
            auto& pc = st.calls[id];
            pc.idempotent = resolve_idempotent(c.command, opts.idempotent);
            pc.max_attempts =
              std::max<std::size_t>(opts.max_attempts.value_or(st.retry.max_attempts), 1);
            pc.seed = st.seed_base ^ (id * 0x9E3779B97F4A7C15ull);
            if (c.type.what() == checkout_type::kind::anonymous)
              st.anonymous->prepare(c, done);
            pc.c = std::move(c);
            pc.done = std::move(done);
            start_attempt(self, id);
          }))
        return;
      if (st.calls.count(id))
        finish(self, id, outcome::failure(internal_error(command)));
      else if (done.fn)
        run_callback(done, outcome::failure(internal_error(command)));
    },
    [=](detail::direct_failure& f) {
      // The first attempt ran on the direct lane and failed: from here the
      // call is this client's, at attempt 1, as if it had sent it.
      auto& st = self->state;
      auto id = st.next_id++;
      auto command = f.c.command;
      if (guarded("direct_failure", [&] {
            auto& pc = st.calls[id];
            pc.idempotent = resolve_idempotent(f.c.command, f.options.idempotent);
            pc.max_attempts =
              std::max<std::size_t>(f.options.max_attempts.value_or(st.retry.max_attempts), 1);
            pc.seed = st.seed_base ^ (id * 0x9E3779B97F4A7C15ull);
            pc.c = std::move(f.c);
            pc.done = std::move(f.done);
            pc.attempt = 1;
            pc.permit = f.permit;
            pc.phase = call_phase::in_flight;
            on_answer(self, id, 1, std::move(f.result));
          }))
        return;
      if (st.calls.count(id))
        finish(self, id, outcome::failure(internal_error(command)));
      else if (f.done.fn)
        run_callback(f.done, outcome::failure(internal_error(command)));
    },
    [=](client_retry_atom, std::uint64_t id, std::size_t attempt) {
      auto it = self->state.calls.find(id);
      if (it == self->state.calls.end() || it->second.attempt != attempt
          || it->second.phase != call_phase::waiting)
        return;
      if (!guarded("retry", [&] { start_attempt(self, id); }) && self->state.calls.count(id))
        finish(self, id, outcome::failure(internal_error(it->second.c.command)));
    },
    [=](park_timeout_atom, std::uint64_t id, std::size_t attempt) {
      auto& st = self->state;
      auto it = st.calls.find(id);
      if (it == st.calls.end() || it->second.attempt != attempt
          || it->second.phase != call_phase::parked)
        return;
      st.parked.erase(std::remove(st.parked.begin(), st.parked.end(), id), st.parked.end());
      it->second.phase = call_phase::waiting;
      fail_final(self, id,
                 make_error(error_category::timeout_error, "checkout_timeout",
                            "the deadline passed while the pool was restarting",
                            {{"command", it->second.c.command}}));
    },
    [=](circuit_tick_atom, std::uint64_t generation) {
      auto& st = self->state;
      if (generation != st.tick_generation || !st.breaker)
        return;
      auto at = with_breaker(self, [](circuit_breaker& b) {
        b.update();
        return b.half_open_at();
      });
      if (at)  // still open (a tick a little early)
        arm_circuit_tick(self, *at);
    },
    [=](sup_event_atom, event& e, caf::actor& child) {
      auto child_id = e.fields.value("child_id", std::string{});
      if ((e.to == "child_started" || e.to == "child_restarted") && child_id == "pool")
        set_pool(self, caf::actor_cast<pool_handle>(child));  // the "pool" child is one
      if (e.to == "child_restarted" && child_id == "pool")
        self->state.shared->pool_restarts.fetch_add(1, std::memory_order_relaxed);
      if ((e.to == "child_started" || e.to == "child_restarted") && child_id == "sessions")
        set_sessions(self, child);
      if (e.to == "gave_up")
        root_gone(self, e.err ? *e.err
                              : make_error(error_category::resource_error, "supervisor_gave_up",
                                           "the root supervisor gave up"));
      self->state.events->publish(e);  // the supervisor is its source
    },
    [=](watch_root_atom, caf::actor& root) {
      self->state.root = root.address();
      self->monitor(root);
    },
    [=](await_ready_atom) -> caf::result<outcome> {
      auto& st = self->state;
      if (st.gave_up)
        return outcome::failure(*st.gave_up);
      auto rp = self->make_response_promise();
      if (st.pool)
        deliver_ready(self, rp);
      else
        st.ready_waiters.push_back(rp);
      return rp;
    },
    [=](closing_atom) {
      auto& st = self->state;
      st.closing = true;
      fail_waiting(self, stopping_error(""), false);
      fail_sessions_parked(self, stopping_error(""));
    },
    [=](stop_atom) {
      auto& st = self->state;
      st.closing = true;
      st.stopping = true;
      fail_waiting(self, stopping_error(""), false);
      fail_sessions_parked(self, stopping_error(""));
      quit_when_drained(self);
    },
    [=](session_op_atom, session_request& r, completion& done) {
      auto command = r.c.command;
      auto keep = done;  // forward_session_op takes `done`; this copy answers if it throws
      if (!guarded("session_op", [&] { forward_session_op(self, std::move(r), std::move(done)); })
          && keep.fn)
        run_callback(keep, outcome::failure(internal_error(command)));
    },
  };
}

} // namespace

pool_client_handle spawn_pool_client(caf::actor_system& sys, std::shared_ptr<const settings> config,
                             std::shared_ptr<event_bus> events,
                             std::shared_ptr<detail::client_shared> shared,
                             std::shared_ptr<detail::anonymous_adapter> anonymous) {
  return sys.spawn(pool_client, std::move(config), std::move(events), std::move(shared),
                   std::move(anonymous));
}

} // namespace dspex::runtime_detail
