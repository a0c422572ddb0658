// pool_actor: keeps pool.size worker actors, mediates every checkout and
// checkin, queues callers with their deadlines, removes and replaces broken
// workers.
//
// Messages it answers:
//  - (execute_atom, call) → outcome. Served by the next idle worker (workers
//    are used round-robin); beyond the idle workers, callers wait in FIFO
//    order until their deadline, and an expired caller is answered with
//    timeout_error/checkout_timeout and never handed a worker. The pool hands
//    the caller's response promise to the worker (delegation), so the reply
//    travels worker → caller directly and no reply can be dropped with a
//    worker inside it: the pool never gives a worker to a caller, it gives
//    the caller's request to a worker.
//  - (status_atom) → pool_status, computed from the live state.
//  - (await_ready_atom) → outcome: ok once every initial worker is ready, or
//    the first start failure (initialization_error) if one fails first.
//  - (stop_atom) → bool: fails queued callers (resource_error/pool_stopping),
//    stops every worker (shutdown → EOF → TERM → KILL) and answers once all
//    are reaped; then quits normally.
//  - leases: (checkout_atom, checkout_request) → checkout_reply,
//    (checkin_atom, lease_id, checkin_status) → bool, (cancel_atom, token);
//  - (ping_idle_atom) → the number of idle workers the contract's
//    handle_ping removed (the maintenance tick's check, at once).
// Workers are monitored, not linked (a link would let a worker killed with
// exit_reason::kill take the pool down): a worker's end reaches the pool as a
// down_msg whose reason (make_exit_reason) says why; the pool then starts a
// replacement, with backoff while starts keep failing, and kills the workers
// still alive when it ends itself.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include <caf/actor.hpp>
#include <caf/fwd.hpp>
#include <caf/replies_to.hpp>
#include <caf/typed_actor.hpp>

#include "dspex/actors/messages.hpp"

#include "dspex/events.hpp"
#include "dspex/settings.hpp"

namespace dspex {

class worker_contract;
class pool_metrics;
namespace detail {
class idle_workers;
} // namespace detail

/// A pool's message interface: its callers' messages (above) and its
/// workers' (worker_actor.hpp: started, ready, checked in, gone, a call
/// handed back unserved).
using pool_handle = caf::typed_actor<
  caf::replies_to<execute_atom, call>::with<outcome>,
  caf::replies_to<status_atom>::with<pool_status>,
  caf::replies_to<await_ready_atom>::with<outcome>,
  caf::replies_to<stop_atom>::with<bool>,
  caf::replies_to<checkout_atom, checkout_request>::with<checkout_reply>,
  caf::replies_to<checkin_atom, std::uint64_t, checkin_status>::with<bool>,
  caf::reacts_to<cancel_atom, std::uint64_t>,
  caf::replies_to<ping_idle_atom>::with<std::size_t>,
  caf::replies_to<retry_atom, call>::with<outcome>,
  caf::reacts_to<checkin_atom, std::string, checkin_status>,
  caf::reacts_to<worker_spawned_atom, std::string, int>,
  caf::reacts_to<worker_ready_atom, std::string, int>,
  caf::reacts_to<worker_gone_atom, std::string, error>>;

/// Spawns a pool. `contract` drives its workers; null means the bundled
/// Python workers (python_worker_contract). `events` receives the pool's and
/// its workers' events; null means a private bus (events are only logged).
/// `metrics` receives its queue waits and run times (pool_status::metrics);
/// null means the pool's own, which ends with it. `idle` is where its idle
/// workers wait, which callers of the direct lane take them from (the
/// runtime keeps it; null means the pool's own, which only the pool uses).
pool_handle spawn_pool(caf::actor_system& sys, std::shared_ptr<const settings> config,
                      std::shared_ptr<worker_contract> contract = nullptr,
                      std::shared_ptr<event_bus> events = nullptr,
                      std::shared_ptr<pool_metrics> metrics = nullptr,
                      std::shared_ptr<detail::idle_workers> idle = nullptr);

/// Same, linked to `parent`: a supervisor's child (see supervisor.hpp).
pool_handle spawn_linked_pool(caf::event_based_actor* parent,
                             std::shared_ptr<const settings> config,
                             std::shared_ptr<worker_contract> contract = nullptr,
                             std::shared_ptr<event_bus> events = nullptr,
                             std::shared_ptr<pool_metrics> metrics = nullptr,
                             std::shared_ptr<detail::idle_workers> idle = nullptr);

} // namespace dspex
