// The pool's status: what pool_status shows, computed from the live state
// at each status_atom. A worker out on a direct call is idle in the pool's
// books but shown busy, and the calls it served directly are folded in
// first, so the counts an operator reads are those of both lanes.
#include <chrono>

#include <caf/all.hpp>

#include "pool_state.hpp"
#include "dspex/pool_metrics.hpp"

namespace dspex::pool_detail {

worker_info info_of(const worker_entry& e, clock_type::time_point now) {
  using secs = std::chrono::duration<double>;
  worker_info info{e.w.id, e.w.pid, to_string(e.state), secs(now - e.started_at).count(),
                   e.w.stats};
  info.stats.last_activity_s = secs(now - e.last_activity).count();
  return info;
}

pool_status make_status(pool_actor_t self) {
  auto& st = self->state;
  auto now = clock_type::now();
  pool_status s;
  s.pool = st.config->pool_name;
  s.size = st.config->pool.size;
  s.queued = st.queue.size() + st.idle->waiting();
  s.replaced = st.replaced;
  s.workers_started = st.workers_started;
  s.removed_by_reason = st.removed_by_reason;
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

} // namespace dspex::pool_detail
