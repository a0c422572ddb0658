#include "dspex/actors/events_actor.hpp"

#include <atomic>
#include <memory>

#include <caf/actor_addr.hpp>
#include <caf/actor_cast.hpp>
#include <caf/send.hpp>

namespace dspex {

std::uint64_t subscribe_actor(event_bus& bus, const caf::actor& receiver) {
  if (!receiver)
    return 0;
  // The id is known only after subscribe returns; a handler that runs before
  // (another thread publishing at once) finds 0 and simply does not remove itself.
  auto id = std::make_shared<std::atomic<std::uint64_t>>(0);
  caf::actor_addr weak = receiver.address();
  auto* b = &bus;  // the bus owns the handler, so it outlives every call of it
  *id = bus.subscribe([weak, id, b](const event& e) {
    if (auto strong = caf::actor_cast<caf::actor>(weak)) {
      caf::anon_send(strong, e);
      return;
    }
    if (auto mine = id->exchange(0))
      b->unsubscribe(mine);  // allowed from a handler (publish runs them outside its lock)
  });
  return *id;
}

} // namespace dspex
