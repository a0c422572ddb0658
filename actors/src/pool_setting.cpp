// One setting per pool (worker_contract::pool_setting_command; the Python
// workers': configure_lm, the pool's LM): a call of it that succeeded on a
// worker becomes the pool's (adopt_setting), and every other worker, and
// every replacement, applies it (start_setting) before it serves again, so
// no caller is served with a stale setting. A worker that refuses it is
// removed.
#include <chrono>

#include <caf/all.hpp>

#include "pool_state.hpp"
#include "dspex/secrets.hpp"

namespace dspex::pool_detail {

void start_setting(pool_actor_t* self, worker_entry& e) {
  auto& st = self->state;
  e.state = worker_state_t::configuring;
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
            || it->second.state != worker_state_t::configuring)
          return;
        if (o.ok()) {
          it->second.setting_generation = generation;
          make_idle(self, it->second);  // or again, if a newer configuration came meanwhile
        } else {
          auto err = o.error();
          remove_worker(self, it->second,
                        make_error(error_category::initialization_error,
                                   "setting_failed",
                                   "worker " + id + " refused the pool's setting ("
                                     + st.setting_command + "): " + err.message,
                                   {{"worker_id", id}}));
        }
        dispatch(self);
      },
      [=](caf::error&) {
        // The worker is gone: its down_msg does the rest.
      });
}

// A caller's configure_lm succeeded on worker `e`: it is the pool's now.
void adopt_setting(pool_actor_t* self, worker_entry& e, nlohmann::json args) {
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
