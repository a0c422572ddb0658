#include "dspex/actors/bridge_actor.hpp"

#include <algorithm>
#include <chrono>
#include <deque>
#include <optional>
#include <vector>

#include <caf/all.hpp>

#include "dspex/actors/messages.hpp"
#include "dspex/actors/worker_actor.hpp"
#include "dspex/logging.hpp"

namespace dspex {

namespace {

using clock_type = std::chrono::steady_clock;

enum class bridge_worker { none, starting, idle, busy, gone, stopping };

const char* to_string(bridge_worker s) {
  switch (s) {
    case bridge_worker::none: return "none";
    case bridge_worker::starting: return "starting";
    case bridge_worker::idle: return "idle";
    case bridge_worker::busy: return "busy";
    case bridge_worker::gone: return "removing";
    case bridge_worker::stopping: return "stopping";
  }
  return "unknown";
}

/// A caller waiting for the worker, with its deadline (inside `request`).
struct waiting_call {
  call request;
  caf::response_promise promise;
};

constexpr std::size_t max_retired = 16;

struct bridge_state {
  std::shared_ptr<const settings> config;
  // The one worker (none while a restart is pending).
  caf::actor worker;
  std::string worker_id;
  int pid = 0;
  bridge_worker phase = bridge_worker::none;
  clock_type::time_point started_at = clock_type::now();
  clock_type::time_point last_activity = clock_type::now();
  worker_stats stats;
  std::uint64_t next_worker = 1;
  // Callers, FIFO. Calls handed back unserved by a dying worker go first.
  std::deque<waiting_call> queue;
  std::optional<clock_type::time_point> queue_timer_due;
  // Restarts.
  std::uint64_t replaced = 0;
  std::uint64_t start_failures = 0;
  std::uint32_t consecutive_start_failures = 0;
  std::optional<error> last_start_failure;  ///< cleared when a worker becomes ready
  bool restart_pending = false;
  std::vector<caf::response_promise> ready_waiters;
  std::deque<worker_info> retired;
  // Stop.
  bool stopping = false;
  std::vector<caf::response_promise> stop_waiters;

  static inline const char* name = "dspex.bridge";
};

using bridge_actor_t = caf::stateful_actor<bridge_state>;

void dispatch(bridge_actor_t* self);

error stopping_error() {
  return make_error(error_category::resource_error, "bridge_stopping", "the bridge is stopping");
}

outcome timeout_outcome(const call& c) {
  return outcome::failure(make_error(error_category::timeout_error, "checkout_timeout",
                                     "the bridge's worker did not become free before the deadline",
                                     {{"command", c.command}}));
}

// Same backoff as the pool: 100 ms doubling to 5 s while starts keep
// failing, so a broken interpreter costs a bounded number of spawns.
clock_type::duration restart_delay(std::uint32_t consecutive_failures) {
  if (consecutive_failures == 0)
    return clock_type::duration::zero();
  auto shift = std::min<std::uint32_t>(consecutive_failures - 1, 6);
  return std::min<clock_type::duration>(std::chrono::milliseconds{100} * (1u << shift),
                                        std::chrono::seconds{5});
}

worker_info current_info(bridge_actor_t* self, clock_type::time_point now) {
  using secs = std::chrono::duration<double>;
  auto& st = self->state;
  worker_info info{st.worker_id, st.pid, to_string(st.phase),
                   secs(now - st.started_at).count(), st.stats};
  info.stats.last_activity_s = secs(now - st.last_activity).count();
  return info;
}

void answer_ready_waiters(bridge_actor_t* self, const outcome& result) {
  auto& st = self->state;
  for (auto& rp : st.ready_waiters)
    rp.deliver(result);
  st.ready_waiters.clear();
}

void arm_queue_timer(bridge_actor_t* self, clock_type::time_point due) {
  auto& st = self->state;
  if (st.queue_timer_due && *st.queue_timer_due <= due)
    return;  // a timer at or before `due` is pending; it re-arms itself
  st.queue_timer_due = due;
  auto delay = std::max(due - clock_type::now(), clock_type::duration::zero());
  self->delayed_send(self, delay, queue_timeout_atom::value);
}

// Answers every waiting caller whose deadline passed (anywhere in the queue:
// deadlines need not be in FIFO order) and re-arms the timer for the rest.
void expire_waiting(bridge_actor_t* self) {
  auto& st = self->state;
  auto now = clock_type::now();
  std::optional<clock_type::time_point> next;
  for (auto it = st.queue.begin(); it != st.queue.end();) {
    if (it->request.deadline <= now) {
      it->promise.deliver(timeout_outcome(it->request));
      it = st.queue.erase(it);
    } else {
      if (!next || it->request.deadline < *next)
        next = it->request.deadline;
      ++it;
    }
  }
  if (next)
    arm_queue_timer(self, *next);
}

void start_worker(bridge_actor_t* self) {
  auto& st = self->state;
  st.worker_id = "b" + std::to_string(st.next_worker++);
  st.pid = 0;
  st.phase = bridge_worker::starting;
  st.started_at = st.last_activity = clock_type::now();
  st.stats = worker_stats{};
  worker_config wc;
  wc.id = st.worker_id;
  wc.config = st.config;
  wc.owner = caf::actor_cast<caf::actor>(self);
  wc.mode = "standalone";
  st.worker = spawn_linked_worker(self, std::move(wc));
}

// Starts the next worker now, or after the backoff while starts keep failing.
void schedule_start(bridge_actor_t* self) {
  auto& st = self->state;
  if (st.stopping || st.restart_pending || st.worker)
    return;
  auto delay = restart_delay(st.consecutive_start_failures);
  if (delay == clock_type::duration::zero()) {
    start_worker(self);
    return;
  }
  st.restart_pending = true;
  self->delayed_send(self, delay, restart_atom::value);
}

void finish_stop_if_done(bridge_actor_t* self) {
  auto& st = self->state;
  if (!st.stopping || st.worker)
    return;
  for (auto& rp : st.stop_waiters)
    rp.deliver(true);
  st.stop_waiters.clear();
  log().info("bridge stopped");
  self->quit();
}

void on_worker_exit(bridge_actor_t* self, const caf::error& reason) {
  auto& st = self->state;
  auto was = st.phase;
  st.retired.push_back(current_info(self, clock_type::now()));
  if (st.retired.size() > max_retired)
    st.retired.pop_front();
  st.worker = nullptr;
  st.phase = bridge_worker::none;
  if (st.stopping) {
    finish_stop_if_done(self);
    return;
  }
  auto detail = decode_exit_reason(reason);
  if (is_start_failure(reason) || was == bridge_worker::starting) {
    ++st.start_failures;
    ++st.consecutive_start_failures;
    st.last_start_failure = detail.value_or(
      make_error(error_category::initialization_error, "init_failed",
                 "worker " + st.worker_id + " exited during start: " + caf::to_string(reason),
                 {{"worker_id", st.worker_id}}));
    log().warn("[{}] bridge worker failed to start: {}", st.worker_id,
               st.last_start_failure->describe());
    answer_ready_waiters(self, outcome::failure(*st.last_start_failure));
  } else {
    ++st.replaced;
    log().warn("[{}] bridge worker exited ({}); restarting", st.worker_id,
               detail ? detail->describe() : caf::to_string(reason));
  }
  schedule_start(self);
}

// Hands the oldest live caller to the worker when it is idle.
void dispatch(bridge_actor_t* self) {
  auto& st = self->state;
  if (st.stopping)
    return;
  expire_waiting(self);
  if (st.phase != bridge_worker::idle || st.queue.empty())
    return;
  auto next = std::move(st.queue.front());
  st.queue.pop_front();
  st.phase = bridge_worker::busy;
  ++st.stats.checkouts;
  st.last_activity = clock_type::now();
  // Delegation: the worker answers the caller directly, after its checkin
  // reaches us; if it lost its process meanwhile, it hands the call back.
  next.promise.delegate(st.worker, execute_atom::value, std::move(next.request));
}

caf::result<outcome> enqueue(bridge_actor_t* self, call& c, bool front) {
  auto& st = self->state;
  if (st.stopping)
    return outcome::failure(stopping_error());
  if (!front && !c.block && !(st.phase == bridge_worker::idle && st.queue.empty()))
    return outcome::failure(make_error(error_category::resource_error, "full",
                                       "the bridge's worker is busy (non-blocking call)",
                                       {{"command", c.command}}));
  if (!front && st.queue.size() >= st.config->pool.max_queue)
    return outcome::failure(make_error(error_category::resource_error, "bridge_saturated",
                                       "the wait queue is full ("
                                         + std::to_string(st.config->pool.max_queue)
                                         + " callers)",
                                       {{"command", c.command}}));
  auto rp = self->make_response_promise();
  auto deadline = c.deadline;
  if (front)
    st.queue.push_front(waiting_call{std::move(c), rp});
  else
    st.queue.push_back(waiting_call{std::move(c), rp});
  arm_queue_timer(self, deadline);
  dispatch(self);
  return rp;
}

caf::behavior bridge_actor(bridge_actor_t* self, std::shared_ptr<const settings> config) {
  auto& st = self->state;
  st.config = std::move(config);
  self->set_exit_handler([=](caf::exit_msg& msg) {
    auto& st = self->state;
    if (st.worker && msg.source == st.worker.address()) {
      on_worker_exit(self, msg.reason);
      return;
    }
    // Not our worker: an exit from a linked parent ends the bridge.
    if (msg.reason)
      self->quit(std::move(msg.reason));
  });
  start_worker(self);
  log().info("bridge: starting worker {}", st.worker_id);

  return {
    [=](execute_atom, call& c) -> caf::result<outcome> { return enqueue(self, c, false); },
    [=](retry_atom, call& c) -> caf::result<outcome> {
      // Handed back unserved by a worker that lost its process: it has
      // waited longest, so it goes first.
      return enqueue(self, c, true);
    },
    [=](worker_ready_atom, const std::string& id, int pid) {
      auto& st = self->state;
      if (!st.worker || id != st.worker_id || st.phase != bridge_worker::starting)
        return;
      st.pid = pid;
      st.phase = bridge_worker::idle;
      st.last_activity = clock_type::now();
      st.consecutive_start_failures = 0;
      st.last_start_failure.reset();
      answer_ready_waiters(self, outcome::success(nlohmann::json{{"ready", true}}));
      dispatch(self);
    },
    [=](checkin_atom, const std::string& id, checkin_status& status) {
      auto& st = self->state;
      if (!st.worker || id != st.worker_id || st.phase != bridge_worker::busy)
        return;
      if (status.what == checkin_status::kind::ok)
        ++st.stats.successful_checkins;
      else
        ++st.stats.error_checkins;
      st.phase = bridge_worker::idle;
      st.last_activity = clock_type::now();
      dispatch(self);
    },
    [=](worker_gone_atom, const std::string& id) {
      // The worker lost its process. The only call we may have handed it is
      // already answered (or comes back as a retry); `release` follows every
      // call we sent it, so it quits after them and its exit restarts it.
      auto& st = self->state;
      if (!st.worker || id != st.worker_id)
        return;
      if (st.phase != bridge_worker::stopping)
        st.phase = bridge_worker::gone;
      self->send(st.worker, release_atom::value);
    },
    [=](queue_timeout_atom) {
      self->state.queue_timer_due.reset();
      expire_waiting(self);
    },
    [=](restart_atom) {
      // The backoff is over: start now (schedule_start would wait again).
      auto& st = self->state;
      st.restart_pending = false;
      if (!st.stopping && !st.worker)
        start_worker(self);
    },
    [=](await_ready_atom) -> caf::result<outcome> {
      auto& st = self->state;
      if (st.stopping)
        return outcome::failure(stopping_error());
      if (st.phase == bridge_worker::idle || st.phase == bridge_worker::busy)
        return outcome::success(nlohmann::json{{"ready", true}});
      if (st.last_start_failure)
        return outcome::failure(*st.last_start_failure);
      auto rp = self->make_response_promise();
      st.ready_waiters.push_back(rp);
      return rp;
    },
    [=](status_atom) {
      auto& st = self->state;
      auto now = clock_type::now();
      pool_status s;
      s.size = 1;
      s.queued = st.queue.size();
      s.replaced = st.replaced;
      s.start_failures = st.start_failures;
      s.stopping = st.stopping;
      switch (st.phase) {
        case bridge_worker::none: break;
        case bridge_worker::starting: ++s.starting; break;
        case bridge_worker::idle: ++s.idle; break;
        case bridge_worker::busy: ++s.busy; break;
        case bridge_worker::gone:
        case bridge_worker::stopping: ++s.removing; break;
      }
      if (st.worker)
        s.workers.push_back(current_info(self, now));
      s.retired.assign(st.retired.begin(), st.retired.end());
      return s;
    },
    [=](stop_atom) -> caf::result<bool> {
      auto& st = self->state;
      auto rp = self->make_response_promise();
      st.stop_waiters.push_back(rp);
      if (!st.stopping) {
        st.stopping = true;
        log().info("bridge: stopping");
        for (auto& wc : st.queue)
          wc.promise.deliver(outcome::failure(stopping_error()));
        st.queue.clear();
        answer_ready_waiters(self, outcome::failure(stopping_error()));
        if (st.worker) {
          // Graceful: a call in flight fails with worker_stopping, then
          // shutdown → EOF → SIGTERM → SIGKILL, bounded by the graces. A
          // worker that lost its process quits at once.
          st.phase = bridge_worker::stopping;
          self->send(st.worker, stop_atom::value);
        }
      }
      finish_stop_if_done(self);
      return rp;
    },
  };
}

} // namespace

caf::actor spawn_bridge(caf::actor_system& sys, std::shared_ptr<const settings> config) {
  return sys.spawn(bridge_actor, std::move(config));
}

} // namespace dspex
