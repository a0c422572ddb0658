// The CAF side of a dspex::runtime, for tests and for embedders that mix the
// runtime with their own actors (e.g. subscribe_actor on the runtime's
// system, or a test that kills the pool actor to watch the root supervisor
// restart it). Not part of the stable embedding API. Included only by
// translation units that use CAF.
#pragma once

#include <caf/actor.hpp>
#include <caf/fwd.hpp>

#include "dspex/actors/pool_actor.hpp"
#include "dspex/runtime.hpp"

namespace dspex {

struct runtime_access {
  /// The runtime's actor system (valid until runtime::stop).
  static caf::actor_system& system(runtime& rt);
  /// The current pool actor; invalid while the root supervisor restarts it,
  /// after it gave up, and after stop.
  static pool_handle pool(runtime& rt);
  /// The root supervisor "dspex.root" (invalid after stop).
  static caf::actor root(runtime& rt);
  /// The pool client, which every execute_anonymous goes through.
  static caf::actor client(runtime& rt);
};

} // namespace dspex
