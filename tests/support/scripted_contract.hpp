// Layer-1 test doubles for the worker contract, the technique of NimblePool's
// own test suite: a scripted contract that records every callback in order
// and answers each from a script, and fake in-process worker actors.
//
//   auto contract = std::make_shared<scripted_contract>();
//   contract->expect(step::checkout(checkout_result_kind::remove, "w1"));
//   ... run the pool ...
//   CHECK(contract->unmet().empty());       // every scripted step ran, in order
//   CHECK(contract->calls() == std::vector<std::string>{"init_worker w1", ...});
#pragma once

#include <deque>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <caf/fwd.hpp>

#include "dspex/actors/worker_contract.hpp"

namespace dspex::testing {

/// One scripted callback result. Callbacks with no scripted step left answer
/// with the default: ok (handover to the fake worker), ok, ok, ok.
/// For init_worker: ok = ready at once, async = a worker that never becomes
/// ready, fail = init_result::failed, raise = an exception.
struct step {
  enum class callback { init_worker, handle_checkout, handle_checkin, handle_info, handle_ping };
  enum class action { ok, remove, skip, fail, async, raise };

  callback cb;
  action act = action::ok;
  std::string worker_id;  ///< empty: any worker

  static step init(action a, std::string worker = {}) { return {callback::init_worker, a, std::move(worker)}; }
  static step checkout(action a, std::string worker = {}) { return {callback::handle_checkout, a, std::move(worker)}; }
  static step checkin(action a, std::string worker = {}) { return {callback::handle_checkin, a, std::move(worker)}; }
  static step info(action a, std::string worker = {}) { return {callback::handle_info, a, std::move(worker)}; }
  static step ping(action a, std::string worker = {}) { return {callback::handle_ping, a, std::move(worker)}; }
};

/// Fake workers are actors (spawned linked to the pool) that answer
/// (execute_atom, call) with {"worker_id", "command", "args"} and check in,
/// and serve leases like a real worker. Their commands:
///   "hold" — keep the request in flight until the worker gets (resume_atom)
///   "fail" — reply with a python_error (an error checkin)
class scripted_contract : public worker_contract {
public:
  /// `async_start`: workers report ready later through worker_ready (as
  /// Python workers do) instead of being ready at once.
  explicit scripted_contract(bool async_start = false);

  void expect(step s);

  /// Every callback so far, e.g. "handle_checkout w2 anonymous".
  std::vector<std::string> calls() const;
  void clear_calls();

  /// Mismatches seen and scripted steps that never ran.
  std::vector<std::string> unmet() const;

  /// The fake worker actor of `worker_id` (null when unknown).
  caf::actor worker(const std::string& worker_id) const;

  init_result init_worker(pool_worker& w, caf::event_based_actor* pool) override;
  checkout_result handle_checkout(const checkout_type& type, const caller_info& caller,
                                  pool_worker& w) override;
  keep_or_remove handle_checkin(const checkin_status& status, pool_worker& w) override;
  keep_or_remove handle_info(const caf::message& msg, pool_worker& w) override;
  keep_or_remove handle_ping(pool_worker& w) override;
  void terminate_worker(const error& reason, pool_worker& w) override;

private:
  std::optional<step::action> next(step::callback cb, const std::string& worker_id,
                                   std::string call);

  bool async_start_;
  mutable std::mutex mtx_;
  std::deque<step> script_;
  std::vector<std::string> calls_;
  std::vector<std::string> mismatches_;
  std::vector<std::pair<std::string, caf::actor>> workers_;
};

/// Spawns a fake worker linked to `pool` (used by scripted_contract).
caf::actor spawn_fake_worker(caf::event_based_actor* pool, const std::string& id, bool announce_ready);

} // namespace dspex::testing
