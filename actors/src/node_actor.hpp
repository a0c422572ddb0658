// node_actor: what a node publishes through CAF's middleman (issue 13): the
// actor other runtimes send their calls to. It serves each call on this
// runtime's pools through the same paths as a local caller (serve), and
// tells a caller its pools' load for routing. It watches each caller: when
// one is lost (its runtime stopped, died or was cut off), its calls still
// in flight are abandoned, so that those not yet running never run. What
// crosses the network is the node_wire JSON text of dspex/node_wire.hpp,
// nothing else.
//
// Internal to actors/ (CAF included).
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <caf/atom.hpp>
#include <caf/fwd.hpp>
#include <caf/replies_to.hpp>
#include <caf/typed_actor.hpp>

#include "dspex/actors/pool_actor.hpp"
#include "dspex/node_wire.hpp"

namespace dspex {

using node_call_atom = caf::atom_constant<caf::atom("nodecall")>;  // (request text) -> reply text
using node_load_atom = caf::atom_constant<caf::atom("nodeload")>;  // () -> load text

/// A node's published interface. A caller checks a peer's interface against
/// it before using the peer: anything else at that port is refused.
using node_handle = caf::typed_actor<caf::replies_to<node_call_atom, std::string>::with<std::string>,
                                     caf::replies_to<node_load_atom>::with<std::string>>;

/// What a node actor needs of its runtime.
struct node_services {
  std::string name;  ///< "host:port" the node is published on (named in replies)
  request_limits limits;
  /// Runs one decoded request on this runtime; `done` is called once, on any
  /// thread. The flag is set when the request's caller is lost (call::abandoned).
  std::function<void(node_request, std::shared_ptr<const std::atomic<bool>>,
                     std::function<void(outcome)>)>
    serve;
  /// The runtime's pools now: name and current pool actor (invalid while it restarts).
  std::function<std::vector<std::pair<std::string, pool_handle>>()> pools;
};

/// Spawns the node actor (unpublished: runtime.cpp publishes it).
/// @param sys the runtime's actor system
/// @param services what it serves calls with
/// @returns the actor
node_handle spawn_node_actor(caf::actor_system& sys, node_services services);

} // namespace dspex
