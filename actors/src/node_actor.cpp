// node_actor: see node_actor.hpp.
#include "node_actor.hpp"

#include <map>
#include <memory>
#include <mutex>
#include <set>

#include <caf/all.hpp>

#include "dspex/logging.hpp"

namespace dspex {

namespace {

// The calls in flight by the caller that sent them (its router, through
// its proxy here), each with the flag that abandons it. Written by the node
// actor (a call comes in, a caller is lost) and by the threads that answer
// calls (a call ends).
class calls_by_caller {
public:
  using flag = std::shared_ptr<std::atomic<bool>>;

  void add(const caf::actor_addr& caller, const flag& f) {
    std::lock_guard<std::mutex> guard{mtx_};
    calls_[caller].insert(f);
  }
  void remove(const caf::actor_addr& caller, const flag& f) {
    std::lock_guard<std::mutex> guard{mtx_};
    auto it = calls_.find(caller);
    if (it == calls_.end())
      return;
    it->second.erase(f);
    if (it->second.empty())
      calls_.erase(it);
  }
  /// Abandons every call of `caller` still in flight.
  /// @returns how many
  std::size_t abandon(const caf::actor_addr& caller) {
    std::set<flag> lost;
    {
      std::lock_guard<std::mutex> guard{mtx_};
      auto it = calls_.find(caller);
      if (it == calls_.end())
        return 0;
      lost = std::move(it->second);
      calls_.erase(it);
    }
    for (const auto& f : lost)
      f->store(true, std::memory_order_release);
    return lost.size();
  }

private:
  std::mutex mtx_;
  std::map<caf::actor_addr, std::set<flag>> calls_;
};

struct node_state {
  static inline const char* name = "dspex.node";
  std::shared_ptr<const node_services> services;
  std::shared_ptr<calls_by_caller> in_flight = std::make_shared<calls_by_caller>();
  std::set<caf::actor_addr> watched;  // the callers this actor monitors
};

// The load of one pool from its status; a restarting pool serves nobody.
node_pool_load load_of(const pool_status& st) {
  node_pool_load l;
  l.size = st.size;
  l.idle = st.idle;
  l.busy = st.busy;
  l.queued = st.queued;
  l.health = st.health;
  return l;
}

// Collects the load of every pool, then answers `rp` once.
struct load_collector {
  caf::typed_response_promise<std::string> rp;
  node_load load;
  std::size_t waiting = 0;

  void done_one() {
    if (--waiting == 0)
      rp.deliver(encode_node_load(load));
  }
};

} // namespace

node_handle spawn_node_actor(caf::actor_system& sys, node_services services) {
  auto shared = std::make_shared<const node_services>(std::move(services));
  auto actor = sys.spawn([shared](node_handle::stateful_pointer<node_state> self)
                           -> node_handle::behavior_type {
    self->state.services = shared;
    // A caller lost: its runtime stopped, died or was cut off (the link's
    // down message). Nobody reads its calls' answers any more.
    self->set_down_handler([=](caf::down_msg& dm) {
      self->state.watched.erase(dm.source);
      auto n = self->state.in_flight->abandon(dm.source);
      if (n > 0)
        log().info("node: a caller was lost ({}); its {} calls in flight are abandoned: those "
                   "not running yet never run",
                   self->system().render(dm.reason), n);
    });
    return {
      [=](node_call_atom, std::string& text) -> caf::result<std::string> {
        const auto& svc = *self->state.services;
        auto decoded = decode_node_request(text, svc.limits);
        if (auto* e = std::get_if<error>(&decoded)) {
          log().warn("node: refused a malformed request: {}", e->message);
          return encode_node_reply(outcome::failure(*e), svc.name);
        }
        // The answer goes from the thread that has it (a worker's I/O
        // thread, mostly) straight to the caller's proxy, as a
        // response_promise would send it: back through this actor it cost
        // one more thread wake-up per call (164 against 201 us p50 on
        // loopback). A request without a sender gets no answer (nobody
        // could read it).
        auto to = self->current_sender();
        auto answer_id = self->take_current_message_id().response_id();
        auto abandoned = std::make_shared<std::atomic<bool>>(false);
        caf::actor_addr caller;
        if (to) {
          caller = caf::actor_cast<caf::actor_addr>(to);
          if (self->state.watched.insert(caller).second)
            self->monitor(caf::actor_cast<caf::actor>(to));
          self->state.in_flight->add(caller, abandoned);
        }
        svc.serve(std::move(std::get<node_request>(decoded)), abandoned,
                  [to, answer_id, me = caf::actor_cast<caf::strong_actor_ptr>(self),
                   name = svc.name, in_flight = self->state.in_flight, caller,
                   abandoned](outcome o) {
                    if (!to)
                      return;
                    in_flight->remove(caller, abandoned);
                    to->enqueue(me, answer_id, caf::make_message(encode_node_reply(o, name)), nullptr);
                  });
        return caf::delegated<std::string>{};
      },
      [=](node_load_atom) -> caf::result<std::string> {
        auto pools = self->state.services->pools();
        auto collector = std::make_shared<load_collector>();
        collector->rp = self->make_response_promise<std::string>();
        collector->waiting = pools.size() + 1;  // + 1: delivered below at the earliest
        for (auto& [name, pool] : pools) {
          if (!pool) {
            node_pool_load restarting;
            restarting.health = "restarting";
            collector->load.pools[name] = restarting;
            collector->done_one();
            continue;
          }
          self->request(pool, std::chrono::seconds{5}, status_atom::value)
            .then(
              [=, pool_name = name](pool_status& st) {
                collector->load.pools[pool_name] = load_of(st);
                collector->done_one();
              },
              [=, pool_name = name](caf::error&) {
                node_pool_load gone;
                gone.health = "restarting";
                collector->load.pools[pool_name] = gone;
                collector->done_one();
              });
        }
        collector->done_one();
        return collector->rp;
      },
    };
  });
  return caf::actor_cast<node_handle>(actor);
}

} // namespace dspex
