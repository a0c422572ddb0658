// The standalone bridge: a single Python worker without a pool of its own
// (the original's Bridge), for service detection's second choice.
//
// It is the pool machinery with one worker whose process runs
// `--mode standalone`, so it answers exactly what a pool answers (execute,
// status, await_ready, stop; see pool_actor.hpp): calls are served one at a
// time, callers beyond the first wait FIFO until their deadline, a worker
// that dies is restarted (with backoff while starts keep failing), and stop
// leaves no child process. One mechanism for checkout, restart and stop
// instead of a second copy of it.
#pragma once

#include <memory>

#include <caf/fwd.hpp>

#include "dspex/actors/pool_actor.hpp"
#include "dspex/settings.hpp"

namespace dspex {

/// Spawns a standalone bridge (not registered: see register_bridge in
/// dspex/actors/service.hpp). Uses config->worker, config->lm and the pool's
/// timeouts and limits; pool.size, max_overflow and lazy are fixed (1, 0, eager).
pool_handle spawn_bridge(caf::actor_system& sys, std::shared_ptr<const settings> config);

} // namespace dspex
