// Layer-1 test doubles for the worker contract, the technique of NimblePool's
// own test suite: a scripted contract that answers every callback from a
// script and fails the test on anything unscripted, and fake in-process
// worker actors.
//
//   auto contract = std::make_shared<scripted_contract>();
//   contract->expect(step::init(act::ok, "w1"));          // every callback, in order
//   contract->expect(step::checkout(act::remove, "w1"));
//   contract->expect(step::terminate("w1", "checkout_failed"));
//   ... run the pool ...
//   check_script(*contract);   // on the test thread: every scripted step ran,
//                              // no callback came unscripted
//
// The rules (NimblePool's TestAgent: each callback takes the next instruction
// and fails on anything else; assert_drained at the end):
//   - A callback takes the next scripted step if it matches it (callback,
//     worker when the step names one, detail when the step names one).
//   - Otherwise a standing allowance (allow(), any number of times, e.g. the
//     terminate_worker calls of the pool's teardown, or every callback of the
//     randomized model test) answers it.
//   - Otherwise it is an UNSCRIPTED CALL: recorded (the pool's callbacks run
//     on actor threads, where a doctest assertion is not safe) and answered
//     with the default (ok), and the test fails when the script is verified.
//   - verify() (on the test thread) returns, once, every unscripted call and
//     every scripted step that never ran; check_script() turns each into a
//     test failure. The destructor verifies whatever was not verified yet:
//     a test that forgets to verify still fails (on the thread that created
//     the contract, a doctest failure; on any other thread, where doctest
//     cannot be used, the message on stderr and std::abort()).
#pragma once

#include <deque>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <caf/atom.hpp>
#include <caf/fwd.hpp>

#include "dspex/actors/worker_contract.hpp"

namespace dspex::testing {

/// A fake worker's "hold" request is answered once it gets this.
using resume_atom = caf::atom_constant<caf::atom("resume")>;

/// A fake worker: every message a pool sends a worker (worker_handle), and
/// the test's resume.
using fake_worker_handle = worker_handle::extend<caf::reacts_to<resume_atom>>;

/// One scripted callback and its answer.
/// For init_worker: ok = ready at once (or announced later with async_start),
/// async = a worker that never becomes ready, fail = init_result::failed,
/// raise = an exception. terminate_worker has no answer (its action is ignored).
struct step {
  enum class callback {
    init_worker,
    handle_checkout,
    handle_checkin,
    handle_info,
    handle_ping,
    terminate_worker,
  };
  enum class action { ok, remove, skip, fail, async, raise };

  callback cb;
  action act = action::ok;
  std::string worker_id;  ///< empty: any worker
  /// Empty: any. Otherwise it must equal the callback's detail: the checkout
  /// type ("anonymous", "session:s1", ...), the checkin status ("ok",
  /// "error", "close"), terminate_worker's reason type ("checkout_failed",
  /// "pool_stopping", ...). init_worker, handle_info and handle_ping have none.
  std::string detail;

  static step init(action a, std::string worker = {}) {
    return {callback::init_worker, a, std::move(worker), {}};
  }
  static step checkout(action a, std::string worker = {}, std::string type = {}) {
    return {callback::handle_checkout, a, std::move(worker), std::move(type)};
  }
  static step checkin(action a, std::string worker = {}, std::string status = {}) {
    return {callback::handle_checkin, a, std::move(worker), std::move(status)};
  }
  static step info(action a, std::string worker = {}) {
    return {callback::handle_info, a, std::move(worker), {}};
  }
  static step ping(action a, std::string worker = {}) {
    return {callback::handle_ping, a, std::move(worker), {}};
  }
  static step terminate(std::string worker = {}, std::string reason_type = {}) {
    return {callback::terminate_worker, action::ok, std::move(worker), std::move(reason_type)};
  }

  /// e.g. "handle_checkout w1 anonymous -> remove", "terminate_worker * pool_stopping".
  std::string describe() const;
};

/// Fake workers are actors (spawned linked to the pool) that answer
/// (execute_atom, call) with {"worker_id", "command", "args"} and check in,
/// and serve leases like a real worker. Their commands:
///   "hold" — keep the request in flight until the worker gets (resume_atom)
///   "fail" — reply with a python_error (an error checkin)
/// and answer a health ping (health_check_atom) with ok.
class scripted_contract : public worker_contract {
public:
  /// Receives what a verification found (never empty). The default reports
  /// each as a doctest failure (test thread) or aborts (any other thread).
  using failure_reporter = std::function<void(const std::vector<std::string>&)>;

  /// `async_start`: workers report ready later through worker_ready (as
  /// Python workers do) instead of being ready at once.
  explicit scripted_contract(bool async_start = false);
  ~scripted_contract() override;  ///< verifies what was not verified yet

  scripted_contract(const scripted_contract&) = delete;
  scripted_contract& operator=(const scripted_contract&) = delete;

  /// A step that must run, after every step scripted before it.
  void expect(step s);
  void expect(std::initializer_list<step> steps);

  /// A standing allowance: callbacks matching `pattern` (callback, and worker
  /// and detail when given) that no scripted step takes are answered with
  /// its action, any number of times, zero included. For what a test does
  /// not script on purpose (teardown, randomized runs); never for what it tests.
  void allow(step pattern);

  /// Every callback so far, e.g. "handle_checkout w2 anonymous".
  std::vector<std::string> calls() const;
  void clear_calls();

  /// What a verification would report now, without consuming it: every
  /// unscripted call ("unscripted call: ...") and every scripted step not
  /// run yet ("scripted step never ran: ..."). For checks in the middle of a test.
  std::vector<std::string> problems() const;

  /// problems(), consumed: reported once, here or by the destructor. Call it
  /// on the test thread when the pool has stopped (or is still), and fail on
  /// anything it returns (check_script does).
  std::vector<std::string> verify();

  /// Replaces the default failure reporter (the destructor's check). For the
  /// meta-tests of this checker.
  void on_failure(failure_reporter r);

  /// The fake worker actor of `worker_id` (null when unknown).
  fake_worker_handle worker(const std::string& worker_id) const;

  init_result init_worker(pool_worker& w, caf::local_actor* pool) override;
  checkout_result handle_checkout(const checkout_type& type, const caller_info& caller,
                                  pool_worker& w) override;
  keep_or_remove handle_checkin(const checkin_status& status, pool_worker& w) override;
  keep_or_remove handle_info(const caf::message& msg, pool_worker& w) override;
  keep_or_remove handle_ping(pool_worker& w) override;
  void terminate_worker(const error& reason, pool_worker& w) override;

private:
  std::optional<step::action> next(step::callback cb, const std::string& worker_id,
                                   const std::string& detail, std::string call);
  std::vector<std::string> problems_locked() const;

  bool async_start_;
  std::thread::id owner_;  ///< the thread that created it: the test's
  mutable std::mutex mtx_;
  std::deque<step> script_;
  std::vector<step> allowed_;
  std::vector<std::string> calls_;
  std::vector<std::string> unscripted_;
  std::vector<std::pair<std::string, fake_worker_handle>> workers_;
  failure_reporter reporter_;
};

/// verify() on the test thread: one doctest failure per problem (and false).
bool check_script(scripted_contract& contract);

/// Spawns a fake worker linked to `pool` (used by scripted_contract).
fake_worker_handle spawn_fake_worker(caf::local_actor* pool, const std::string& id,
                                     bool announce_ready);

} // namespace dspex::testing
