#include "dspex/actors/python_worker_contract.hpp"

#include <caf/all.hpp>

#include "dspex/actors/messages.hpp"
#include "dspex/actors/worker_actor.hpp"
#include "dspex/logging.hpp"
#include "worker_channel.hpp"

namespace dspex {

namespace {

worker_health* health_of(pool_worker& w) {
  return static_cast<worker_health*>(w.state.get());
}

// validate_port: the worker's process and pipes, as the pool can see them.
std::optional<error> validate_worker(pool_worker& w) {
  auto* h = health_of(w);
  if (!h || !w.handle)
    return checkout_failed("worker has no actor", w.id);
  if (!h->actor_alive)
    return connect_exited("worker actor has exited", w.id);
  if (!h->process_alive)
    return connect_failed("process_not_alive", w.id);
  if (!h->pipes_open)
    return connect_failed("port_closed", w.id);
  return std::nullopt;
}

} // namespace

python_worker_contract::python_worker_contract(std::shared_ptr<const settings> config,
                                               std::string mode,
                                               std::shared_ptr<event_bus> events)
  : config_(std::move(config)), mode_(std::move(mode)),
    events_(events ? std::move(events) : std::make_shared<event_bus>()) {
}

init_result python_worker_contract::init_worker(pool_worker& w, caf::local_actor* pool) {
  auto health = std::make_shared<worker_health>();
  health->channel = std::make_shared<detail::worker_channel>(w.id, config_->pool.max_frame_bytes,
                                                             config_->pool.max_json_depth);
  w.state = health;
  worker_config cfg{w.id, config_, caf::actor_cast<caf::actor>(pool), health};
  cfg.mode = mode_;
  cfg.events = events_;
  // Not linked: the pool monitors its workers and kills them when it ends
  // (a link would let a worker killed with exit_reason::kill take the pool
  // down: CAF 0.17 never lets a linked actor trap kill).
  w.handle = spawn_worker(pool->system(), std::move(cfg));
  return init_result::async();
}

checkout_result python_worker_contract::handle_checkout(const checkout_type&,
                                                        const caller_info& caller,
                                                        pool_worker& w) {
  if (!config_->pool.use_safe_port_connect)
    return checkout_result::ok(w.handle);  // the rollback switch: hand over unchecked
  if (auto err = validate_worker(w))
    return checkout_result::remove(std::move(*err));
  if (!caller.alive)
    return checkout_result::skip(make_error(error_category::connection_error,
                                            "target_process_dead",
                                            "the caller is gone; the worker stays",
                                            {{"worker_id", w.id}}));
  return checkout_result::ok(w.handle);
}

keep_or_remove python_worker_contract::handle_checkin(const checkin_status& status,
                                                      pool_worker& w) {
  if (status.what == checkin_status::kind::close)
    return keep_or_remove::remove(make_error(error_category::communication_error,
                                             "closed_by_client",
                                             "the lease holder closed the worker",
                                             {{"worker_id", w.id}}));
  return keep_or_remove::ok();
}

keep_or_remove python_worker_contract::handle_info(const caf::message& msg, pool_worker& w) {
  // (worker_gone_atom, id, error): the worker says why (exit, protocol
  // violation, timeout); that error is the removal's reason.
  if (msg.match_elements<worker_gone_atom, std::string, error>())
    return keep_or_remove::remove(msg.get_as<error>(2));
  if (msg.match_element<worker_gone_atom>(0))
    return keep_or_remove::remove(make_error(error_category::communication_error,
                                             "worker_exited",
                                             "idle worker " + w.id + " lost its process",
                                             {{"worker_id", w.id}}));
  return keep_or_remove::ok();
}

std::string python_worker_contract::pool_setting_command() const {
  return "configure_lm";
}

nlohmann::json python_worker_contract::initial_pool_setting() const {
  const auto& lm = config_->lm;
  if (lm.provider.empty())
    return nullptr;
  nlohmann::json args{{"provider", lm.provider}, {"model", lm.model}, {"temperature", lm.temperature}};
  if (!lm.api_key_env.empty())
    args["api_key_env"] = lm.api_key_env;  // the name: each worker reads the key itself
  return args;
}

std::shared_ptr<detail::worker_channel> python_worker_contract::direct_channel(pool_worker& w) {
  // The lane checks what validate_worker checks, on every call: a process
  // it can write to (else the call is not sent and the worker goes back to
  // the pool, which then learns of the loss from the worker actor).
  auto* h = health_of(w);
  if (!h || !config_->pool.use_safe_port_connect)
    return nullptr;  // the rollback switch: every handover through the pool, unchecked
  return h->channel;
}

keep_or_remove python_worker_contract::handle_ping(pool_worker& w) {
  if (auto err = validate_worker(w)) {
    err->category = error_category::health_check_error;
    return keep_or_remove::remove(std::move(*err));
  }
  return keep_or_remove::ok();
}

void python_worker_contract::terminate_worker(const error&, pool_worker& w) {
  if (w.handle)
    caf::anon_send(w.handle, stop_atom::value);
}

} // namespace dspex
