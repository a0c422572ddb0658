// Maintenance of idle workers: a healthy worker over one of its limits
// (max_requests, max_age, max_rss_mb) is recycled, only when idle; an idle
// worker is checked every pool.health_interval (the contract's handle_ping,
// then a ping through its process), out of the idle list while
// the ping runs, so no caller waits behind a health check; a process
// stopped by a signal is killed and replaced. A tick is armed only when a
// limit or the health interval needs one.
#include <algorithm>
#include <chrono>
#include <optional>

#include <caf/all.hpp>

#include "pool_state.hpp"
#include "dspex/proc_stats.hpp"

namespace dspex::pool_detail {

// A healthy worker over one of its limits is drained (it is only recycled
// when idle, i.e. at checkin or from the maintenance tick) and replaced.
std::optional<error> recycle_reason(pool_actor_t self, worker_entry& e,
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

void recycle(pool_actor_t self, worker_entry& e, const error& why) {
  ++self->state.recycled;
  remove_worker(self, e, why);
}

static void on_health_result(pool_actor_t self, const std::string& id, const worker_handle& handle,
                             const outcome& o);

bool contract_ping(pool_actor_t self, worker_entry& e) {
  auto& st = self->state;
  auto id = e.w.id;
  auto res = guarded(id, "handle_ping",
                     [&](std::string) {
                       return keep_or_remove::remove(callback_failed(id, "handle_ping"));
                     },
                     [&] { return st.contract->handle_ping(e.w); });
  if (res.what() != keep_or_remove::kind::remove)
    return true;
  remove_worker(self, e, res.reason());
  return false;
}

// Pings one idle (or degraded) worker. It is out of the idle list while the
// ping runs, so no caller ever waits behind a health check.
static void check_health(pool_actor_t self, worker_entry& e) {
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

static void on_health_result(pool_actor_t self, const std::string& id, const worker_handle& handle,
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

static clock_type::duration maintenance_period(const settings::pool_settings& pc) {
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

void arm_maintenance(pool_actor_t self) {
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
static void reap_stopped_processes(pool_actor_t self) {
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
void maintain(pool_actor_t self) {
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
    if (e.state == worker_state_t::degraded || now - e.last_activity >= pc.health_interval) {
      // The contract's own idle check first (no round trip: for the Python
      // workers, process alive and pipes open), then a ping through the process.
      if (e.state == worker_state_t::idle && !contract_ping(self, e))
        continue;
      check_health(self, e);
    }
  }
  dispatch(self);
}

} // namespace dspex::pool_detail
