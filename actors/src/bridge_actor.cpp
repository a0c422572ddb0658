#include "dspex/actors/bridge_actor.hpp"

#include <caf/actor_system.hpp>

#include "dspex/actors/pool_actor.hpp"
#include "dspex/actors/python_worker_contract.hpp"

namespace dspex {

pool_handle spawn_bridge(caf::actor_system& sys, std::shared_ptr<const settings> config) {
  auto one = std::make_shared<settings>(*config);
  one->pool.size = 1;
  one->pool.max_overflow = 0;
  one->pool.lazy = false;
  auto contract = std::make_shared<python_worker_contract>(one, "standalone");
  return spawn_pool(sys, std::move(one), std::move(contract));
}

} // namespace dspex
