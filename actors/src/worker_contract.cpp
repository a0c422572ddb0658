#include "dspex/actors/worker_contract.hpp"

#include "dspex/logging.hpp"

namespace dspex {

worker_contract::~worker_contract() = default;

std::shared_ptr<detail::worker_channel> worker_contract::direct_channel(pool_worker&) {
  return nullptr;
}

std::string worker_contract::pool_setting_command() const {
  return {};
}

nlohmann::json worker_contract::initial_pool_setting() const {
  return nullptr;
}

namespace {

// Fix 1: each checkout failure is logged with the worker id where it arises.
error checkout_error(const char* type, std::string reason, const std::string& worker_id,
                     nlohmann::json extra = nlohmann::json::object()) {
  log().error("[{}] {}: {}", worker_id, type, reason);
  extra["worker_id"] = worker_id;
  extra["reason"] = reason;
  return make_error(error_category::connection_error, type, std::string{type} + "(" + reason + ")",
                    std::move(extra));
}

} // namespace

error checkout_failed(std::string reason, const std::string& worker_id) {
  return checkout_error("checkout_failed", std::move(reason), worker_id);
}

error connect_failed(std::string reason, const std::string& worker_id) {
  return checkout_error("connect_failed", std::move(reason), worker_id);
}

error connect_exited(std::string reason, const std::string& worker_id) {
  return checkout_error("connect_exited", std::move(reason), worker_id);
}

error connect_error(std::string kind, std::string reason, const std::string& worker_id) {
  return checkout_error("connect_error", kind + ", " + reason, worker_id, {{"kind", kind}});
}

} // namespace dspex
