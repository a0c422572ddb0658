// runtime_tree: the supervision tree runtime::start builds (issue 4): the
// root supervisor, its children (the pool, the session registry) and the
// observer that tells the pool client which pool is current. Apart from
// runtime.cpp because the tree's shape is a decision of its own (order,
// restart policy, shutdown bounds), read and changed without the API.
//
// Internal to actors/ (CAF included).
#pragma once

#include <memory>
#include <vector>

#include <caf/actor.hpp>
#include <caf/fwd.hpp>

#include "dspex/events.hpp"
#include "dspex/settings.hpp"
#include "pool_client.hpp"

namespace dspex {
class pool_metrics;
} // namespace dspex

namespace dspex::detail {
struct client_shared;
class session_directory;
} // namespace dspex::detail

namespace dspex::runtime_detail {

struct direct_sinks;

/// What the tree's children share with the runtime that starts it; each
/// outlives a child's restart.
struct runtime_tree_parts {
  std::shared_ptr<const settings> shared_config;  ///< the pool's settings (pool_name: its name)
  std::shared_ptr<event_bus> events;  ///< the pool's bus (stamps its name on every event)
  std::shared_ptr<pool_metrics> metrics;
  std::shared_ptr<detail::client_shared> shared;  ///< the pool child sets its idle_workers here
  pool_client_handle client;  ///< the pool client: told every (re)started child, and the root to watch
  /// Filled by the session registry: a session's call goes to its actor directly.
  std::shared_ptr<detail::session_directory> sessions;
  /// The direct lane's way to the pool client, for the sessions' calls.
  std::shared_ptr<const direct_sinks> sinks;
};

/// Spawns the root supervisor "dspex.root" with one subtree per pool (the
/// supervisor "dspex.pool.NAME" with the children "pool" and "sessions"),
/// and tells each pool's client to watch its subtree's supervisor.
/// @param sys the runtime's actor system (spawned on the calling thread)
/// @param bus the runtime's event bus (the root's own events go there)
/// @param pools what each pool's children share with the runtime, the
///        default pool first
/// @returns the root supervisor
caf::actor spawn_runtime_tree(caf::actor_system& sys, std::shared_ptr<event_bus> bus,
                              const std::vector<runtime_tree_parts>& pools);

} // namespace dspex::runtime_detail
