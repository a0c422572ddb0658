// lease: what runtime::checkout needs of the lease side (lease.cpp): the
// lease holder's spawn, the continuations it answers, and the lease's
// state, which checkout fills in once the pool granted the worker.
//
// Internal to actors/ (CAF included).
#pragma once

#include <functional>
#include <memory>

#include <caf/actor.hpp>
#include <caf/allowed_unsafe_message_type.hpp>
#include <caf/fwd.hpp>

#include "dspex/actors/messages.hpp"
#include "dspex/actors/pool_actor.hpp"
#include "dspex/json_limits.hpp"
#include "dspex/runtime.hpp"
#include "api_support.hpp"

namespace dspex::detail {

/// Continuations of a lease's checkout and checkin (local only).
struct checkout_sink {
  std::function<void(checkout_reply)> fn;
};
struct checkin_sink {
  std::function<void(bool)> fn;
};

} // namespace dspex::detail

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(dspex::detail::checkout_sink)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(dspex::detail::checkin_sink)

namespace dspex {

struct lease::impl {
  caf::actor holder;
  lease_grant grant;
  std::shared_ptr<detail::api_gate> gate;
  request_limits limits;
  bool checked_in = false;
};

} // namespace dspex

namespace dspex::runtime_detail {

/// Spawns the holder of one lease, which then takes
///  - (checkout_atom, checkout_request, detail::checkout_sink): the checkout;
///  - (execute_atom, worker, lease_id, call, completion): a request;
///  - (checkin_atom, lease_id, checkin_status, detail::checkin_sink): the
///    checkin, after which it quits;
///  - stop_atom: the checkout failed, nothing to hold.
/// @param sys the runtime's actor system (spawned on the calling thread)
/// @param pool the pool to check out from; the holder monitors it and quits
///        when it goes
/// @returns the holder
caf::actor spawn_lease_holder(caf::actor_system& sys, pool_handle pool);

} // namespace dspex::runtime_detail
