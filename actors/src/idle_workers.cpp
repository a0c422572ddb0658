#include "idle_workers.hpp"

#include <algorithm>
#include <utility>

#include "worker_channel.hpp"

namespace dspex::detail {

idle_workers::idle_workers(bool lifo, std::shared_ptr<pool_metrics> metrics,
                           std::size_t max_waiting)
  : lifo_(lifo), metrics_(std::move(metrics)), max_waiting_(max_waiting) {
}

void idle_workers::set_to_pool(to_pool_fn fn, arm_fn arm) {
  std::lock_guard<std::mutex> lk{mtx_};
  to_pool_ = std::move(fn);
  arm_ = std::move(arm);
}

void idle_workers::to_pool(const std::string& worker_id) const {
  to_pool_fn fn;
  {
    std::lock_guard<std::mutex> lk{mtx_};
    fn = to_pool_;
  }
  if (fn)
    fn(worker_id);
}

std::optional<direct_waiter> idle_workers::put(const std::string& worker_id,
                                               std::shared_ptr<worker_channel> channel) {
  std::lock_guard<std::mutex> lk{mtx_};
  out_.erase(worker_id);
  recalled_.erase(worker_id);
  known_.insert(worker_id);
  // The pool's own waiters had their turn (it puts a worker here only when
  // none of them takes it): the line here is next.
  if (channel && !waiters_.empty() && !closed_ && paused_ == 0) {
    auto w = std::move(waiters_.front());
    waiters_.pop_front();
    count_affinity(w.preferred, worker_id);
    out_[worker_id] = std::move(channel);
    return w;
  }
  idle_.push_back(entry{worker_id, std::move(channel)});
  return std::nullopt;
}

std::optional<std::string> idle_workers::take_any() {
  std::lock_guard<std::mutex> lk{mtx_};
  if (idle_.empty())
    return std::nullopt;
  std::string id;
  if (lifo_) {
    id = std::move(idle_.back().id);
    idle_.pop_back();
  } else {
    id = std::move(idle_.front().id);
    idle_.pop_front();
  }
  return id;
}

bool idle_workers::take(const std::string& worker_id) {
  std::lock_guard<std::mutex> lk{mtx_};
  auto it = std::find_if(idle_.begin(), idle_.end(),
                         [&](const entry& e) { return e.id == worker_id; });
  if (it == idle_.end())
    return false;
  idle_.erase(it);
  return true;
}

void idle_workers::forget(const std::string& worker_id) {
  std::lock_guard<std::mutex> lk{mtx_};
  idle_.erase(std::remove_if(idle_.begin(), idle_.end(),
                             [&](const entry& e) { return e.id == worker_id; }),
              idle_.end());
  out_.erase(worker_id);
  recalled_.erase(worker_id);
  known_.erase(worker_id);
}

void idle_workers::recall(const std::string& worker_id) {
  std::lock_guard<std::mutex> lk{mtx_};
  if (out_.count(worker_id))
    recalled_.insert(worker_id);
}

void idle_workers::recall_all() {
  std::lock_guard<std::mutex> lk{mtx_};
  for (auto& [id, ch] : out_)
    recalled_.insert(id);
}

bool idle_workers::contains(const std::string& worker_id) const {
  std::lock_guard<std::mutex> lk{mtx_};
  return std::any_of(idle_.begin(), idle_.end(),
                     [&](const entry& e) { return e.id == worker_id; });
}

bool idle_workers::out_on_direct_call(const std::string& worker_id) const {
  std::lock_guard<std::mutex> lk{mtx_};
  return out_.count(worker_id) > 0;
}

std::size_t idle_workers::size() const {
  std::lock_guard<std::mutex> lk{mtx_};
  return idle_.size();
}

std::vector<std::string> idle_workers::ids() const {
  std::lock_guard<std::mutex> lk{mtx_};
  std::vector<std::string> ids;
  for (auto& e : idle_)
    ids.push_back(e.id);
  return ids;
}

void idle_workers::set_pool_waiting(bool waiting) {
  std::lock_guard<std::mutex> lk{mtx_};
  pool_waiting_ = waiting;
}

void idle_workers::pause() {
  std::lock_guard<std::mutex> lk{mtx_};
  ++paused_;
}

std::vector<std::pair<direct_waiter, std::shared_ptr<worker_channel>>> idle_workers::resume() {
  std::lock_guard<std::mutex> lk{mtx_};
  std::vector<std::pair<direct_waiter, std::shared_ptr<worker_channel>>> serve;
  if (paused_ > 0)
    --paused_;
  if (paused_ > 0 || closed_)
    return serve;
  while (!waiters_.empty()) {
    auto it = std::find_if(idle_.begin(), idle_.end(),
                           [](const entry& e) { return e.channel != nullptr; });
    if (it == idle_.end())
      break;
    out_[it->id] = it->channel;
    count_affinity(waiters_.front().preferred, it->id);
    serve.emplace_back(std::move(waiters_.front()), it->channel);
    waiters_.pop_front();
    idle_.erase(it);
  }
  return serve;
}

std::vector<direct_waiter> idle_workers::close() {
  std::lock_guard<std::mutex> lk{mtx_};
  closed_ = true;
  // Drops the channels: they point back here (weakly) and must not be kept
  // alive by a pool that is gone.
  idle_.clear();
  out_.clear();
  std::vector<direct_waiter> left(std::make_move_iterator(waiters_.begin()),
                                  std::make_move_iterator(waiters_.end()));
  waiters_.clear();
  return left;
}

std::pair<std::vector<direct_waiter>, std::optional<idle_workers::clock_type::time_point>>
idle_workers::expire(clock_type::time_point now) {
  std::lock_guard<std::mutex> lk{mtx_};
  std::vector<direct_waiter> expired;
  std::optional<clock_type::time_point> next;
  for (auto it = waiters_.begin(); it != waiters_.end();) {
    if (it->deadline <= now) {
      expired.push_back(std::move(*it));
      it = waiters_.erase(it);
    } else {
      if (!next || it->deadline < *next)
        next = it->deadline;
      ++it;
    }
  }
  armed_ = next;
  return {std::move(expired), next};
}

std::vector<direct_waiter> idle_workers::set_waiting_allowed(bool allowed) {
  std::lock_guard<std::mutex> lk{mtx_};
  waiting_allowed_ = allowed;
  std::vector<direct_waiter> left;
  if (!allowed) {
    left.assign(std::make_move_iterator(waiters_.begin()), std::make_move_iterator(waiters_.end()));
    waiters_.clear();
  }
  return left;
}

std::size_t idle_workers::waiting() const {
  std::lock_guard<std::mutex> lk{mtx_};
  return waiters_.size();
}

idle_workers::wait_answer idle_workers::take_or_wait(direct_waiter& waiter,
                                                     std::shared_ptr<worker_channel>& taken) {
  arm_fn arm;
  auto due = waiter.deadline;
  {
    std::lock_guard<std::mutex> lk{mtx_};
    if (closed_ || paused_ > 0 || pool_waiting_)
      return wait_answer::refused;
    auto it = find_direct(waiter.preferred);
    if (it != idle_.end()) {
      count_affinity(waiter.preferred, it->id);
      taken = it->channel;
      out_[it->id] = taken;
      idle_.erase(it);
      return wait_answer::taken;
    }
    if (!waiting_allowed_ || waiters_.size() >= max_waiting_)
      return wait_answer::refused;  // the pool answers it (pool_unavailable, pool_saturated)
    // Only a waiter due before every wake-up asked for needs a new one.
    if (!armed_ || due < *armed_) {
      armed_ = due;
      arm = arm_;
    }
    waiters_.push_back(std::move(waiter));
  }
  if (arm)
    arm(due);
  return wait_answer::queued;
}

std::deque<idle_workers::entry>::iterator idle_workers::find_direct(const std::string& preferred) {
  auto has_channel = [](const entry& e) { return e.channel != nullptr; };
  if (!preferred.empty()) {
    auto it = std::find_if(idle_.begin(), idle_.end(), [&](const entry& e) {
      return e.channel != nullptr && e.id == preferred;
    });
    if (it != idle_.end())
      return it;
  }
  if (!lifo_)
    return std::find_if(idle_.begin(), idle_.end(), has_channel);
  auto r = std::find_if(idle_.rbegin(), idle_.rend(), has_channel);
  return r == idle_.rend() ? idle_.end() : std::prev(r.base());
}

std::shared_ptr<worker_channel> idle_workers::take_direct() {
  std::lock_guard<std::mutex> lk{mtx_};
  if (closed_ || paused_ > 0 || pool_waiting_)
    return nullptr;
  auto it = find_direct();
  if (it == idle_.end())
    return nullptr;
  auto ch = it->channel;
  out_[it->id] = ch;
  idle_.erase(it);
  return ch;
}

idle_workers::next_use idle_workers::give_back(const std::shared_ptr<worker_channel>& channel) {
  std::lock_guard<std::mutex> lk{mtx_};
  const auto& id = channel->worker_id();
  auto it = out_.find(id);
  if (it == out_.end() || it->second != channel)
    return {next_use::to_pool, std::nullopt};  // forgotten meanwhile: the pool actor decides
  if (recalled_.erase(id) > 0 || closed_ || paused_ > 0 || pool_waiting_
      || channel->budget_spent()) {
    out_.erase(it);
    return {next_use::to_pool, std::nullopt};
  }
  if (!waiters_.empty()) {
    auto w = std::move(waiters_.front());
    waiters_.pop_front();
    count_affinity(w.preferred, id);
    return {next_use::serve, std::move(w)};  // stays out, on the next call
  }
  out_.erase(it);
  idle_.push_back(entry{id, channel});
  return {next_use::idle, std::nullopt};
}

void idle_workers::count_affinity(const std::string& preferred, const std::string& served) {
  if (preferred.empty())
    return;
  if (served == preferred)
    ++affinity_.hits;
  else if (known_.count(preferred) > 0)
    ++affinity_.misses;  // it lives, busy: a hint lets another serve
  else
    ++affinity_.rebinds;
}

idle_workers::affinity_counts idle_workers::take_affinity_counts() {
  std::lock_guard<std::mutex> lk{mtx_};
  return std::exchange(affinity_, affinity_counts{});
}

} // namespace dspex::detail
