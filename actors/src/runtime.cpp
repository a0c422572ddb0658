#include "dspex/runtime.hpp"

#include <atomic>
#include <variant>

#include <caf/all.hpp>

#include "dspex/actors/messages.hpp"
#include "dspex/actors/pool_actor.hpp"
#include "dspex/actors/service.hpp"
#include "dspex/actors/system_config.hpp"
#include "dspex/logging.hpp"

namespace dspex {

namespace {

using clock_type = std::chrono::steady_clock;

// Margin on top of a call's deadline for the caller's own CAF request: the
// pool and the worker always answer by the deadline, so this only catches a
// lost reply instead of waiting forever.
constexpr auto reply_margin = std::chrono::seconds{5};

outcome from_caf_error(caf::actor_system& sys, const caf::error& err, const std::string& command) {
  if (err == caf::sec::request_timeout)
    return outcome::failure(make_error(error_category::timeout_error, "caller_timeout",
                                       "no reply from the pool in time", {{"command", command}}));
  return outcome::failure(make_error(error_category::system_error, "actor_error",
                                     sys.render(err), {{"command", command}}));
}

caf::duration caller_timeout(const call& c) {
  auto left = std::max(c.deadline - clock_type::now(), clock_type::duration::zero());
  return caf::duration{std::chrono::duration_cast<std::chrono::milliseconds>(left)
                       + reply_margin};
}

// Set while an asynchronous callback runs on the caller actor's thread: a
// blocking call from there would wait for that very thread, forever.
thread_local bool in_async_callback = false;

void run_callback(const completion& done, outcome o) {
  in_async_callback = true;
  try {
    done.fn(std::move(o));
  } catch (const std::exception& e) {
    log().error("an asynchronous callback threw: {}", e.what());
  } catch (...) {
    log().error("an asynchronous callback threw");
  }
  in_async_callback = false;
}

error blocking_in_callback(const std::string& what) {
  return make_error(error_category::system_error, "blocking_in_callback",
                    "a blocking " + what
                      + " from an asynchronous callback would wait forever; use "
                        "execute_anonymous_async",
                    {{"command", what}});
}

struct async_caller_state {
  std::size_t pending = 0;
  bool stopping = false;
  static inline const char* name = "dspex.async_caller";
};

// Issues the asynchronous calls of one runtime. One long-lived actor instead
// of one per call: no spawn on the hot path, and calls made from one thread
// reach the pool in the order they were made.
caf::behavior async_caller(caf::stateful_actor<async_caller_state>* self, caf::actor pool) {
  auto finish_one = [self] {
    if (--self->state.pending == 0 && self->state.stopping)
      self->quit();
  };
  return {
    [=](execute_atom, call& c, completion& done) {
      ++self->state.pending;
      auto command = c.command;
      // No CAF timeout: the pool and the worker answer every call by its
      // deadline, and a timed request costs wake-ups of CAF's timer thread
      // on every call. The blocking form bounds its own wait.
      self->request(pool, caf::infinite, execute_atom::value, std::move(c))
        .then(
          [=](outcome& o) {
            run_callback(done, std::move(o));
            finish_one();
          },
          [=](caf::error& e) {
            run_callback(done, from_caf_error(self->system(), e, command));
            finish_one();
          });
    },
    [=](stop_atom) {
      self->state.stopping = true;
      if (self->state.pending == 0)
        self->quit();
    },
  };
}

// The identity of one lease holder: the pool monitors it, so destroying a
// lease (this actor exits) revokes it. It also waits for the grant, and if
// its own wait ends first it tells the pool, as NimblePool's client does.
caf::behavior lease_holder(caf::event_based_actor* self, caf::actor pool) {
  self->monitor(pool);
  self->set_down_handler([=](caf::down_msg&) { self->quit(); });  // pool gone: lease over
  return {
    [=](checkout_atom, checkout_request& req) -> caf::result<checkout_reply> {
      auto rp = self->make_response_promise();
      auto token = req.token;
      auto left = std::max(req.deadline - clock_type::now(), clock_type::duration::zero());
      auto timeout = caf::duration{
        std::chrono::duration_cast<std::chrono::milliseconds>(left) + reply_margin};
      self->request(pool, timeout, checkout_atom::value, std::move(req))
        .then([=](checkout_reply& reply) mutable { rp.deliver(std::move(reply)); },
              [=](caf::error& e) mutable {
                self->send(pool, cancel_atom::value, token);
                rp.deliver(checkout_reply{
                  std::nullopt, from_caf_error(self->system(), e, "checkout").error()});
              });
      return rp;
    },
    [=](stop_atom) { self->quit(); },
  };
}

} // namespace

struct lease::impl {
  caf::actor_system* system = nullptr;
  caf::actor pool;
  caf::actor holder;
  lease_grant grant;
  std::shared_ptr<std::atomic<bool>> runtime_stopped;
  bool checked_in = false;
};

lease::lease(std::unique_ptr<impl> p) : impl_(std::move(p)) {
}

lease::~lease() {
  if (!impl_->checked_in && !*impl_->runtime_stopped)
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
  if (*impl_->runtime_stopped)
    return fail("pool_stopping", "the runtime is stopped");
  if (in_async_callback)
    return outcome::failure(blocking_in_callback(command));
  if (impl_->checked_in)
    return fail("not_lease_holder", "the lease was checked in");
  if (args.is_null())
    args = nlohmann::json::object();
  if (!args.is_object())
    return outcome::failure(make_error(error_category::system_error, "invalid_request",
                                       "args must be a JSON object", {{"command", command}}));
  auto timeout = options.timeout.value_or(std::chrono::milliseconds{30'000});
  call c{command, std::move(args), clock_type::now() + timeout};
  outcome result;
  caf::scoped_actor self{*impl_->system};
  self->request(impl_->grant.worker, caller_timeout(c), execute_atom::value,
                impl_->grant.lease_id, std::move(c))
    .receive([&](outcome& o) { result = std::move(o); },
             [&](caf::error& e) { result = from_caf_error(*impl_->system, e, command); });
  return result;
}

bool lease::checkin(checkin_status status) {
  if (impl_->checked_in || *impl_->runtime_stopped)
    return false;
  if (in_async_callback) {
    log().error("lease::checkin from an asynchronous callback: the lease is revoked instead");
    return false;  // the holder dies with the lease object: revoked, not lost
  }
  impl_->checked_in = true;
  bool known = false;
  {
    caf::scoped_actor self{*impl_->system};
    self->request(impl_->pool, caf::duration{std::chrono::seconds{10}}, checkin_atom::value,
                  impl_->grant.lease_id, std::move(status))
      .receive([&](bool k) { known = k; }, [&](caf::error&) {});
  }
  caf::anon_send(impl_->holder, stop_atom::value);
  return known;
}

struct runtime::impl {
  settings config;
  std::shared_ptr<const settings> shared_config;
  // actor_system keeps a reference to its config: it must outlive the system.
  std::unique_ptr<system_config> system_cfg;
  std::unique_ptr<caf::actor_system> system;
  caf::actor pool;
  caf::actor async_caller;
  std::atomic<bool> stopped{false};
  // Shared with leases, which may be destroyed after stop().
  std::shared_ptr<std::atomic<bool>> stopped_flag = std::make_shared<std::atomic<bool>>(false);

  // Validates the arguments of one call and fixes its deadline.
  std::variant<call, outcome> make_call(const std::string& command, nlohmann::json args,
                                        const call_options& options) const {
    if (args.is_null())
      args = nlohmann::json::object();
    if (!args.is_object() || command.empty())
      return outcome::failure(make_error(
        error_category::system_error, "invalid_request",
        command.empty() ? "command must not be empty" : "args must be a JSON object",
        {{"command", command}}));
    if (stopped)
      return outcome::failure(make_error(error_category::resource_error, "pool_stopping",
                                         "the runtime is stopped", {{"command", command}}));
    auto timeout = options.timeout.value_or(config.pool.request_timeout);
    return call{command, std::move(args), clock_type::now() + timeout};
  }

};

runtime::runtime(std::unique_ptr<impl> p) : impl_(std::move(p)) {
}

runtime::~runtime() {
  stop();
}

std::unique_ptr<runtime> runtime::start(settings config) {
  if (auto err = config.validate())
    throw start_error(*err);
  set_log_level(config.log_level);
  auto p = std::make_unique<impl>();
  p->config = config;
  p->shared_config = std::make_shared<const settings>(config);
  p->system_cfg = std::make_unique<system_config>(config);
  p->system = std::make_unique<caf::actor_system>(*p->system_cfg);
  p->pool = spawn_pool(*p->system, p->shared_config);
  // Service detection (seed Fix 5): the running pool is "dspexpool".
  register_pool(*p->system, p->pool);
  p->async_caller = p->system->spawn(async_caller, p->pool);
  std::unique_ptr<runtime> rt{new runtime(std::move(p))};
  outcome ready;
  {
    caf::scoped_actor self{*rt->impl_->system};
    auto bound = caf::duration{config.pool.init_timeout + reply_margin};
    self->request(rt->impl_->pool, bound, await_ready_atom::value)
      .receive([&](outcome& o) { ready = std::move(o); },
               [&](caf::error& e) { ready = from_caf_error(*rt->impl_->system, e, "start"); });
  }
  if (!ready) {
    rt->stop();
    throw start_error(ready.error());
  }
  return rt;
}

outcome runtime::execute_anonymous(const std::string& command, nlohmann::json args,
                                   call_options options) {
  auto made = impl_->make_call(command, std::move(args), options);
  if (auto* early = std::get_if<outcome>(&made))
    return std::move(*early);
  if (in_async_callback)
    return outcome::failure(blocking_in_callback(command));
  auto& c = std::get<call>(made);
  // Through the runtime's long-lived caller actor: a scoped_actor per call
  // costs an actor spawn and several timer-thread wake-ups (measured).
  auto bound = c.deadline + reply_margin;
  auto promise = std::make_shared<std::promise<outcome>>();
  auto future = promise->get_future();
  caf::anon_send(impl_->async_caller, execute_atom::value, std::move(c),
                 completion{[promise](outcome o) { promise->set_value(std::move(o)); }});
  if (future.wait_until(bound) != std::future_status::ready)
    return outcome::failure(make_error(error_category::timeout_error, "caller_timeout",
                                       "no reply from the pool in time", {{"command", command}}));
  return future.get();
}

void runtime::execute_anonymous_async(const std::string& command, nlohmann::json args,
                                      call_options options, std::function<void(outcome)> done) {
  auto made = impl_->make_call(command, std::move(args), options);
  if (auto* early = std::get_if<outcome>(&made)) {
    done(std::move(*early));
    return;
  }
  caf::anon_send(impl_->async_caller, execute_atom::value, std::move(std::get<call>(made)),
                 completion{std::move(done)});
}

std::future<outcome> runtime::execute_anonymous_async(const std::string& command,
                                                      nlohmann::json args, call_options options) {
  auto promise = std::make_shared<std::promise<outcome>>();
  auto future = promise->get_future();
  execute_anonymous_async(command, std::move(args), options,
                          [promise](outcome o) { promise->set_value(std::move(o)); });
  return future;
}

std::variant<std::unique_ptr<lease>, error> runtime::checkout(checkout_type type,
                                                             checkout_options options) {
  if (impl_->stopped)
    return make_error(error_category::resource_error, "pool_stopping", "the runtime is stopped");
  if (in_async_callback)
    return blocking_in_callback("checkout");
  static std::atomic<std::uint64_t> next_token{1};
  auto timeout = options.timeout.value_or(impl_->config.pool.request_timeout);
  checkout_request req{std::move(type), next_token++, clock_type::now() + timeout, options.block};
  auto holder = impl_->system->spawn(lease_holder, impl_->pool);
  checkout_reply reply{std::nullopt, {}};
  {
    caf::scoped_actor self{*impl_->system};
    self->request(holder, caf::infinite, checkout_atom::value, std::move(req))
      .receive([&](checkout_reply& r) { reply = std::move(r); },
               [&](caf::error& e) {
                 reply.err = from_caf_error(*impl_->system, e, "checkout").error();
               });
  }
  if (!reply.grant) {
    caf::anon_send(holder, stop_atom::value);
    return reply.err;
  }
  auto p = std::make_unique<lease::impl>();
  p->system = impl_->system.get();
  p->pool = impl_->pool;
  p->holder = holder;
  p->grant = std::move(*reply.grant);
  p->runtime_stopped = impl_->stopped_flag;
  return std::make_unique<lease>(std::move(p));
}

pool_status runtime::status() {
  pool_status result;
  if (impl_->stopped || in_async_callback)
    return result;
  caf::scoped_actor self{*impl_->system};
  self->request(impl_->pool, caf::duration{std::chrono::seconds{10}}, status_atom::value)
    .receive([&](pool_status& s) { result = std::move(s); },
             [&](caf::error& e) { log().warn("status: {}", impl_->system->render(e)); });
  return result;
}

void runtime::stop() {
  if (impl_->stopped.exchange(true))
    return;
  // Service detection: no longer "dspexpool" (and a registry entry must not
  // outlive the system: ~actor_system() would wait for it forever).
  unregister_pool(*impl_->system, impl_->pool);
  *impl_->stopped_flag = true;
  auto& sys = *impl_->system;
  const auto& w = impl_->config.worker;
  // Workers stop concurrently, each bounded by its graces; the margin covers
  // reaping and message hops.
  auto bound = caf::duration{w.shutdown_grace + w.kill_grace + std::chrono::seconds{5}};
  {
    caf::scoped_actor self{sys};
    self->monitor(impl_->pool);
    bool stopped_cleanly = false;
    self->request(impl_->pool, bound, stop_atom::value)
      .receive([&](bool) { stopped_cleanly = true; },
               [&](caf::error& e) {
                 log().error("pool did not stop in time ({}); killing it", sys.render(e));
               });
    if (!stopped_cleanly)
      self->send_exit(impl_->pool, caf::exit_reason::kill);
    self->receive([](caf::down_msg&) {},
                  caf::after(bound) >> [&] { log().error("pool did not terminate"); });
    // Every call has its answer now; the async caller quits once it passed
    // the last one on.
    self->monitor(impl_->async_caller);
    self->send(impl_->async_caller, stop_atom::value);
    self->receive([](caf::down_msg&) {},
                  caf::after(bound) >> [&] {
                    log().error("async callers did not finish");
                    self->send_exit(impl_->async_caller, caf::exit_reason::kill);
                  });
  }
  impl_->pool = nullptr;
  impl_->async_caller = nullptr;
  // ~actor_system() blocks while any actor lives; every actor of ours is gone
  // or going now (workers die with the pool, async callers with their reply).
  impl_->system.reset();
}

const settings& runtime::config() const noexcept {
  return impl_->config;
}

} // namespace dspex
