// An isolated pool per test, driven at the actor level (seed Fix 7's
// start_test_pool, with the REAL status): its own actor system, its own
// pool, eager start; plus callers that can die and a way to hold the pool
// still so timeouts can be forced deterministically.
#pragma once

#include <chrono>
#include <functional>
#include <future>
#include <memory>
#include <optional>
#include <string>

#include <caf/all.hpp>

#include "dspex/actors/messages.hpp"
#include "dspex/actors/pool_actor.hpp"
#include "dspex/actors/worker_contract.hpp"
#include "support/harness.hpp"

namespace dspex::testing {

struct test_pool_options {
  settings config = test_settings(2);          ///< size 2, no overflow, eager (Fix 7)
  std::shared_ptr<worker_contract> contract;   ///< null: the bundled Python worker
  std::shared_ptr<event_bus> events = std::make_shared<event_bus>();  ///< the pool's events
};

class test_pool {
public:
  explicit test_pool(test_pool_options opts = {});
  ~test_pool();  ///< stops the pool (bounded) and the actor system

  caf::actor_system& system() { return sys_; }
  const pool_handle& pool() const { return pool_; }
  const settings& config() const { return *config_; }
  event_bus& events() { return *events_; }

  pool_status status();

  /// Waits on the real status until every one of the pool.size workers is
  /// idle. Returns false on timeout (the original returned success anyway).
  bool wait_for_pool_ready(std::chrono::milliseconds timeout = 10s);

  /// Waits until `pred(status)`; false on timeout.
  bool wait_for(const std::function<bool(const pool_status&)>& pred,
                std::chrono::milliseconds timeout = 10s);

  /// A pool-mediated call.
  outcome execute(const std::string& command, nlohmann::json args = nlohmann::json::object(),
                  std::chrono::milliseconds timeout = 5s,
                  checkout_type type = checkout_type::anonymous(), bool block = true);

  /// A pool-mediated call as the pool receives it (sessions: preferred worker, affinity).
  outcome execute(call c);

  /// The same without waiting: `done` runs on an actor thread with the outcome.
  void execute_async(call c, std::function<void(outcome)> done);

  /// Holds the pool still until resume(): every scheduler thread of this
  /// test's actor system is occupied by a blocked actor, so the pool (and
  /// every other actor of the system) handles nothing while messages queue
  /// in its mailbox. Callers' own threads and the clock go on, so deadlines
  /// pass. No hook in the pool: it sees only a busy machine. Bounded: the
  /// threads are released after 60 s at most even without resume().
  void hold();
  void resume();

  /// Runs handle_ping on every idle worker; returns how many were removed.
  std::size_t ping_idle();

private:
  caf::actor_system_config cfg_;
  caf::actor_system sys_;
  std::shared_ptr<const settings> config_;
  std::shared_ptr<event_bus> events_;
  pool_handle pool_;
  std::shared_ptr<std::promise<void>> release_;  ///< set while held
};

/// A caller actor: it checks workers out, uses and checks them in, and can
/// die holding them.
class test_caller {
public:
  explicit test_caller(test_pool& pool);
  ~test_caller();

  /// Checks out and waits for the answer (a grant or an error).
  checkout_reply checkout(checkout_type type = checkout_type::anonymous(),
                          std::chrono::milliseconds deadline = 5s, bool block = true);

  /// Sends a checkout without waiting: it may queue. Returns its token.
  std::uint64_t checkout_async(checkout_type type = checkout_type::anonymous(),
                               std::chrono::milliseconds deadline = 5s);

  /// Waits for the answer to an earlier checkout_async.
  checkout_reply await_checkout(std::chrono::milliseconds timeout = 10s);

  /// A checkout whose own wait gives up after `give_up` (CAF drops a later
  /// reply), then tells the pool, as NimblePool's client does. Returns the
  /// token it cancelled.
  std::uint64_t checkout_giving_up(std::chrono::milliseconds give_up,
                                   std::chrono::milliseconds deadline = 5s);

  /// A request under a lease (to the worker directly).
  outcome execute(const lease_grant& lease, const std::string& command,
                  nlohmann::json args = nlohmann::json::object(),
                  std::chrono::milliseconds timeout = 5s);

  /// Sends a request under a lease without waiting for its reply.
  void execute_async(const lease_grant& lease, const std::string& command);

  /// Checks a lease in; true when the pool knew the lease.
  bool checkin(const lease_grant& lease, checkin_status status = checkin_status::ok());
  /// Checks `lease` in without waiting for the pool's answer (it may be held).
  /// Only the holder may check in: this caller must be the one that checked out.
  void checkin_async(const lease_grant& lease, checkin_status status = checkin_status::ok());

  /// Terminates this caller: the pool sees it die.
  void die();

  bool alive() const { return self_ != nullptr; }
  caf::actor_addr address() const;

private:
  test_pool& pool_;
  std::unique_ptr<caf::scoped_actor> self_;
  std::uint64_t next_token_ = 1;
};

} // namespace dspex::testing
