#include "dspex/actors/pool_actor.hpp"

#include <sys/random.h>

#include <algorithm>
#include <chrono>
#include <deque>
#include <map>
#include <optional>
#include <random>

#include <caf/all.hpp>

#include "dspex/actors/messages.hpp"
#include "deadline_timer.hpp"
#include "idle_workers.hpp"
#include "worker_channel.hpp"
#include "dspex/actors/python_worker_contract.hpp"
#include "dspex/backoff.hpp"
#include "dspex/logging.hpp"
#include "dspex/pool_metrics.hpp"
#include "dspex/proc_stats.hpp"
#include "dspex/secrets.hpp"

namespace dspex {

namespace {

using clock_type = std::chrono::steady_clock;

// checking: out for a health ping (not idle, so no caller waits behind it);
// degraded: its last health ping failed: no work until a ping passes.
// configuring: applying the pool's current LM configuration before it serves.
enum class worker_state_t {
  starting, idle, busy, leased, checking, degraded, configuring, removing, stopping
};

const char* to_string(worker_state_t s) {
  switch (s) {
    case worker_state_t::starting: return "starting";
    case worker_state_t::idle: return "idle";
    case worker_state_t::busy: return "busy";
    case worker_state_t::leased: return "leased";
    case worker_state_t::checking: return "checking";
    case worker_state_t::degraded: return "degraded";
    case worker_state_t::configuring: return "configuring";
    case worker_state_t::removing: return "removing";
    case worker_state_t::stopping: return "stopping";
  }
  return "unknown";
}

struct worker_entry {
  pool_worker w;
  worker_state_t state = worker_state_t::starting;
  clock_type::time_point started_at = clock_type::now();
  clock_type::time_point last_activity = clock_type::now();
  bool initial = false;            ///< started with the pool (await_ready waits for these)
  bool counted_as_removed = false; ///< counters already updated for its removal
  std::uint64_t lease = 0;         ///< the lease it is out under, if leased
  std::uint64_t recycle_after = 0; ///< requests before recycling (max_requests with jitter); 0 = never
  std::uint32_t health_failures = 0;  ///< failed health pings in a row
  bool seen_stopped = false;  ///< its process was in state T (stopped) at the last tick
  clock_type::time_point rss_checked_at{};
  std::uint64_t lm_generation = 0;  ///< the pool LM configuration it has (0: the settings' one)
  std::optional<nlohmann::json> pending_lm;  ///< a configure_lm call it is running for a caller
  /// When it took the call it runs (pool-mediated calls only): its run time
  /// ends at the checkin.
  std::optional<clock_type::time_point> running_since;
};

/// One caller waiting for a worker: a pool-mediated call or a lease request.
struct waiter {
  checkout_type type = checkout_type::anonymous();
  std::optional<call> request;      ///< a call to run (execute); empty for a lease request
  std::uint64_t token = 0;          ///< lease requests: the caller's token
  clock_type::time_point deadline;
  clock_type::time_point arrived = clock_type::now();  ///< its queue wait starts here
  caf::response_promise promise;
  caf::actor_addr caller;
  bool watched = false;  ///< queued callers are monitored; a down_msg drops them
};

struct lease_record {
  std::string worker_id;
  caf::actor_addr holder;
  std::uint64_t token = 0;
};

constexpr std::size_t max_retired = 64;

struct pool_state {
  std::shared_ptr<const settings> config;
  std::shared_ptr<worker_contract> contract;
  std::shared_ptr<event_bus> events;
  std::shared_ptr<pool_metrics> metrics;  ///< queue waits and run times (make_status)
  std::map<std::string, worker_entry> workers;
  /// The idle workers (oldest checkin first), which callers may also take
  /// directly (idle_workers.hpp): the one list of them.
  std::shared_ptr<detail::idle_workers> idle;
  std::map<std::uint64_t, waiter> queue;  ///< by ticket: FIFO order
  // New callers get increasing tickets, handed-back calls decreasing ones
  // below all of them: a retried caller goes first, it has waited longest.
  std::uint64_t next_ticket = std::uint64_t{1} << 40;
  std::uint64_t next_retry_ticket = (std::uint64_t{1} << 40) - 1;
  detail::deadline_timer queue_timer;  ///< the earliest queued caller's deadline
  std::map<std::uint64_t, lease_record> leases;
  std::map<caf::actor_addr, std::size_t> monitored;  ///< callers and how many entries name them
  std::uint64_t next_worker = 1;
  std::uint64_t replaced = 0;
  std::uint64_t start_failures = 0;
  std::uint32_t consecutive_start_failures = 0;  ///< reset when a start succeeds
  /// Workers removed before serving anyone, reset at the next handover: a
  /// contract that removes every worker at checkout must not spin the pool.
  std::uint32_t consecutive_young_removals = 0;
  dspex::backoff restart_backoff;  ///< the crash-loop guard's delays
  std::optional<error> last_start_failure;  ///< until a start succeeds
  std::string health = "healthy";  ///< healthy, degraded, broken (see update_health)
  std::uint64_t recycled = 0;
  std::uint64_t health_check_failures = 0;
  std::uint64_t affinity_hits = 0;
  std::uint64_t affinity_misses = 0;
  std::uint64_t affinity_rebinds = 0;
  /// The pool's one LM configuration: a configure_lm call that succeeded on a
  /// worker becomes the pool's (generation + 1); every other worker, and
  /// every replacement, applies it before it serves again.
  std::uint64_t lm_generation = 0;
  nlohmann::json lm_args;
  bool tick_armed = false;         ///< a maintenance_tick is on its way
  std::mt19937_64 rng{std::random_device{}()};
  bool restart_pending = false;  ///< a delayed restart_atom is on its way
  bool backoff_served = false;   ///< it arrived: the next fill starts workers
  std::size_t initial_pending = 0;  ///< initial workers not yet ready
  std::optional<error> initial_failure;
  std::vector<caf::response_promise> ready_waiters;
  bool stopping = false;
  bool held = false;
  std::vector<caf::response_promise> stop_waiters;
  std::deque<worker_info> retired;
  /// Outside the state: the pool's attach_functor runs after the state is gone.
  std::shared_ptr<std::map<std::string, caf::actor>> live_workers
    = std::make_shared<std::map<std::string, caf::actor>>();
  std::deque<caf::actor_addr> former_workers;  ///< recently gone: ignore a second exit/down
  caf::error exit_after_stop;  ///< a supervisor's shutdown: quit with it once stopped

  static inline const char* name = "dspex.pool";
};

using pool_actor_t = caf::stateful_actor<pool_state>;

void dispatch(pool_actor_t* self);
bool fill_pool(pool_actor_t* self);
void sync_waiting(pool_actor_t* self);
void fold_direct_calls(pool_actor_t* self, worker_entry& e);

// -- small helpers ------------------------------------------------------------------

worker_info info_of(const worker_entry& e, clock_type::time_point now) {
  using secs = std::chrono::duration<double>;
  worker_info info{e.w.id, e.w.pid, to_string(e.state), secs(now - e.started_at).count(),
                   e.w.stats};
  info.stats.last_activity_s = secs(now - e.last_activity).count();
  return info;
}

/// (worker_id): a worker's direct call was answered and the worker is the
/// pool's again (idle_workers::to_pool).
using direct_back_atom = caf::atom_constant<caf::atom("dback")>;
/// (steady-clock ns): a caller waits in idle_workers until then at most;
/// the queue timer must wake the pool by that time (idle_workers::expire).
using direct_due_atom = caf::atom_constant<caf::atom("ddue")>;

// Runs what idle_workers hands back: waiters served by a channel, or sent
// the usual way (null).
void run_waiters(std::vector<std::pair<detail::direct_waiter,
                                       std::shared_ptr<detail::worker_channel>>> serve) {
  for (auto& [w, channel] : serve)
    w.run(channel);
}
void reroute_waiters(std::vector<detail::direct_waiter> waiters) {
  for (auto& w : waiters)
    w.run(nullptr);
}

std::size_t active_count(pool_actor_t* self, bool overflow) {
  std::size_t n = 0;
  for (auto& [id, e] : self->state.workers)
    if (e.state != worker_state_t::removing && e.state != worker_state_t::stopping
        && e.w.overflow == overflow)
      ++n;
  return n;
}

std::size_t starting_count(pool_actor_t* self) {
  std::size_t n = 0;
  for (auto& [id, e] : self->state.workers)
    n += e.state == worker_state_t::starting ? 1 : 0;
  return n;
}

void watch_caller(pool_actor_t* self, const caf::actor_addr& caller) {
  if (!caller)
    return;
  if (self->state.monitored[caller]++ == 0)
    self->monitor(caller);
}

void unwatch_caller(pool_actor_t* self, const caf::actor_addr& caller) {
  auto& m = self->state.monitored;
  auto it = m.find(caller);
  if (it == m.end())
    return;
  if (--it->second == 0) {
    self->demonitor(caller);
    m.erase(it);
  }
}


// What a pool-made error says about its caller: the checkout type, and the
// session when there is one.
nlohmann::json caller_context(const checkout_type& t) {
  nlohmann::json ctx{{"checkout_type", t.to_string()}};
  if (t.what() == checkout_type::kind::session)
    ctx["session_id"] = t.session_id();
  return ctx;
}

error pool_stopping_error(const checkout_type& t) {
  return make_error(error_category::resource_error, "pool_stopping", "the pool is stopping",
                    caller_context(t));
}

outcome timeout_outcome(const waiter& wt) {
  return outcome::failure(make_error(error_category::timeout_error, "checkout_timeout",
                                     "no worker became free before the deadline",
                                     caller_context(wt.type)));
}

void fail_waiter(waiter& wt, error err) {
  if (wt.request)
    wt.promise.deliver(outcome::failure(std::move(err)));
  else
    wt.promise.deliver(checkout_reply{std::nullopt, std::move(err)});
}

// The contract runs user code: an exception becomes `on_throw(what)` (a
// removal), never a crash. `on_throw` only runs when something was thrown.
template <class OnThrow, class F>
auto guarded(const std::string& worker_id, const char* callback, OnThrow&& on_throw, F&& fun)
  -> decltype(fun()) {
  try {
    return fun();
  } catch (const std::exception& e) {
    log().error("[{}] {} threw: {}", worker_id, callback, e.what());
    return on_throw(std::string{e.what()});
  } catch (...) {
    log().error("[{}] {} threw a non-standard exception", worker_id, callback);
    return on_throw(std::string{"non-standard exception"});
  }
}

error callback_failed(const std::string& worker_id, const char* callback) {
  return make_error(error_category::system_error, "callback_failed",
                    std::string{callback} + " threw", {{"worker_id", worker_id}});
}

void arm_queue_timer(pool_actor_t* self, clock_type::time_point due) {
  self->state.queue_timer.arm(self, due, queue_timeout_atom::value);
}

// -- events and pool health ---------------------------------------------------------------

void publish(pool_actor_t* self, event e) {
  if (e.source.empty())
    e.source = "pool";
  self->state.events->publish(e);
}

event make_event(event_kind kind, std::string worker_id = {}, std::string reason = {}) {
  event e;
  e.kind = kind;
  e.worker_id = std::move(worker_id);
  e.reason = std::move(reason);
  return e;
}

/// Workers that serve or can serve soon (not starting, not on their way out).
std::size_t serving_count(pool_actor_t* self) {
  std::size_t n = 0;
  for (auto& [id, e] : self->state.workers)
    switch (e.state) {
      case worker_state_t::idle:
      case worker_state_t::busy:
      case worker_state_t::leased:
      case worker_state_t::checking:
      case worker_state_t::degraded:
      case worker_state_t::configuring:
        ++n;
        break;
      default:
        break;
    }
  return n;
}

error pool_unavailable(pool_actor_t* self, const checkout_type& type) {
  auto& st = self->state;
  auto ctx = caller_context(type);
  ctx["consecutive_start_failures"] = st.consecutive_start_failures;
  std::string last = "unknown";
  if (st.last_start_failure) {
    ctx["last_start_failure"] = st.last_start_failure->to_json();
    last = st.last_start_failure->message;
  }
  return make_error(error_category::resource_error, "pool_unavailable",
                    "the pool is broken: " + std::to_string(st.consecutive_start_failures)
                      + " worker starts failed in a row; last: " + last,
                    std::move(ctx));
}

// healthy: every start lately succeeded. degraded: starts are failing (the
// crash-loop guard delays them) but not pool.broken_after in a row, or some
// worker still serves. broken: pool.broken_after starts failed in a row and
// no worker serves: callers fail fast with pool_unavailable (naming the last
// start failure) instead of waiting for their deadlines. The guard keeps
// trying; the first start that succeeds makes the pool healthy again.
void update_health(pool_actor_t* self) {
  auto& st = self->state;
  std::string now_health = "healthy";
  if (st.consecutive_start_failures >= st.config->pool.broken_after && serving_count(self) == 0)
    now_health = "broken";
  else if (st.consecutive_start_failures > 0)
    now_health = "degraded";
  if (now_health == st.health)
    return;
  auto e = make_event(event_kind::pool_health_changed, {},
                      now_health == "healthy"
                        ? "a worker started"
                        : std::to_string(st.consecutive_start_failures)
                            + " worker starts failed in a row");
  e.from = st.health;
  e.to = now_health;
  e.attempt = st.consecutive_start_failures;
  if (now_health != "healthy")
    e.err = st.last_start_failure;
  st.health = now_health;
  publish(self, std::move(e));
  // Waiting only runs into the deadline while the pool is broken: callers
  // of the direct lane come here to be answered (pool_unavailable).
  reroute_waiters(st.idle->set_waiting_allowed(st.health != "broken"));
  if (st.health == "broken") {
    // Waiting would only run into the deadline: answer now.
    for (auto& [ticket, wt] : st.queue) {
      fail_waiter(wt, pool_unavailable(self, wt.type));
      unwatch_caller(self, wt.caller);
    }
    st.queue.clear();
    sync_waiting(self);
  }
}

void note_start_failure(pool_actor_t* self, const std::string& worker_id, const error& why) {
  auto& st = self->state;
  ++st.start_failures;
  ++st.consecutive_start_failures;
  st.last_start_failure = why;
  auto e = make_event(event_kind::worker_start_failed, worker_id, why.message);
  e.err = why;
  e.attempt = st.consecutive_start_failures;
  publish(self, std::move(e));
  update_health(self);
}

void note_start_success(pool_actor_t* self, const std::string& worker_id, int pid) {
  auto& st = self->state;
  st.consecutive_start_failures = 0;
  st.last_start_failure.reset();
  auto e = make_event(event_kind::worker_ready, worker_id);
  e.fields["pid"] = pid;
  publish(self, std::move(e));
  update_health(self);
}

// -- worker lifecycle -------------------------------------------------------------------

void start_worker(pool_actor_t* self, bool initial, bool overflow) {
  auto& st = self->state;
  auto id = "w" + std::to_string(st.next_worker++);
  auto& e = st.workers[id];
  e.w.id = id;
  e.w.overflow = overflow;
  e.initial = initial;
  if (auto max = st.config->pool.max_requests; max > 0) {
    // Each worker draws its own limit from [max * (1 - jitter), max], so
    // workers started together do not all recycle together.
    auto span = static_cast<std::uint64_t>(static_cast<double>(max)
                                           * st.config->pool.max_requests_jitter);
    e.recycle_after = max - (span > 0 ? st.rng() % (span + 1) : 0);
    e.recycle_after = std::max<std::uint64_t>(e.recycle_after, 1);
  }
  {
    auto ev = make_event(event_kind::worker_started, id);
    ev.attempt = st.consecutive_start_failures;
    publish(self, std::move(ev));
  }
  auto res = guarded(id, "init_worker",
                     [&](std::string) {
                       return init_result::failed(callback_failed(id, "init_worker"));
                     },
                     [&] { return st.contract->init_worker(e.w, self); });
  if (e.w.handle && res.what() != init_result::kind::failed) {
    // Supervised by monitor, not by link: see on_worker_down.
    self->unlink_from(e.w.handle);
    self->monitor(e.w.handle);
    (*st.live_workers)[id] = e.w.handle;
  }
  switch (res.what()) {
    case init_result::kind::async:
      return;  // worker_ready or its exit follows
    case init_result::kind::ready:
      e.state = worker_state_t::idle;
      st.idle->put(id, nullptr);
      note_start_success(self, id, 0);
      return;
    case init_result::kind::failed: {
      log().warn("[{}] init_worker failed: {}", id, res.reason().describe());
      if (e.w.handle)
        self->unlink_from(e.w.handle);
      auto why = res.reason();
      st.workers.erase(id);
      note_start_failure(self, id, why);
      return;
    }
  }
}

// The crash-loop guard: while starts keep failing (or workers die before
// serving anyone), the next start waits pool.restart_backoff_base doubling
// to pool.restart_backoff_max, with jitter, so a broken interpreter costs a
// bounded number of spawns instead of a busy loop.
clock_type::duration restart_delay(pool_actor_t* self, std::uint32_t consecutive_failures) {
  if (consecutive_failures == 0)
    return clock_type::duration::zero();
  return self->state.restart_backoff.delay(consecutive_failures);
}

// Keeps pool.size workers (eager), or as many as callers need up to
// pool.size (lazy), plus overflow workers for callers beyond that. Returns
// true when a worker became idle at once (synchronous init_worker).
bool fill_pool(pool_actor_t* self) {
  auto& st = self->state;
  if (st.stopping || st.restart_pending)
    return false;
  const auto& pc = st.config->pool;
  auto regular = active_count(self, false);
  auto overflow = active_count(self, true);
  std::size_t wanted = pc.size;
  if (pc.lazy) {
    // On demand: one worker per waiting caller not covered by a starting one.
    auto demand = st.queue.size() + (regular - std::min(regular, starting_count(self)));
    wanted = std::min(pc.size, std::max(regular, demand));
  }
  std::size_t missing = wanted > regular ? wanted - regular : 0;
  std::size_t extra = 0;
  if (regular + missing >= pc.size && pc.max_overflow > overflow) {
    auto starting = starting_count(self) + missing;
    if (st.queue.size() > starting)
      extra = std::min(pc.max_overflow - overflow, st.queue.size() - starting);
  }
  if (missing + extra == 0)
    return false;
  if (st.consecutive_start_failures > 0 && starting_count(self) > 0)
    return false;  // a probe is starting: its outcome decides what comes next
  auto young = st.consecutive_young_removals;
  auto failures = std::max(st.consecutive_start_failures, young > 0 ? young - 1 : 0);
  auto delay = restart_delay(self, failures);
  if (delay > clock_type::duration::zero() && !st.backoff_served) {
    st.restart_pending = true;
    auto ev = make_event(event_kind::restart_scheduled, {},
                         st.consecutive_start_failures > 0
                           ? "worker starts are failing"
                           : "workers die before serving anyone");
    ev.attempt = failures;
    ev.delay = std::chrono::duration_cast<std::chrono::milliseconds>(delay);
    ev.err = st.last_start_failure;
    publish(self, std::move(ev));
    self->delayed_send(self, delay, restart_atom::value);
    return false;
  }
  st.backoff_served = false;
  if (st.consecutive_start_failures > 0) {
    // Probing: one start at a time until one succeeds, not a burst of
    // doomed spawns per slot.
    missing = std::min<std::size_t>(missing, 1);
    extra = 0;
  }
  auto idle_before = st.idle->size();
  for (std::size_t i = 0; i < missing; ++i)
    start_worker(self, false, false);
  for (std::size_t i = 0; i < extra; ++i)
    start_worker(self, false, true);
  return st.idle->size() > idle_before;
}

void retire(pool_actor_t* self, const worker_entry& e) {
  auto& st = self->state;
  st.retired.push_back(info_of(e, clock_type::now()));
  if (st.retired.size() > max_retired)
    st.retired.pop_front();
}

void end_lease(pool_actor_t* self, worker_entry& e) {
  auto& st = self->state;
  if (e.lease == 0)
    return;
  auto it = st.leases.find(e.lease);
  if (it != st.leases.end()) {
    unwatch_caller(self, it->second.holder);
    st.leases.erase(it);
  }
  e.lease = 0;
}

// `remove`: the worker leaves the pool for good and a replacement starts.
void remove_worker(pool_actor_t* self, worker_entry& e, const error& reason,
                   bool start_failure = false) {
  auto& st = self->state;
  if (e.state == worker_state_t::removing)
    return;
  log().warn("[{}] removed from the pool: {}", e.w.id, reason.describe());
  fold_direct_calls(self, e);
  end_lease(self, e);
  st.idle->forget(e.w.id);
  if (e.pending_lm) {
    e.pending_lm.reset();
    run_waiters(st.idle->resume());  // its configure_lm will not check in
  }
  auto was_starting = e.state == worker_state_t::starting;
  // Crash-loop guard: a process killed by a signal from outside (an
  // operator, a storm, the OOM killer) says nothing about whether workers
  // can start: it counts neither as a start failure nor as a worker that
  // died before serving anyone, so it costs no backoff. Its removal is
  // published as worker_removed (cause external_signal), never as
  // worker_start_failed.
  auto external = reason.context.is_object()
                  && reason.context.value("cause", std::string{}) == "external_signal";
  e.state = worker_state_t::removing;
  if (!e.counted_as_removed) {
    e.counted_as_removed = true;
    if ((start_failure || was_starting) && !external) {
      note_start_failure(self, e.w.id, reason);
    } else if (reason.type == "overflow_retired" || reason.type == "recycled") {
      retire(self, e);  // not a failure: demand went away, or a limit was reached
    } else {
      ++st.replaced;
      if (e.w.stats.checkouts == 0 && !external)
        ++st.consecutive_young_removals;
      retire(self, e);
    }
  }
  if ((!start_failure && !was_starting) || external) {
    auto ev = make_event(reason.type == "recycled" ? event_kind::worker_recycled
                                                   : event_kind::worker_removed,
                         e.w.id, reason.message);
    ev.err = reason;
    publish(self, std::move(ev));
  }
  guarded(e.w.id, "terminate_worker", [](std::string) { return 0; }, [&] {
    st.contract->terminate_worker(reason, e.w);
    return 0;
  });
  if (!st.stopping) {
    update_health(self);
    fill_pool(self);
  }
}

// Seed Fix 6: the one place worker statistics change at checkin.
void update_worker_stats(worker_entry& e, const checkin_status& status) {
  switch (status.what) {
    case checkin_status::kind::ok:
      ++e.w.stats.successful_checkins;
      break;
    case checkin_status::kind::error:
      ++e.w.stats.error_checkins;
      break;
    case checkin_status::kind::close:
      break;
  }
  e.last_activity = clock_type::now();
  e.w.current_session.reset();
}

void start_configure(pool_actor_t* self, worker_entry& e);

// -- the direct lane (issue 11) ----------------------------------------------------------

/// The worker's lane for direct calls, bound to this pool, or null (the
/// contract offers none, or the worker is an overflow one: those must come
/// back to the pool at every checkin to be retired when idle).
std::shared_ptr<detail::worker_channel> channel_of(pool_actor_t* self, worker_entry& e) {
  return guarded(e.w.id, "direct_channel",
                 [](std::string) { return std::shared_ptr<detail::worker_channel>{}; },
                 [&] { return self->state.contract->direct_channel(e.w); });
}

std::shared_ptr<detail::worker_channel> direct_channel_of(pool_actor_t* self, worker_entry& e) {
  if (e.w.overflow || self->state.stopping)
    return nullptr;
  return channel_of(self, e);
}

/// Folds the calls a worker served directly into its statistics (Fix 6:
/// the pool's record stays the one place they are read from).
void fold_direct_calls(pool_actor_t* self, worker_entry& e) {
  auto channel = channel_of(self, e);
  if (!channel)
    return;
  auto served = channel->take_served();
  if (served.started + served.ok + served.failed == 0)
    return;
  e.w.stats.checkouts += served.started;
  e.w.stats.successful_checkins += served.ok;
  e.w.stats.error_checkins += served.failed;
  if (served.ok > 0)
    e.w.consecutive_failures = 0;
  if (served.last && *served.last > e.last_activity)
    e.last_activity = *served.last;
}

/// The direct lane yields to callers queued here (FIFO across both lanes).
void sync_waiting(pool_actor_t* self) {
  self->state.idle->set_pool_waiting(!self->state.queue.empty());
}

void make_idle(pool_actor_t* self, worker_entry& e) {
  auto& st = self->state;
  if (e.lm_generation < st.lm_generation && !st.stopping) {
    start_configure(self, e);  // it serves nobody with a stale LM configuration
    return;
  }
  e.state = worker_state_t::idle;
  e.last_activity = clock_type::now();
  if (e.w.overflow && st.queue.empty()) {
    auto delay = st.config->pool.overflow_idle_delay;
    if (delay.count() == 0) {
      remove_worker(self, e, make_error(error_category::resource_error, "overflow_retired",
                                        "overflow worker retired when idle",
                                        {{"worker_id", e.w.id}}));
      return;
    }
    self->delayed_send(self, delay, retire_atom::value, e.w.id);
  }
  auto channel = direct_channel_of(self, e);
  if (channel && e.recycle_after > 0)
    channel->set_budget(e.recycle_after > e.w.stats.checkouts
                          ? e.recycle_after - e.w.stats.checkouts : 0);
  if (auto waiter = st.idle->put(e.w.id, channel))
    waiter->run(channel);  // a caller of the direct lane was waiting for it
}

// -- one LM configuration per pool -------------------------------------------------------------

void start_configure(pool_actor_t* self, worker_entry& e) {
  auto& st = self->state;
  e.state = worker_state_t::configuring;
  auto id = e.w.id;
  auto handle = e.w.handle;
  auto generation = st.lm_generation;
  auto timeout = st.config->pool.init_timeout;
  call c{"configure_lm", st.lm_args, clock_type::now() + timeout};
  self->request(handle, caf::duration{timeout + std::chrono::seconds{2}}, execute_atom::value,
                std::move(c))
    .then(
      [=](outcome& o) {
        auto& st = self->state;
        auto it = st.workers.find(id);
        if (st.stopping || it == st.workers.end() || it->second.w.handle != handle
            || it->second.state != worker_state_t::configuring)
          return;
        if (o.ok()) {
          it->second.lm_generation = generation;
          make_idle(self, it->second);  // or again, if a newer configuration came meanwhile
        } else {
          auto err = o.error();
          remove_worker(self, it->second,
                        make_error(error_category::initialization_error,
                                   "lm_configuration_failed",
                                   "worker " + id + " refused the pool's LM configuration: "
                                     + err.message,
                                   {{"worker_id", id}}));
        }
        dispatch(self);
      },
      [=](caf::error&) {
        // The worker is gone: its down_msg does the rest.
      });
}

// A caller's configure_lm succeeded on worker `e`: it is the pool's now.
void adopt_lm(pool_actor_t* self, worker_entry& e, nlohmann::json args) {
  auto& st = self->state;
  args.erase("session_id");
  st.lm_args = std::move(args);
  e.lm_generation = ++st.lm_generation;
  log().info("pool: LM configuration {} adopted from {}; every worker applies it before it serves",
             redacted(st.lm_args).dump(), e.w.id);
  // Workers out on a direct call come back here when answered, and are
  // configured then (make_idle).
  st.idle->recall_all();
  for (auto& id : st.idle->ids()) {
    auto it = st.workers.find(id);
    if (it != st.workers.end() && it->second.state == worker_state_t::idle
        && st.idle->take(id)) {
      fold_direct_calls(self, it->second);
      start_configure(self, it->second);
    }
  }
}

// -- recycling and health checks -----------------------------------------------------------

// A healthy worker over one of its limits is drained (it is only recycled
// when idle, i.e. at checkin or from the maintenance tick) and replaced.
std::optional<error> recycle_reason(pool_actor_t* self, worker_entry& e,
                                    clock_type::time_point now) {
  const auto& pc = self->state.config->pool;
  auto recycled = [&](const char* limit, std::string what, std::uint64_t value,
                      std::uint64_t threshold) {
    return make_error(error_category::resource_error, "recycled",
                      "worker " + e.w.id + " recycled: " + what,
                      {{"worker_id", e.w.id}, {"limit", limit}, {"value", value},
                       {"threshold", threshold}});
  };
  if (e.recycle_after > 0 && e.w.stats.checkouts >= e.recycle_after)
    return recycled("max_requests",
                    "served " + std::to_string(e.w.stats.checkouts) + " requests",
                    e.w.stats.checkouts, e.recycle_after);
  auto age = std::chrono::duration_cast<std::chrono::milliseconds>(now - e.started_at);
  if (pc.max_age.count() > 0 && age >= pc.max_age)
    return recycled("max_age", "age " + std::to_string(age.count()) + " ms",
                    static_cast<std::uint64_t>(age.count()),
                    static_cast<std::uint64_t>(pc.max_age.count()));
  // Reading /proc costs a few microseconds: at most every 250 ms per worker.
  if (pc.max_rss_mb > 0 && now - e.rss_checked_at >= std::chrono::milliseconds{250}) {
    e.rss_checked_at = now;
    if (auto rss = resident_bytes(e.w.pid)) {
      auto mb = *rss / (1024 * 1024);
      if (mb >= pc.max_rss_mb) {
        return recycled("max_rss_mb", "resident memory " + std::to_string(mb) + " MiB", mb,
                        pc.max_rss_mb);
      }
    }
  }
  return std::nullopt;
}

void recycle(pool_actor_t* self, worker_entry& e, const error& why) {
  ++self->state.recycled;
  remove_worker(self, e, why);
}

void on_health_result(pool_actor_t* self, const std::string& id, const caf::actor& handle,
                      const outcome& o);

// Pings one idle (or degraded) worker. It is out of the idle list while the
// ping runs, so no caller ever waits behind a health check.
void check_health(pool_actor_t* self, worker_entry& e) {
  auto& st = self->state;
  if (e.state == worker_state_t::idle && !st.idle->take(e.w.id))
    return;  // out on a direct call: busy, so not pinged
  e.state = worker_state_t::checking;
  auto id = e.w.id;
  auto handle = e.w.handle;
  // The worker answers by pool.health_timeout itself; the margin only
  // catches a worker actor that is gone (its down_msg does the rest).
  auto bound = caf::duration{st.config->pool.health_timeout + std::chrono::seconds{2}};
  self->request(handle, bound, health_check_atom::value)
    .then([=](outcome& o) { on_health_result(self, id, handle, o); },
          [=](caf::error& err) {
            on_health_result(self, id, handle,
                             outcome::failure(make_error(
                               error_category::health_check_error, "health_timeout",
                               "no answer to the health check: " + self->system().render(err),
                               {{"worker_id", id}})));
          });
}

void on_health_result(pool_actor_t* self, const std::string& id, const caf::actor& handle,
                      const outcome& o) {
  auto& st = self->state;
  auto it = st.workers.find(id);
  if (st.stopping || it == st.workers.end() || it->second.w.handle != handle
      || it->second.state != worker_state_t::checking)
    return;
  auto& e = it->second;
  if (o.ok() || o.error().type == "worker_busy") {
    // worker_busy: it was not ready after all (it is going); its own
    // messages decide, the check found nothing.
    if (o.ok())
      e.health_failures = 0;
    make_idle(self, e);
    dispatch(self);
    return;
  }
  ++e.health_failures;
  ++st.health_check_failures;
  auto ev = make_event(event_kind::health_check_failed, id, o.error().message);
  ev.attempt = e.health_failures;
  ev.err = o.error();
  publish(self, std::move(ev));
  if (o.error().type == "health_timeout") {
    remove_worker(self, e, o.error());  // hung: the worker killed its process
  } else if (e.health_failures >= st.config->pool.health_max_failures) {
    remove_worker(self, e,
                  make_error(error_category::health_check_error, "health_check_failed",
                             std::to_string(e.health_failures)
                               + " failed health checks in a row; last: " + o.error().message,
                             {{"worker_id", id}}));
  } else {
    e.state = worker_state_t::degraded;  // no work until a ping passes
  }
  dispatch(self);
}

clock_type::duration maintenance_period(const settings::pool_settings& pc) {
  using std::chrono::milliseconds;
  std::optional<clock_type::duration> period;
  auto consider = [&](clock_type::duration d) {
    d = std::max<clock_type::duration>(d, milliseconds{10});
    period = period ? std::min(*period, d) : d;
  };
  if (pc.health_interval.count() > 0)
    consider(pc.health_interval / 2);
  if (pc.max_age.count() > 0)
    consider(pc.max_age / 4);
  if (pc.max_rss_mb > 0)
    consider(milliseconds{1000});
  return period.value_or(clock_type::duration::zero());
}

void arm_maintenance(pool_actor_t* self) {
  auto& st = self->state;
  auto period = maintenance_period(st.config->pool);
  if (st.tick_armed || st.stopping || period == clock_type::duration::zero())
    return;
  st.tick_armed = true;
  self->delayed_send(self, period, maintenance_atom::value);
}

// A process stopped by a signal (SIGSTOP; state T in /proc) answers nothing
// and would hold its slot (and any request on it) until a deadline: seen
// stopped on two ticks in a row, whatever the worker's state, it is killed
// by its worker actor and replaced. Two ticks, so a stop/continue in
// between (job control, a quick inspection) costs nothing.
void reap_stopped_processes(pool_actor_t* self) {
  for (auto& [id, e] : self->state.workers) {
    if (e.w.pid <= 0 || e.state == worker_state_t::removing
        || e.state == worker_state_t::stopping || !e.w.handle)
      continue;
    auto stopped = process_state_letter(e.w.pid) == std::optional<char>{'T'};
    if (stopped && e.seen_stopped) {
      log().warn("[{}] process {} is stopped (SIGSTOP): killing it", id, e.w.pid);
      self->send(e.w.handle, process_stopped_atom::value);
    }
    e.seen_stopped = stopped;
  }
}

// Idle workers: recycled when over a limit, pinged when idle for
// pool.health_interval; degraded workers are pinged at every tick.
void maintain(pool_actor_t* self) {
  auto& st = self->state;
  auto now = clock_type::now();
  const auto& pc = st.config->pool;
  reap_stopped_processes(self);
  std::vector<std::string> ids;
  for (auto& [id, e] : st.workers)
    if (e.state == worker_state_t::idle || e.state == worker_state_t::degraded)
      ids.push_back(id);
  for (auto& id : ids) {
    auto it = st.workers.find(id);
    if (it == st.workers.end())
      continue;
    auto& e = it->second;
    if (e.state == worker_state_t::idle) {
      if (st.idle->out_on_direct_call(id))
        continue;  // busy: recycled or pinged when it is idle again
      fold_direct_calls(self, e);
      if (auto why = recycle_reason(self, e, now)) {
        recycle(self, e, *why);
        continue;
      }
    }
    if (pc.health_interval.count() == 0)
      continue;
    if (e.state == worker_state_t::degraded || now - e.last_activity >= pc.health_interval)
      check_health(self, e);
  }
  dispatch(self);
}

// A checkout ended (pool-mediated call, lease checkin, cancel, revoke).
void finish_checkin(pool_actor_t* self, worker_entry& e, const checkin_status& status) {
  auto& st = self->state;
  update_worker_stats(e, status);
  if (e.running_since) {
    st.metrics->worker_ran(clock_type::now() - *e.running_since);
    e.running_since.reset();
  }
  if (e.pending_lm) {
    // The worker checks in before its caller sees the reply: the next call
    // of that caller already finds the pool on the new configuration.
    if (status.what == checkin_status::kind::ok && !st.stopping)
      adopt_lm(self, e, std::move(*e.pending_lm));
    e.pending_lm.reset();
    run_waiters(st.idle->resume());
  }
  // Recoverable failures count; a Python-side error is the program's, not
  // the worker's, and success resets the count.
  if (status.what == checkin_status::kind::ok)
    e.w.consecutive_failures = 0;
  else if (status.what == checkin_status::kind::error
           && (!status.reason || status.reason->category != error_category::python_error))
    ++e.w.consecutive_failures;
  if (st.stopping)
    return;
  if (e.w.consecutive_failures >= st.config->pool.failure_threshold) {
    remove_worker(self, e,
                  make_error(error_category::resource_error, "failure_threshold",
                             std::to_string(e.w.consecutive_failures)
                               + " consecutive failed checkins",
                             {{"worker_id", e.w.id}}));
    dispatch(self);
    return;
  }
  auto res = guarded(e.w.id, "handle_checkin",
                     [&](std::string) {
                       return keep_or_remove::remove(callback_failed(e.w.id, "handle_checkin"));
                     },
                     [&] { return st.contract->handle_checkin(status, e.w); });
  if (res.what() == keep_or_remove::kind::remove)
    remove_worker(self, e, res.reason());
  else if (auto why = recycle_reason(self, e, clock_type::now()))
    recycle(self, e, *why);
  else
    make_idle(self, e);
  dispatch(self);
}

// -- checkout -------------------------------------------------------------------------------

std::optional<std::string> take_idle(pool_actor_t* self) {
  auto& st = self->state;
  auto id = st.idle->take_any();
  if (id)
    fold_direct_calls(self, st.workers.at(*id));
  return id;
}

// -- session affinity (see affinity_mode in checkout.hpp) ----------------------------------

enum class preferred_is { none, idle, occupied, gone };

/// The state of the worker a session's call prefers.
preferred_is preferred_state(pool_actor_t* self, const waiter& wt) {
  if (!wt.request || wt.request->preferred_worker.empty())
    return preferred_is::none;
  auto it = self->state.workers.find(wt.request->preferred_worker);
  if (it == self->state.workers.end())
    return preferred_is::gone;
  switch (it->second.state) {
    case worker_state_t::idle:
      return self->state.idle->out_on_direct_call(it->first) ? preferred_is::occupied
                                                             : preferred_is::idle;
    case worker_state_t::removing:
    case worker_state_t::stopping: return preferred_is::gone;
    default: return preferred_is::occupied;
  }
}

/// The idle worker `wt` may take now, or nothing: no idle worker, or a
/// strict_queue call whose worker is occupied (it keeps waiting for it).
std::optional<std::string> take_idle_for(pool_actor_t* self, const waiter& wt) {
  auto& st = self->state;
  switch (preferred_state(self, wt)) {
    case preferred_is::idle: {
      const auto& id = wt.request->preferred_worker;
      if (st.idle->take(id)) {
        fold_direct_calls(self, st.workers.at(id));
        return id;
      }
      // Out on a direct call: occupied for now.
      if (wt.request->affinity != affinity_mode::hint)
        return std::nullopt;
      return take_idle(self);
    }
    case preferred_is::occupied:
      if (wt.request->affinity != affinity_mode::hint)
        return std::nullopt;  // strict: wait for it (fail_fast never queues)
      return take_idle(self);
    case preferred_is::none:
    case preferred_is::gone:
      return take_idle(self);  // a new session, or a rebind
  }
  return std::nullopt;
}

void count_affinity(pool_actor_t* self, const worker_entry& e, const waiter& wt) {
  auto& st = self->state;
  if (!wt.request || wt.request->preferred_worker.empty())
    return;
  if (e.w.id == wt.request->preferred_worker)
    ++st.affinity_hits;
  else if (preferred_state(self, wt) == preferred_is::gone)
    ++st.affinity_rebinds;
  else
    ++st.affinity_misses;
}

// A lease id is a capability: the worker serves whoever names it. So it
// comes from the kernel's CSPRNG (not from a seeded mt19937_64, whose next
// values follow from a few observed ones), is never 0, and is never reused
// while a lease is open. Checkin also checks the sender (see checkin_atom).
std::uint64_t new_lease_id(const std::map<std::uint64_t, lease_record>& open) {
  for (;;) {
    std::uint64_t id = 0;
    auto got = ::getrandom(&id, sizeof id, 0);
    if (got != static_cast<ssize_t>(sizeof id)) {
      // getrandom cannot fail for 8 bytes once the pool is initialised;
      // if it does, random_device reads the same kernel source.
      std::random_device rd;
      id = (std::uint64_t{rd()} << 32) ^ rd();
    }
    if (id != 0 && open.count(id) == 0)
      return id;
  }
}

void hand_over(pool_actor_t* self, worker_entry& e, waiter& wt, const caf::actor& client) {
  auto& st = self->state;
  count_affinity(self, e, wt);
  st.consecutive_young_removals = 0;
  ++e.w.stats.checkouts;
  e.last_activity = clock_type::now();
  st.metrics->queue_wait.record(e.last_activity - wt.arrived);
  if (wt.type.what() == checkout_type::kind::session)
    e.w.current_session = wt.type.session_id();
  if (wt.request) {
    e.state = worker_state_t::busy;
    e.running_since = e.last_activity;
    if (wt.request->command == "configure_lm" && wt.type.what() != checkout_type::kind::session) {
      e.pending_lm = wt.request->args;
      // No direct call until it is decided: a call made after its reply
      // must find every idle worker on the new configuration.
      st.idle->pause();
    }
    wt.promise.delegate(client, execute_atom::value, std::move(*wt.request));
    return;
  }
  e.state = worker_state_t::leased;
  auto lease = new_lease_id(st.leases);
  e.lease = lease;
  st.leases[lease] = lease_record{e.w.id, wt.caller, wt.token};
  watch_caller(self, wt.caller);
  // Pool → worker before pool → caller: the worker knows the lease before
  // the holder's first request can reach it.
  self->send(e.w.handle, lease_atom::value, lease);
  wt.promise.deliver(checkout_reply{lease_grant{lease, client, e.w.id}, {}});
}

// Offers the worker `id` to `wt`. Returns true when `wt` is answered (served
// or skipped); false when the worker was removed and `wt` still waits.
bool offer(pool_actor_t* self, const std::string& id, waiter& wt) {
  auto& st = self->state;
  auto& e = st.workers.at(id);
  // A caller that just asked is alive; a queued one is monitored, and its
  // down_msg would have dropped it from the queue.
  caller_info caller{wt.caller,
                     !wt.watched || self->state.monitored.count(wt.caller) > 0};
  auto res = guarded(id, "handle_checkout",
                     [&](std::string what) {
                       return checkout_result::remove(connect_error("exception", what, id));
                     },
                     [&] { return st.contract->handle_checkout(wt.type, caller, e.w); });
  switch (res.what()) {
    case checkout_result::kind::ok:
      // A caller that dies after this point is seen through its monitor:
      // a lease is revoked and the worker returns (see on_caller_down).
      hand_over(self, e, wt, res.client());
      return true;
    case checkout_result::kind::skip:
      fail_waiter(wt, res.reason());
      make_idle(self, e);
      return true;
    case checkout_result::kind::remove:
      remove_worker(self, e, res.reason());
      return false;
  }
  return false;
}

// Matches waiting callers with idle workers, oldest first. An expired caller
// is answered here and never handed a worker; a removal retries the same
// caller on the next worker.
void match_waiters(pool_actor_t* self, clock_type::time_point now) {
  auto& st = self->state;
  auto it = st.queue.begin();
  while (it != st.queue.end()) {
    auto& wt = it->second;
    if (wt.deadline <= now) {
      fail_waiter(wt, timeout_outcome(wt).error());
      unwatch_caller(self, wt.caller);
      it = st.queue.erase(it);
      continue;
    }
    if (st.idle->size() == 0)
      break;
    auto id = take_idle_for(self, wt);
    if (!id) {
      ++it;  // a strict session call waiting for its own worker: the next caller may go
      continue;
    }
    if (offer(self, *id, wt)) {
      unwatch_caller(self, wt.caller);
      it = st.queue.erase(it);
    } else {
      // The worker was removed, which can change the queue (a broken pool
      // fails every waiter): start over from the oldest caller.
      it = st.queue.begin();
    }
  }
}

// Serves waiters, starting workers as they are needed.
void dispatch(pool_actor_t* self) {
  auto& st = self->state;
  if (st.stopping)
    return;
  auto now = clock_type::now();
  do {
    match_waiters(self, now);
  } while (fill_pool(self) && !st.queue.empty());
  sync_waiting(self);
}

error full_error(const checkout_type& t) {
  return make_error(error_category::resource_error, "full", "no idle worker (non-blocking checkout)",
                    caller_context(t));
}

// Entry of every checkout: serve now, or queue with the caller's deadline.
caf::response_promise enqueue(pool_actor_t* self, waiter wt, bool block) {
  auto& st = self->state;
  auto rp = wt.promise;
  if (wt.deadline <= clock_type::now()) {
    fail_waiter(wt, timeout_outcome(wt).error());
    return rp;
  }
  if (st.health == "broken") {
    fail_waiter(wt, pool_unavailable(self, wt.type));
    return rp;
  }
  if (wt.request && wt.request->affinity == affinity_mode::strict_fail_fast
      && preferred_state(self, wt) == preferred_is::occupied) {
    auto ctx = caller_context(wt.type);
    ctx["worker_id"] = wt.request->preferred_worker;
    fail_waiter(wt, make_error(error_category::resource_error, "worker_busy",
                               "the session's worker " + wt.request->preferred_worker
                                 + " is busy (strict_fail_fast)",
                               std::move(ctx)));
    return rp;
  }
  if (st.queue.empty() && st.idle->size() > 0) {
    while (auto id = take_idle_for(self, wt))
      if (offer(self, *id, wt))
        return rp;
  }
  if (!block) {
    fail_waiter(wt, full_error(wt.type));
    return rp;
  }
  if (st.queue.size() >= st.config->pool.max_queue) {
    fail_waiter(wt, make_error(error_category::resource_error, "pool_saturated",
                               "the wait queue is full ("
                                 + std::to_string(st.config->pool.max_queue) + " callers)",
                               caller_context(wt.type)));
    return rp;
  }
  watch_caller(self, wt.caller);
  wt.watched = true;
  arm_queue_timer(self, wt.deadline);
  st.queue.emplace(st.next_ticket++, std::move(wt));
  dispatch(self);
  return rp;
}

// -- exits, downs, stop -------------------------------------------------------------------

void answer_ready_waiters(pool_actor_t* self) {
  auto& st = self->state;
  auto result = st.initial_failure ? outcome::failure(*st.initial_failure)
                                   : outcome::success(nlohmann::json{{"ready", true}});
  for (auto& rp : st.ready_waiters)
    rp.deliver(result);
  st.ready_waiters.clear();
}

// Stop: queued callers fail with pool_stopping, every worker is stopped
// (shutdown → EOF → TERM → KILL); the pool quits once all are reaped.
void begin_stop(pool_actor_t* self) {
  auto& st = self->state;
  st.stopping = true;
  log().info("pool: stopping {} workers", st.workers.size());
  for (auto& [ticket, wt] : st.queue)
    fail_waiter(wt, pool_stopping_error(wt.type));
  st.queue.clear();
  if (!st.initial_failure && st.initial_pending > 0) {
    st.initial_failure = make_error(error_category::resource_error, "pool_stopping",
                                    "the pool stopped before it was ready");
    answer_ready_waiters(self);
  }
  // No direct call starts any more; answered ones come back here, and the
  // callers waiting there go the usual way (pool_stopping).
  reroute_waiters(st.idle->close());
  auto reason = make_error(error_category::resource_error, "pool_stopping",
                           "the pool is stopping");
  for (auto& [id, e] : st.workers) {
    end_lease(self, e);
    if (e.state != worker_state_t::removing) {
      e.state = worker_state_t::stopping;
      guarded(id, "terminate_worker", [](std::string) { return 0; }, [&, &e = e] {
        st.contract->terminate_worker(reason, e.w);
        return 0;
      });
    }
  }
}

void finish_stop_if_done(pool_actor_t* self) {
  auto& st = self->state;
  if (!st.stopping || !st.workers.empty())
    return;
  for (auto& rp : st.stop_waiters)
    rp.deliver(true);
  st.stop_waiters.clear();
  log().info("pool stopped");
  self->quit(st.exit_after_stop);
}

// Workers are supervised by monitor: the pool unlinks each worker right after
// init_worker spawned it and monitors it. A link would let a worker killed
// with exit_reason::kill take the pool down (CAF 0.17 never lets a linked
// actor trap kill). When the pool terminates, for whatever reason, it kills
// the workers still alive (attach_functor in pool_actor), so none outlives it.
// A worker that died before the unlink may report twice (exit_msg through
// the link, then down_msg): the first one is handled, the second finds no
// entry and is ignored.
bool is_former_worker(pool_actor_t* self, const caf::actor_addr& addr) {
  auto& f = self->state.former_workers;
  return std::find(f.begin(), f.end(), addr) != f.end();
}

void on_worker_down(pool_actor_t* self, const caf::actor_addr& source, caf::error reason);

void on_exit(pool_actor_t* self, caf::exit_msg& msg) {
  auto& st = self->state;
  auto it = std::find_if(st.workers.begin(), st.workers.end(), [&](auto& kv) {
    return kv.second.w.handle.address() == msg.source;
  });
  if (it != st.workers.end()) {
    on_worker_down(self, msg.source, std::move(msg.reason));
    return;
  }
  if (is_former_worker(self, msg.source))
    return;
  // Not one of ours: an exit from a linked parent (a supervisor) ends the
  // pool, as in OTP: gracefully when it is an ordered shutdown.
  if (msg.reason == caf::exit_reason::user_shutdown && !st.stopping) {
    st.exit_after_stop = msg.reason;
    begin_stop(self);
    finish_stop_if_done(self);
    return;
  }
  if (msg.reason)
    self->quit(std::move(msg.reason));
}

void on_worker_down(pool_actor_t* self, const caf::actor_addr& source, caf::error reason) {
  auto& st = self->state;
  auto it = std::find_if(st.workers.begin(), st.workers.end(), [&](auto& kv) {
    return kv.second.w.handle.address() == source;
  });
  if (it == st.workers.end())
    return;
  st.live_workers->erase(it->first);
  st.former_workers.push_back(source);
  if (st.former_workers.size() > 64)
    st.former_workers.pop_front();
  caf::exit_msg msg{source, std::move(reason)};
  auto& e = it->second;
  auto detail = decode_exit_reason(msg.reason);
  auto start_failure = is_start_failure(msg.reason);
  if (start_failure && e.initial && !st.initial_failure && st.initial_pending > 0) {
    st.initial_failure = detail;
    answer_ready_waiters(self);
  }
  if (e.state != worker_state_t::removing && e.state != worker_state_t::stopping)
    remove_worker(self, e,
                  detail.value_or(make_error(error_category::system_error, "worker_exited",
                                             "worker actor exited: " + caf::to_string(msg.reason),
                                             {{"worker_id", e.w.id}})),
                  start_failure);
  end_lease(self, e);
  st.workers.erase(it);
  finish_stop_if_done(self);
  dispatch(self);
}

// A caller went away: its queued checkouts are dropped, its leases revoked.
void on_caller_down(pool_actor_t* self, caf::down_msg& msg) {
  auto& st = self->state;
  if (st.monitored.erase(msg.source) == 0) {
    on_worker_down(self, msg.source, std::move(msg.reason));
    return;
  }
  for (auto it = st.queue.begin(); it != st.queue.end();)
    it = it->second.caller == msg.source ? st.queue.erase(it) : std::next(it);
  sync_waiting(self);
  std::vector<std::uint64_t> revoked;
  for (auto& [lease, rec] : st.leases)
    if (rec.holder == msg.source)
      revoked.push_back(lease);
  for (auto lease : revoked) {
    auto rec = st.leases.at(lease);
    st.leases.erase(lease);
    auto wit = st.workers.find(rec.worker_id);
    if (wit == st.workers.end())
      continue;
    wit->second.lease = 0;
    // Back to the pool only when in sync (nothing in flight); else replaced.
    self->request(wit->second.w.handle, caf::infinite, revoke_atom::value, lease)
      .then(
        [=](bool in_sync) {
          auto w2 = self->state.workers.find(rec.worker_id);
          if (w2 == self->state.workers.end() || w2->second.state != worker_state_t::leased)
            return;
          if (in_sync) {
            // Nothing in flight: the worker is fine and goes back as it is.
            w2->second.w.current_session.reset();
            make_idle(self, w2->second);
          } else
            remove_worker(self, w2->second,
                          make_error(error_category::communication_error, "lease_revoked",
                                     "lease holder died with a request in flight",
                                     {{"worker_id", rec.worker_id}}));
          dispatch(self);
        },
        [=](caf::error&) {
          // The worker is gone: its exit does the rest.
        });
  }
}

pool_status make_status(pool_actor_t* self) {
  auto& st = self->state;
  auto now = clock_type::now();
  pool_status s;
  s.size = st.config->pool.size;
  s.queued = st.queue.size() + st.idle->waiting();
  s.replaced = st.replaced;
  s.start_failures = st.start_failures;
  s.stopping = st.stopping;
  s.leased = st.leases.size();
  for (auto& [id, e] : st.workers) {
    auto direct = e.state == worker_state_t::idle && st.idle->out_on_direct_call(id);
    if (e.state == worker_state_t::idle)
      fold_direct_calls(self, e);
    switch (e.state) {
      case worker_state_t::starting: ++s.starting; break;
      case worker_state_t::idle: ++(direct ? s.busy : s.idle); break;
      case worker_state_t::busy:
      case worker_state_t::leased:
      case worker_state_t::checking:
      case worker_state_t::degraded:
      case worker_state_t::configuring: ++s.busy; break;
      case worker_state_t::removing:
      case worker_state_t::stopping: ++s.removing; break;
    }
    if (e.w.overflow && e.state != worker_state_t::removing)
      ++s.overflow;
    s.workers.push_back(info_of(e, now));
    if (direct)
      s.workers.back().state = "busy";  // on a direct call
  }
  s.retired.assign(st.retired.begin(), st.retired.end());
  s.health = st.health;
  s.consecutive_start_failures = st.consecutive_start_failures;
  s.last_start_failure = st.last_start_failure;
  s.recycled = st.recycled;
  s.health_check_failures = st.health_check_failures;
  // Session calls of the direct lane count where they were served.
  auto lane = st.idle->take_affinity_counts();
  st.affinity_hits += lane.hits;
  st.affinity_misses += lane.misses;
  st.affinity_rebinds += lane.rebinds;
  s.affinity_hits = st.affinity_hits;
  s.affinity_misses = st.affinity_misses;
  s.affinity_rebinds = st.affinity_rebinds;
  s.metrics = st.metrics->summary();
  return s;
}

// The waiter of a pool-mediated call from the current sender.
waiter waiter_for(pool_actor_t* self, call c) {
  waiter wt;
  wt.type = c.type;
  wt.deadline = c.deadline;
  wt.caller = caf::actor_cast<caf::actor_addr>(self->current_sender());
  wt.promise = self->make_response_promise();
  wt.request = std::move(c);
  return wt;
}

caf::behavior held_behavior(pool_actor_t* self) {
  return {
    [=](resume_atom) {
      self->state.held = false;
      run_waiters(self->state.idle->resume());
      self->set_default_handler(caf::print_and_drop);
      self->unbecome();
    },
  };
}

caf::behavior pool_actor(pool_actor_t* self, std::shared_ptr<const settings> config,
                         std::shared_ptr<worker_contract> contract,
                         std::shared_ptr<event_bus> events,
                         std::shared_ptr<pool_metrics> metrics,
                         std::shared_ptr<detail::idle_workers> idle) {
  auto& st = self->state;
  st.config = std::move(config);
  st.metrics = metrics ? std::move(metrics) : std::make_shared<pool_metrics>(st.config->pool.size);
  st.idle = idle ? std::move(idle)
                 : std::make_shared<detail::idle_workers>(st.config->pool.strategy == "lifo",
                                                          st.metrics, st.config->pool.max_queue);
  auto pool_addr = caf::actor_cast<caf::actor_addr>(self);
  st.idle->set_to_pool(
    [pool_addr](const std::string& id) {
      if (auto dest = caf::actor_cast<caf::actor>(pool_addr))
        caf::anon_send(dest, direct_back_atom::value, id);
    },
    [pool_addr](clock_type::time_point due) {
      if (auto dest = caf::actor_cast<caf::actor>(pool_addr))
        caf::anon_send(dest, direct_due_atom::value,
                       static_cast<std::int64_t>(due.time_since_epoch().count()));
    });
  st.events = events ? std::move(events) : std::make_shared<event_bus>();
  st.contract = contract ? std::move(contract)
                         : std::make_shared<python_worker_contract>(st.config, "pool-worker",
                                                                    st.events);
  {
    backoff_config bc;
    bc.kind = backoff_kind::exponential;
    bc.base = st.config->pool.restart_backoff_base;
    bc.max_delay = st.config->pool.restart_backoff_max;
    bc.jitter = 0.2;  // only ever shortens a delay: max stays a hard bound
    st.restart_backoff = dspex::backoff{bc, std::random_device{}()};
  }
  arm_maintenance(self);
  self->set_exit_handler([=](caf::exit_msg& msg) { on_exit(self, msg); });
  // Whatever ends the pool ends its workers (they are monitored, not linked).
  self->attach_functor([live = st.live_workers, idle = st.idle](const caf::error&) {
    reroute_waiters(idle->close());  // callers stop taking its workers at once
    for (auto& [id, h] : *live)
      caf::anon_send_exit(h, caf::exit_reason::kill);
    live->clear();
  });
  self->set_down_handler([=](caf::down_msg& msg) { on_caller_down(self, msg); });
  if (!st.config->pool.lazy) {
    // All initial workers start at once: each spawns its own child, so their
    // Python start-ups overlap instead of adding up.
    st.initial_pending = st.config->pool.size;
    for (std::size_t i = 0; i < st.config->pool.size; ++i)
      start_worker(self, true, false);
    // Workers ready at once (synchronous init) count as ready now.
    for (auto& [id, e] : st.workers)
      if (e.state == worker_state_t::idle && st.initial_pending > 0)
        --st.initial_pending;
    log().info("pool: starting {} workers", st.config->pool.size);
  }

  return {
    [=](execute_atom, call& c) -> caf::result<outcome> {
      if (self->state.stopping)
        return outcome::failure(pool_stopping_error(c.type));
      auto block = c.block;
      return enqueue(self, waiter_for(self, std::move(c)), block);
    },
    [=](retry_atom, call& c) -> caf::result<outcome> {
      // A call handed back unserved by a worker that lost its process: it
      // goes first, and a caller never loses its place to a dying worker.
      auto& st = self->state;
      if (st.stopping)
        return outcome::failure(pool_stopping_error(c.type));
      auto wt = waiter_for(self, std::move(c));
      auto rp = wt.promise;
      if (st.health == "broken") {
        fail_waiter(wt, pool_unavailable(self, wt.type));
        return rp;
      }
      watch_caller(self, wt.caller);
      wt.watched = true;
      arm_queue_timer(self, wt.deadline);
      st.queue.emplace(st.next_retry_ticket--, std::move(wt));
      dispatch(self);
      return rp;
    },
    [=](checkout_atom, checkout_request& r) -> caf::result<checkout_reply> {
      if (self->state.stopping)
        return checkout_reply{std::nullopt, pool_stopping_error(r.type)};
      waiter wt;
      wt.type = r.type;
      wt.token = r.token;
      wt.deadline = r.deadline;
      wt.caller = caf::actor_cast<caf::actor_addr>(self->current_sender());
      wt.promise = self->make_response_promise();
      return enqueue(self, std::move(wt), r.block);
    },
    [=](checkin_atom, std::uint64_t lease, checkin_status& status) -> bool {
      auto& st = self->state;
      auto it = st.leases.find(lease);
      if (it == st.leases.end())
        return false;  // revoked or unknown: nothing to do, and no crash
      // Only the holder checks in (the lease's holder actor sends it): a
      // lease id learnt elsewhere cannot end somebody else's lease.
      if (it->second.holder != caf::actor_cast<caf::actor_addr>(self->current_sender())) {
        log().warn("pool: checkin of a lease of worker {} by an actor that does not hold it",
                   it->second.worker_id);
        return false;
      }
      auto wit = st.workers.find(it->second.worker_id);
      unwatch_caller(self, it->second.holder);
      st.leases.erase(it);
      if (wit == st.workers.end())
        return true;
      wit->second.lease = 0;
      self->send(wit->second.w.handle, lease_atom::value, std::uint64_t{0});
      if (wit->second.state == worker_state_t::leased)
        finish_checkin(self, wit->second, status);
      return true;
    },
    [=](cancel_atom, std::uint64_t token) {
      // The caller gave up on a checkout. Still queued: drop it. Already
      // granted (the grant raced with the caller's timeout and was dropped):
      // the worker comes back; no request can have reached it.
      auto& st = self->state;
      auto caller = caf::actor_cast<caf::actor_addr>(self->current_sender());
      for (auto it = st.queue.begin(); it != st.queue.end(); ++it)
        if (!it->second.request && it->second.token == token && it->second.caller == caller) {
          unwatch_caller(self, caller);
          st.queue.erase(it);
          sync_waiting(self);
          return;
        }
      for (auto it = st.leases.begin(); it != st.leases.end(); ++it)
        if (it->second.token == token && it->second.holder == caller) {
          auto worker_id = it->second.worker_id;
          unwatch_caller(self, caller);
          st.leases.erase(it);
          auto wit = st.workers.find(worker_id);
          if (wit != st.workers.end() && wit->second.state == worker_state_t::leased) {
            wit->second.lease = 0;
            self->send(wit->second.w.handle, lease_atom::value, std::uint64_t{0});
            wit->second.w.current_session.reset();
            make_idle(self, wit->second);
            dispatch(self);
          }
          return;
        }
    },
    [=](checkin_atom, const std::string& id, checkin_status& status) {
      auto& st = self->state;
      auto it = st.workers.find(id);
      if (it == st.workers.end())
        return;
      auto& e = it->second;
      if (e.state == worker_state_t::idle && st.idle->out_on_direct_call(id)) {
        // A direct call that its worker actor took over, answered after all.
        st.idle->forget(id);
        fold_direct_calls(self, e);  // its checkout included
        e.state = worker_state_t::busy;
      }
      if (e.state != worker_state_t::busy)
        return;
      finish_checkin(self, e, status);
    },
    [=](direct_back_atom, const std::string& id) {
      // A worker whose direct call was answered, given back to the pool
      // (recalled, over its recycling budget, or callers wait here).
      auto& st = self->state;
      auto it = st.workers.find(id);
      if (it == st.workers.end() || it->second.state != worker_state_t::idle
          || st.idle->contains(id))
        return;
      auto& e = it->second;
      st.idle->forget(id);
      fold_direct_calls(self, e);
      if (st.stopping)
        return;
      if (auto why = recycle_reason(self, e, clock_type::now()))
        recycle(self, e, *why);
      else
        make_idle(self, e);
      dispatch(self);
    },
    [=](worker_spawned_atom, const std::string& id, int pid) {
      // Shown in the status while the worker starts (so an operator, or a
      // storm, can find the process before it is ready).
      auto it = self->state.workers.find(id);
      if (it != self->state.workers.end() && it->second.state == worker_state_t::starting)
        it->second.w.pid = pid;
    },
    [=](worker_ready_atom, const std::string& id, int pid) {
      auto& st = self->state;
      auto it = st.workers.find(id);
      if (it == st.workers.end() || it->second.state != worker_state_t::starting)
        return;
      auto& e = it->second;
      e.w.pid = pid;
      // Its lane goes back to this pool's idle list after each direct call.
      if (auto channel = channel_of(self, e))
        channel->set_board(st.idle);
      note_start_success(self, id, pid);
      if (e.initial && st.initial_pending > 0 && --st.initial_pending == 0)
        answer_ready_waiters(self);
      if (st.stopping)
        return;
      make_idle(self, e);
      dispatch(self);
    },
    [=](worker_gone_atom, const std::string& id, error& gone) {
      auto& st = self->state;
      auto it = st.workers.find(id);
      if (it == st.workers.end())
        return;
      auto& e = it->second;
      if (e.state == worker_state_t::idle) {
        auto msg = caf::make_message(worker_gone_atom::value, id, gone);
        auto res = guarded(id, "handle_info",
                           [&](std::string) { return keep_or_remove::remove(gone); },
                           [&] { return st.contract->handle_info(msg, e.w); });
        if (res.what() == keep_or_remove::kind::remove)
          remove_worker(self, e, res.reason());
      } else if (e.state != worker_state_t::stopping) {
        remove_worker(self, e, gone);
      } else {
        guarded(id, "terminate_worker", [](std::string) { return 0; }, [&] {
          st.contract->terminate_worker(gone, e.w);
          return 0;
        });
      }
      dispatch(self);
    },
    [=](queue_timeout_atom, std::uint64_t generation) {
      auto& st = self->state;
      if (!st.queue_timer.fired(generation))
        return;
      auto next = detail::expire_passed(
        st.queue, [](const auto& entry) { return entry.second.deadline; },
        [&](auto& entry) {
          fail_waiter(entry.second, timeout_outcome(entry.second).error());
          unwatch_caller(self, entry.second.caller);
        });
      auto [late, direct_next] = st.idle->expire(clock_type::now());
      reroute_waiters(std::move(late));  // the pool answers them (checkout_timeout)
      if (direct_next && (!next || *direct_next < *next))
        next = direct_next;
      if (next)
        arm_queue_timer(self, *next);
      sync_waiting(self);
    },
    [=](direct_due_atom, std::int64_t due) {
      arm_queue_timer(self, clock_type::time_point{clock_type::duration{due}});
    },
    [=](maintenance_atom) {
      self->state.tick_armed = false;
      if (self->state.stopping)
        return;
      maintain(self);
      arm_maintenance(self);
    },
    [=](restart_atom) {
      self->state.restart_pending = false;
      self->state.backoff_served = true;  // the delay is over: start now
      fill_pool(self);
      dispatch(self);
    },
    [=](retire_atom, const std::string& id) {
      auto& st = self->state;
      auto it = st.workers.find(id);
      if (it == st.workers.end() || it->second.state != worker_state_t::idle
          || !it->second.w.overflow)
        return;
      auto idle_for = clock_type::now() - it->second.last_activity;
      if (idle_for + std::chrono::milliseconds{1} < st.config->pool.overflow_idle_delay)
        return;  // used again since: a newer retire check is pending
      remove_worker(self, it->second,
                    make_error(error_category::resource_error, "overflow_retired",
                               "overflow worker retired after its idle delay",
                               {{"worker_id", id}}));
    },
    [=](ping_idle_atom) -> std::size_t {
      auto& st = self->state;
      std::size_t removed = 0;
      for (auto& id : st.idle->ids()) {
        auto it = st.workers.find(id);
        if (it == st.workers.end() || it->second.state != worker_state_t::idle)
          continue;
        auto res = guarded(id, "handle_ping",
                           [&](std::string) {
                             return keep_or_remove::remove(callback_failed(id, "handle_ping"));
                           },
                           [&] { return st.contract->handle_ping(it->second.w); });
        if (res.what() == keep_or_remove::kind::remove) {
          remove_worker(self, it->second, res.reason());
          ++removed;
        }
      }
      dispatch(self);
      return removed;
    },
    [=](hold_atom) {
      // Tests: requests wait in the mailbox until resume, so deadlines can
      // pass deterministically while the pool is still.
      self->state.held = true;
      self->state.idle->pause();  // a held pool serves nobody, directly or not
      self->set_default_handler(caf::skip);
      self->become(caf::keep_behavior, held_behavior(self));
    },
    [=](status_atom) { return make_status(self); },
    [=](await_ready_atom) -> caf::result<outcome> {
      auto& st = self->state;
      if (st.initial_failure)
        return outcome::failure(*st.initial_failure);
      if (st.initial_pending == 0)
        return outcome::success(nlohmann::json{{"ready", true}});
      auto rp = self->make_response_promise();
      st.ready_waiters.push_back(rp);
      return rp;
    },
    [=](stop_atom) -> caf::result<bool> {
      auto& st = self->state;
      auto rp = self->make_response_promise();
      st.stop_waiters.push_back(rp);
      if (!st.stopping)
        begin_stop(self);
      finish_stop_if_done(self);
      return rp;
    },
  };
}

} // namespace

caf::actor spawn_pool(caf::actor_system& sys, std::shared_ptr<const settings> config,
                      std::shared_ptr<worker_contract> contract,
                      std::shared_ptr<event_bus> events, std::shared_ptr<pool_metrics> metrics,
                      std::shared_ptr<detail::idle_workers> idle) {
  return sys.spawn(pool_actor, std::move(config), std::move(contract), std::move(events),
                   std::move(metrics), std::move(idle));
}

caf::actor spawn_linked_pool(caf::event_based_actor* parent,
                             std::shared_ptr<const settings> config,
                             std::shared_ptr<worker_contract> contract,
                             std::shared_ptr<event_bus> events,
                             std::shared_ptr<pool_metrics> metrics,
                             std::shared_ptr<detail::idle_workers> idle) {
  return parent->spawn<caf::linked>(pool_actor, std::move(config), std::move(contract),
                                    std::move(events), std::move(metrics), std::move(idle));
}

} // namespace dspex
