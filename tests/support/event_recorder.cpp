#include "support/event_recorder.hpp"

namespace dspex::testing {

event_recorder::event_recorder(event_bus& bus) : bus_(bus) {
  subscription_ = bus_.subscribe([this](const event& e) {
    {
      std::lock_guard<std::mutex> guard{mtx_};
      events_.push_back(e);
    }
    cv_.notify_all();
  });
}

event_recorder::~event_recorder() {
  bus_.unsubscribe(subscription_);
}

std::size_t event_recorder::count(const predicate& match) const {
  std::lock_guard<std::mutex> guard{mtx_};
  std::size_t n = 0;
  for (auto& e : events_)
    n += match(e) ? 1 : 0;
  return n;
}

bool event_recorder::wait_for(const predicate& match, std::size_t n,
                              std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock{mtx_};
  return cv_.wait_for(lock, timeout, [&] {
    std::size_t found = 0;
    for (auto& e : events_)
      found += match(e) ? 1 : 0;
    return found >= n;
  });
}

std::vector<event> event_recorder::all() const {
  std::lock_guard<std::mutex> guard{mtx_};
  return events_;
}

void event_recorder::clear() {
  std::lock_guard<std::mutex> guard{mtx_};
  events_.clear();
}

event_recorder::predicate kind_is(event_kind k, std::string to) {
  return [k, to = std::move(to)](const event& e) {
    return e.kind == k && (to.empty() || e.to == to);
  };
}

} // namespace dspex::testing
