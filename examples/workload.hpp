// The main job's workload: create programs, execute them from concurrent
// callers, list programs; with progress and a summary table.
#pragma once

#include <cstddef>
#include <iosfwd>

namespace dspex {

class runtime;

struct workload_options {
  std::size_t programs = 8;
  std::size_t requests = 400;   ///< execute_program calls
  std::size_t concurrency = 8;  ///< concurrent callers
  bool progress = true;
};

/// Runs the workload against `rt`, writes progress to `progress_out` and the
/// summary table to `out`. Returns the number of failed requests.
std::size_t run_workload(runtime& rt, const workload_options& opts, std::ostream& out,
                         std::ostream& progress_out);

} // namespace dspex
