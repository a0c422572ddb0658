// api_support: how the runtime's files answer a caller alike. The public
// calls (runtime.cpp, lease.cpp), the pool client and the direct lane all
// wait with the same margin, turn a CAF error into the same outcome, run an
// asynchronous caller's continuation the same way, and refuse a blocking
// call from a runtime thread with the same error; one definition keeps them
// from drifting apart. Only what more than one of those files uses is here.
//
// Internal to actors/ (CAF included).
#pragma once

#include <chrono>
#include <future>
#include <shared_mutex>
#include <string>

#include <caf/fwd.hpp>

#include "dspex/actors/messages.hpp"
#include "dspex/error.hpp"

namespace dspex::detail {

/// What every public call holds while it touches the actor system, and what
/// stop() closes before the system goes: a call racing stop() either runs
/// on a live system or fails with pool_stopping, never on a destroyed one.
/// Shared with leases, which may outlive their runtime.
struct api_gate {
  std::shared_timed_mutex mtx;
  bool closed = false;  ///< written under the exclusive lock, read under a shared one
};

} // namespace dspex::detail

namespace dspex::runtime_detail {

using clock_type = std::chrono::steady_clock;

// Margin on top of a call's deadline for the caller's own CAF request: the
// pool and the worker always answer by the deadline, so this only catches a
// lost reply instead of waiting forever.
constexpr auto reply_margin = std::chrono::seconds{5};

/// The outcome of a caller's CAF request that failed: timeout_error/
/// caller_timeout when no reply came in time, system_error/actor_error else.
/// @param sys the system that renders `err`
/// @param err what the request failed with
/// @param command the call's command (the error's context)
/// @returns a failed outcome
outcome from_caf_error(caf::actor_system& sys, const caf::error& err, const std::string& command);

/// Runs an asynchronous caller's continuation on this (a runtime) thread.
/// What it throws is logged and goes no further; a blocking call it makes
/// fails with blocking_in_callback (must_not_block).
/// @param done the continuation
/// @param o the call's outcome
void run_callback(const completion& done, outcome o);

/// `done`, answered at most once (through run_callback), and answered with
/// `on_loss` when its last copy goes unanswered: a message carrying it to an
/// actor that is already gone (CAF 0.17 drops it silently) still answers its
/// caller.
/// @param done the caller's continuation
/// @param on_loss what the caller gets when nobody answers
/// @returns the guarded continuation; copies share one answer
completion answer_once(completion done, error on_loss);

/// A blocking call on a runtime thread (an asynchronous callback, an event
/// handler, an actor) would wait for work that very thread has to do.
/// @returns true on such a thread, where a public call must not block
bool must_not_block() noexcept;

/// The error of a blocking call refused by must_not_block.
/// @param what the call (the error's command)
/// @returns system_error/blocking_in_callback
error blocking_in_callback(const std::string& what);

/// The error of a call made once runtime::stop began (runtime::impl's
/// stopping_error; the direct lane gives it too, without a runtime).
/// @param command the call's command (the error's context)
/// @returns resource_error/pool_stopping
error stopped_error(const std::string& command);

// Waits for a future a runtime thread fulfils, bounded by `bound`. A promise
// dropped unanswered (its actor terminated) is an error too, never a throw.
template <class T, class OnMissing>
T await_bounded(std::future<T>& future, clock_type::time_point bound, OnMissing on_missing) {
  if (future.wait_until(bound) != std::future_status::ready)
    return on_missing(false);
  try {
    return future.get();
  } catch (const std::future_error&) {
    return on_missing(true);  // broken_promise
  }
}

} // namespace dspex::runtime_detail
