#include "dspex/actors/pool_actor.hpp"

#include <algorithm>
#include <chrono>
#include <deque>
#include <map>
#include <optional>

#include <caf/all.hpp>

#include "dspex/actors/messages.hpp"
#include "dspex/actors/worker_actor.hpp"
#include "dspex/logging.hpp"

namespace dspex {

namespace {

using clock_type = std::chrono::steady_clock;

enum class worker_state_t { starting, idle, busy, removing, stopping };

const char* to_string(worker_state_t s) {
  switch (s) {
    case worker_state_t::starting: return "starting";
    case worker_state_t::idle: return "idle";
    case worker_state_t::busy: return "busy";
    case worker_state_t::removing: return "removing";
    case worker_state_t::stopping: return "stopping";
  }
  return "unknown";
}

struct worker_entry {
  std::string id;
  caf::actor handle;
  int pid = 0;
  worker_state_t state = worker_state_t::starting;
  clock_type::time_point started_at = clock_type::now();
  clock_type::time_point last_activity = clock_type::now();
  worker_stats stats;
  bool initial = false;  ///< one of the workers started with the pool
};

struct queued_call {
  call request;
  caf::response_promise promise;
};

constexpr std::size_t max_retired = 64;

struct pool_state {
  std::shared_ptr<const settings> config;
  std::map<std::string, worker_entry> workers;
  std::deque<std::string> idle;            ///< idle worker ids, oldest first
  std::map<std::uint64_t, queued_call> queue;  ///< by ticket: FIFO order
  // New callers get increasing tickets, handed-back calls decreasing ones
  // below all of them: a retried caller goes first, it has waited longest.
  std::uint64_t next_ticket = std::uint64_t{1} << 40;
  std::uint64_t next_retry_ticket = (std::uint64_t{1} << 40) - 1;
  std::optional<clock_type::time_point> queue_timer_due;
  std::uint64_t next_worker = 1;
  std::uint64_t replaced = 0;
  std::uint64_t start_failures = 0;
  std::uint32_t consecutive_start_failures = 0;
  bool restart_pending = false;
  std::size_t initial_pending = 0;         ///< initial workers not yet ready
  std::optional<error> initial_failure;
  std::vector<caf::response_promise> ready_waiters;
  bool stopping = false;
  std::vector<caf::response_promise> stop_waiters;
  std::deque<worker_info> retired;

  static inline const char* name = "dspex.pool";
};

using pool_actor_t = caf::stateful_actor<pool_state>;

worker_info info_of(const worker_entry& w, clock_type::time_point now) {
  using secs = std::chrono::duration<double>;
  worker_info info{w.id, w.pid, to_string(w.state),
                   secs(now - w.started_at).count(), w.stats};
  info.stats.last_activity_s = secs(now - w.last_activity).count();
  return info;
}

// Seed Fix 6: the one place worker statistics change at checkin.
void update_worker_stats(worker_entry& w, checkin_status status) {
  if (status == checkin_status::ok)
    ++w.stats.successful_checkins;
  else
    ++w.stats.error_checkins;
  w.last_activity = clock_type::now();
}

void start_worker(pool_actor_t* self, bool initial) {
  auto& st = self->state;
  auto id = "w" + std::to_string(st.next_worker++);
  worker_entry entry;
  entry.id = id;
  entry.initial = initial;
  entry.handle = spawn_linked_worker(self, worker_config{id, st.config, self});
  st.workers.emplace(id, std::move(entry));
}

void answer_ready_waiters(pool_actor_t* self) {
  auto& st = self->state;
  auto result = st.initial_failure ? outcome::failure(*st.initial_failure)
                                   : outcome::success(nlohmann::json{{"ready", true}});
  for (auto& rp : st.ready_waiters)
    rp.deliver(result);
  st.ready_waiters.clear();
}

outcome queue_timeout(const call& c) {
  return outcome::failure(make_error(error_category::timeout_error, "checkout_timeout",
                                     "no worker became free before the deadline",
                                     {{"command", c.command}}));
}

void arm_queue_timer(pool_actor_t* self, clock_type::time_point due) {
  auto& st = self->state;
  if (st.queue_timer_due && *st.queue_timer_due <= due)
    return;
  st.queue_timer_due = due;
  auto delay = std::max(due - clock_type::now(), clock_type::duration::zero());
  self->delayed_send(self, delay, queue_timeout_atom::value);
}

void hand_over(worker_entry& w, queued_call qc) {
  w.state = worker_state_t::busy;
  ++w.stats.checkouts;
  w.last_activity = clock_type::now();
  qc.promise.delegate(w.handle, execute_atom::value, std::move(qc.request));
}

// Matches queued callers with idle workers, oldest caller first. An expired
// caller is answered here and never handed a worker.
void dispatch(pool_actor_t* self) {
  auto& st = self->state;
  auto now = clock_type::now();
  while (!st.queue.empty() && !st.idle.empty()) {
    auto node = st.queue.extract(st.queue.begin());
    auto& qc = node.mapped();
    if (qc.request.deadline <= now) {
      qc.promise.deliver(queue_timeout(qc.request));
      continue;
    }
    auto id = std::move(st.idle.front());
    st.idle.pop_front();
    hand_over(st.workers.at(id), std::move(qc));
  }
}

void mark_idle(pool_actor_t* self, worker_entry& w) {
  w.state = worker_state_t::idle;
  self->state.idle.push_back(w.id);
  dispatch(self);
}

void retire(pool_actor_t* self, const worker_entry& w) {
  auto& st = self->state;
  st.retired.push_back(info_of(w, clock_type::now()));
  if (st.retired.size() > max_retired)
    st.retired.pop_front();
}

// Backoff while starts keep failing: 100 ms doubling to 5 s, so a broken
// interpreter costs a bounded number of spawns instead of a busy loop.
clock_type::duration restart_delay(std::uint32_t consecutive_failures) {
  if (consecutive_failures == 0)
    return clock_type::duration::zero();
  auto shift = std::min<std::uint32_t>(consecutive_failures - 1, 6);
  return std::min<clock_type::duration>(std::chrono::milliseconds{100} * (1u << shift),
                                        std::chrono::seconds{5});
}

void fill_pool(pool_actor_t* self) {
  auto& st = self->state;
  if (st.stopping || st.restart_pending)
    return;
  auto missing = st.config->pool.size > st.workers.size() ? st.config->pool.size - st.workers.size()
                                                          : 0;
  if (missing == 0)
    return;
  auto delay = restart_delay(st.consecutive_start_failures);
  if (delay == clock_type::duration::zero()) {
    for (std::size_t i = 0; i < missing; ++i)
      start_worker(self, false);
    return;
  }
  st.restart_pending = true;
  self->delayed_send(self, delay, restart_atom::value);
}

void finish_stop_if_done(pool_actor_t* self) {
  auto& st = self->state;
  if (!st.stopping || !st.workers.empty())
    return;
  for (auto& rp : st.stop_waiters)
    rp.deliver(true);
  st.stop_waiters.clear();
  log().info("pool stopped");
  self->quit();
}

void on_worker_exit(pool_actor_t* self, caf::exit_msg& msg) {
  auto& st = self->state;
  auto it = std::find_if(st.workers.begin(), st.workers.end(), [&](auto& kv) {
    return kv.second.handle.address() == msg.source;
  });
  if (it == st.workers.end()) {
    // Not one of ours: an exit from a linked parent ends the pool, as in OTP.
    if (msg.reason)
      self->quit(std::move(msg.reason));
    return;
  }
  auto w = std::move(it->second);
  st.workers.erase(it);
  st.idle.erase(std::remove(st.idle.begin(), st.idle.end(), w.id), st.idle.end());
  if (st.stopping) {
    finish_stop_if_done(self);
    return;
  }
  auto detail = decode_exit_reason(msg.reason);
  if (is_start_failure(msg.reason)) {
    ++st.start_failures;
    ++st.consecutive_start_failures;
    if (w.initial && !st.initial_failure && st.initial_pending > 0) {
      st.initial_failure = detail;
      answer_ready_waiters(self);
    }
  } else {
    ++st.replaced;
    retire(self, w);
  }
  log().info("pool: worker {} removed ({}); starting a replacement", w.id,
             detail ? detail->describe() : to_string(msg.reason));
  fill_pool(self);
}

pool_status make_status(pool_actor_t* self) {
  auto& st = self->state;
  auto now = clock_type::now();
  pool_status s;
  s.size = st.config->pool.size;
  s.queued = st.queue.size();
  s.replaced = st.replaced;
  s.start_failures = st.start_failures;
  s.stopping = st.stopping;
  for (auto& [id, w] : st.workers) {
    switch (w.state) {
      case worker_state_t::starting: ++s.starting; break;
      case worker_state_t::idle: ++s.idle; break;
      case worker_state_t::busy: ++s.busy; break;
      case worker_state_t::removing:
      case worker_state_t::stopping: break;
    }
    s.workers.push_back(info_of(w, now));
  }
  s.retired.assign(st.retired.begin(), st.retired.end());
  return s;
}

caf::behavior pool_actor(pool_actor_t* self, std::shared_ptr<const settings> config) {
  auto& st = self->state;
  st.config = std::move(config);
  self->set_exit_handler([=](caf::exit_msg& msg) { on_worker_exit(self, msg); });
  // All initial workers start at once: each spawns its own child, so their
  // Python start-ups overlap instead of adding up.
  st.initial_pending = st.config->pool.size;
  for (std::size_t i = 0; i < st.config->pool.size; ++i)
    start_worker(self, true);
  log().info("pool: starting {} workers", st.config->pool.size);

  return {
    [=](execute_atom, call& c) -> caf::result<outcome> {
      auto& st = self->state;
      if (st.stopping)
        return outcome::failure(make_error(error_category::resource_error, "pool_stopping",
                                           "the pool is stopping", {{"command", c.command}}));
      auto rp = self->make_response_promise();
      if (st.queue.empty() && !st.idle.empty()) {
        auto id = std::move(st.idle.front());
        st.idle.pop_front();
        hand_over(st.workers.at(id), queued_call{std::move(c), rp});
        return rp;
      }
      auto due = c.deadline;
      st.queue.emplace(st.next_ticket++, queued_call{std::move(c), rp});
      arm_queue_timer(self, due);
      return rp;
    },
    [=](retry_atom, call& c) -> caf::result<outcome> {
      auto& st = self->state;
      if (st.stopping)
        return outcome::failure(make_error(error_category::resource_error, "pool_stopping",
                                           "the pool is stopping", {{"command", c.command}}));
      auto due = c.deadline;
      auto rp = self->make_response_promise();
      st.queue.emplace(st.next_retry_ticket--, queued_call{std::move(c), rp});
      arm_queue_timer(self, due);
      dispatch(self);
      return rp;
    },
    [=](worker_gone_atom, const std::string& id) {
      // The worker lost its process: hand it nothing more, then release it.
      auto& st = self->state;
      auto it = st.workers.find(id);
      if (it == st.workers.end())
        return;
      if (it->second.state != worker_state_t::stopping)
        it->second.state = worker_state_t::removing;
      st.idle.erase(std::remove(st.idle.begin(), st.idle.end(), id), st.idle.end());
      self->send(it->second.handle, release_atom::value);
    },
    [=](worker_ready_atom, const std::string& id, int pid) {
      auto& st = self->state;
      auto it = st.workers.find(id);
      if (it == st.workers.end())
        return;
      auto& w = it->second;
      w.pid = pid;
      st.consecutive_start_failures = 0;
      if (w.initial && st.initial_pending > 0 && --st.initial_pending == 0)
        answer_ready_waiters(self);
      if (st.stopping)
        return;
      mark_idle(self, w);
    },
    [=](checkin_atom, const std::string& id, checkin_status status) {
      auto& st = self->state;
      auto it = st.workers.find(id);
      if (it == st.workers.end() || it->second.state != worker_state_t::busy)
        return;
      update_worker_stats(it->second, status);
      if (st.stopping)
        return;
      mark_idle(self, it->second);
    },
    [=](queue_timeout_atom) {
      auto& st = self->state;
      st.queue_timer_due.reset();
      auto now = clock_type::now();
      std::optional<clock_type::time_point> next;
      for (auto it = st.queue.begin(); it != st.queue.end();) {
        if (it->second.request.deadline <= now) {
          it->second.promise.deliver(queue_timeout(it->second.request));
          it = st.queue.erase(it);
        } else {
          if (!next || it->second.request.deadline < *next)
            next = it->second.request.deadline;
          ++it;
        }
      }
      if (next)
        arm_queue_timer(self, *next);
    },
    [=](restart_atom) {
      self->state.restart_pending = false;
      fill_pool(self);
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
      if (!st.stopping) {
        st.stopping = true;
        log().info("pool: stopping {} workers", st.workers.size());
        for (auto& [ticket, qc] : st.queue)
          qc.promise.deliver(outcome::failure(make_error(
            error_category::resource_error, "pool_stopping", "the pool is stopping",
            {{"command", qc.request.command}})));
        st.queue.clear();
        if (!st.initial_failure && st.initial_pending > 0) {
          st.initial_failure = make_error(error_category::resource_error, "pool_stopping",
                                          "the pool stopped before it was ready");
          answer_ready_waiters(self);
        }
        st.idle.clear();
        for (auto& [id, w] : st.workers) {
          w.state = worker_state_t::stopping;
          self->send(w.handle, stop_atom::value);
        }
      }
      finish_stop_if_done(self);
      return rp;
    },
  };
}

} // namespace

caf::actor spawn_pool(caf::actor_system& sys, std::shared_ptr<const settings> config) {
  return sys.spawn(pool_actor, std::move(config));
}

} // namespace dspex
