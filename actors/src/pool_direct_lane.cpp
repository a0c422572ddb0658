// The pool's side of the direct lane (issue 11): idle workers wait in
// idle_workers, where callers may take them without the pool actor. The
// pool stays the authority: a worker enters that list only through
// make_idle (configured, within its recycling budget, never an overflow
// one), the lane yields while callers wait in the pool's queue, and the
// calls served directly are folded into the pool's statistics (Fix 6).
#include <chrono>

#include <caf/all.hpp>

#include "pool_state.hpp"
#include "worker_channel.hpp"

namespace dspex::pool_detail {

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

/// The worker's lane for direct calls, bound to this pool, or null (the
/// contract offers none, or the worker is an overflow one: those must come
/// back to the pool at every checkin to be retired when idle).
std::shared_ptr<detail::worker_channel> channel_of(pool_actor_t self, worker_entry& e) {
  return guarded(e.w.id, "direct_channel",
                 [](std::string) { return std::shared_ptr<detail::worker_channel>{}; },
                 [&] { return self->state.contract->direct_channel(e.w); });
}

static std::shared_ptr<detail::worker_channel> direct_channel_of(pool_actor_t self,
                                                                 worker_entry& e) {
  if (e.w.overflow || self->state.stopping)
    return nullptr;
  return channel_of(self, e);
}

/// Folds the calls a worker served directly into its statistics (Fix 6:
/// the pool's record stays the one place they are read from).
void fold_direct_calls(pool_actor_t self, worker_entry& e) {
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
void sync_waiting(pool_actor_t self) {
  self->state.idle->set_pool_waiting(!self->state.queue.empty());
}

void make_idle(pool_actor_t self, worker_entry& e) {
  auto& st = self->state;
  if (e.setting_generation < st.setting_generation && !st.stopping) {
    start_setting(self, e);  // it serves nobody with a stale setting
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

} // namespace dspex::pool_detail
