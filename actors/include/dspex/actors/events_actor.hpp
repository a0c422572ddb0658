// Events for actors: the CAF side of dspex/events.hpp. An actor subscribed to
// an event_bus receives every event as a message holding one dspex::event,
// so it can react to restarts, circuit changes and retries in its own
// behavior:
//
//   auto id = dspex::subscribe_actor(rt->events(), watcher);
//   // in watcher's behavior:  [=](const dspex::event& e) { ... }
//   rt->events().unsubscribe(id);
//
// Included only by translation units that use CAF.
#pragma once

#include <cstdint>

#include <caf/actor.hpp>
#include <caf/allowed_unsafe_message_type.hpp>

#include "dspex/events.hpp"

namespace dspex {

/// Forwards each event published on `bus` to `receiver` (an asynchronous,
/// anonymous send of one dspex::event; the publisher never waits). The bus
/// keeps only a weak handle: it never keeps `receiver` alive (so it never
/// holds up ~actor_system), and the subscription removes itself at the first
/// event after `receiver` terminated. Returns the id for bus.unsubscribe().
/// An invalid `receiver` subscribes nothing and returns 0.
std::uint64_t subscribe_actor(event_bus& bus, const caf::actor& receiver);

} // namespace dspex

// Local only: events carry JSON and steady_clock time points.
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(dspex::event)
