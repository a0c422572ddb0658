// One setting per pool (worker_contract::pool_setting_command; the Python
// workers': configure_lm, the pool's LM): the contract's initial one (the
// configured LM) or a call of it that succeeded on a worker (adopt_setting)
// is the pool's, and every worker, new or not, applies it (start_setting)
// before it serves again, so no caller is served with a stale setting. A
// worker that refuses it is removed; at its start, that is a start failure.
#include <chrono>

#include <caf/all.hpp>

#include "pool_state.hpp"
#include "dspex/secrets.hpp"

namespace dspex::pool_detail {

void start_setting(pool_actor_t self, worker_entry& e, bool at_start) {
  auto& st = self->state;
  // At start the worker stays `starting` (it serves nobody yet; process_up
  // says its own start succeeded).
  auto expected = at_start ? worker_state_t::starting : worker_state_t::configuring;
  e.state = expected;
  auto id = e.w.id;
  auto handle = e.w.handle;
  auto generation = st.setting_generation;
  auto timeout = st.config->pool.init_timeout;
  call c{st.setting_command, st.setting_args, clock_type::now() + timeout};
  self->request(handle, caf::duration{timeout + std::chrono::seconds{2}}, execute_atom::value,
                std::move(c))
    .then(
      [=](outcome& o) {
        auto& st = self->state;
        auto it = st.workers.find(id);
        if (st.stopping || it == st.workers.end() || it->second.w.handle != handle
            || it->second.state != expected)
          return;
        auto& e = it->second;
        if (o.ok()) {
          e.setting_generation = generation;
          if (at_start)
            worker_started(self, e);  // or configured again first, if a newer setting came
          else
            make_idle(self, e);       // likewise
          dispatch(self);
          return;
        }
        // A refusal is the worker's answer (python_error): at start, a
        // start failure. Anything else (its process lost, killed from
        // outside, a timeout) is the worker's own loss, removed with its own
        // error: a worker lost before serving anyone (remove_worker).
        if (o.error().category != error_category::python_error) {
          remove_worker(self, e, o.error());
          dispatch(self);
          return;
        }
        auto err = make_error(error_category::initialization_error, "setting_failed",
                              "worker " + id + " refused the pool's setting ("
                                + st.setting_command + "): " + o.error().message,
                              {{"worker_id", id}});
        if (at_start && e.initial && !st.initial_failure && st.initial_pending > 0) {
          st.initial_failure = err;
          answer_ready_waiters(self);
        }
        remove_worker(self, e, err, at_start);
        dispatch(self);
      },
      [=](caf::error&) {
        // The worker is gone: its down_msg does the rest.
      });
}

// A caller's configure_lm succeeded on worker `e`: it is the pool's now.
void adopt_setting(pool_actor_t self, worker_entry& e, nlohmann::json args) {
  auto& st = self->state;
  args.erase("session_id");
  st.setting_args = std::move(args);
  e.setting_generation = ++st.setting_generation;
  log().info("pool: {} {} adopted from {}; every worker applies it before it serves",
             st.setting_command, redacted(st.setting_args).dump(), e.w.id);
  // Workers out on a direct call come back here when answered, and are
  // configured then (make_idle).
  st.idle->recall_all();
  for (auto& id : st.idle->ids()) {
    auto it = st.workers.find(id);
    if (it != st.workers.end() && it->second.state == worker_state_t::idle
        && st.idle->take(id)) {
      fold_direct_calls(self, it->second);
      start_setting(self, it->second);
    }
  }
}

} // namespace dspex::pool_detail
