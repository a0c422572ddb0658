#include "dspex/error.hpp"

#include <array>

namespace dspex {

namespace {

constexpr std::array<const char*, 10> category_names = {
  "initialization_error", "connection_error", "communication_error",
  "timeout_error",        "resource_error",   "health_check_error",
  "session_error",        "python_error",     "system_error",
  "configuration_error",
};

} // namespace

const char* to_string(error_category c) noexcept {
  auto i = static_cast<std::size_t>(c);
  return i < category_names.size() ? category_names[i] : "system_error";
}

std::optional<error_category> category_from_string(std::string_view name) noexcept {
  for (std::size_t i = 0; i < category_names.size(); ++i)
    if (name == category_names[i])
      return static_cast<error_category>(i);
  return std::nullopt;
}

const char* to_string(error_severity s) noexcept {
  switch (s) {
    case error_severity::info: return "info";
    case error_severity::warning: return "warning";
    case error_severity::error: return "error";
    case error_severity::critical: return "critical";
  }
  return "error";
}

error_severity error::severity() const noexcept {
  switch (category) {
    case error_category::python_error:
      return error_severity::info;
    case error_category::configuration_error:
      return error_severity::critical;
    case error_category::resource_error:
      return type == "pool_unavailable" || type == "supervisor_gave_up"
               ? error_severity::critical
               : error_severity::warning;
    case error_category::system_error:
    case error_category::initialization_error:
      return error_severity::error;
    default:
      return error_severity::warning;
  }
}

nlohmann::json error::to_json() const {
  return {{"category", to_string(category)},
          {"type", type},
          {"message", message},
          {"context", context},
          {"severity", to_string(severity())}};
}

std::string error::describe() const {
  std::string out = to_string(category);
  out += '/';
  out += type;
  out += ": ";
  out += message;
  return out;
}

error make_error(error_category category, std::string type, std::string message,
                 nlohmann::json context) {
  if (!context.is_object())
    context = nlohmann::json::object();
  return error{category, std::move(type), std::move(message), std::move(context)};
}

outcome outcome::success(nlohmann::json result) {
  outcome o;
  o.ok_ = true;
  o.value_ = std::move(result);
  return o;
}

outcome outcome::failure(dspex::error err) {
  outcome o;
  o.ok_ = false;
  o.error_ = std::move(err);
  return o;
}

nlohmann::json outcome::to_json() const {
  if (ok_)
    return {{"ok", true}, {"result", value_}};
  return {{"ok", false}, {"error", error_.to_json()}};
}

} // namespace dspex
