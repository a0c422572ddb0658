#include "deadline_timer.hpp"

#include <mutex>

#include <caf/actor_cast.hpp>
#include <caf/actor_clock.hpp>
#include <caf/actor_registry.hpp>
#include <caf/actor_system.hpp>
#include <caf/system_messages.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/mailbox_element.hpp>
#include <caf/send.hpp>

namespace dspex::detail {

namespace {

using timer_wake_atom = caf::atom_constant<caf::atom("tmrwake")>;

/// The relay's name in the system's registry (one relay per actor system).
constexpr caf::atom_value relay_name = caf::atom("dspextimer");

/// Forwards a wake-up to its receiver if the receiver still lives; ends
/// with `anchor` (see relay_of).
/// @note Spawned with an argument on purpose: CAF 0.17 spawns a function
///       without arguments by dereferencing a null shared_ptr<tuple<>>
///       (init_fun_factory.hpp), which UBSan reports.
caf::behavior timer_relay(caf::event_based_actor* self, const caf::strong_actor_ptr& anchor) {
  // Monitored, not linked: nothing of the relay's may reach CAF's own actor.
  self->monitor(anchor);
  self->set_down_handler([self](caf::down_msg&) { self->quit(); });
  return {
    [](timer_wake_atom, const caf::actor_addr& receiver, caf::message& msg) {
      if (auto dest = caf::actor_cast<caf::strong_actor_ptr>(receiver))
        dest->enqueue(nullptr, caf::make_message_id(), std::move(msg), nullptr);
    },
  };
}

caf::actor relay_of(caf::actor_system& sys) {
  if (auto found = caf::actor_cast<caf::actor>(sys.registry().get(relay_name)))
    return found;
  // Serialises the first spawn.
  static std::mutex spawn_mtx;
  std::lock_guard<std::mutex> lk(spawn_mtx);
  auto found = caf::actor_cast<caf::actor>(sys.registry().get(relay_name));
  if (found)
    return found;
  // CAF ends its internal actors first thing at shutdown; watching one, the
  // relay ends then too and leaves the registry. A registered actor
  // that never ended would be destroyed with the registry, after the
  // scheduler (a crash in local_actor::cleanup). Without that internal
  // actor: no relay (the caller falls back to delayed_send).
  auto anchor = sys.registry().get(caf::atom("ConfigServ"));
  if (!anchor)
    return {};
  // Hidden: it does not hold up the system's shutdown.
  auto relay = sys.spawn<caf::hidden>(timer_relay, anchor);
  auto* sysp = &sys;
  relay->attach_functor([sysp] { sysp->registry().erase(relay_name); });
  sys.registry().put(relay_name, relay);
  return relay;
}

} // namespace

void send_later(caf::scheduled_actor* self, caf::timespan delay, caf::message msg) {
  auto relay = relay_of(self->home_system());
  if (!relay) {
    auto& clock = self->home_system().clock();
    clock.schedule_message(clock.now() + delay, caf::actor_cast<caf::strong_actor_ptr>(self),
                           caf::make_mailbox_element(nullptr, caf::make_message_id(), {},
                                                     std::move(msg)));
    return;
  }
  // Anonymous: a sender is held by strong reference too.
  caf::delayed_anon_send(relay, delay, timer_wake_atom::value, self->address(), std::move(msg));
}

} // namespace dspex::detail
