// node_actor: see node_actor.hpp.
#include "node_actor.hpp"

#include <cstdint>
#include <map>
#include <memory>

#include <caf/all.hpp>

#include "dspex/logging.hpp"

namespace dspex {

namespace {

using node_answer_atom = caf::atom_constant<caf::atom("nodeansw")>;

// The node actor's own interface: the published one, and the runtime's
// answers coming back to it.
using node_actor_t = node_handle::extend<caf::reacts_to<node_answer_atom, std::uint64_t, std::string>>;

struct node_state {
  static inline const char* name = "dspex.node";
  std::shared_ptr<const node_services> services;
  // Calls being served: each promise is delivered on the actor's own
  // thread, when the runtime's answer comes back as a message.
  std::map<std::uint64_t, caf::typed_response_promise<std::string>> serving;
  std::uint64_t next_id = 1;
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
  auto actor = sys.spawn([shared](node_actor_t::stateful_pointer<node_state> self)
                           -> node_actor_t::behavior_type {
    self->state.services = shared;
    return {
      [=](node_call_atom, std::string& text) -> caf::result<std::string> {
        const auto& svc = *self->state.services;
        auto decoded = decode_node_request(text, svc.limits);
        if (auto* e = std::get_if<error>(&decoded)) {
          log().warn("node: refused a malformed request: {}", e->message);
          return encode_node_reply(outcome::failure(*e), svc.name);
        }
        auto id = self->state.next_id++;
        auto rp = self->make_response_promise<std::string>();
        self->state.serving.emplace(id, rp);
        // The runtime answers once, on any thread: back to this actor.
        svc.serve(std::move(std::get<node_request>(decoded)),
                  [me = caf::actor_cast<caf::actor>(self), id, name = svc.name](outcome o) {
                    caf::anon_send(me, node_answer_atom::value, id, encode_node_reply(o, name));
                  });
        return rp;
      },
      [=](node_answer_atom, std::uint64_t id, std::string& reply) {
        auto it = self->state.serving.find(id);
        if (it == self->state.serving.end())
          return;
        it->second.deliver(std::move(reply));
        self->state.serving.erase(it);
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
