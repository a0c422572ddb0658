// The one error taxonomy of the runtime: every failure a caller can see is a
// structured error {category, type, message, context}.
#pragma once

#include <optional>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

namespace dspex {

/// Categories of the original DSPex bridge, used everywhere.
enum class error_category {
  initialization_error,  ///< a worker or the runtime could not start
  connection_error,      ///< a worker could not be reached or handed over
  communication_error,   ///< the wire broke: protocol violation, worker died mid-request
  timeout_error,         ///< a deadline passed (queued or in flight)
  resource_error,        ///< no capacity: pool saturated, stopping, unavailable
  health_check_error,    ///< a health check failed
  session_error,         ///< session missing, expired or inconsistent
  python_error,          ///< the worker answered success:false (worker stays healthy)
  system_error,          ///< an OS-level failure or a runtime defect
  configuration_error,   ///< a bad setting, rejected at start
};

/// snake_case name, e.g. "timeout_error".
const char* to_string(error_category c) noexcept;

/// How bad an error is for the runtime, not for the caller:
///   info:     the caller's program failed, the runtime is fine (python_error)
///   warning:  one call failed, retry or replacement handles it
///             (timeout, communication, connection, resource, session, health check)
///   error:    a component failed and was replaced or refused (system_error,
///             and initialization_error of a single worker)
///   critical: the runtime cannot serve as configured (configuration_error,
///             resource_error/pool_unavailable, resource_error/supervisor_gave_up)
enum class error_severity { info, warning, error, critical };

/// @returns "info", "warning", "error" or "critical".
const char* to_string(error_severity s) noexcept;
/// @returns the category named `name` (e.g. "timeout_error"), or nullopt.
std::optional<error_category> category_from_string(std::string_view name) noexcept;

/// A structured error. `type` is a stable snake_case word within the category
/// (e.g. "request_timeout", "worker_exited", "protocol_violation"); `context`
/// is a JSON object naming what is known: worker_id, command, attempt, pid, ...
struct error {
  error_category category = error_category::system_error;
  std::string type;
  std::string message;
  nlohmann::json context = nlohmann::json::object();

  /// See error_severity; derived from category and type.
  error_severity severity() const noexcept;

  /// {category, type, message, context, severity}
  nlohmann::json to_json() const;
  /// "timeout_error/request_timeout: <message>"
  std::string describe() const;
};

error make_error(error_category category, std::string type, std::string message,
                 nlohmann::json context = nlohmann::json::object());

/// The outcome of one call: the result JSON of a successful command, or a
/// structured error. What every execute_* returns.
class outcome {
public:
  outcome() = default;
  /// A success carrying `result` (the worker's reply).
  static outcome success(nlohmann::json result);
  /// A failure carrying `err`.
  static outcome failure(error err);

  bool ok() const noexcept { return ok_; }
  explicit operator bool() const noexcept { return ok_; }
  /// Precondition: ok().
  const nlohmann::json& value() const { return value_; }
  /// Precondition: !ok().
  const dspex::error& error() const { return error_; }

  /// {"ok":true,"result":...} or {"ok":false,"error":{...}}
  nlohmann::json to_json() const;

  /// The worker that answered (its reply, success or python_error); empty
  /// when no worker answered. Sessions learn their worker from it.
  const std::string& served_by() const noexcept { return served_by_; }
  void set_served_by(std::string worker_id) { served_by_ = std::move(worker_id); }

private:
  bool ok_ = false;
  std::string served_by_;
  nlohmann::json value_;
  dspex::error error_;
};

} // namespace dspex
