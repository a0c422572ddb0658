// runtime_tree: see runtime_tree.hpp.
#include "runtime_tree.hpp"

#include <chrono>
#include <mutex>
#include <vector>

#include <caf/all.hpp>

#include "dspex/actors/pool_actor.hpp"
#include "dspex/actors/session_actor.hpp"
#include "dspex/actors/supervisor.hpp"
#include "direct_lane.hpp"
#include "dspy_adapter.hpp"
#include "idle_workers.hpp"
#include "pool_client.hpp"

namespace dspex::runtime_detail {

namespace {

// A supervisor's event as the runtime's event stream shows it.
event to_event(caf::actor_system& sys, const supervisor_event& ev) {
  event e;
  e.kind = event_kind::supervisor;
  e.source = ev.supervisor;
  e.to = to_string(ev.kind);
  if (ev.reason)
    e.reason = sys.render(ev.reason);
  e.attempt = ev.restarts;
  e.fields = {{"child_id", ev.child_id}, {"restarts", ev.restarts}};
  if (ev.kind == supervisor_event_kind::child_stopped)
    e.fields["killed"] = ev.killed;
  if (ev.kind == supervisor_event_kind::gave_up)
    if (auto info = decode_supervisor_exit(ev.reason))
      e.err = to_error(*info);
  return e;
}

// The supervisor events of one pool's subtree go to that pool's client.
// Runs on the supervisor's thread: it only renders and sends. The client
// switches to a new pool, re-registers it and publishes the event, in that
// order, so a subscriber that sees child_restarted finds the new pool in use.
std::function<void(const supervisor_event&)> tell_client(caf::actor_system& sys,
                                                          pool_client_handle client) {
  return [client, sys = &sys](const supervisor_event& ev) {
    caf::actor child;
    if (ev.kind == supervisor_event_kind::child_started
        || ev.kind == supervisor_event_kind::child_restarted)
      child = caf::actor_cast<caf::actor>(ev.child);
    caf::anon_send(client, sup_event_atom::value, to_event(*sys, ev), std::move(child));
  };
}

// One pool's subtree (issue 13): the supervisor "dspex.pool.NAME" with the
// pool actor and the session registry.
child_spec pool_subtree(caf::actor_system& sys, const runtime_tree_parts& p) {
  const settings& config = *p.shared_config;
  supervisor_flags flags;
  flags.name = "dspex.pool." + config.pool_name;
  flags.strategy = restart_strategy::one_for_one;
  flags.max_restarts = 3;
  flags.max_seconds = std::chrono::seconds{5};
  flags.observer = tell_client(sys, p.client);
  std::vector<child_spec> children;
  {
    child_spec pool;
    pool.id = "pool";
    pool.restart = restart_type::permanent;
    pool.start = [cfg = p.shared_config, events = p.events, metrics = p.metrics,
                  shared = p.shared](caf::event_based_actor* sup) {
      // Each pool (a restarted one too) has its own idle list; callers of
      // the direct lane find the current one here.
      auto idle = std::make_shared<detail::idle_workers>(cfg->pool.strategy == "lifo", metrics,
                                                         cfg->pool.max_queue);
      {
        std::lock_guard<std::mutex> guard{shared->mtx};
        shared->idle = idle;
      }
      // The supervisor's children are untyped; the client's observer types
      // the pool again (pool_client: current_pool).
      return caf::actor_cast<caf::actor>(spawn_linked_pool(sup, cfg, nullptr, events, metrics, idle));
    };
    // The pool's own stop: workers in parallel, each bounded by its graces.
    pool.shutdown_timeout = std::chrono::duration_cast<std::chrono::milliseconds>(
      config.worker.shutdown_grace + config.worker.kill_grace + std::chrono::seconds{2});
    children.push_back(std::move(pool));
  }
  // Issue 5: the session layer is the second child, after "pool" (children
  // start in order and stop in reverse order, so sessions start once the
  // pool exists and stop before it). one_for_one: a pool restart keeps the
  // sessions (their calls go through the client, which always uses the
  // current pool, and their programs travel with every execute_program).
  {
    child_spec sessions;
    sessions.id = "sessions";
    sessions.restart = restart_type::permanent;
    // A session's call with the affinity hint takes the direct lane as an
    // anonymous call does, with the session's worker preferred.
    session_lane lane = [shared = p.shared, sinks = p.sinks](call& c,
                                                             const detail::client_call_options& opts,
                                                             const completion& done) {
      return c.affinity == affinity_mode::hint
             && start_direct(shared, c, opts, done, nullptr, c.preferred_worker, sinks) != nullptr;
    };
    sessions.start = [cfg = p.shared_config, client = p.client, dir = p.sessions,
                      lane](caf::event_based_actor* sup) {
      return spawn_linked_session_registry(sup, cfg, caf::actor_cast<caf::actor>(client), dir, lane,
                                           detail::make_dspy_session);
    };
    sessions.shutdown_timeout = std::chrono::seconds{2};
    children.push_back(std::move(sessions));
  }
  // Temporary: a pool whose supervisor gave up stays unavailable (its
  // client fails its calls with supervisor_gave_up); restarting it from the
  // root would let one pool's crash loop use up the root's restarts and end
  // every other pool.
  // Its own stop is bounded by its children's (supervisor_child's default).
  return supervisor_child("pool." + config.pool_name, std::move(flags), std::move(children),
                          restart_type::temporary);
}

} // namespace

caf::actor spawn_runtime_tree(caf::actor_system& sys, std::shared_ptr<event_bus> bus,
                              const std::vector<runtime_tree_parts>& pools) {
  // The supervision tree (issue 4, item 1; one subtree per pool since issue 13):
  //   dspex.root (one_for_one; its children are temporary)
  //   └── pool.NAME: supervisor dspex.pool.NAME (one_for_one, at most 3 restarts in 5 s)
  //       ├── pool (permanent): the pool actor, which monitors its workers
  //       └── sessions (permanent): the session registry
  supervisor_flags flags;
  flags.name = "dspex.root";
  flags.strategy = restart_strategy::one_for_one;
  // Its own events (a pool's subtree started, ended, stopped) go on the
  // runtime's bus, naming the pool (its child "pool.NAME").
  flags.observer = [sys = &sys, events = bus](const supervisor_event& ev) {
    auto e = to_event(*sys, ev);
    if (ev.child_id.rfind("pool.", 0) == 0)
      e.pool = ev.child_id.substr(5);
    events->publish(e);
  };
  std::vector<child_spec> children;
  for (const auto& p : pools)
    children.push_back(pool_subtree(sys, p));
  auto root = spawn_supervisor(sys, std::move(flags), std::move(children));
  // Each client watches its pool's supervisor: the root's child, found by id.
  caf::scoped_actor self{sys};
  self->request(root, caf::duration{std::chrono::seconds{10}}, which_children_atom::value)
    .receive(
      [&](std::vector<child_info>& running) {
        for (const auto& p : pools)
          for (const auto& c : running)
            if (c.id == "pool." + p.shared_config->pool_name)
              caf::anon_send(p.client, watch_root_atom::value, c.actor);
      },
      [&](caf::error&) {});
  return root;
}

} // namespace dspex::runtime_detail
