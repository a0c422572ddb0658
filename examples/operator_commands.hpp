// The dspex program's operator commands (issue 12, item 4): one call, the
// doctor, the metrics. Each takes the loaded settings and the command's own
// arguments, writes what a person or a script reads to `out` and what went
// wrong to `err`, and returns the process's exit code.
#pragma once

#include <cstddef>
#include <iosfwd>
#include <optional>
#include <string>
#include <vector>

#include "dspex/settings.hpp"

namespace dspex {

/// Exit codes of `dspex call`, one per kind of outcome (README "The dspex command").
enum call_exit : int {
  call_ok = 0,
  call_command_failed = 1,   ///< python_error: the worker answered success:false
  call_usage = 2,            ///< bad arguments or configuration
  call_start_failed = 3,     ///< the pool could not start
  call_timeout = 4,          ///< timeout_error
  call_worker_lost = 5,      ///< communication_error, connection_error: the worker died or broke
  call_no_capacity = 6,      ///< resource_error, session_error
  call_runtime_error = 7,    ///< system_error, health_check_error, anything else
};

/// A command-line count: decimal digits only, at most `max`.
/// @returns the number, or nullopt for anything else ("-1", "3x", "", too large)
std::optional<std::size_t> parse_count(const std::string& text, std::size_t max);

/// The exit code of `dspex call` for an error of `category`.
int call_exit_code(error_category category) noexcept;

/// True when `out` is a terminal: pretty output and progress there, quiet
/// and compact in pipes.
bool is_terminal(std::ostream& out);

/// `dspex call COMMAND [JSON] [--session=ID] [--json]`: starts a pool (one
/// worker unless pool.size was given), runs one command, prints its reply
/// (with --json: the whole outcome, {"ok":...}) and stops.
int run_call(const std::vector<std::string>& args, settings config, bool size_given,
             std::ostream& out, std::ostream& err);

/// `dspex doctor [--json]`: checks what a pool needs (the interpreter, the
/// script, the worker starting and importing, dspy, the LM key variable,
/// file limits) and says what to fix. Exit 0 when nothing failed, 1 otherwise.
int run_doctor(const std::vector<std::string>& args, const settings& config, std::ostream& out,
               std::ostream& err);

/// `dspex doctor` when the configuration itself is refused: that one
/// finding, and what to fix, in the doctor's format. Exit 1.
int report_configuration_failure(const std::vector<std::string>& args, const error& why,
                                 std::ostream& out, std::ostream& err);

/// `dspex node` (issue 13): starts the runtime as a node (node.publish), so
/// other runtimes that list it in remote.nodes use its pools; prints one
/// line "dspex node: serving POOLS on HOST:PORT" on `out`, then serves until
/// SIGTERM or SIGINT, stops the runtime (no worker left) and returns 0.
/// @returns 0, 2 for a bad argument, 3 when the runtime cannot start
int run_node(const std::vector<std::string>& args, settings config, std::ostream& out,
             std::ostream& err);

/// `dspex metrics [--requests=N]`: starts the pool, runs N pings (default
/// 0), prints the Prometheus exposition (render_prometheus) and stops.
int run_metrics(const std::vector<std::string>& args, settings config, std::ostream& out,
                std::ostream& err);

} // namespace dspex
