// Calls counted by command and outcome, for dspex_calls_total. Commands are
// the caller's strings: a careless caller could make up a new one per call,
// so at most max_commands are counted by name and the rest as "other".
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>

#include "dspex/error.hpp"

namespace dspex {

class call_counts {
public:
  /// Distinct command names counted by name; later ones count as "other".
  static constexpr std::size_t max_commands = 64;
  /// The outcome label of a success.
  static constexpr const char* ok_label = "ok";

  /// Counts one call of `command` that ended with `o` (its error category,
  /// or "ok"). A short lock; no allocation for a command already counted.
  void count(std::string_view command, const outcome& o);

  /// (command, outcome) → calls, every pair counted so far.
  std::map<std::pair<std::string, std::string>, std::uint64_t> snapshot() const;

private:
  static constexpr std::size_t outcome_slots = 11;  ///< ok + each error_category
  mutable std::mutex mtx_;
  std::unordered_map<std::string, std::array<std::uint64_t, outcome_slots>> counts_;
};

} // namespace dspex
