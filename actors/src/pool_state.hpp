// pool_state: the pool actor's state (pool_actor.cpp) and what the pool's
// files offer one another. Each pool_*.cpp holds one concept of the pool and
// the rules that concept owns; a function one file calls in another is
// declared here, under the file that defines it, so its home is found by its
// group. Helpers only one file uses stay in that file.
//
// Internal to actors/ (CAF included): only the pool's own files include it.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <exception>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <caf/actor.hpp>
#include <caf/actor_addr.hpp>
#include <caf/atom.hpp>
#include <caf/fwd.hpp>
#include <caf/response_promise.hpp>
#include <caf/stateful_actor.hpp>
#include <caf/typed_event_based_actor.hpp>
#include <nlohmann/json.hpp>

#include "dspex/actors/messages.hpp"
#include "dspex/actors/pool_actor.hpp"
#include "dspex/actors/worker_contract.hpp"
#include "dspex/backoff.hpp"
#include "dspex/events.hpp"
#include "dspex/logging.hpp"
#include "dspex/settings.hpp"
#include "dspex/status.hpp"
#include "deadline_timer.hpp"
#include "idle_workers.hpp"

namespace dspex {
class pool_metrics;
} // namespace dspex

namespace dspex::detail {
class worker_channel;
} // namespace dspex::detail

namespace dspex::pool_detail {

using clock_type = std::chrono::steady_clock;

// Where a worker is in the pool's hands: the pool's own bookkeeping of
// checkouts, held only here (worker_info::state shows it). What the process
// is doing is another thing, the worker's lifecycle (worker_lifecycle.hpp),
// held only by its worker actor and published as worker_transition events.
// checking: out for a health ping (not idle, so no caller waits behind it);
// degraded: its last health ping failed: no work until a ping passes.
// configuring: applying the pool's setting (the LM) before it serves again;
// a new worker applies it while still `starting`.
enum class worker_state_t {
  starting, idle, busy, leased, checking, degraded, configuring, removing, stopping
};

inline const char* to_string(worker_state_t s) {
  switch (s) {
    case worker_state_t::starting: return "starting";
    case worker_state_t::idle: return "idle";
    case worker_state_t::busy: return "busy";
    case worker_state_t::leased: return "leased";
    case worker_state_t::checking: return "checking";
    case worker_state_t::degraded: return "degraded";
    case worker_state_t::configuring: return "configuring";
    case worker_state_t::removing: return "removing";
    case worker_state_t::stopping: return "stopping";
  }
  return "unknown";
}

struct worker_entry {
  pool_worker w;
  worker_state_t state = worker_state_t::starting;
  clock_type::time_point started_at = clock_type::now();
  clock_type::time_point last_activity = clock_type::now();
  bool initial = false;            ///< started with the pool (await_ready waits for these)
  /// Its own start succeeded (init_worker ready, or worker_ready): while it
  /// is still `starting` it is applying the pool's setting, and its loss is
  /// no start failure (only a refusal of the setting is).
  bool process_up = false;
  bool counted_as_removed = false; ///< counters already updated for its removal
  std::uint64_t lease = 0;         ///< the lease it is out under, if leased
  std::uint64_t recycle_after = 0; ///< requests before recycling (max_requests with jitter); 0 = never
  std::uint32_t health_failures = 0;  ///< failed health pings in a row
  bool seen_stopped = false;  ///< its process was in state T (stopped) at the last tick
  clock_type::time_point rss_checked_at{};
  std::uint64_t setting_generation = 0;  ///< the pool setting it has (0: the one it started with)
  std::optional<nlohmann::json> pending_setting;  ///< a setting call it is running for a caller
  /// When it took the call it runs (pool-mediated calls only): its run time
  /// ends at the checkin.
  std::optional<clock_type::time_point> running_since;
};

/// One caller waiting for a worker: a pool-mediated call or a lease request.
struct waiter {
  checkout_type type = checkout_type::anonymous();
  std::optional<call> request;      ///< a call to run (execute); empty for a lease request
  std::uint64_t token = 0;          ///< lease requests: the caller's token
  clock_type::time_point deadline;
  clock_type::time_point arrived = clock_type::now();  ///< its queue wait starts here
  caf::response_promise promise;
  caf::actor_addr caller;
  bool watched = false;  ///< queued callers are monitored; a down_msg drops them
};

struct lease_record {
  std::string worker_id;
  caf::actor_addr holder;
  std::uint64_t token = 0;
};

constexpr std::size_t max_retired = 64;

struct pool_state {
  std::shared_ptr<const settings> config;
  std::shared_ptr<worker_contract> contract;
  std::shared_ptr<event_bus> events;
  std::shared_ptr<pool_metrics> metrics;  ///< queue waits and run times (make_status)
  std::map<std::string, worker_entry> workers;
  /// The idle workers (oldest checkin first), which callers may also take
  /// directly (idle_workers.hpp): the one list of them.
  std::shared_ptr<detail::idle_workers> idle;
  std::map<std::uint64_t, waiter> queue;  ///< by ticket: FIFO order
  // New callers get increasing tickets, handed-back calls decreasing ones
  // below all of them: a retried caller goes first, it has waited longest.
  std::uint64_t next_ticket = std::uint64_t{1} << 40;
  std::uint64_t next_retry_ticket = (std::uint64_t{1} << 40) - 1;
  detail::deadline_timer queue_timer;  ///< the earliest queued caller's deadline
  std::map<std::uint64_t, lease_record> leases;
  std::map<caf::actor_addr, std::size_t> monitored;  ///< callers and how many entries name them
  std::uint64_t next_worker = 1;
  std::uint64_t replaced = 0;
  std::uint64_t workers_started = 0;                        ///< pool_status::workers_started
  std::map<std::string, std::uint64_t> removed_by_reason;  ///< pool_status::removed_by_reason
  std::uint64_t start_failures = 0;
  std::uint32_t consecutive_start_failures = 0;  ///< reset when a start succeeds
  /// Workers removed before serving anyone, reset at the next handover: a
  /// contract that removes every worker at checkout must not spin the pool.
  std::uint32_t consecutive_young_removals = 0;
  dspex::backoff restart_backoff;  ///< the crash-loop guard's delays
  std::optional<error> last_start_failure;  ///< until a start succeeds
  std::string health = "healthy";  ///< healthy, degraded, broken (see update_health)
  std::uint64_t recycled = 0;
  std::uint64_t health_check_failures = 0;
  std::uint64_t affinity_hits = 0;
  std::uint64_t affinity_misses = 0;
  std::uint64_t affinity_rebinds = 0;
  /// The pool's one setting (worker_contract::pool_setting_command; the
  /// Python workers': configure_lm, the LM): a call of it that succeeded on
  /// a worker becomes the pool's (generation + 1); every other worker, and
  /// every replacement, applies it before it serves again.
  std::string setting_command;  ///< empty: the contract has none
  std::uint64_t setting_generation = 0;
  nlohmann::json setting_args;
  bool tick_armed = false;         ///< a maintenance_tick is on its way
  std::mt19937_64 rng{std::random_device{}()};
  bool restart_pending = false;  ///< a delayed restart_atom is on its way
  bool backoff_served = false;   ///< it arrived: the next fill starts workers
  std::size_t initial_pending = 0;  ///< initial workers not yet ready
  /// Initial workers lost before they counted as started, not by a start
  /// failure (a kill from outside): their replacements are awaited instead.
  std::size_t initial_heirs = 0;
  std::optional<error> initial_failure;
  std::vector<caf::response_promise> ready_waiters;
  bool stopping = false;
  std::vector<caf::response_promise> stop_waiters;
  std::deque<worker_info> retired;
  /// Outside the state: the pool's attach_functor runs after the state is gone.
  std::shared_ptr<std::map<std::string, worker_handle>> live_workers
    = std::make_shared<std::map<std::string, worker_handle>>();
  std::deque<caf::actor_addr> former_workers;  ///< recently gone: ignore a second exit/down
  caf::error exit_after_stop;  ///< a supervisor's shutdown: quit with it once stopped

  static inline const char* name = "dspex.pool";
};

/// (worker_id): a worker's direct call was answered and the worker is the
/// pool's again (idle_workers::to_pool).
using direct_back_atom = caf::atom_constant<caf::atom("dback")>;
/// (steady-clock ns): a caller waits in idle_workers until then at most;
/// the queue timer must wake the pool by that time (idle_workers::expire).
using direct_due_atom = caf::atom_constant<caf::atom("ddue")>;

/// The pool actor's whole interface: its public one (pool_handle), its
/// direct lane's (idle_workers) and its own timers'.
using pool_actor_type = pool_handle::extend<
  caf::reacts_to<direct_back_atom, std::string>,
  caf::reacts_to<direct_due_atom, std::int64_t>,
  caf::reacts_to<queue_timeout_atom, std::uint64_t>,
  caf::reacts_to<maintenance_atom>,
  caf::reacts_to<restart_atom>,
  caf::reacts_to<retire_atom, std::string>>;

using pool_actor_t = pool_actor_type::stateful_pointer<pool_state>;

// The contract runs user code: an exception becomes `on_throw(what)` (a
// removal), never a crash. `on_throw` only runs when something was thrown.
template <class OnThrow, class F>
auto guarded(const std::string& worker_id, const char* callback, OnThrow&& on_throw, F&& fun)
  -> decltype(fun()) {
  try {
    return fun();
  } catch (const std::exception& e) {
    log().error("[{}] {} threw: {}", worker_id, callback, e.what());
    return on_throw(std::string{e.what()});
  } catch (...) {
    log().error("[{}] {} threw a non-standard exception", worker_id, callback);
    return on_throw(std::string{"non-standard exception"});
  }
}

// -- pool_actor.cpp: the behavior, stop, and the helpers every file uses ----------------

/// The contract callback `callback` threw: the error that removes the worker.
error callback_failed(const std::string& worker_id, const char* callback);
/// Publishes a pool event on the pool's bus (source "pool" unless set).
void publish(pool_actor_t self, event e);
/// A pool event of `kind`, about a worker when `worker_id` is set.
event make_event(event_kind kind, std::string worker_id = {}, std::string reason = {});
/// Stop: queued callers fail, every worker is stopped; the pool quits once all are reaped.
void begin_stop(pool_actor_t self);
/// Quits (answering the stop callers) once stopping and the last worker is reaped.
void finish_stop_if_done(pool_actor_t self);

// -- pool_queue.cpp: callers waiting for a worker, checkout and checkin ------------------

/// Queued callers and lease holders are monitored, counted per caller.
void watch_caller(pool_actor_t self, const caf::actor_addr& caller);
void unwatch_caller(pool_actor_t self, const caf::actor_addr& caller);
/// The checkout type (and session) a pool-made error names.
nlohmann::json caller_context(const checkout_type& t);
/// checkout_timeout: the caller's deadline passed before a worker was free.
outcome timeout_outcome(const waiter& wt);
/// Answers a waiter with an error, as an outcome or a checkout_reply.
void fail_waiter(waiter& wt, error err);
/// Wakes the pool by `due` (the earliest deadline of a waiting caller).
void arm_queue_timer(pool_actor_t self, clock_type::time_point due);
/// A checkout ended: counts it, then keeps, recycles or removes the worker.
void finish_checkin(pool_actor_t self, worker_entry& e, const checkin_status& status);
/// Serves waiters, starting workers as they are needed.
void dispatch(pool_actor_t self);
/// Entry of every checkout: serve now, or queue with the caller's deadline.
caf::response_promise enqueue(pool_actor_t self, waiter wt, bool block);
/// The waiter of a pool-mediated call from the current sender.
waiter waiter_for(pool_actor_t self, call c);

// -- pool_leases.cpp: leases --------------------------------------------------------------

/// A fresh lease id from the kernel's CSPRNG: a capability, never 0, never reused while open.
std::uint64_t new_lease_id(const std::map<std::uint64_t, lease_record>& open);
/// Forgets the worker's lease (and stops watching its holder), if it has one.
void end_lease(pool_actor_t self, worker_entry& e);
/// A caller went away: its queued checkouts are dropped, its leases revoked.
void on_caller_down(pool_actor_t self, caf::down_msg& msg);

// -- pool_maintenance.cpp: recycling, health pings, the maintenance tick ------------------

/// Why a healthy worker is over one of its limits (and is recycled), if it is.
std::optional<error> recycle_reason(pool_actor_t self, worker_entry& e,
                                    clock_type::time_point now);
/// Replaces a worker over a limit (counted as recycled, not as a failure).
void recycle(pool_actor_t self, worker_entry& e, const error& why);
/// The contract's idle check (handle_ping) on idle worker `e`: false when it
/// said remove (the worker is removed).
bool contract_ping(pool_actor_t self, worker_entry& e);
/// Schedules the next maintenance tick, when a limit or the health interval needs one.
void arm_maintenance(pool_actor_t self);
/// One tick: reaps stopped processes, recycles and pings idle workers.
void maintain(pool_actor_t self);

// -- pool_membership.cpp: starting, replacing and removing workers ------------------------

/// pool_unavailable: the pool is broken, callers fail fast naming the last start failure.
error pool_unavailable(pool_actor_t self, const checkout_type& type);
/// A worker is ready: resets the crash-loop guard, publishes worker_ready.
void note_start_success(pool_actor_t self, const std::string& worker_id, int pid);
/// Starts one worker through the contract (ready now, later, or failed).
void start_worker(pool_actor_t self, bool initial, bool overflow);
/// Starts the workers the pool lacks, unless the crash-loop guard delays them.
bool fill_pool(pool_actor_t self);
/// The worker leaves the pool for good and a replacement starts.
void remove_worker(pool_actor_t self, worker_entry& e, const error& reason,
                   bool start_failure = false);
/// Answers await_ready: every initial worker is ready, or the first failure.
void answer_ready_waiters(pool_actor_t self);
/// An exit_msg: a worker's (as a down), or a linked parent's (ends the pool).
void on_exit(pool_actor_t self, caf::exit_msg& msg);
/// Worker `e`'s own start succeeded (init_worker ready, or worker_ready): it
/// applies the pool's setting first if it has not got it, then counts as
/// started (worker_started). Both ways of a start end here.
/// @note The queue is not served here (the caller dispatches, or, inside
///       fill_pool, its caller does): a dispatch from within fill_pool
///       would start workers fill_pool is about to start.
void worker_up(pool_actor_t self, worker_entry& e);
/// Worker `e` is up and has the pool's setting: it counts as started (the
/// crash-loop guard, await_ready) and becomes idle (make_idle).
/// @note As worker_up: the caller dispatches.
void worker_started(pool_actor_t self, worker_entry& e);
/// A worker actor is gone: its entry is removed and a replacement starts.
void on_worker_down(pool_actor_t self, const caf::actor_addr& source, caf::error reason);

// -- pool_setting.cpp: one setting per pool (the Python workers' LM) -----------------------

/// Applies the pool's setting to a worker before it serves again.
/// `at_start`: a new worker's first; it stays `starting` until it has it, and
/// a refusal is a start failure.
void start_setting(pool_actor_t self, worker_entry& e, bool at_start = false);
/// A caller's setting call succeeded on `e`: it becomes the pool's, for every worker.
void adopt_setting(pool_actor_t self, worker_entry& e, nlohmann::json args);

// -- pool_direct_lane.cpp: the pool's side of the direct lane -----------------------------

/// Runs what idle_workers hands back: waiters served by a channel, or sent the usual way.
void run_waiters(std::vector<std::pair<detail::direct_waiter,
                                       std::shared_ptr<detail::worker_channel>>> serve);
/// Sends waiters of the direct lane the usual way (through the pool actor).
void reroute_waiters(std::vector<detail::direct_waiter> waiters);
/// The worker's lane for direct calls (the contract's), or null.
std::shared_ptr<detail::worker_channel> channel_of(pool_actor_t self, worker_entry& e);
/// Folds the calls a worker served directly into its statistics.
void fold_direct_calls(pool_actor_t self, worker_entry& e);
/// The direct lane yields to callers queued here (FIFO across both lanes).
void sync_waiting(pool_actor_t self);
/// The worker is idle: configured first if stale, retired if overflow, else offered to both lanes.
void make_idle(pool_actor_t self, worker_entry& e);

// -- pool_status.cpp: status ---------------------------------------------------------------

/// One worker as pool_status (and the retired list) shows it.
worker_info info_of(const worker_entry& e, clock_type::time_point now);
/// The pool's status, computed from the live state.
pool_status make_status(pool_actor_t self);

} // namespace dspex::pool_detail
