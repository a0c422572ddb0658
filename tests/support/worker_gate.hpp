// Keeps a worker busy for exactly as long as a test needs, with the bundled
// worker's `sleep` {"until_file": path}: busy until the file exists. A test
// that needs "still busy" then never rests on a sleep outlasting the
// machine's load.
#pragma once

#include <chrono>
#include <string>

#include <nlohmann/json.hpp>

namespace dspex::testing {

class worker_gate {
public:
  worker_gate();   ///< a fresh path under /tmp; nothing is created yet
  ~worker_gate();  ///< removes the file
  worker_gate(const worker_gate&) = delete;
  worker_gate& operator=(const worker_gate&) = delete;

  /// Arguments of a `sleep` that lasts until open(), or `bound` at most (a
  /// hang guard, never expected to end it).
  nlohmann::json sleep_args(std::chrono::milliseconds bound = std::chrono::seconds{60}) const;

  /// Creates the file: every `sleep` waiting on it returns.
  void open();

  const std::string& path() const { return path_; }

private:
  std::string path_;
};

} // namespace dspex::testing
