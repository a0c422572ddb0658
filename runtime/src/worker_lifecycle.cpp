#include "dspex/worker_lifecycle.hpp"

#include <array>

namespace dspex {

namespace {

constexpr std::array<const char*, 6> state_names = {"initializing", "ready",       "busy",
                                                    "degraded",     "terminating", "terminated"};

} // namespace

const char* to_string(lifecycle_state s) noexcept {
  auto i = static_cast<std::size_t>(s);
  return i < state_names.size() ? state_names[i] : "unknown";
}

std::optional<lifecycle_state> lifecycle_state_from_string(std::string_view name) noexcept {
  for (std::size_t i = 0; i < state_names.size(); ++i)
    if (name == state_names[i])
      return static_cast<lifecycle_state>(i);
  return std::nullopt;
}

worker_lifecycle::worker_lifecycle(std::string worker_id, time_point now,
                                   std::size_t history_capacity)
  : worker_id_(std::move(worker_id)), entered_at_(now), capacity_(history_capacity) {}

worker_lifecycle::duration worker_lifecycle::time_in_state(time_point now) const noexcept {
  return now > entered_at_ ? now - entered_at_ : duration::zero();
}

std::optional<error> worker_lifecycle::transition(lifecycle_state to, std::string reason,
                                                  time_point now) {
  if (!lifecycle_allows(state_, to)) {
    ++rejected_;
    return make_error(error_category::system_error, "invalid_transition",
                      "worker " + worker_id_ + ": no transition from " + to_string(state_)
                        + " to " + to_string(to) + " (" + reason + ")",
                      {{"worker_id", worker_id_},
                       {"from", to_string(state_)},
                       {"to", to_string(to)},
                       {"reason", reason}});
  }
  lifecycle_record rec{state_, to, std::move(reason), now, time_in_state(now)};
  state_ = to;
  entered_at_ = now > entered_at_ ? now : entered_at_;
  ++accepted_;
  if (capacity_ > 0) {
    if (history_.size() == capacity_)
      history_.pop_front();
    history_.push_back(std::move(rec));
  }
  return std::nullopt;
}

} // namespace dspex
