#include "idle_workers.hpp"

#include <algorithm>

#include "worker_channel.hpp"

namespace dspex::detail {

idle_workers::idle_workers(bool lifo, std::shared_ptr<pool_metrics> metrics)
  : lifo_(lifo), metrics_(std::move(metrics)) {
}

void idle_workers::set_to_pool(to_pool_fn fn) {
  std::lock_guard<std::mutex> lk{mtx_};
  to_pool_ = std::move(fn);
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

void idle_workers::put(const std::string& worker_id, std::shared_ptr<worker_channel> channel) {
  std::lock_guard<std::mutex> lk{mtx_};
  out_.erase(worker_id);
  recalled_.erase(worker_id);
  idle_.push_back(entry{worker_id, std::move(channel)});
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

void idle_workers::resume() {
  std::lock_guard<std::mutex> lk{mtx_};
  if (paused_ > 0)
    --paused_;
}

void idle_workers::close() {
  std::lock_guard<std::mutex> lk{mtx_};
  closed_ = true;
  // Drops the channels: they point back here (weakly) and must not be kept
  // alive by a pool that is gone.
  idle_.clear();
  out_.clear();
}

std::shared_ptr<worker_channel> idle_workers::take_direct() {
  std::lock_guard<std::mutex> lk{mtx_};
  if (closed_ || paused_ > 0 || pool_waiting_)
    return nullptr;
  if (lifo_) {
    auto it = std::find_if(idle_.rbegin(), idle_.rend(),
                           [](const entry& e) { return e.channel != nullptr; });
    if (it == idle_.rend())
      return nullptr;
    auto ch = it->channel;
    out_[it->id] = ch;
    idle_.erase(std::next(it).base());
    return ch;
  }
  auto it = std::find_if(idle_.begin(), idle_.end(),
                         [](const entry& e) { return e.channel != nullptr; });
  if (it == idle_.end())
    return nullptr;
  auto ch = it->channel;
  out_[it->id] = ch;
  idle_.erase(it);
  return ch;
}

bool idle_workers::give_back(const std::shared_ptr<worker_channel>& channel) {
  std::lock_guard<std::mutex> lk{mtx_};
  const auto& id = channel->worker_id();
  auto it = out_.find(id);
  if (it == out_.end() || it->second != channel)
    return false;  // forgotten meanwhile: the pool actor decides
  out_.erase(it);
  if (recalled_.erase(id) > 0 || closed_ || paused_ > 0 || pool_waiting_ || channel->budget_spent())
    return false;
  idle_.push_back(entry{id, channel});
  return true;
}

} // namespace dspex::detail
