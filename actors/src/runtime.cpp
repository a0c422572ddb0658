#include "dspex/runtime.hpp"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <deque>
#include <map>
#include <list>
#include <mutex>
#include <shared_mutex>
#include <thread>
#include <unordered_map>
#include <variant>

#include <caf/all.hpp>
#include <caf/logger.hpp>

#include "dspex/actors/events_actor.hpp"
#include "dspex/actors/messages.hpp"
#include "dspex/actors/pool_actor.hpp"
#include "dspex/actors/runtime_access.hpp"
#include "dspex/actors/runtime_thread.hpp"
#include "dspex/actors/service.hpp"
#include "dspex/actors/session_actor.hpp"
#include "dspex/actors/supervisor.hpp"
#include "dspex/actors/system_config.hpp"
#include "dspex/pool_metrics.hpp"
#include "dspex/backoff.hpp"
#include "dspex/circuit_breaker.hpp"
#include "dspex/json_limits.hpp"
#include "dspex/program_store.hpp"
#include "dspex/logging.hpp"
#include "idle_workers.hpp"
#include "session_directory.hpp"
#include "worker_channel.hpp"

namespace dspex::detail {

/// Shared by a runtime object and its pool client: what runtime::status and
/// runtime::checkout read without a round trip through the client.
struct client_shared {
  std::mutex mtx;
  caf::actor pool;               ///< the current pool; none while it restarts
  std::optional<error> gave_up;  ///< set once the root supervisor gave up
  /// The current pool's idle workers, which the direct lane takes from
  /// (set by the root's pool child before the pool starts).
  std::shared_ptr<idle_workers> idle;
  std::atomic<circuit_state> circuit{circuit_state::closed};

  /// The pool's circuit breaker, used by the pool client and, for calls in
  /// the closed state, by the direct lane. Its observer only records the
  /// transitions (under breaker_mtx); the pool client publishes them.
  std::mutex breaker_mtx;
  std::optional<circuit_breaker> breaker;
  std::vector<circuit_transition> transitions;

  caf::actor current_pool() {
    std::lock_guard<std::mutex> guard{mtx};
    return pool;
  }
  std::shared_ptr<idle_workers> current_idle() {
    std::lock_guard<std::mutex> guard{mtx};
    return idle;
  }
  std::optional<error> gave_up_error() {
    std::lock_guard<std::mutex> guard{mtx};
    return gave_up;
  }
};

/// What every public call holds while it touches the actor system, and what
/// stop() closes before the system goes: a call racing stop() either runs
/// on a live system or fails with pool_stopping, never on a destroyed one.
/// Shared with leases, which may outlive their runtime.
struct api_gate {
  std::shared_timed_mutex mtx;
  bool closed = false;  ///< written under the exclusive lock, read under a shared one
};

/// Continuations of a lease's checkout and checkin (local only).
struct checkout_sink {
  std::function<void(checkout_reply)> fn;
};
struct checkin_sink {
  std::function<void(bool)> fn;
};

/// A call of the direct lane whose attempt failed: the pool client takes it
/// over from there (retry policy, circuit breaker), as if it had sent it.
struct direct_failure {
  call c;
  completion done;
  client_call_options options;
  std::optional<circuit_permit> permit;
  outcome result;  ///< a failure, served_by set when a worker answered
};

} // namespace dspex::detail

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(dspex::detail::checkout_sink)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(dspex::detail::checkin_sink)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(dspex::detail::direct_failure)

namespace dspex {

namespace {

using clock_type = std::chrono::steady_clock;

// Margin on top of a call's deadline for the caller's own CAF request: the
// pool and the worker always answer by the deadline, so this only catches a
// lost reply instead of waiting forever.
constexpr auto reply_margin = std::chrono::seconds{5};

outcome from_caf_error(caf::actor_system& sys, const caf::error& err, const std::string& command) {
  if (err == caf::sec::request_timeout)
    return outcome::failure(make_error(error_category::timeout_error, "caller_timeout",
                                       "no reply from the pool in time", {{"command", command}}));
  return outcome::failure(make_error(error_category::system_error, "actor_error",
                                     sys.render(err), {{"command", command}}));
}

caf::duration caller_timeout(const call& c) {
  auto left = std::max(c.deadline - clock_type::now(), clock_type::duration::zero());
  return caf::duration{std::chrono::duration_cast<std::chrono::milliseconds>(left)
                       + reply_margin};
}

// Set while an asynchronous callback runs on the caller actor's thread: a
// blocking call from there would wait for that very thread, forever.
thread_local bool in_async_callback = false;

void run_callback(const completion& done, outcome o) {
  in_async_callback = true;
  try {
    done.fn(std::move(o));
  } catch (const std::exception& e) {
    log().error("an asynchronous callback threw: {}", e.what());
  } catch (...) {
    log().error("an asynchronous callback threw");
  }
  in_async_callback = false;
}

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

// A blocking call on a runtime thread (an asynchronous callback, an event
// handler, an actor) would wait for work that very thread has to do.
bool must_not_block() noexcept {
  return in_async_callback || on_runtime_thread();
}

error blocking_in_callback(const std::string& what) {
  return make_error(error_category::system_error, "blocking_in_callback",
                    "a blocking " + what
                      + " from a runtime thread (an asynchronous callback, an event handler "
                        "or an actor) would wait forever; use the asynchronous form",
                    {{"command", what}});
}

// Waits for a future a runtime thread fulfils, bounded by `bound`. A promise
// dropped unanswered (its actor terminated) is an error too, never a throw.
template <class T, class OnMissing>
T await_bounded(std::future<T>& future, clock_type::time_point bound, OnMissing on_missing) {
  if (future.wait_until(bound) != std::future_status::ready)
    return on_missing(false);
  try {
    return future.get();
  } catch (const std::future_error&) {
    return on_missing(true);  // broken_promise
  }
}

// -- the direct lane (issue 11) ------------------------------------------------------------
//
// A call that takes a worker from idle_workers (or waits there in line)
// and writes its frame to the worker's process itself; the worker's I/O
// thread (or, for a blocking caller, the caller's own thread) answers it.
// Who owns the call decides what happens to its answer and to a call the
// lane cannot serve: the API for anonymous calls, the pool client for the
// session calls it runs (the hooks).

using detail::direct_reply;
using detail::direct_waiter;
using detail::idle_workers;
using detail::worker_channel;

// A worker taken for a direct call that did not start: back to the idle
// list (or on to the next waiter), or to the pool actor (`to_pool`: it
// cannot take calls).
void hand_back(idle_workers& idle, const std::shared_ptr<worker_channel>& channel, bool to_pool) {
  if (to_pool)
    idle.recall(channel->worker_id());
  auto next = idle.give_back(channel);
  if (next.what == idle_workers::next_use::to_pool)
    idle.to_pool(channel->worker_id());
  else if (next.what == idle_workers::next_use::serve)
    next.waiter->run(channel);
}

// Where a blocking caller of the direct lane waits: for its outcome, or
// for a reply to read itself. When it waited in line, the thread that gives
// it a worker (the caller before it, reading its own reply, or an I/O
// thread) writes its frame and hands it the read: the caller is woken once,
// as in the raw loop, and the worker never waits for a thread to wake.
class blocked_caller : public std::enable_shared_from_this<blocked_caller> {
public:
  explicit blocked_caller(clock_type::time_point deadline) : deadline_(deadline) {
  }

  // The call's completion: the outcome (once); `dropped` is what its last
  // copy sends when it goes unanswered (an actor that died with it).
  std::function<void(outcome)> completion() {
    struct unanswered {
      std::shared_ptr<blocked_caller> to;
      ~unanswered() {
        if (to)
          to->drop();
      }
    };
    auto guard = std::make_shared<unanswered>();
    guard->to = shared_from_this();
    return [guard](outcome o) { guard->to->deliver(std::move(o)); };
  }

  // A worker was given to it with `read_id` open (worker_channel::start):
  // the caller reads the reply, or, when it stopped waiting, nobody (false:
  // the giver must not open a direct read for it). Called under claim().
  bool wants_read() const { return !gone_; }
  void give_read(std::shared_ptr<worker_channel> channel, std::uint64_t read_id) {
    to_read_ = std::move(channel);
    read_id_ = read_id;
    wake_.notify_one();
  }
  std::unique_lock<std::mutex> claim() { return std::unique_lock<std::mutex>{mtx_}; }

  // Waits until `bound` for the outcome, reading a reply handed to it.
  template <class OnMissing>
  outcome wait(clock_type::time_point bound, OnMissing on_missing) {
    std::unique_lock<std::mutex> lk{mtx_};
    for (;;) {
      if (answer_)
        return std::move(*answer_);
      if (to_read_) {
        auto channel = std::move(to_read_);
        auto id = std::exchange(read_id_, 0);
        lk.unlock();
        channel->read_reply(id, deadline_);
        lk.lock();
        continue;
      }
      if (dropped_) {
        gone_ = true;
        return on_missing(true);
      }
      if (wake_.wait_until(lk, bound) == std::cv_status::timeout && !answer_ && !to_read_) {
        gone_ = true;
        return on_missing(false);
      }
    }
  }

private:
  void deliver(outcome o) {
    {
      std::lock_guard<std::mutex> lk{mtx_};
      if (answer_)
        return;
      answer_ = std::move(o);
    }
    wake_.notify_one();
  }
  void drop() {
    {
      std::lock_guard<std::mutex> lk{mtx_};
      dropped_ = true;
    }
    wake_.notify_one();
  }

  const clock_type::time_point deadline_;
  std::mutex mtx_;
  std::condition_variable wake_;
  std::optional<outcome> answer_;
  std::shared_ptr<worker_channel> to_read_;
  std::uint64_t read_id_ = 0;
  bool dropped_ = false;
  bool gone_ = false;
};

// One call on the direct lane, from the moment it takes a worker or a place
// in idle_workers' line until it is answered or sent the usual way.
struct direct_job : std::enable_shared_from_this<direct_job> {
  std::weak_ptr<idle_workers> idle;
  call c;
  clock_type::time_point queued_at = clock_type::now();
  /// A blocking caller (null: an asynchronous one): it reads its reply on
  /// its own thread.
  std::shared_ptr<blocked_caller> blocked;
  /// The attempt's outcome (any thread).
  std::function<void(direct_job&, outcome)> on_answer;
  /// Not served on the lane after all (its deadline passed in line, the lane
  /// closed, the worker could not take it): the usual way, with `c`.
  std::function<void(direct_job&)> on_reroute;

  // Writes the call to `channel`'s process; false when nothing was sent
  // (the worker has gone back: to the idle list, or to the pool).
  // `read_id`: non-null asks for a direct read (worker_channel::start).
  bool start_on(const std::shared_ptr<worker_channel>& channel, std::uint64_t* read_id = nullptr) {
    auto self = shared_from_this();
    auto reply = std::make_shared<direct_reply>(
      [self](outcome o) { self->on_answer(*self, std::move(o)); }, channel->worker_id(),
      c.command);
    auto result = channel->start(c.command, c.args, c.deadline, reply, read_id);
    auto board = idle.lock();
    if (result == worker_channel::start_result::sent) {
      if (board)
        board->metrics().queue_wait.record(clock_type::now() - queued_at);
      return true;
    }
    reply->disarm();  // not sent: answered the usual way
    if (board)
      hand_back(*board, channel, result == worker_channel::start_result::unusable);
    return false;
  }

  // A waiter's turn: a worker, or none (the usual way). A blocking caller
  // is handed the read of its reply.
  void run_on(const std::shared_ptr<worker_channel>& channel) {
    if (!channel) {
      on_reroute(*this);
      return;
    }
    if (!blocked) {
      if (!start_on(channel))
        on_reroute(*this);
      return;
    }
    bool started = false;
    {
      auto lk = blocked->claim();
      std::uint64_t read_id = 0;
      started = start_on(channel, blocked->wants_read() ? &read_id : nullptr);
      if (started && read_id != 0)
        blocked->give_read(channel, read_id);
    }
    if (!started)
      on_reroute(*this);
  }

  // Takes a worker (the call starts now), or a place in line. False:
  // nothing happened (the lane refuses it, or the worker could not take it).
  // A blocking caller that took a worker is handed the read at once (it
  // reads in blocked_caller::wait).
  bool take(idle_workers& board, const std::string& preferred) {
    auto self = shared_from_this();
    direct_waiter waiter{c.deadline,
                         [self](std::shared_ptr<worker_channel> channel) { self->run_on(channel); },
                         preferred};
    std::shared_ptr<worker_channel> taken;
    switch (board.take_or_wait(waiter, taken)) {
      case idle_workers::wait_answer::queued:
        return true;
      case idle_workers::wait_answer::taken:
        if (!blocked)
          return start_on(taken);
        {
          auto lk = blocked->claim();
          std::uint64_t read_id = 0;
          if (!start_on(taken, &read_id))
            return false;
          if (read_id != 0)
            blocked->give_read(taken, read_id);
        }
        return true;
      case idle_workers::wait_answer::refused:
        break;
    }
    return false;
  }
};

// Anonymous commands the pool client must see: configure_lm (the pool
// adopts it) and the anonymous programs it remembers (remember_anonymous).
bool direct_eligible(const std::string& command) {
  return command != "configure_lm" && command != "create_program"
         && command != "execute_program" && command != "delete_program";
}

// -- the pool client ------------------------------------------------------------------------
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

using client_retry_atom = caf::atom_constant<caf::atom("cretry")>;      // (id, attempt): resend
using circuit_tick_atom = caf::atom_constant<caf::atom("ctick")>;       // (generation): open -> half_open due
using park_timeout_atom = caf::atom_constant<caf::atom("parktmo")>;     // (id, attempt): deadline while parked
using sup_event_atom = caf::atom_constant<caf::atom("supevent")>;       // (event, child actor)
using closing_atom = caf::atom_constant<caf::atom("closing")>;          // runtime::stop began
using lane_answer_atom = caf::atom_constant<caf::atom("laneans")>;      // (id, attempt, outcome): a session call's answer from the direct lane
using lane_reroute_atom = caf::atom_constant<caf::atom("lanerr")>;      // (id, attempt, call): not served on the lane: the pool
using watch_root_atom = caf::atom_constant<caf::atom("watchroot")>;     // (root supervisor)

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
  caf::actor pool;
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
  // Anonymous programs: create_program's definitions by (session_id, id), so
  // an anonymous execute_program carries program_data and any worker serves it.
  std::optional<program_store> anonymous_programs;  ///< sized from session.max_anonymous_programs
  std::uint64_t next_id = 1;
  std::uint64_t seed_base = 0;
  bool closing = false;   ///< runtime::stop began: no retries, no new attempts
  bool stopping = false;  ///< quit once the last call is answered

  static inline const char* name = "dspex.pool_client";
};

using pool_client_t = caf::stateful_actor<pool_client_state>;

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

void publish(pool_client_t* self, event e) {
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
void quit_when_drained(pool_client_t* self) {
  auto& st = self->state;
  if (st.stopping && st.calls.empty() && st.session_ops.empty())
    self->quit();
}

// Answers the entry `id` of `pending` (calls or session operations) and forgets it.
template <class Pending>
void answer_and_forget(pool_client_t* self, Pending& pending, std::uint64_t id, outcome o) {
  auto it = pending.find(id);
  if (it == pending.end())
    return;
  auto done = std::move(it->second.done);
  pending.erase(it);
  run_callback(done, std::move(o));
  quit_when_drained(self);
}

// Answers the call and forgets it.
void finish(pool_client_t* self, std::uint64_t id, outcome o) {
  answer_and_forget(self, self->state.calls, id, std::move(o));
}

void fail_final(pool_client_t* self, std::uint64_t id, error e) {
  auto& pc = self->state.calls.at(id);
  auto o = outcome::failure(with_call_context(std::move(e), pc));
  o.set_served_by(pc.served_by);  // e.g. a python_error: the session learns its worker
  finish(self, id, std::move(o));
}

void arm_circuit_tick(pool_client_t* self, circuit_breaker::time_point at) {
  using namespace std::chrono;
  auto left = at - clock_type::now();
  // Rounded up, so the tick never comes before the breaker's own deadline.
  auto delay = left > clock_type::duration::zero()
                 ? duration_cast<milliseconds>(left) + milliseconds{1}
                 : milliseconds{0};
  self->delayed_send(self, delay, circuit_tick_atom::value, ++self->state.tick_generation);
}

void on_circuit_transition(pool_client_t* self, const circuit_transition& t) {
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
void handle_failure(pool_client_t* self, std::uint64_t id, const error& err) {
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

void on_circuit_transition(pool_client_t* self, const circuit_transition& t);

// Runs `f` on the breaker under its lock, then publishes what changed.
template <class F>
auto with_breaker(pool_client_t* self, F&& f) {
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

void settle_permit(pool_client_t* self, pending_call& pc, const outcome& o) {
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
void on_answer(pool_client_t* self, std::uint64_t id, std::size_t attempt, outcome o) {
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

void park(pool_client_t* self, std::uint64_t id) {
  auto& pc = self->state.calls.at(id);
  pc.phase = call_phase::parked;
  self->state.parked.push_back(id);
  auto left = pc.c.deadline - clock_type::now();
  auto delay = left > clock_type::duration::zero()
                 ? std::chrono::duration_cast<std::chrono::milliseconds>(left)
                 : std::chrono::milliseconds{0};
  self->delayed_send(self, delay, park_timeout_atom::value, id, pc.attempt);
}

bool try_lane(pool_client_t* self, std::uint64_t id, std::size_t attempt, call& c);
void send_to_pool(pool_client_t* self, std::uint64_t id, std::size_t attempt, call c);

// Runs the current attempt of call `id`: on the current pool, if the breaker
// allows it; parked while there is no pool.
void dispatch(pool_client_t* self, std::uint64_t id) {
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
  // The args are copied only when another attempt may need them.
  call c{pc.c.command, pc.max_attempts > 1 ? pc.c.args : std::move(pc.c.args), pc.c.deadline,
         pc.c.type, pc.c.block, pc.c.preferred_worker, pc.c.affinity};
  auto attempt = pc.attempt;
  if (try_lane(self, id, attempt, c))
    return;
  send_to_pool(self, id, attempt, std::move(c));
}

// A session's call with the affinity hint runs on the direct lane when a
// worker is idle or the line is open: its preferred worker when idle, any
// other otherwise (counted as the pool counts affinity). Its answer, or its
// way back when the lane cannot serve it, comes here as a message.
bool try_lane(pool_client_t* self, std::uint64_t id, std::size_t attempt, call& c) {
  auto& st = self->state;
  // Every command of a session may go: the session actor already made the
  // call whole (program_data, its LM), and the pool adopts no session's
  // configure_lm.
  if (c.type.what() != checkout_type::kind::session || c.affinity != affinity_mode::hint
      || !c.args.is_object() || !c.args.contains("session_id"))
    return false;
  auto idle = st.shared->current_idle();
  if (!idle)
    return false;
  auto job = std::make_shared<direct_job>();
  job->idle = idle;
  job->c = std::move(c);
  auto me = caf::actor_cast<caf::actor_addr>(self);
  job->on_answer = [me, id, attempt](direct_job&, outcome o) {
    if (auto a = caf::actor_cast<caf::actor>(me))
      caf::anon_send(a, lane_answer_atom::value, id, attempt, std::move(o));
  };
  job->on_reroute = [me, id, attempt](direct_job& j) {
    if (auto a = caf::actor_cast<caf::actor>(me))
      caf::anon_send(a, lane_reroute_atom::value, id, attempt, std::move(j.c));
  };
  if (job->take(*idle, job->c.preferred_worker))
    return true;
  c = std::move(job->c);
  return false;
}

// The attempt `attempt` of call `id`, through the current pool.
void send_to_pool(pool_client_t* self, std::uint64_t id, std::size_t attempt, call c) {
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

void start_attempt(pool_client_t* self, std::uint64_t id) {
  ++self->state.calls.at(id).attempt;
  dispatch(self, id);
}

void deliver_ready(pool_client_t* self, caf::response_promise rp) {
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

void fail_waiting(pool_client_t* self, const error& err, bool parked_only) {
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

void fail_sessions_parked(pool_client_t* self, const error& err);

// The root supervisor gave up (or ended otherwise, outside stop): every call
// fails at once from now on.
void root_gone(pool_client_t* self, error err) {
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

void set_pool(pool_client_t* self, caf::actor pool) {
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
  if (!st.closing)
    register_pool(self->system(), pool);
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

void session_op_done(pool_client_t* self, std::uint64_t op, outcome o) {
  answer_and_forget(self, self->state.session_ops, op, std::move(o));
}

void forward_session_op(pool_client_t* self, session_request r, completion done) {
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
    self->send(st.sessions, session_exec_atom::value, std::move(r), std::move(done));
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

void fail_sessions_parked(pool_client_t* self, const error& err) {
  auto parked = std::move(self->state.sessions_parked);
  self->state.sessions_parked.clear();
  for (auto& [r, done] : parked)
    run_callback(done, outcome::failure(err));
}

void set_sessions(pool_client_t* self, caf::actor registry) {
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

// Anonymous programs (issue 5): create_program remembers the definition,
// execute_program carries it (program_data) unless the caller did, so an
// anonymous program runs on any worker; delete_program forgets it.
void remember_anonymous(pool_client_t* self, call& c, completion& done) {
  if (!c.args.is_object())
    return;
  auto sid = c.args.value("session_id", nlohmann::json("anonymous"));
  std::string session = sid.is_string() ? sid.get<std::string>() : sid.dump();
  auto& store = *self->state.anonymous_programs;
  if (c.command == "execute_program") {
    auto pid = c.args.value("program_id", nlohmann::json(nullptr));
    if (pid.is_string() && !c.args.contains("program_data"))
      if (const auto* def = store.find({session, pid.get<std::string>()}))
        c.args["program_data"] = *def;
    return;
  }
  if (c.command == "delete_program") {
    auto pid = c.args.value("program_id", nlohmann::json(nullptr));
    if (pid.is_string())
      store.erase({session, pid.get<std::string>()});
    return;
  }
  if (c.command != "create_program")
    return;
  auto pid = c.args.value("id", nlohmann::json(nullptr));
  if (!pid.is_string())
    return;
  auto def = c.args;
  def.erase("session_id");
  done = completion{[self, key = std::make_pair(session, pid.get<std::string>()),
                     def = std::move(def), inner = std::move(done.fn)](outcome o) {
    if (o)
      self->state.anonymous_programs->put(key, def);
    inner(std::move(o));
  }};
}

// The root or a pool (current or former) terminated. Calls in flight on a
// pool lost their answer: they fail as on a dead worker (retried if idempotent).
void on_down(pool_client_t* self, const caf::down_msg& dm) {
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

caf::behavior pool_client(pool_client_t* self, std::shared_ptr<const settings> config,
                          std::shared_ptr<event_bus> events,
                          std::shared_ptr<detail::client_shared> shared) {
  auto& st = self->state;
  st.config = config;
  st.events = std::move(events);
  st.shared = std::move(shared);
  st.retry = make_retry_settings(*config);
  st.anonymous_programs.emplace(config->session.max_anonymous_programs);
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
              remember_anonymous(self, c, done);
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
    [=](lane_answer_atom, std::uint64_t id, std::size_t attempt, outcome& o) {
      on_answer(self, id, attempt, std::move(o));
    },
    [=](lane_reroute_atom, std::uint64_t id, std::size_t attempt, call& c) {
      auto it = self->state.calls.find(id);
      if (it == self->state.calls.end() || it->second.attempt != attempt
          || it->second.phase != call_phase::in_flight)
        return;
      if (!self->state.pool) {  // gone meanwhile: this attempt failed before any worker
        on_answer(self, id, attempt,
                  outcome::failure(make_error(error_category::connection_error, "pool_down",
                                              "the pool terminated before it received the call",
                                              {{"command", c.command}})));
        return;
      }
      it->second.pool = self->state.pool.address();
      send_to_pool(self, id, attempt, std::move(c));
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
        set_pool(self, std::move(child));
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

// The identity of one lease holder: the pool monitors it, so destroying a
// lease (this actor exits) revokes it. Everything a lease does goes through
// it, so that the public calls wait on a bounded future instead of holding
// a scoped actor on the system: the checkout (if its own wait ends first it
// tells the pool, as NimblePool's client does), the lease's requests to its
// worker, and the checkin (the pool accepts a checkin only from the holder).
// When the pool goes, the holder quits: whatever it still waited for is
// answered by the dropped promise (await_bounded turns it into an error).
// What a holder still has to answer when its pool goes: the pending
// continuations are answered by the holder itself (CAF 0.17 keeps a quit
// actor's response handlers until the actor object dies, and the caller
// holds a handle to it while it waits).
struct lease_holder_state {
  std::optional<detail::checkout_sink> checkout;
  std::map<std::uint64_t, completion> executes;
  std::uint64_t next_execute = 1;

  static inline const char* name = "dspex.lease_holder";
};

using lease_holder_t = caf::stateful_actor<lease_holder_state>;

caf::behavior lease_holder(lease_holder_t* self, caf::actor pool) {
  self->monitor(pool);
  self->set_down_handler([=](caf::down_msg&) {
    // The pool is gone: the lease is over, and whatever waited is told so.
    auto& st = self->state;
    if (st.checkout) {
      auto sink = std::move(*st.checkout);
      st.checkout.reset();
      sink.fn(checkout_reply{std::nullopt,
                             make_error(error_category::resource_error, "pool_unavailable",
                                        "the pool terminated while the checkout waited; try again")});
    }
    auto executes = std::move(st.executes);
    st.executes.clear();
    for (auto& [id, done] : executes)
      done.fn(outcome::failure(make_error(error_category::resource_error, "lease_revoked",
                                          "the lease ended: its pool terminated during the request")));
    self->quit();
  });
  return {
    [=](checkout_atom, checkout_request& req, detail::checkout_sink& done) {
      auto token = req.token;
      auto left = std::max(req.deadline - clock_type::now(), clock_type::duration::zero());
      auto timeout = caf::duration{
        std::chrono::duration_cast<std::chrono::milliseconds>(left) + reply_margin};
      self->state.checkout = std::move(done);
      auto answer = [=](checkout_reply reply) {
        auto& st = self->state;
        if (!st.checkout)
          return;
        auto sink = std::move(*st.checkout);
        st.checkout.reset();
        sink.fn(std::move(reply));
      };
      self->request(pool, timeout, checkout_atom::value, std::move(req))
        .then([=](checkout_reply& reply) { answer(std::move(reply)); },
              [=](caf::error& e) {
                self->send(pool, cancel_atom::value, token);
                answer(checkout_reply{std::nullopt,
                                      from_caf_error(self->system(), e, "checkout").error()});
              });
    },
    [=](execute_atom, caf::actor& worker, std::uint64_t lease, call& c, completion& done) {
      auto command = c.command;
      auto id = self->state.next_execute++;
      self->state.executes.emplace(id, std::move(done));
      auto answer = [=](outcome o) {
        auto& st = self->state;
        auto it = st.executes.find(id);
        if (it == st.executes.end())
          return;
        auto fn = std::move(it->second.fn);
        st.executes.erase(it);
        fn(std::move(o));
      };
      self->request(worker, caller_timeout(c), execute_atom::value, lease, std::move(c))
        .then([=](outcome& o) { answer(std::move(o)); },
              [=](caf::error& e) { answer(from_caf_error(self->system(), e, command)); });
    },
    [=](checkin_atom, std::uint64_t lease, checkin_status& status, detail::checkin_sink& done) {
      self->request(pool, caf::duration{std::chrono::seconds{10}}, checkin_atom::value, lease,
                    std::move(status))
        .then([=](bool known) {
                done.fn(known);
                self->quit();
              },
              [=](caf::error&) {
                done.fn(false);
                self->quit();
              });
    },
    [=](stop_atom) { self->quit(); },
  };
}

} // namespace

struct lease::impl {
  caf::actor holder;
  lease_grant grant;
  std::shared_ptr<detail::api_gate> gate;
  request_limits limits;
  bool checked_in = false;
};

lease::lease(std::unique_ptr<impl> p) : impl_(std::move(p)) {
}

lease::~lease() {
  std::shared_lock<std::shared_timed_mutex> lk{impl_->gate->mtx};
  if (!impl_->checked_in && !impl_->gate->closed)
    caf::anon_send_exit(impl_->holder, caf::exit_reason::user_shutdown);
}

const std::string& lease::worker_id() const noexcept {
  return impl_->grant.worker_id;
}

bool lease::checked_in() const noexcept {
  return impl_->checked_in;
}

outcome lease::execute(const std::string& command, nlohmann::json args, call_options options) {
  auto fail = [&](const char* type, const char* message) {
    return outcome::failure(make_error(error_category::resource_error, type, message,
                                       {{"command", command}, {"worker_id", worker_id()}}));
  };
  if (must_not_block())
    return outcome::failure(blocking_in_callback(command));
  if (impl_->checked_in)
    return fail("not_lease_holder", "the lease was checked in");
  if (auto invalid = validate_request(command, args, impl_->limits))
    return outcome::failure(std::move(*invalid));
  if (args.is_null())
    args = nlohmann::json::object();
  auto timeout = options.timeout.value_or(std::chrono::milliseconds{30'000});
  call c;
  c.command = command;
  c.args = std::move(args);
  c.deadline = clock_type::now() + timeout;
  auto bound = c.deadline + reply_margin;
  auto promise = std::make_shared<std::promise<outcome>>();
  auto future = promise->get_future();
  {
    std::shared_lock<std::shared_timed_mutex> lk{impl_->gate->mtx};
    if (impl_->gate->closed)
      return fail("pool_stopping", "the runtime is stopped");
    caf::anon_send(impl_->holder, execute_atom::value, impl_->grant.worker, impl_->grant.lease_id,
                   std::move(c), completion{[promise](outcome o) { promise->set_value(std::move(o)); }});
  }
  return await_bounded(future, bound, [&](bool dropped) {
    return dropped ? fail("lease_revoked", "the lease ended (its pool terminated) during the request")
                   : outcome::failure(make_error(error_category::timeout_error, "caller_timeout",
                                                 "no reply from the leased worker in time",
                                                 {{"command", command}}));
  });
}

bool lease::checkin(checkin_status status) {
  if (impl_->checked_in)
    return false;
  if (must_not_block()) {
    log().error("lease::checkin from a runtime thread: the lease is revoked instead");
    return false;  // the holder dies with the lease object: revoked, not lost
  }
  auto promise = std::make_shared<std::promise<bool>>();
  auto future = promise->get_future();
  {
    std::shared_lock<std::shared_timed_mutex> lk{impl_->gate->mtx};
    if (impl_->gate->closed)
      return false;
    impl_->checked_in = true;
    caf::anon_send(impl_->holder, checkin_atom::value, impl_->grant.lease_id, std::move(status),
                   detail::checkin_sink{[promise](bool known) { promise->set_value(known); }});
  }
  return await_bounded(future, clock_type::now() + std::chrono::seconds{10} + reply_margin,
                       [](bool) { return false; });
}

struct runtime::impl : std::enable_shared_from_this<runtime::impl> {
  settings config;
  std::shared_ptr<const settings> shared_config;
  // actor_system keeps a reference to its config: it must outlive the system.
  std::unique_ptr<system_config> system_cfg;
  std::unique_ptr<caf::actor_system> system;
  // The event stream: shared with the pool and its workers (and it outlives
  // the actor system: subscribers may keep using it after stop()).
  std::shared_ptr<event_bus> events = std::make_shared<event_bus>();
  // Shared with every pool the root starts: it outlives a pool's restart.
  std::shared_ptr<pool_metrics> metrics;
  // Which actor serves each session (filled by the session registry): a
  // session's call goes there directly.
  std::shared_ptr<detail::session_directory> sessions
    = std::make_shared<detail::session_directory>();
  // The current pool and what the client knows, for status() and checkout().
  std::shared_ptr<detail::client_shared> shared = std::make_shared<detail::client_shared>();
  caf::actor root;    // the root supervisor "dspex.root"
  caf::actor client;  // the pool client: every execute_anonymous goes through it
  // Set first by stop(): new calls fail fast without touching the gate.
  std::atomic<bool> stopped{false};
  // Closed by stop() before the system goes (see api_gate); shared with leases.
  std::shared_ptr<detail::api_gate> gate = std::make_shared<detail::api_gate>();
  // stop() runs once; whoever calls it later waits for that one run.
  std::once_flag stop_once;
  std::promise<void> stop_done;
  std::shared_future<void> stop_finished = stop_done.get_future().share();

  request_limits limits() const {
    request_limits l;
    l.max_json_depth = config.pool.max_json_depth;
    return l;
  }

  static error stopping_error(const std::string& command) {
    return make_error(error_category::resource_error, "pool_stopping", "the runtime is stopped",
                      {{"command", command}});
  }

  // Validates the arguments of one call and fixes its deadline.
  std::variant<call, outcome> make_call(const std::string& command, nlohmann::json args,
                                        const call_options& options) const {
    if (auto invalid = validate_request(command, args, limits()))
      return outcome::failure(std::move(*invalid));
    if (args.is_null())
      args = nlohmann::json::object();
    if (stopped)
      return outcome::failure(stopping_error(command));
    auto timeout = options.timeout.value_or(config.pool.request_timeout);
    call c;
    c.command = command;
    c.args = std::move(args);
    c.deadline = clock_type::now() + timeout;
    return c;
  }

  // -- the direct lane (issue 11) ------------------------------------------------------
  //
  // An anonymous call that finds an idle worker and no queue goes straight
  // to the worker's process: this thread writes the frame, the worker's I/O
  // thread answers (worker_channel), and the pool actor only learns of it
  // when it next looks at the worker. A failed attempt goes to the pool
  // client, whose retry policy and breaker decide as for its own calls.

  // Starts `c` on the direct lane. A job: `done` will be called (on a
  // worker's I/O thread, the pool's, the pool client's, or, after
  // `blocked`'s wait, this one). Null: nothing started, `c` and `done` are
  // untouched; the call goes the usual way. `blocked`: a blocking caller,
  // which reads its reply itself (blocked_caller).
  std::shared_ptr<direct_job> try_direct(call& c, const call_options& options,
                                         const completion& done,
                                         std::shared_ptr<blocked_caller> blocked = nullptr,
                                         const std::string& preferred = {}) {
    if (!direct_eligible(c.command) || shared->circuit.load() != circuit_state::closed)
      return nullptr;
    auto idle = shared->current_idle();
    if (!idle)
      return nullptr;
    std::optional<circuit_permit> permit;
    {
      std::lock_guard<std::mutex> guard{shared->breaker_mtx};
      if (shared->breaker) {
        auto admission = shared->breaker->allow();
        if (!admission)
          return nullptr;  // the pool client gives the rejection
        permit = admission.permit;
      }
    }
    if (c.args.find("session_id") == c.args.end())
      c.args["session_id"] = "anonymous";
    auto job = std::make_shared<direct_job>();
    job->idle = idle;
    job->c = std::move(c);
    // The permit is settled once: a success here, a failure by the pool
    // client (which publishes a transition), a reroute releases it.
    auto held = std::make_shared<std::optional<circuit_permit>>(permit);
    auto opts = detail::client_call_options{options.idempotent, options.max_attempts};
    auto rt = weak_from_this();
    job->on_answer = [rt, done, opts, held](direct_job& j, outcome o) {
      auto r = rt.lock();
      if (o.ok()) {
        if (r && *held) {
          std::lock_guard<std::mutex> guard{r->shared->breaker_mtx};
          if (r->shared->breaker)
            r->shared->breaker->record_success(**held);  // never a transition: see shared->breaker
        }
        run_callback(done, std::move(o));
        return;
      }
      auto command = j.c.command;
      if (!r || !r->send_to_client(detail::direct_failure{std::move(j.c), done, opts, *held, o}))
        run_callback(done, outcome::failure(impl::stopping_error(command)));
    };
    job->on_reroute = [rt, done, opts, held](direct_job& j) {
      auto r = rt.lock();
      if (r && *held) {
        std::lock_guard<std::mutex> guard{r->shared->breaker_mtx};
        if (r->shared->breaker)
          r->shared->breaker->release(**held);
      }
      held->reset();
      auto command = j.c.command;
      if (!r || !r->send_to_client(execute_atom::value, std::move(j.c), done, opts))
        run_callback(done, outcome::failure(impl::stopping_error(command)));
    };
    job->blocked = std::move(blocked);
    if (job->take(*idle, preferred))
      return job;
    if (permit) {
      std::lock_guard<std::mutex> guard{shared->breaker_mtx};
      shared->breaker->release(*permit);
    }
    c = std::move(job->c);
    return nullptr;
  }

  // The call's whole time counts from here to its outcome (pool_metrics::total).
  completion timed(std::function<void(outcome)> done) {
    metrics->call_started();
    return completion{[m = metrics, started = clock_type::now(), fn = std::move(done)](outcome o) {
      m->call_finished(started);
      fn(std::move(o));
    }};
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
    const char* what = op == session_op::execute ? command.c_str()
                       : op == session_op::end   ? "end_session"
                       : op == session_op::info  ? "get_session_info"
                                                 : "list_sessions";
    if (op != session_op::list && (session_id.empty() || !valid_utf8(session_id)))
      return outcome::failure(make_error(
        error_category::system_error, "invalid_request",
        session_id.empty() ? "session_id must not be empty" : "session_id is not valid UTF-8",
        {{"command", what}, {"reason", session_id.empty() ? "empty_session_id" : "invalid_utf8"}}));
    session_request r;
    r.op = op;
    r.session_id = session_id;
    if (op == session_op::execute) {
      call_options co;
      co.timeout = options.timeout;
      auto made = make_call(command, std::move(args), co);
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
        affinity_mode_from_string(config.session.affinity).value_or(affinity_mode::hint));
      r.opts = detail::client_call_options{options.idempotent, options.max_attempts};
    } else {
      if (stopped)
        return outcome::failure(stopping_error(what));
      r.c.command = what;
      r.c.deadline = clock_type::now() + config.pool.request_timeout;
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
      done.fn(outcome::failure(stopping_error(command)));
      return;
    }
    if (!sessions->send(r.session_id, session_call_atom::value, r.c, r.opts, done))
      caf::anon_send(client, session_op_atom::value, std::move(r), std::move(done));
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
    auto comp = r.op == session_op::execute ? timed(std::move(deliver)) : completion{std::move(deliver)};
    if (r.op == session_op::execute)
      send_session_call(std::move(r), std::move(comp));
    else if (!send_to_client(session_op_atom::value, std::move(r), comp))
      comp.fn(outcome::failure(stopping_error(command)));
    return await_bounded(future, bound, [&](bool) {
      return outcome::failure(make_error(error_category::timeout_error, "caller_timeout",
                                         "no reply from the session layer in time",
                                         {{"command", command}}));
    });
  }

  // The stop itself (see runtime::stop for the thread it runs on).
  void run_stop() {
    auto& sys = *system;
    // No retries and no new attempts from now on; calls waiting for a retry
    // or for a pool fail with resource_error/pool_stopping.
    caf::anon_send(client, closing_atom::value);
    // Service detection: no longer "dspexpool" (and a registry entry must not
    // outlive the system: ~actor_system() would wait for it forever).
    unregister_pool(sys);
    const auto& w = config.worker;
    // The root stops its children in reverse start order, each bounded by its
    // shutdown_timeout (the pool's: both graces + 2 s); the margin covers
    // reaping and message hops.
    auto bound = caf::duration{w.shutdown_grace + w.kill_grace + std::chrono::seconds{2}
                               + reply_margin};
    {
      caf::scoped_actor self{sys};
      self->monitor(root);  // a root that already gave up: down at once
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
      // Every call has its answer now (or fails on the pool's down); the
      // client quits once it passed the last one on.
      self->monitor(client);
      self->send(client, stop_atom::value);
      self->receive([](caf::down_msg&) {},
                    caf::after(bound) >> [&] {
                      log().error("the pool client did not finish its calls");
                      self->send_exit(client, caf::exit_reason::kill);
                    });
    }
    // A restart racing with the unregistration above may have registered a
    // pool again; its entry goes with the pool, but leave nothing to chance.
    unregister_services(sys);
    {
      std::lock_guard<std::mutex> guard{shared->mtx};
      shared->pool = nullptr;
    }
    root = nullptr;
    client = nullptr;
    // ~actor_system() blocks while any actor lives; every actor of ours is
    // gone or going now (workers die with the pool, lease holders with it).
    log().debug("runtime stop: {} actors still running", sys.registry().running());
    system.reset();
    stop_done.set_value();
  }

  // The error of a lease or a status query while there is no pool.
  error no_pool_error() const {
    if (auto gave_up = shared->gave_up_error())
      return *gave_up;
    return make_error(error_category::resource_error, "pool_unavailable",
                      "the pool is restarting");
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
  set_log_level(config.log_level);
  auto p = std::make_shared<impl>();
  p->config = config;
  p->shared_config = std::make_shared<const settings>(config);
  p->metrics = std::make_shared<pool_metrics>(config.pool.size);
  p->system_cfg = std::make_unique<system_config>(config);
  p->system = std::make_unique<caf::actor_system>(*p->system_cfg);
  auto& sys = *p->system;
  // The client first: the root supervisor's observer tells it about every
  // (re)started pool, from the first start on.
  p->client = sys.spawn(pool_client, p->shared_config, p->events, p->shared);

  // The supervision tree (issue 4, item 1):
  //   dspex.root (one_for_one, at most 3 restarts in 5 s)
  //   └── pool (permanent): the pool actor, which links its workers
  supervisor_flags flags;
  flags.name = "dspex.root";
  flags.strategy = restart_strategy::one_for_one;
  flags.max_restarts = 3;
  flags.max_seconds = std::chrono::seconds{5};
  // Runs on the supervisor's thread: it only renders and sends. The client
  // switches to a new pool, re-registers it and publishes the event, in that
  // order, so a subscriber that sees child_restarted finds the new pool in use.
  flags.observer = [client = p->client, sys = &sys](const supervisor_event& ev) {
    event e;
    e.kind = event_kind::supervisor;
    e.source = ev.supervisor;
    e.to = to_string(ev.kind);
    if (ev.reason)
      e.reason = sys->render(ev.reason);
    e.attempt = ev.restarts;
    e.fields = {{"child_id", ev.child_id}, {"restarts", ev.restarts}};
    if (ev.kind == supervisor_event_kind::child_stopped)
      e.fields["killed"] = ev.killed;
    if (ev.kind == supervisor_event_kind::gave_up)
      if (auto info = decode_supervisor_exit(ev.reason))
        e.err = to_error(*info);
    caf::actor child;
    if (ev.kind == supervisor_event_kind::child_started
        || ev.kind == supervisor_event_kind::child_restarted)
      child = caf::actor_cast<caf::actor>(ev.child);
    caf::anon_send(client, sup_event_atom::value, std::move(e), std::move(child));
  };
  std::vector<child_spec> children;
  {
    child_spec pool;
    pool.id = "pool";
    pool.restart = restart_type::permanent;
    pool.start = [cfg = p->shared_config, events = p->events, metrics = p->metrics,
                  shared = p->shared](caf::event_based_actor* sup) {
      // Each pool (a restarted one too) has its own idle list; callers of
      // the direct lane find the current one here.
      auto idle = std::make_shared<detail::idle_workers>(cfg->pool.strategy == "lifo", metrics,
                                                         cfg->pool.max_queue);
      {
        std::lock_guard<std::mutex> guard{shared->mtx};
        shared->idle = idle;
      }
      return spawn_linked_pool(sup, cfg, nullptr, events, metrics, idle);
    };
    // The pool's own stop: workers in parallel, each bounded by its graces.
    pool.shutdown_timeout = std::chrono::duration_cast<std::chrono::milliseconds>(
      config.worker.shutdown_grace + config.worker.kill_grace + std::chrono::seconds{2});
    children.push_back(std::move(pool));
  }
  // Issue 5: the session layer is the second child, after "pool" (children
  // start in order and stop in reverse order, so sessions start once the
  // pool exists and stop before it). one_for_one: a pool restart keeps the
  // sessions (their calls go through the client, which always uses the
  // current pool, and their programs travel with every execute_program).
  {
    child_spec sessions;
    sessions.id = "sessions";
    sessions.restart = restart_type::permanent;
    // A session's call with the affinity hint takes the direct lane as an
    // anonymous call does, with the session's worker preferred.
    session_lane lane = [w = std::weak_ptr<runtime::impl>(p)](
                          call& c, const detail::client_call_options& opts,
                          const completion& done) {
      auto r = w.lock();
      if (!r || c.affinity != affinity_mode::hint)
        return false;
      call_options co;
      co.idempotent = opts.idempotent;
      co.max_attempts = opts.max_attempts;
      return r->try_direct(c, co, done, nullptr, c.preferred_worker) != nullptr;
    };
    sessions.start = [cfg = p->shared_config, client = p->client, dir = p->sessions,
                      lane](caf::event_based_actor* sup) {
      return spawn_linked_session_registry(sup, cfg, client, dir, lane);
    };
    sessions.shutdown_timeout = std::chrono::seconds{2};
    children.push_back(std::move(sessions));
  }
  p->root = spawn_supervisor(sys, std::move(flags), std::move(children));
  caf::anon_send(p->client, watch_root_atom::value, p->root);

  std::unique_ptr<runtime> rt{new runtime(std::move(p))};
  outcome ready;
  {
    // Through the client: it answers once it knows the pool (and has
    // registered it), then asks the pool.
    caf::scoped_actor self{*rt->impl_->system};
    auto bound = caf::duration{config.pool.init_timeout + reply_margin};
    self->request(rt->impl_->client, bound, await_ready_atom::value)
      .receive([&](outcome& o) { ready = std::move(o); },
               [&](caf::error& e) { ready = from_caf_error(*rt->impl_->system, e, "start"); });
  }
  if (!ready) {
    rt->stop();
    throw start_error(ready.error());
  }
  return rt;
}

outcome runtime::execute_anonymous(const std::string& command, nlohmann::json args,
                                   call_options options) {
  auto made = impl_->make_call(command, std::move(args), options);
  if (auto* early = std::get_if<outcome>(&made))
    return std::move(*early);
  if (must_not_block())
    return outcome::failure(blocking_in_callback(command));
  auto& c = std::get<call>(made);
  // Through the runtime's long-lived caller actor: a scoped_actor per call
  // costs an actor spawn and several timer-thread wake-ups (measured).
  auto bound = c.deadline + reply_margin;
  auto blocked = std::make_shared<blocked_caller>(c.deadline);
  auto comp = impl_->timed(blocked->completion());
  if (!impl_->try_direct(c, options, comp, blocked)
      && !impl_->send_to_client(execute_atom::value, std::move(c), comp,
                                detail::client_call_options{options.idempotent,
                                                            options.max_attempts}))
    comp.fn(outcome::failure(impl_->stopping_error(command)));
  comp = {};  // its last copy is the call's (see blocked_caller::completion)
  return blocked->wait(bound, [&](bool) {
    return outcome::failure(make_error(error_category::timeout_error, "caller_timeout",
                                       "no reply from the pool in time", {{"command", command}}));
  });
}

void runtime::execute_anonymous_async(const std::string& command, nlohmann::json args,
                                      call_options options, std::function<void(outcome)> done) {
  auto made = impl_->make_call(command, std::move(args), options);
  if (auto* early = std::get_if<outcome>(&made)) {
    done(std::move(*early));
    return;
  }
  auto comp = impl_->timed(std::move(done));
  auto& c = std::get<call>(made);
  if (!impl_->try_direct(c, options, comp)
      && !impl_->send_to_client(execute_atom::value, std::move(c), comp,
                                detail::client_call_options{options.idempotent, options.max_attempts}))
    comp.fn(outcome::failure(impl_->stopping_error(command)));
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
  return impl_->session_blocking(impl_->make_session_request(
    session_op::execute, session_id, command, std::move(args), options));
}

void runtime::execute_in_session_async(const std::string& session_id, const std::string& command,
                                       nlohmann::json args, session_call_options options,
                                       std::function<void(outcome)> done) {
  auto made = impl_->make_session_request(session_op::execute, session_id, command,
                                          std::move(args), options);
  if (auto* early = std::get_if<outcome>(&made)) {
    done(std::move(*early));
    return;
  }
  impl_->send_session_call(std::move(std::get<session_request>(made)),
                           impl_->timed(std::move(done)));
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

outcome runtime::end_session(const std::string& session_id) {
  return impl_->session_blocking(
    impl_->make_session_request(session_op::end, session_id, {}, nullptr, {}));
}

outcome runtime::get_session_info(const std::string& session_id) {
  return impl_->session_blocking(
    impl_->make_session_request(session_op::info, session_id, {}, nullptr, {}));
}

outcome runtime::list_sessions() {
  return impl_->session_blocking(
    impl_->make_session_request(session_op::list, {}, {}, nullptr, {}));
}

std::variant<std::unique_ptr<lease>, error> runtime::checkout(checkout_type type,
                                                             checkout_options options) {
  if (impl_->stopped)
    return impl_->stopping_error("checkout");
  if (must_not_block())
    return blocking_in_callback("checkout");
  static std::atomic<std::uint64_t> next_token{1};
  release_caf_thread_state release;  // the holder is spawned on this thread
  auto timeout = options.timeout.value_or(impl_->config.pool.request_timeout);
  auto deadline = clock_type::now() + timeout;
  auto promise = std::make_shared<std::promise<checkout_reply>>();
  auto future = promise->get_future();
  caf::actor holder;
  caf::actor pool;
  {
    std::shared_lock<std::shared_timed_mutex> lk{impl_->gate->mtx};
    if (impl_->gate->closed)
      return impl_->stopping_error("checkout");
    pool = impl_->shared->current_pool();
    if (!pool)
      return impl_->no_pool_error();
    holder = impl_->system->spawn(lease_holder, pool);
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
  p->limits = impl_->limits();
  return std::make_unique<lease>(std::move(p));
}

pool_status runtime::status() {
  pool_status result;
  if (impl_->stopped || must_not_block())
    return result;
  std::shared_lock<std::shared_timed_mutex> lk{impl_->gate->mtx};
  if (impl_->gate->closed)
    return result;
  auto pool = impl_->shared->current_pool();
  if (!pool) {
    result.size = impl_->config.pool.size;
    result.health = impl_->shared->gave_up_error() ? "unavailable" : "restarting";
  } else {
    // Bounded (10 s); stop() waits for it before the system goes.
    release_caf_thread_state release;
    caf::scoped_actor self{*impl_->system};
    self->request(pool, caf::duration{std::chrono::seconds{10}}, status_atom::value)
      .receive([&](pool_status& s) { result = std::move(s); },
               [&](caf::error& e) { log().warn("status: {}", impl_->system->render(e)); });
  }
  result.circuit = to_string(impl_->shared->circuit.load());
  result.metrics = impl_->metrics->summary();  // also while the pool restarts
  return result;
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

caf::actor runtime_access::pool(runtime& rt) {
  return rt.impl_->shared->current_pool();
}

caf::actor runtime_access::root(runtime& rt) {
  return rt.impl_->root;
}

caf::actor runtime_access::client(runtime& rt) {
  return rt.impl_->client;
}

} // namespace dspex
