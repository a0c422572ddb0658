// Leases: a checkout that hands a caller a worker for several requests. A
// lease id is a capability (whoever names it is served), so it is drawn
// from the kernel's CSPRNG; the holder is monitored, and when it goes away
// its leases are revoked: the worker comes back when nothing is in flight,
// and is replaced otherwise. Checkin and cancel are in pool_actor.cpp.
#include <sys/random.h>

#include <map>
#include <random>

#include <caf/all.hpp>

#include "pool_state.hpp"

namespace dspex::pool_detail {

// A lease id is a capability: the worker serves whoever names it. So it
// comes from the kernel's CSPRNG (not from a seeded mt19937_64, whose next
// values follow from a few observed ones), is never 0, and is never reused
// while a lease is open. Checkin also checks the sender (see checkin_atom).
std::uint64_t new_lease_id(const std::map<std::uint64_t, lease_record>& open) {
  for (;;) {
    std::uint64_t id = 0;
    auto got = ::getrandom(&id, sizeof id, 0);
    if (got != static_cast<ssize_t>(sizeof id)) {
      // getrandom cannot fail for 8 bytes once the pool is initialised;
      // if it does, random_device reads the same kernel source.
      std::random_device rd;
      id = (std::uint64_t{rd()} << 32) ^ rd();
    }
    if (id != 0 && open.count(id) == 0)
      return id;
  }
}

void end_lease(pool_actor_t self, worker_entry& e) {
  auto& st = self->state;
  if (e.lease == 0)
    return;
  auto it = st.leases.find(e.lease);
  if (it != st.leases.end()) {
    unwatch_caller(self, it->second.holder);
    st.leases.erase(it);
  }
  e.lease = 0;
}

// A caller went away: its queued checkouts are dropped, its leases revoked.
void on_caller_down(pool_actor_t self, caf::down_msg& msg) {
  auto& st = self->state;
  if (st.monitored.erase(msg.source) == 0) {
    on_worker_down(self, msg.source, std::move(msg.reason));
    return;
  }
  for (auto it = st.queue.begin(); it != st.queue.end();)
    it = it->second.caller == msg.source ? st.queue.erase(it) : std::next(it);
  sync_waiting(self);
  std::vector<std::uint64_t> revoked;
  for (auto& [lease, rec] : st.leases)
    if (rec.holder == msg.source)
      revoked.push_back(lease);
  for (auto lease : revoked) {
    auto rec = st.leases.at(lease);
    st.leases.erase(lease);
    auto wit = st.workers.find(rec.worker_id);
    if (wit == st.workers.end())
      continue;
    wit->second.lease = 0;
    // Back to the pool only when in sync (nothing in flight); else replaced.
    self->request(wit->second.w.handle, caf::infinite, revoke_atom::value, lease)
      .then(
        [=](bool in_sync) {
          auto w2 = self->state.workers.find(rec.worker_id);
          if (w2 == self->state.workers.end() || w2->second.state != worker_state_t::leased)
            return;
          if (in_sync) {
            // Nothing in flight: the worker is fine and goes back as it is.
            w2->second.w.current_session.reset();
            make_idle(self, w2->second);
          } else
            remove_worker(self, w2->second,
                          make_error(error_category::communication_error, "lease_revoked",
                                     "lease holder died with a request in flight",
                                     {{"worker_id", rec.worker_id}}));
          dispatch(self);
        },
        [=](caf::error&) {
          // The worker is gone: its exit does the rest.
        });
  }
}

} // namespace dspex::pool_detail
