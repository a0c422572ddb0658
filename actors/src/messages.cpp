#include "dspex/actors/messages.hpp"

#include <caf/message.hpp>
#include <caf/make_message.hpp>


namespace dspex {

caf::error make_exit_reason(worker_exit code, const error& detail) {
  return caf::error{static_cast<std::uint8_t>(code), worker_exit_category,
                    caf::make_message(detail.to_json().dump(
                      -1, ' ', false, nlohmann::json::error_handler_t::replace))};
}

std::optional<error> decode_exit_reason(const caf::error& reason) {
  if (!reason || reason.category() != worker_exit_category)
    return std::nullopt;
  const auto& ctx = reason.context();
  if (ctx.size() != 1 || !ctx.match_element<std::string>(0))
    return std::nullopt;
  auto j = nlohmann::json::parse(ctx.get_as<std::string>(0), nullptr, false);
  if (!j.is_object())
    return std::nullopt;
  error e;
  e.category = category_from_string(j.value("category", "")).value_or(error_category::system_error);
  e.type = j.value("type", "");
  e.message = j.value("message", "");
  if (j.contains("context") && j["context"].is_object())
    e.context = j["context"];
  return e;
}

error caller_lost_error(const std::string& command, const std::string& worker_id) {
  nlohmann::json ctx{{"command", command}};
  if (!worker_id.empty())
    ctx["worker_id"] = worker_id;
  return make_error(error_category::communication_error, "caller_lost",
                    "the caller of this call was lost before it ran; it was not run",
                    std::move(ctx));
}

bool is_start_failure(const caf::error& reason) {
  if (!reason || reason.category() != worker_exit_category)
    return false;
  auto code = static_cast<worker_exit>(reason.code());
  return code == worker_exit::spawn_failed || code == worker_exit::init_failed
         || code == worker_exit::init_timeout;
}

} // namespace dspex
