// Callers waiting for a worker, checkout and checkin. Waiting callers are
// served oldest first (handed-back calls before all of them), an expired
// caller is answered and never handed a worker, and a queued caller is
// monitored so its death drops it. The pool never gives a worker to a
// caller: it delegates the caller's request to the worker, or grants a
// lease. Session affinity (affinity_mode) decides which idle worker a
// session's call may take.
#include <chrono>
#include <optional>

#include <caf/all.hpp>

#include "pool_state.hpp"
#include "dspex/pool_metrics.hpp"

namespace dspex::pool_detail {

void watch_caller(pool_actor_t self, const caf::actor_addr& caller) {
  if (!caller)
    return;
  if (self->state.monitored[caller]++ == 0)
    self->monitor(caller);
}

void unwatch_caller(pool_actor_t self, const caf::actor_addr& caller) {
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

void arm_queue_timer(pool_actor_t self, clock_type::time_point due) {
  self->state.queue_timer.arm(self, due, queue_timeout_atom::value);
}

// Seed Fix 6: the one place worker statistics change at checkin.
static void update_worker_stats(worker_entry& e, const checkin_status& status) {
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

// A checkout ended (pool-mediated call, lease checkin, cancel, revoke).
void finish_checkin(pool_actor_t self, worker_entry& e, const checkin_status& status) {
  auto& st = self->state;
  update_worker_stats(e, status);
  if (e.running_since) {
    st.metrics->worker_ran(clock_type::now() - *e.running_since);
    e.running_since.reset();
  }
  if (e.pending_setting) {
    // The worker checks in before its caller sees the reply: the next call
    // of that caller already finds the pool on the new configuration.
    if (status.what == checkin_status::kind::ok && !st.stopping)
      adopt_setting(self, e, std::move(*e.pending_setting));
    e.pending_setting.reset();
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

static std::optional<std::string> take_idle(pool_actor_t self) {
  auto& st = self->state;
  auto id = st.idle->take_any();
  if (id)
    fold_direct_calls(self, st.workers.at(*id));
  return id;
}

// -- session affinity (see affinity_mode in checkout.hpp) ----------------------------------

namespace {
enum class preferred_is { none, idle, occupied, gone };
} // namespace

/// The state of the worker a session's call prefers.
static preferred_is preferred_state(pool_actor_t self, const waiter& wt) {
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
static std::optional<std::string> take_idle_for(pool_actor_t self, const waiter& wt) {
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

static void count_affinity(pool_actor_t self, const worker_entry& e, const waiter& wt) {
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

static void hand_over(pool_actor_t self, worker_entry& e, waiter& wt, const caf::actor& client) {
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
    if (!st.setting_command.empty() && wt.request->command == st.setting_command
        && wt.type.what() != checkout_type::kind::session) {
      e.pending_setting = wt.request->args;
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
static bool offer(pool_actor_t self, const std::string& id, waiter& wt) {
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
static void match_waiters(pool_actor_t self, clock_type::time_point now) {
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
void dispatch(pool_actor_t self) {
  auto& st = self->state;
  if (st.stopping)
    return;
  auto now = clock_type::now();
  do {
    match_waiters(self, now);
  } while (fill_pool(self) && !st.queue.empty());
  sync_waiting(self);
}

static error full_error(const checkout_type& t) {
  return make_error(error_category::resource_error, "full", "no idle worker (non-blocking checkout)",
                    caller_context(t));
}

// Entry of every checkout: serve now, or queue with the caller's deadline.
caf::response_promise enqueue(pool_actor_t self, waiter wt, bool block) {
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
  // pool.max_queue bounds every caller waiting for a worker: those in the
  // direct lane's line too (a caller the full line refused comes here).
  if (st.queue.size() + st.idle->waiting() >= st.config->pool.max_queue) {
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

// The waiter of a pool-mediated call from the current sender.
waiter waiter_for(pool_actor_t self, call c) {
  waiter wt;
  wt.type = c.type;
  wt.deadline = c.deadline;
  wt.caller = caf::actor_cast<caf::actor_addr>(self->current_sender());
  wt.promise = self->make_response_promise();
  wt.request = std::move(c);
  return wt;
}

} // namespace dspex::pool_detail
