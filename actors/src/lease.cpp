// lease: explicit checkout's other half, the lease a caller holds and the
// actor that holds it for the caller. A file of its own because a lease
// outlives the call that made it (runtime::checkout only starts it) and may
// outlive its runtime (the gate): nothing here touches runtime::impl.
#include "lease.hpp"

#include <algorithm>
#include <cstdint>
#include <future>
#include <map>
#include <optional>
#include <shared_mutex>

#include <caf/all.hpp>

#include "dspex/logging.hpp"

namespace dspex::runtime_detail {

namespace {

caf::duration caller_timeout(const call& c) {
  auto left = std::max(c.deadline - clock_type::now(), clock_type::duration::zero());
  return caf::duration{std::chrono::duration_cast<std::chrono::milliseconds>(left)
                       + reply_margin};
}

// The identity of one lease holder: the pool monitors it, so destroying a
// lease (this actor exits) revokes it. Everything a lease does goes through
// it, so that the public calls wait on a bounded future instead of holding
// a scoped actor on the system: the checkout (if its own wait ends first it
// tells the pool, as NimblePool's client does), the lease's requests to its
// worker, and the checkin (the pool accepts a checkin only from the holder).
// When the pool goes, the holder quits: whatever it still waited for is
// answered by the dropped promise (await_bounded turns it into an error).
// What a holder still has to answer when its pool goes: the pending
// continuations are answered by the holder itself (CAF 0.17 keeps a quit
// actor's response handlers until the actor object dies, and the caller
// holds a handle to it while it waits).
struct lease_holder_state {
  std::optional<detail::checkout_sink> checkout;
  std::map<std::uint64_t, completion> executes;
  std::uint64_t next_execute = 1;

  static inline const char* name = "dspex.lease_holder";
};

using lease_holder_t = caf::stateful_actor<lease_holder_state>;

caf::behavior lease_holder(lease_holder_t* self, pool_handle pool) {
  self->monitor(pool);
  self->set_down_handler([=](caf::down_msg&) {
    // The pool is gone: the lease is over, and whatever waited is told so.
    auto& st = self->state;
    if (st.checkout) {
      auto sink = std::move(*st.checkout);
      st.checkout.reset();
      sink.fn(checkout_reply{std::nullopt,
                             make_error(error_category::resource_error, "pool_unavailable",
                                        "the pool terminated while the checkout waited; try again")});
    }
    auto executes = std::move(st.executes);
    st.executes.clear();
    for (auto& [id, done] : executes)
      done.fn(outcome::failure(make_error(error_category::resource_error, "lease_revoked",
                                          "the lease ended: its pool terminated during the request")));
    self->quit();
  });
  return {
    [=](checkout_atom, checkout_request& req, detail::checkout_sink& done) {
      auto token = req.token;
      auto left = std::max(req.deadline - clock_type::now(), clock_type::duration::zero());
      auto timeout = caf::duration{
        std::chrono::duration_cast<std::chrono::milliseconds>(left) + reply_margin};
      self->state.checkout = std::move(done);
      auto answer = [=](checkout_reply reply) {
        auto& st = self->state;
        if (!st.checkout)
          return;
        auto sink = std::move(*st.checkout);
        st.checkout.reset();
        sink.fn(std::move(reply));
      };
      self->request(pool, timeout, checkout_atom::value, std::move(req))
        .then([=](checkout_reply& reply) { answer(std::move(reply)); },
              [=](caf::error& e) {
                self->send(pool, cancel_atom::value, token);
                answer(checkout_reply{std::nullopt,
                                      from_caf_error(self->system(), e, "checkout").error()});
              });
    },
    [=](execute_atom, caf::actor& worker, std::uint64_t lease, call& c, completion& done) {
      auto command = c.command;
      auto id = self->state.next_execute++;
      self->state.executes.emplace(id, std::move(done));
      auto answer = [=](outcome o) {
        auto& st = self->state;
        auto it = st.executes.find(id);
        if (it == st.executes.end())
          return;
        auto fn = std::move(it->second.fn);
        st.executes.erase(it);
        fn(std::move(o));
      };
      self->request(worker, caller_timeout(c), execute_atom::value, lease, std::move(c))
        .then([=](outcome& o) { answer(std::move(o)); },
              [=](caf::error& e) { answer(from_caf_error(self->system(), e, command)); });
    },
    [=](checkin_atom, std::uint64_t lease, checkin_status& status, detail::checkin_sink& done) {
      self->request(pool, caf::duration{std::chrono::seconds{10}}, checkin_atom::value, lease,
                    std::move(status))
        .then([=](bool known) {
                done.fn(known);
                self->quit();
              },
              [=](caf::error&) {
                done.fn(false);
                self->quit();
              });
    },
    [=](stop_atom) { self->quit(); },
  };
}

} // namespace

caf::actor spawn_lease_holder(caf::actor_system& sys, pool_handle pool) {
  return sys.spawn(lease_holder, std::move(pool));
}

} // namespace dspex::runtime_detail

namespace dspex {

namespace {

using runtime_detail::await_bounded;
using runtime_detail::blocking_in_callback;
using runtime_detail::clock_type;
using runtime_detail::must_not_block;
using runtime_detail::reply_margin;

} // namespace

lease::lease(std::unique_ptr<impl> p) : impl_(std::move(p)) {
}

lease::~lease() {
  std::shared_lock<std::shared_timed_mutex> lk{impl_->gate->mtx};
  if (!impl_->checked_in && !impl_->gate->closed)
    caf::anon_send_exit(impl_->holder, caf::exit_reason::user_shutdown);
}

const std::string& lease::worker_id() const noexcept {
  return impl_->grant.worker_id;
}

bool lease::checked_in() const noexcept {
  return impl_->checked_in;
}

outcome lease::execute(const std::string& command, nlohmann::json args, call_options options) {
  auto fail = [&](const char* type, const char* message) {
    return outcome::failure(make_error(error_category::resource_error, type, message,
                                       {{"command", command}, {"worker_id", worker_id()}}));
  };
  if (must_not_block())
    return outcome::failure(blocking_in_callback(command));
  if (impl_->checked_in)
    return fail("not_lease_holder", "the lease was checked in");
  if (auto invalid = validate_request(command, args, impl_->limits))
    return outcome::failure(std::move(*invalid));
  if (args.is_null())
    args = nlohmann::json::object();
  auto timeout = options.timeout.value_or(std::chrono::milliseconds{30'000});
  call c;
  c.command = command;
  c.args = std::move(args);
  c.deadline = clock_type::now() + timeout;
  auto bound = c.deadline + reply_margin;
  auto promise = std::make_shared<std::promise<outcome>>();
  auto future = promise->get_future();
  {
    std::shared_lock<std::shared_timed_mutex> lk{impl_->gate->mtx};
    if (impl_->gate->closed)
      return fail("pool_stopping", "the runtime is stopped");
    caf::anon_send(impl_->holder, execute_atom::value, impl_->grant.worker, impl_->grant.lease_id,
                   std::move(c), completion{[promise](outcome o) { promise->set_value(std::move(o)); }});
  }
  return await_bounded(future, bound, [&](bool dropped) {
    return dropped ? fail("lease_revoked", "the lease ended (its pool terminated) during the request")
                   : outcome::failure(make_error(error_category::timeout_error, "caller_timeout",
                                                 "no reply from the leased worker in time",
                                                 {{"command", command}}));
  });
}

bool lease::checkin(checkin_status status) {
  if (impl_->checked_in)
    return false;
  if (must_not_block()) {
    log().error("lease::checkin from a runtime thread: the lease is revoked instead");
    return false;  // the holder dies with the lease object: revoked, not lost
  }
  auto promise = std::make_shared<std::promise<bool>>();
  auto future = promise->get_future();
  {
    std::shared_lock<std::shared_timed_mutex> lk{impl_->gate->mtx};
    if (impl_->gate->closed)
      return false;
    impl_->checked_in = true;
    caf::anon_send(impl_->holder, checkin_atom::value, impl_->grant.lease_id, std::move(status),
                   detail::checkin_sink{[promise](bool known) { promise->set_value(known); }});
  }
  return await_bounded(future, clock_type::now() + std::chrono::seconds{10} + reply_margin,
                       [](bool) { return false; });
}

} // namespace dspex
