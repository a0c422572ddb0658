// The CAF side of a dspex::runtime, for tests and for embedders that mix the
// runtime with their own actors (e.g. subscribe_actor on the runtime's
// system, or a test that kills the pool actor to watch the root supervisor
// restart it). Not part of the stable embedding API. Included only by
// translation units that use CAF.
#pragma once

#include <string>

#include <caf/actor.hpp>
#include <caf/fwd.hpp>

#include "dspex/actors/pool_actor.hpp"
#include "dspex/runtime.hpp"

namespace dspex {

struct runtime_access {
  /// The runtime's actor system (valid until runtime::stop).
  static caf::actor_system& system(runtime& rt);
  /// @param name a pool's name ("" or "default": the default pool)
  /// @returns the pool's current pool actor; invalid while its supervisor
  ///          restarts it, after it gave up, after stop, and for a name the
  ///          runtime does not know
  static pool_handle pool(runtime& rt, const std::string& name = {});
  /// @returns the root supervisor "dspex.root" (invalid after stop)
  static caf::actor root(runtime& rt);
  /// @param name a pool's name ("" or "default": the default pool)
  /// @returns the supervisor "dspex.pool.NAME" of that pool's subtree
  ///          (invalid once it ended, and after stop)
  static caf::actor pool_supervisor(runtime& rt, const std::string& name = {});
  /// @param name a pool's name ("" or "default": the default pool)
  /// @returns that pool's client, which every call not on the direct lane goes through
  static caf::actor client(runtime& rt, const std::string& name = {});
};

} // namespace dspex
