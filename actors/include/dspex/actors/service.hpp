// Service detection (seed Fix 5): which running service — a pool or a
// standalone bridge — a caller should talk to.
//
// Two places know about services:
//  - CAF's actor registry of one actor system: a running pool under the atom
//    "dspexpool", a standalone bridge under "dspexbrdg" (the original's
//    Process.whereis(SessionPool) / Process.whereis(Bridge));
//  - a dspex-level fallback registry (the original's Registry.DSPex), process
//    wide and thread-safe: name → weak actor handle + kind, for pools and
//    bridges started under other names.
//
// detect_service(sys) answers, in this order: the registered pool if it is
// alive; else the registered bridge if it is alive; else the first live pool,
// then the first live bridge, of the fallback registry (registration order,
// actors of `sys` only); else connection_error/service_unavailable with the
// message "Python bridge not available".
//
// "Alive" is checked, not assumed: CAF 0.17's registry keeps a handle after
// its actor terminated. Every registration attaches a functor to the actor
// that erases the entry when it terminates, and detect_service additionally
// asks each candidate whether it has terminated (is_alive below), so an entry
// whose clean-up has not run yet does not count either.
//
// Shutdown: ~actor_system() blocks forever while a registry entry keeps an
// actor alive. Unregister (unregister_pool / unregister_bridge /
// unregister_services) before the actor system is destroyed.
#pragma once

#include <string>
#include <variant>

#include <caf/actor.hpp>
#include <caf/atom.hpp>
#include <caf/fwd.hpp>

#include "dspex/error.hpp"

namespace dspex {

enum class service_kind { pool, bridge };

/// "pool" or "bridge".
const char* to_string(service_kind k) noexcept;

/// CAF registry names (atoms: at most 10 characters).
constexpr caf::atom_value pool_service_name = caf::atom("dspexpool");
constexpr caf::atom_value bridge_service_name = caf::atom("dspexbrdg");

/// A detected service: send it (execute_atom, call) → outcome,
/// (status_atom) → pool_status, (stop_atom) → bool.
struct service {
  service_kind kind = service_kind::pool;
  caf::actor handle;
  std::string name;            ///< "dspexpool", "dspexbrdg" or the fallback registry name
  bool from_fallback = false;  ///< found in the dspex fallback registry
};

/// A service, or connection_error/service_unavailable "Python bridge not available".
using detect_result = std::variant<service, error>;

/// The message of the error detect_service returns when nothing is running.
inline constexpr const char* service_unavailable_message = "Python bridge not available";

/// Finds a running service (seed Fix 5): the pool registered as dspexpool if
/// alive, else a live bridge registered as dspexbrdg, else the first live
/// entry of the fallback registry.
/// @returns the service, or connection_error/service_unavailable
///          (service_unavailable_message)
/// @note Liveness is checked now (is_alive), not trusted from the registry.
detect_result detect_service(caf::actor_system& sys);

/// True while `actor` has not terminated (nor decided to: quit() called).
/// Checked under the actor's own lock, the one its termination takes, so it
/// is exact at the moment of the call. False for an invalid handle.
bool is_alive(const caf::actor& actor);

// -- CAF registry names ------------------------------------------------------------

/// Registers `pool` as "dspexpool" in `sys`'s registry, replacing an earlier
/// entry. The entry is erased when the pool terminates. Returns false (and
/// registers nothing) for an invalid or already terminated actor.
bool register_pool(caf::actor_system& sys, const caf::actor& pool);

/// Same for a standalone bridge, as "dspexbrdg".
bool register_bridge(caf::actor_system& sys, const caf::actor& bridge);

/// Erases "dspexpool" when it names `pool` (any actor when `pool` is invalid).
/// Returns whether an entry was erased.
bool unregister_pool(caf::actor_system& sys, const caf::actor& pool = {});

/// Erases "dspexbrdg" when it names `bridge` (any actor when invalid).
bool unregister_bridge(caf::actor_system& sys, const caf::actor& bridge = {});

// -- the fallback registry -----------------------------------------------------------

/// Registers `handle` under `name` (replacing an earlier entry of that name).
/// Holds a weak handle only; the entry is erased when the actor terminates.
/// Returns false for an empty name, an invalid or an already terminated actor.
bool register_service(const std::string& name, service_kind kind, const caf::actor& handle);

/// Erases `name`; returns whether it was registered.
bool unregister_service(const std::string& name);

/// Erases every registration of actors of `sys`: its two registry names and
/// its fallback entries. Call before destroying the actor system.
void unregister_services(caf::actor_system& sys);

} // namespace dspex
