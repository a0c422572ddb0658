// bridge_actor: a single Python worker without a pool (the original's
// standalone Bridge). It owns ONE worker actor, a linked child whose process
// runs `--mode standalone`, and serves callers through it one call at a time.
//
// Messages it answers:
//  - (execute_atom, call) → outcome. Forwarded to the worker when it is idle
//    (the caller's promise is delegated, so the reply travels worker →
//    caller); otherwise the caller waits in FIFO order until its deadline,
//    and an expired caller gets timeout_error/checkout_timeout without ever
//    reaching the worker. block=false: resource_error/full when busy.
//  - (status_atom) → pool_status with size 1 and the one worker.
//  - (await_ready_atom) → outcome: ok once the first worker is ready, or the
//    first start failure (initialization_error).
//  - (stop_atom) → bool: fails waiting callers (resource_error/bridge_stopping),
//    stops the worker gracefully (shutdown → EOF → TERM → KILL), answers once
//    its process is reaped, then quits normally.
// From its worker (the worker contract, worker_actor.hpp): worker_ready,
// checkin, worker_gone (answered with release), retry (a call handed back
// unserved goes first). When the worker exits it is restarted at once, or
// after a backoff (100 ms doubling to 5 s) while starts keep failing.
#pragma once

#include <memory>

#include <caf/actor.hpp>
#include <caf/fwd.hpp>

#include "dspex/settings.hpp"

namespace dspex {

/// Spawns a standalone bridge (not registered: see register_bridge in
/// dspex/actors/service.hpp). Uses config->worker and config->lm; the pool
/// settings it uses are init_timeout, max_frame_bytes and max_queue.
caf::actor spawn_bridge(caf::actor_system& sys, std::shared_ptr<const settings> config);

} // namespace dspex
