// The pool's membership: starting workers, replacing the ones that leave,
// and the pool's health. The crash-loop guard lives here: while starts keep
// failing (or workers die before serving anyone) the next start waits, with
// backoff, one probe at a time; broken (pool.broken_after failures in a row
// and nobody serving) makes callers fail fast instead of waiting for their
// deadlines. Workers are supervised by monitor, never by link (on_exit).
#include <algorithm>
#include <chrono>

#include <caf/all.hpp>

#include "pool_state.hpp"
#include "worker_channel.hpp"

namespace dspex::pool_detail {

static std::size_t active_count(pool_actor_t self, bool overflow) {
  std::size_t n = 0;
  for (auto& [id, e] : self->state.workers)
    if (e.state != worker_state_t::removing && e.state != worker_state_t::stopping
        && e.w.overflow == overflow)
      ++n;
  return n;
}

static std::size_t starting_count(pool_actor_t self) {
  std::size_t n = 0;
  for (auto& [id, e] : self->state.workers)
    n += e.state == worker_state_t::starting ? 1 : 0;
  return n;
}

/// Workers that serve or can serve soon (not starting, not on their way out).
static std::size_t serving_count(pool_actor_t self) {
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

error pool_unavailable(pool_actor_t self, const checkout_type& type) {
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
static void update_health(pool_actor_t self) {
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

static void note_start_failure(pool_actor_t self, const std::string& worker_id, const error& why) {
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

void note_start_success(pool_actor_t self, const std::string& worker_id, int pid) {
  auto& st = self->state;
  ++st.workers_started;
  st.consecutive_start_failures = 0;
  st.last_start_failure.reset();
  auto e = make_event(event_kind::worker_ready, worker_id);
  e.fields["pid"] = pid;
  publish(self, std::move(e));
  update_health(self);
}

// -- worker lifecycle -------------------------------------------------------------------

void start_worker(pool_actor_t self, bool initial, bool overflow) {
  auto& st = self->state;
  // A named pool's workers carry its name, so its log lines and events tell them apart.
  auto id = (st.config->pool_name == "default" ? std::string{"w"} : st.config->pool_name + ".w")
            + std::to_string(st.next_worker++);
  auto& e = st.workers[id];
  e.w.id = id;
  e.w.overflow = overflow;
  if (!initial && !overflow && st.initial_heirs > 0) {
    --st.initial_heirs;
    initial = true;  // in place of an initial worker lost at start
  }
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
      worker_up(self, e);  // fill_pool's caller serves the queue with it
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
static clock_type::duration restart_delay(pool_actor_t self, std::uint32_t consecutive_failures) {
  if (consecutive_failures == 0)
    return clock_type::duration::zero();
  return self->state.restart_backoff.delay(consecutive_failures);
}

// Keeps pool.size workers (eager), or as many as callers need up to
// pool.size (lazy), plus overflow workers for callers beyond that. Returns
// true when a worker became idle at once (synchronous init_worker).
bool fill_pool(pool_actor_t self) {
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

static void retire(pool_actor_t self, const worker_entry& e) {
  auto& st = self->state;
  st.retired.push_back(info_of(e, clock_type::now()));
  if (st.retired.size() > max_retired)
    st.retired.pop_front();
}

// `remove`: the worker leaves the pool for good and a replacement starts.
void remove_worker(pool_actor_t self, worker_entry& e, const error& reason,
                   bool start_failure) {
  auto& st = self->state;
  if (e.state == worker_state_t::removing)
    return;
  log().warn("[{}] removed from the pool: {}", e.w.id, reason.describe());
  fold_direct_calls(self, e);
  end_lease(self, e);
  st.idle->forget(e.w.id);
  if (e.pending_setting) {
    e.pending_setting.reset();
    run_waiters(st.idle->resume());  // its setting call will not check in
  }
  // Its own start had not succeeded yet. (Lost while applying the pool's
  // setting, it had: that loss is a worker lost before serving anyone.)
  auto was_starting = e.state == worker_state_t::starting && !e.process_up;
  if (e.initial && e.state == worker_state_t::starting && st.initial_pending > 0
      && !st.initial_failure && !st.stopping)
    ++st.initial_heirs;  // its replacement is awaited instead (or the failure answers)
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
    // By the error's type: a bounded set, the runtime's own words.
    ++st.removed_by_reason[reason.type.empty() ? std::string{"unknown"} : reason.type];
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

void worker_up(pool_actor_t self, worker_entry& e) {
  auto& st = self->state;
  e.process_up = true;
  // Its lane goes back to this pool's idle list after each direct call.
  if (auto channel = channel_of(self, e))
    channel->set_board(st.idle);
  if (e.setting_generation < st.setting_generation && !st.stopping) {
    start_setting(self, e, true);  // started once it has the pool's setting
    return;
  }
  worker_started(self, e);
}

void worker_started(pool_actor_t self, worker_entry& e) {
  auto& st = self->state;
  note_start_success(self, e.w.id, e.w.pid);
  if (e.initial && st.initial_pending > 0 && --st.initial_pending == 0)
    answer_ready_waiters(self);
  if (!st.stopping)
    make_idle(self, e);
}

void answer_ready_waiters(pool_actor_t self) {
  auto& st = self->state;
  auto result = st.initial_failure ? outcome::failure(*st.initial_failure)
                                   : outcome::success(nlohmann::json{{"ready", true}});
  for (auto& rp : st.ready_waiters)
    rp.deliver(result);
  st.ready_waiters.clear();
}

// Workers are supervised by monitor: the pool unlinks each worker right after
// init_worker spawned it and monitors it. A link would let a worker killed
// with exit_reason::kill take the pool down (CAF 0.17 never lets a linked
// actor trap kill). When the pool terminates, for whatever reason, it kills
// the workers still alive (attach_functor in pool_actor), so none outlives it.
// A worker that died before the unlink may report twice (exit_msg through
// the link, then down_msg): the first one is handled, the second finds no
// entry and is ignored.
static bool is_former_worker(pool_actor_t self, const caf::actor_addr& addr) {
  auto& f = self->state.former_workers;
  return std::find(f.begin(), f.end(), addr) != f.end();
}

void on_exit(pool_actor_t self, caf::exit_msg& msg) {
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

void on_worker_down(pool_actor_t self, const caf::actor_addr& source, caf::error reason) {
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

} // namespace dspex::pool_detail
