// The main job's workload: one session per concurrent caller creates its
// programs, executes them, and lists them; with progress and a summary table
// (affinity hits, misses and rebinds, and programs lost: none, even when
// workers are killed meanwhile).
#pragma once

#include <chrono>
#include <cstddef>
#include <iosfwd>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace dspex {

class runtime;
struct error;

struct workload_options {
  std::size_t programs = 8;
  std::size_t requests = 400;   ///< execute_program calls (at least)
  std::size_t concurrency = 8;  ///< concurrent callers
  bool progress = true;
  /// The summary as one JSON object (for scripts) instead of the tables.
  bool json = false;
  /// The callers keep executing beyond `requests` until this long after the
  /// executions began (e.g. for the whole of a crash storm); 0 = off.
  std::chrono::milliseconds min_duration{0};
};

/// What the workload saw, call by call.
struct workload_result {
  std::size_t requests = 0;  ///< every call: create, execute, list
  std::size_t executions = 0;  ///< execute_program calls
  std::size_t ok = 0;
  std::map<std::string, std::size_t> ok_by_pool;  ///< succeeded calls by pool
  std::map<std::string, std::size_t> errors;  ///< "category/type" → count (structured failures)
  std::map<std::string, std::string> first_message;
  /// Outcomes that were not a structured dspex::error (unknown category,
  /// empty type or message) or calls that threw: each is a contract violation.
  std::size_t unstructured = 0;
  std::vector<std::string> unstructured_examples;  ///< the first few, described
  double elapsed_s = 0;
  std::size_t sessions = 0;       ///< one per concurrent caller
  std::size_t programs_lost = 0;  ///< programs a session created but no longer listed at the end

  std::size_t failed() const;  ///< structured and unstructured failures
};

/// The demo DSPy program (predict, QuestionAnswer: question -> answer,
/// confidence) under the id `id`: what the workload and the soak create.
nlohmann::json demo_program_definition(const std::string& id);

/// A structured error: a known category, a type and a message.
bool is_structured(const error& e);

/// Runs the workload against `rt`, writes progress to `progress_out` and the
/// summary table to `out`.
workload_result run_workload_detailed(runtime& rt, const workload_options& opts,
                                      std::ostream& out, std::ostream& progress_out);

/// The same; returns the number of failed requests.
std::size_t run_workload(runtime& rt, const workload_options& opts, std::ostream& out,
                         std::ostream& progress_out);

} // namespace dspex
