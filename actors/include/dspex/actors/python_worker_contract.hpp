// The worker contract for the bundled Python workers: each worker is a
// worker_actor owning one process.
#pragma once

#include <memory>
#include <string>

#include "dspex/actors/worker_contract.hpp"
#include "dspex/events.hpp"
#include "dspex/settings.hpp"

namespace dspex {

class python_worker_contract : public worker_contract {
public:
  /// `mode`: the workers' --mode, pool-worker or standalone (the bridge).
  explicit python_worker_contract(std::shared_ptr<const settings> config,
                                  std::string mode = "pool-worker",
                                  std::shared_ptr<event_bus> events = nullptr);

  /// Spawns a worker_actor (the pool monitors it); it reports ready asynchronously.
  init_result init_worker(pool_worker& w, caf::local_actor* pool) override;

  /// Seed Fix 2 (validate_port + safe_port_connect), unless
  /// pool.use_safe_port_connect is off: the worker actor alive
  /// (else connect_exited), its process alive and its pipes open (else
  /// connect_failed), the caller alive (else skip: the worker stays).
  checkout_result handle_checkout(const checkout_type& type, const caller_info& caller,
                                  pool_worker& w) override;

  /// `close` removes the worker (the holder says its stream is unusable).
  keep_or_remove handle_checkin(const checkin_status& status, pool_worker& w) override;

  /// (worker_gone_atom, id): the process exited → remove.
  keep_or_remove handle_info(const caf::message& msg, pool_worker& w) override;

  /// The worker actor's direct lane (worker_channel), unless
  /// pool.use_safe_port_connect is off.
  std::shared_ptr<detail::worker_channel> direct_channel(pool_worker& w) override;
  /// configure_lm: the pool's LM.
  std::string pool_setting_command() const override;
  /// The configured LM (lm.provider, lm.model, lm.temperature), or null when
  /// lm.provider is empty.
  nlohmann::json initial_pool_setting() const override;
  /// Idle check without a round trip: process alive and pipes open.
  keep_or_remove handle_ping(pool_worker& w) override;

  /// Graceful stop: `shutdown`, EOF, SIGTERM, SIGKILL (bounded by the graces).
  void terminate_worker(const error& reason, pool_worker& w) override;

private:
  std::shared_ptr<const settings> config_;
  std::string mode_;
  std::shared_ptr<event_bus> events_;
};

} // namespace dspex
