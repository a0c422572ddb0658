// idle_workers: one pool's idle workers, the one list of them. The pool actor
// puts a worker here when it becomes idle and takes it out to hand it to a
// queued caller, a lease, a health ping or a recycling; a caller of the
// direct lane (worker_channel) takes one here without asking the pool actor,
// and the worker's I/O thread gives it back when the call is answered.
//
// Callers of the direct lane that find no idle worker wait here, in order
// (direct_waiter), while nobody waits in the pool actor's queue: a worker
// whose call was answered starts the next waiter's call on its I/O thread,
// so under load a worker never waits for a thread to wake. A waiter whose
// deadline passes, or that this list can no longer serve (close), goes the
// usual way through the pool client and the pool actor, whose rules answer it.
//
// The pool actor stays the authority: it decides what enters, and it can
// stop the direct lane at any time (pause, set_pool_waiting, close). A
// worker that is out on a direct call cannot be taken; recall() makes it go
// to the pool actor (a checkin) instead of coming back here.
//
// Thread-safe; internal to actors/ (no CAF here).
#pragma once

#include <chrono>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace dspex {
class pool_metrics;
} // namespace dspex

namespace dspex::detail {

class worker_channel;

/// A caller of the direct lane waiting for a worker.
struct direct_waiter {
  std::chrono::steady_clock::time_point deadline;
  /// Runs the call on the channel it was given, or, with null, sends it the
  /// usual way (its deadline passed here, or the lane closed). Called once,
  /// never under the list's lock.
  std::function<void(std::shared_ptr<worker_channel>)> run;
  /// A session's worker, taken when idle (affinity hint: any other will do).
  std::string preferred{};
};

class idle_workers {
public:
  using clock_type = std::chrono::steady_clock;
  /// Asks the pool actor to call expire() at the given time.
  using arm_fn = std::function<void(clock_type::time_point)>;

  /// Sends a worker back to the pool actor (a checkin). Called by
  /// give_back's caller, never under this object's lock.
  using to_pool_fn = std::function<void(const std::string& worker_id)>;

  /// @param lifo take the newest idle worker first (pool.strategy lifo).
  /// @param metrics the pool's, for the run time of direct calls.
  /// @param max_waiting callers that may wait here (pool.max_queue).
  idle_workers(bool lifo, std::shared_ptr<pool_metrics> metrics, std::size_t max_waiting);

  pool_metrics& metrics() const noexcept { return *metrics_; }

  /// Set once by the pool actor when it starts.
  void set_to_pool(to_pool_fn fn, arm_fn arm);
  /// Sends `worker_id` to the pool actor (see to_pool_fn).
  void to_pool(const std::string& worker_id) const;

  // -- the pool actor --------------------------------------------------------

  /// A worker became idle; `channel` (may be null) lets callers take it
  /// directly. With a channel and a waiter here, it serves that waiter: the
  /// waiter is returned, to be run with the channel by the caller.
  std::optional<direct_waiter> put(const std::string& worker_id,
                                   std::shared_ptr<worker_channel> channel);
  /// Takes the next idle worker (oldest, or newest with lifo).
  std::optional<std::string> take_any();
  /// Takes `worker_id` if it is idle here (false: not here, e.g. out on a direct call).
  bool take(const std::string& worker_id);
  /// Removes every trace of `worker_id`: not idle any more, and if it is out
  /// on a direct call it will not come back here.
  void forget(const std::string& worker_id);
  /// It is out on a direct call: when answered it goes to the pool actor.
  void recall(const std::string& worker_id);
  /// Every worker out on a direct call goes to the pool actor when answered.
  void recall_all();
  bool contains(const std::string& worker_id) const;
  /// True while `worker_id` serves a direct call.
  bool out_on_direct_call(const std::string& worker_id) const;
  std::size_t size() const;
  std::vector<std::string> ids() const;
  /// Callers are waiting in the pool actor's queue: the direct lane yields to them.
  void set_pool_waiting(bool waiting);
  /// No direct take until the matching resume() (nested).
  void pause();
  /// @returns the waiters that idle workers serve now, each with its channel.
  std::vector<std::pair<direct_waiter, std::shared_ptr<worker_channel>>> resume();
  /// For good: no direct take, and every worker goes to the pool actor.
  /// @returns the waiters, to be sent the usual way (run(nullptr)).
  std::vector<direct_waiter> close();
  /// The waiters whose deadline has passed by `now`, out of the list (to be
  /// sent the usual way), and when the next one is due.
  std::pair<std::vector<direct_waiter>, std::optional<clock_type::time_point>> expire(
    clock_type::time_point now);
  /// Callers waiting here.
  std::size_t waiting() const;
  /// While false, no caller waits here (the pool answers them: a broken
  /// pool fails them at once). Closing it hands back those waiting, to be
  /// sent the usual way.
  std::vector<direct_waiter> set_waiting_allowed(bool allowed);

  // -- callers and I/O threads ----------------------------------------------------

  /// An idle worker for a direct call, or null (none idle with a channel,
  /// the pool has waiters, the lane is paused or closed).
  std::shared_ptr<worker_channel> take_direct();

  enum class wait_answer {
    taken,    ///< `taken` is an idle worker: run the call on it now
    queued,   ///< the waiter waits here; it will be run
    refused,  ///< the lane cannot take it (closed, paused, callers wait in
              ///< the pool, the list is full): nothing happened
  };
  /// An idle worker now (the waiter's preferred one when it is idle), or a
  /// place in the line.
  wait_answer take_or_wait(direct_waiter& waiter, std::shared_ptr<worker_channel>& taken);

  /// Session calls served here with a preferred worker: by it (hits), by
  /// another while it lived (misses), by another because it was gone
  /// (rebinds), as the pool counts its own (pool_status::affinity_*).
  struct affinity_counts {
    std::uint64_t hits = 0, misses = 0, rebinds = 0;
  };
  /// @returns the counts since the last call, and resets them.
  affinity_counts take_affinity_counts();

  /// What becomes of a worker whose direct call ended (give_back).
  struct next_use {
    enum kind { idle, to_pool, serve } what = idle;
    /// serve: the waiter to run on the same worker now (it stays out).
    std::optional<direct_waiter> waiter;
  };
  /// The direct call of `channel` ended (or never started). idle: it waits
  /// here again. serve: it runs the next waiter's call (call its run with
  /// the channel). to_pool: it belongs to the pool actor now; the caller
  /// must call to_pool (its budget is spent, it was recalled or forgotten,
  /// the pool has waiters, the lane is paused or closed).
  next_use give_back(const std::shared_ptr<worker_channel>& channel);

private:
  struct entry {
    std::string id;
    std::shared_ptr<worker_channel> channel;
  };

  /// The idle worker a direct call takes (`preferred` if idle here, else the
  /// oldest, or newest with lifo), or end().
  std::deque<entry>::iterator find_direct(const std::string& preferred = {});
  /// Counts a session call with `preferred` served by `served` (under the lock).
  void count_affinity(const std::string& preferred, const std::string& served);

  const bool lifo_;
  const std::shared_ptr<pool_metrics> metrics_;
  const std::size_t max_waiting_;
  to_pool_fn to_pool_;
  arm_fn arm_;
  mutable std::mutex mtx_;
  std::deque<entry> idle_;
  std::map<std::string, std::shared_ptr<worker_channel>> out_;  ///< on a direct call
  std::set<std::string> recalled_;
  std::set<std::string> known_;  ///< every worker put here and not yet forgotten
  affinity_counts affinity_;
  std::deque<direct_waiter> waiters_;
  /// The earliest time the pool actor was asked to call expire() at.
  std::optional<clock_type::time_point> armed_;
  bool pool_waiting_ = false;
  bool waiting_allowed_ = true;
  int paused_ = 0;
  bool closed_ = false;
};

} // namespace dspex::detail
