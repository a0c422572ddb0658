// The definitions of anonymous programs (create_program outside a session),
// so an anonymous execute_program can carry its definition (program_data)
// and run on any worker. Bounded: beyond its capacity the least recently
// used definition is dropped (that program then runs only on a worker that
// still has it cached; elsewhere it is "Program not found").
#pragma once

#include <cstddef>
#include <list>
#include <map>
#include <string>
#include <utility>

#include <nlohmann/json.hpp>

namespace dspex {

class program_store {
public:
  /// (session_id, program_id)
  using key = std::pair<std::string, std::string>;

  /// @param capacity definitions kept (at least 1)
  explicit program_store(std::size_t capacity);

  /// The definition of `k`, now the most recently used; nullptr if unknown.
  const nlohmann::json* find(const key& k);

  /// Stores (or replaces) the definition of `k` as the most recently used;
  /// drops the least recently used one beyond the capacity.
  void put(key k, nlohmann::json definition);

  /// Forgets the definition of `k` (nothing when unknown).
  void erase(const key& k);

  std::size_t size() const noexcept { return entries_.size(); }
  std::size_t capacity() const noexcept { return capacity_; }

private:
  std::size_t capacity_;
  std::list<key> order_;  ///< most recently used first
  std::map<key, std::pair<nlohmann::json, std::list<key>::iterator>> entries_;
};

} // namespace dspex
