#include "dspex/call_counts.hpp"

#include "dspex/json_limits.hpp"

namespace dspex {

namespace {

constexpr error_category categories[] = {
  error_category::initialization_error, error_category::connection_error,
  error_category::communication_error,  error_category::timeout_error,
  error_category::resource_error,       error_category::health_check_error,
  error_category::session_error,        error_category::python_error,
  error_category::system_error,         error_category::configuration_error};

std::size_t slot_of(const outcome& o) {
  if (o.ok())
    return 0;
  return static_cast<std::size_t>(o.error().category) + 1;
}

} // namespace

static_assert(std::size(categories) + 1 == 11, "call_counts: one slot per category and ok");

void call_counts::count(std::string_view command, const outcome& o) {
  auto slot = slot_of(o);
  if (slot >= outcome_slots)
    return;
  std::string key{command};  // commands are short: no allocation (small string)
  std::lock_guard<std::mutex> guard{mtx_};
  auto it = counts_.find(key);
  if (it == counts_.end()) {
    if (counts_.size() >= max_commands || !valid_utf8(key))
      key = "other";
    it = counts_.try_emplace(std::move(key)).first;
  }
  ++it->second[slot];
}

std::map<std::pair<std::string, std::string>, std::uint64_t> call_counts::snapshot() const {
  std::map<std::pair<std::string, std::string>, std::uint64_t> out;
  std::lock_guard<std::mutex> guard{mtx_};
  for (auto& [command, slots] : counts_)
    for (std::size_t i = 0; i < outcome_slots; ++i)
      if (slots[i] > 0)
        out[{command, i == 0 ? std::string{ok_label} : std::string{to_string(categories[i - 1])}}] =
          slots[i];
  return out;
}

} // namespace dspex
