// idle_workers: one pool's idle workers, the one list of them. The pool actor
// puts a worker here when it becomes idle and takes it out to hand it to a
// queued caller, a lease, a health ping or a recycling; a caller of the
// direct lane (worker_channel) takes one here without asking the pool actor,
// and the worker's I/O thread gives it back when the call is answered.
//
// The pool actor stays the authority: it decides what enters, and it can
// stop the direct lane at any time (pause, set_pool_waiting, close). A
// worker that is out on a direct call cannot be taken; recall() makes it go
// to the pool actor (a checkin) instead of coming back here.
//
// Thread-safe; internal to actors/ (no CAF here).
#pragma once

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

class idle_workers {
public:
  /// Sends a worker back to the pool actor (a checkin). Called by
  /// give_back's caller, never under this object's lock.
  using to_pool_fn = std::function<void(const std::string& worker_id)>;

  /// @param lifo take the newest idle worker first (pool.strategy lifo).
  /// @param metrics the pool's, for the run time of direct calls.
  idle_workers(bool lifo, std::shared_ptr<pool_metrics> metrics);

  pool_metrics& metrics() const noexcept { return *metrics_; }

  /// Set once by the pool actor when it starts.
  void set_to_pool(to_pool_fn fn);
  /// Sends `worker_id` to the pool actor (see to_pool_fn).
  void to_pool(const std::string& worker_id) const;

  // -- the pool actor --------------------------------------------------------

  /// A worker became idle; `channel` (may be null) lets callers take it directly.
  void put(const std::string& worker_id, std::shared_ptr<worker_channel> channel);
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
  void resume();
  /// For good: no direct take, and every worker goes to the pool actor.
  void close();

  // -- callers and I/O threads ----------------------------------------------------

  /// An idle worker for a direct call, or null (none idle with a channel,
  /// the pool has waiters, the lane is paused or closed).
  std::shared_ptr<worker_channel> take_direct();
  /// The direct call of `channel` ended (or never started). True: it is
  /// idle here again. False: it belongs to the pool actor now; the caller
  /// must call to_pool (its budget is spent, it was recalled or forgotten,
  /// the pool has waiters, the lane is paused or closed).
  bool give_back(const std::shared_ptr<worker_channel>& channel);

private:
  struct entry {
    std::string id;
    std::shared_ptr<worker_channel> channel;
  };

  const bool lifo_;
  const std::shared_ptr<pool_metrics> metrics_;
  to_pool_fn to_pool_;
  mutable std::mutex mtx_;
  std::deque<entry> idle_;
  std::map<std::string, std::shared_ptr<worker_channel>> out_;  ///< on a direct call
  std::set<std::string> recalled_;
  bool pool_waiting_ = false;
  int paused_ = 0;
  bool closed_ = false;
};

} // namespace dspex::detail
