// The pool actor's behavior: its message handlers, stop, and spawn_pool.
// Each concept of the pool has its own file beside this one, and
// pool_state.hpp says what each offers the others: the queue, checkout and
// checkin (pool_queue), leases (pool_leases), membership and the crash-loop
// guard (pool_membership), recycling and health pings (pool_maintenance),
// the pool's setting, the LM (pool_setting), the direct lane (pool_direct_lane) and
// the status (pool_status). A handler that is a rule of its own (a lease's
// checkin, cancel, retire, ping_idle) stays here with its message.
#include "dspex/actors/pool_actor.hpp"

#include <chrono>
#include <random>

#include <caf/all.hpp>

#include "pool_state.hpp"
#include "dspex/actors/messages.hpp"
#include "deadline_timer.hpp"
#include "idle_workers.hpp"
#include "worker_channel.hpp"
#include "dspex/actors/python_worker_contract.hpp"
#include "dspex/backoff.hpp"
#include "dspex/logging.hpp"
#include "dspex/pool_metrics.hpp"

namespace dspex {

namespace pool_detail {

static error pool_stopping_error(const checkout_type& t) {
  return make_error(error_category::resource_error, "pool_stopping", "the pool is stopping",
                    caller_context(t));
}

error callback_failed(const std::string& worker_id, const char* callback) {
  return make_error(error_category::system_error, "callback_failed",
                    std::string{callback} + " threw", {{"worker_id", worker_id}});
}

// -- events ---------------------------------------------------------------------------------

void publish(pool_actor_t self, event e) {
  if (e.source.empty())
    e.source = "pool";
  self->state.events->publish(e);
}

event make_event(event_kind kind, std::string worker_id, std::string reason) {
  event e;
  e.kind = kind;
  e.worker_id = std::move(worker_id);
  e.reason = std::move(reason);
  return e;
}

// -- stop ---------------------------------------------------------------------------------

// Stop: queued callers fail with pool_stopping, every worker is stopped
// (shutdown → EOF → TERM → KILL); the pool quits once all are reaped.
void begin_stop(pool_actor_t self) {
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

void finish_stop_if_done(pool_actor_t self) {
  auto& st = self->state;
  if (!st.stopping || !st.workers.empty())
    return;
  for (auto& rp : st.stop_waiters)
    rp.deliver(true);
  st.stop_waiters.clear();
  log().info("pool stopped");
  self->quit(st.exit_after_stop);
}

static pool_actor_type::behavior_type pool_actor(pool_actor_t self, std::shared_ptr<const settings> config,
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
  st.setting_command = st.contract->pool_setting_command();
  if (auto initial = st.contract->initial_pool_setting();
      !st.setting_command.empty() && initial.is_object()) {
    st.setting_args = std::move(initial);
    st.setting_generation = 1;  // workers start at 0: each applies it before it serves
  }
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
      if (self->current_sender() == self->ctrl())
        // The pool's own setting call (start_setting) belongs to its worker
        // alone: served elsewhere it would pass for a caller's and become
        // the pool's setting again. The worker's loss already reached us.
        return outcome::failure(make_error(error_category::communication_error,
                                           "worker_exited",
                                           "the worker was lost before it took the pool's "
                                           "setting"));
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
      worker_up(self, e);
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
      // The maintenance tick's contract check, at once, on every idle worker.
      auto& st = self->state;
      std::size_t removed = 0;
      for (auto& id : st.idle->ids()) {
        auto it = st.workers.find(id);
        if (it != st.workers.end() && it->second.state == worker_state_t::idle
            && !contract_ping(self, it->second))
          ++removed;
      }
      dispatch(self);
      return removed;
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

} // namespace pool_detail

pool_handle spawn_pool(caf::actor_system& sys, std::shared_ptr<const settings> config,
                      std::shared_ptr<worker_contract> contract,
                      std::shared_ptr<event_bus> events, std::shared_ptr<pool_metrics> metrics,
                      std::shared_ptr<detail::idle_workers> idle) {
  return sys.spawn(pool_detail::pool_actor, std::move(config), std::move(contract),
                   std::move(events), std::move(metrics), std::move(idle));
}

pool_handle spawn_linked_pool(caf::event_based_actor* parent,
                             std::shared_ptr<const settings> config,
                             std::shared_ptr<worker_contract> contract,
                             std::shared_ptr<event_bus> events,
                             std::shared_ptr<pool_metrics> metrics,
                             std::shared_ptr<detail::idle_workers> idle) {
  return parent->spawn<caf::linked>(pool_detail::pool_actor, std::move(config), std::move(contract),
                                    std::move(events), std::move(metrics), std::move(idle));
}

} // namespace dspex
