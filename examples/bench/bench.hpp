// The benchmark of the request path (issue 11): the raw pipe loop, the
// NimblePool anchor and the pool's API, side by side in one run, every ratio
// printed from figures of that run. Run by `bench_pool` (tests/bench) and by
// `dspex bench`; never a test (timing figures are no assertions).
#pragma once

#include <functional>
#include <string>

namespace dspex::bench {

/// Told the name of each row once it is measured (about 15 in a full run).
using progress_fn = std::function<void(const std::string& row)>;

/// The number of rows a full run measures with the anchor (for a progress bar).
constexpr int expected_rows = 16;

/// Runs the benchmark with bench_pool's options (argv[0] names the program
/// in messages) and prints its tables to stdout.
/// @returns 0, or 1 when the runtime did not start or a child was left
/// @note Exits with 2 on bad options, after printing the usage.
int run(int argc, char** argv, progress_fn progress);

} // namespace dspex::bench
