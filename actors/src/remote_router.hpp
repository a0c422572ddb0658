// remote_router: a caller runtime's side of the nodes it lists in
// remote.nodes (issue 13). One actor holds a link to each node through CAF's
// middleman, reads each node's load every remote.status_interval, and sends
// each call on a remote pool to the least loaded node that serves it (a
// session's calls to the node that serves the session). A node's death or
// partition reaches it as a down message: the node's pools leave the routing
// table, its calls in flight fail with communication_error/node_down (an
// idempotent one is sent to another node within its deadline), and the link
// is tried again with the project's backoff until the node is back.
//
// Internal to actors/ (CAF included).
#pragma once

#include <chrono>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <caf/actor.hpp>
#include <caf/allowed_unsafe_message_type.hpp>
#include <caf/atom.hpp>
#include <caf/fwd.hpp>

#include "dspex/actors/messages.hpp"
#include "dspex/events.hpp"
#include "dspex/node_wire.hpp"
#include "dspex/settings.hpp"
#include "dspex/status.hpp"

namespace dspex::detail {

/// What the router knows of the nodes, for the runtime's callers: which
/// pools are remote, and their load. Written by the router only.
class remote_directory {
public:
  struct node_view {
    std::string address;  ///< "host:port"
    bool up = false;
    node_load load;       ///< the last load it published (empty while down)
    std::vector<std::string> served;  ///< every pool it ever served (kept while it is down)
  };

  /// @returns true when some node serves or served `pool` (a call to it is
  ///          remote; while no such node is up it fails with node_down)
  bool knows(const std::string& pool) const;
  /// @returns the remote pools' names, sorted, each once
  std::vector<std::string> pools() const;
  /// @returns the pool's status summed over the nodes that serve it now
  ///          (pool, size, idle, busy, queued, health, nodes), or nullopt
  ///          for a pool no node ever served
  std::optional<pool_status> status(const std::string& pool) const;
  /// @returns a copy of every node's view
  std::vector<node_view> nodes() const;

  /// The router's write (the whole view at once).
  void replace(std::vector<node_view> nodes);

private:
  mutable std::mutex mtx_;
  std::vector<node_view> nodes_;
};

/// One call on a remote pool, as the runtime hands it to the router.
struct remote_call {
  node_request request;  ///< timeout_ms is filled in per attempt, from `deadline`
  std::chrono::steady_clock::time_point deadline;
  completion done;
};

} // namespace dspex::detail

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(dspex::detail::remote_call)

namespace dspex::runtime_detail {

using remote_call_atom = caf::atom_constant<caf::atom("remcall")>;    // (remote_call)
using remote_ready_atom = caf::atom_constant<caf::atom("remready")>;  // () -> bool, once every node was tried

/// Spawns the router for `config.remote.nodes`; it starts connecting at once.
/// @param sys the runtime's actor system (with the middleman loaded)
/// @param config the runtime's settings (remote.*, retry.max_attempts)
/// @param directory where it publishes what it knows of the nodes
/// @param events the runtime's bus (node_up, node_down)
/// @returns the router; an exit message stops it (its calls fail with pool_stopping)
caf::actor spawn_remote_router(caf::actor_system& sys, std::shared_ptr<const settings> config,
                               std::shared_ptr<detail::remote_directory> directory,
                               std::shared_ptr<event_bus> events);

} // namespace dspex::runtime_detail
