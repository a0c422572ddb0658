// Records the events of a bus so a test can wait for what it expects to
// happen (a restart, a circuit change, a retry) instead of sleeping.
#pragma once

#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <vector>

#include "dspex/events.hpp"

namespace dspex::testing {

class event_recorder {
public:
  using predicate = std::function<bool(const event&)>;

  explicit event_recorder(event_bus& bus);
  ~event_recorder();  ///< unsubscribes
  event_recorder(const event_recorder&) = delete;
  event_recorder& operator=(const event_recorder&) = delete;

  /// Waits until at least `n` recorded events match; false on timeout.
  bool wait_for(const predicate& match, std::size_t n = 1,
                std::chrono::milliseconds timeout = std::chrono::seconds{15});

  /// How many recorded events match.
  std::size_t count(const predicate& match) const;
  /// A copy of every event so far, oldest first.
  std::vector<event> all() const;
  void clear();

private:
  event_bus& bus_;
  std::uint64_t subscription_ = 0;
  mutable std::mutex mtx_;
  std::condition_variable cv_;
  std::vector<event> events_;
};

/// Matches events of one kind (and, when given, one `to` state).
event_recorder::predicate kind_is(event_kind k, std::string to = {});

} // namespace dspex::testing
