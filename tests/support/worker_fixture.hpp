// One worker actor driven directly by a test, which plays its owner: it
// receives the worker's ready, checkin and gone messages and its down
// message. Shared by the worker actor's suites.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include <caf/all.hpp>

#include "dspex/actors/messages.hpp"
#include "dspex/actors/worker_actor.hpp"
#include "support/event_recorder.hpp"

namespace dspex::testing {

struct worker_fixture {
  /// Only ever catches a hang.
  static constexpr auto hang_catch = std::chrono::seconds{20};

  caf::actor_system_config cfg;
  caf::actor_system sys{cfg};
  std::unique_ptr<caf::scoped_actor> self = std::make_unique<caf::scoped_actor>(sys);
  std::shared_ptr<event_bus> bus = std::make_shared<event_bus>();
  std::unique_ptr<event_recorder> events = std::make_unique<event_recorder>(*bus);
  worker_actor_handle worker;
  int pid = 0;
  caf::error down_reason;

  ~worker_fixture();  ///< kills a worker still alive and waits for it

  /// Spawns the worker (monitored, its events on `bus`).
  void start(settings s, const std::string& id = "tw1");

  /// Waits for the ready notification; 0 when the worker went down instead.
  int await_ready();

  /// A pool-mediated call (the worker checks in with us before it replies).
  outcome execute(const std::string& command, nlohmann::json args,
                  std::chrono::milliseconds timeout = std::chrono::seconds{10});

  /// Waits for the worker's down message, releasing it when it reports its
  /// process gone (and skipping checkins); returns its exit reason.
  caf::error await_down();
};

/// A CAF error of a test's own request as an outcome.
outcome test_failure(const caf::error& e);

} // namespace dspex::testing
