// Bounded store of anonymous program definitions (see program_store.hpp).
#include "dspex/program_store.hpp"

#include <algorithm>

namespace dspex {

program_store::program_store(std::size_t capacity) : capacity_(std::max<std::size_t>(capacity, 1)) {
}

const nlohmann::json* program_store::find(const key& k) {
  auto it = entries_.find(k);
  if (it == entries_.end())
    return nullptr;
  order_.splice(order_.begin(), order_, it->second.second);
  return &it->second.first;
}

void program_store::put(key k, nlohmann::json definition) {
  auto it = entries_.find(k);
  if (it != entries_.end()) {
    it->second.first = std::move(definition);
    order_.splice(order_.begin(), order_, it->second.second);
    return;
  }
  order_.push_front(k);
  entries_.emplace(std::move(k), std::make_pair(std::move(definition), order_.begin()));
  if (entries_.size() > capacity_) {
    entries_.erase(order_.back());
    order_.pop_back();
  }
}

void program_store::erase(const key& k) {
  auto it = entries_.find(k);
  if (it == entries_.end())
    return;
  order_.erase(it->second.second);
  entries_.erase(it);
}

} // namespace dspex
