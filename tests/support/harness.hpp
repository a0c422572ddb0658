// Reusable pieces for tests of code that embeds the runtime: settings for an
// isolated pool of the bundled worker, waiting on the pool's real status, and
// /proc checks (proc.hpp).
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "dspex/runtime.hpp"
#include "support/proc.hpp"

namespace dspex::testing {

using namespace std::chrono_literals;

/// Settings for an isolated test pool: the bundled worker under the test
/// interpreter, test-only commands on, mock LM, short stop graces.
settings test_settings(std::size_t pool_size = 2);

/// Waits until `pred(status)` holds, re-reading the real status of `pool`
/// ("" = default; every 5 ms) until `timeout`. Returns the last status read;
/// `ok` tells whether the predicate held.
struct status_wait {
  bool ok = false;
  pool_status status;
};
status_wait wait_for_status(runtime& rt, const std::function<bool(const pool_status&)>& pred,
                            std::chrono::milliseconds timeout = 15s, const std::string& pool = {});

/// Starts a runtime and waits until every worker of every pool is idle
/// (fails the test otherwise).
std::unique_ptr<runtime> start_runtime(settings s);

/// Stops the runtime and checks that no child process is left (through /proc).
void stop_and_check_no_children(runtime& rt);

/// The pool is back at full size with every worker idle.
bool full_and_idle(const pool_status& s);

/// Pids of the pool's current worker processes (0 for workers not started yet).
std::vector<int> worker_pids(const pool_status& s);

} // namespace dspex::testing
