#include "support/test_pool.hpp"

#include <atomic>
#include <thread>

#include <doctest/doctest.h>

namespace dspex::testing {

namespace {

constexpr auto margin = std::chrono::seconds{5};

std::chrono::steady_clock::time_point after(std::chrono::milliseconds d) {
  return std::chrono::steady_clock::now() + d;
}

} // namespace

test_pool::test_pool(test_pool_options opts)
  : cfg_{}, sys_{cfg_.set("scheduler.policy", caf::atom("sharing"))},
    config_(std::make_shared<const settings>(opts.config)), events_(std::move(opts.events)) {
  if (!events_)
    events_ = std::make_shared<event_bus>();
  pool_ = spawn_pool(sys_, config_, std::move(opts.contract), events_);
}

test_pool::~test_pool() {
  if (release_)
    release_->set_value();  // a test that failed while the pool was held
  caf::scoped_actor self{sys_};
  self->monitor(pool_);
  bool answered = false;
  self->request(pool_, caf::duration{10s}, stop_atom::value)
    .receive([&](bool) { answered = true; }, [&](caf::error&) {});
  if (!answered)
    self->send_exit(pool_, caf::exit_reason::kill);
  self->receive([](caf::down_msg&) {}, caf::after(std::chrono::seconds{10}) >> [] {});
}

pool_status test_pool::status() {
  pool_status result;
  caf::scoped_actor self{sys_};
  self->request(pool_, caf::duration{10s}, status_atom::value)
    .receive([&](pool_status& s) { result = std::move(s); }, [&](caf::error&) {});
  return result;
}

bool test_pool::wait_for(const std::function<bool(const pool_status&)>& pred,
                         std::chrono::milliseconds timeout) {
  auto deadline = after(timeout);
  for (;;) {
    if (pred(status()))
      return true;
    if (std::chrono::steady_clock::now() >= deadline)
      return false;
    std::this_thread::sleep_for(2ms);
  }
}

bool test_pool::wait_for_pool_ready(std::chrono::milliseconds timeout) {
  auto size = config_->pool.size;
  return wait_for([size](const pool_status& s) { return s.idle == size && s.starting == 0; },
                  timeout);
}

outcome test_pool::execute(const std::string& command, nlohmann::json args,
                           std::chrono::milliseconds timeout, checkout_type type, bool block) {
  outcome result = outcome::failure(make_error(error_category::system_error, "no_reply", "no reply"));
  caf::scoped_actor self{sys_};
  call c{command, std::move(args), after(timeout), std::move(type), block};
  self->request(pool_, caf::duration{timeout + margin}, execute_atom::value, std::move(c))
    .receive([&](outcome& o) { result = std::move(o); },
             [&](caf::error& e) {
               result = outcome::failure(
                 make_error(error_category::system_error, "actor_error", caf::to_string(e)));
             });
  return result;
}

outcome test_pool::execute(call c) {
  outcome result = outcome::failure(make_error(error_category::system_error, "no_reply", "no reply"));
  caf::scoped_actor self{sys_};
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
    c.deadline - std::chrono::steady_clock::now());
  self->request(pool_, caf::duration{left + margin}, execute_atom::value, std::move(c))
    .receive([&](outcome& o) { result = std::move(o); },
             [&](caf::error& e) {
               result = outcome::failure(
                 make_error(error_category::system_error, "actor_error", caf::to_string(e)));
             });
  return result;
}

void test_pool::execute_async(call c, std::function<void(outcome)> done) {
  auto fn = std::move(done);
  sys_.spawn([c = std::move(c), fn, pool = pool_](caf::event_based_actor* self) mutable {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
      c.deadline - std::chrono::steady_clock::now());
    self->request(pool, caf::duration{left + margin}, execute_atom::value, std::move(c))
      .then([fn](outcome& o) { fn(std::move(o)); },
            [fn](caf::error& e) {
              fn(outcome::failure(
                make_error(error_category::system_error, "actor_error", caf::to_string(e))));
            });
  });
}

void test_pool::hold() {
  REQUIRE_FALSE(release_);
  release_ = std::make_shared<std::promise<void>>();
  auto released = release_->get_future().share();
  auto threads = sys_.scheduler().num_workers();
  auto entered = std::make_shared<std::atomic<std::size_t>>(0);
  for (std::size_t i = 0; i < threads; ++i) {
    // One blocked handler per scheduler thread: a thread running one cannot
    // take the next, so the stallers end up on distinct threads.
    auto staller = sys_.spawn([released, entered](caf::event_based_actor* self) -> caf::behavior {
      return {[=](caf::atom_value) {
        ++*entered;
        released.wait_for(60s);  // hang guard
        self->quit();
      }};
    });
    caf::anon_send(staller, caf::atom("stall"));
  }
  auto deadline = after(10s);
  while (*entered < threads && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(1ms);
  REQUIRE_MESSAGE(*entered == threads, "not every scheduler thread could be held");
}

void test_pool::resume() {
  REQUIRE(release_);
  release_->set_value();
  release_.reset();
}

std::size_t test_pool::ping_idle() {
  std::size_t removed = 0;
  caf::scoped_actor self{sys_};
  self->request(pool_, caf::duration{10s}, ping_idle_atom::value)
    .receive([&](std::size_t n) { removed = n; }, [&](caf::error&) {});
  return removed;
}

test_caller::test_caller(test_pool& pool)
  : pool_(pool), self_(std::make_unique<caf::scoped_actor>(pool.system())) {
}

test_caller::~test_caller() {
  die();
}

caf::actor_addr test_caller::address() const {
  return self_ ? (*self_)->address() : caf::actor_addr{};
}

checkout_reply test_caller::checkout(checkout_type type, std::chrono::milliseconds deadline,
                                     bool block) {
  checkout_reply reply{std::nullopt, make_error(error_category::system_error, "no_reply", "")};
  checkout_request req{std::move(type), next_token_++, after(deadline), block};
  (*self_)
    ->request(pool_.pool(), caf::duration{deadline + margin}, checkout_atom::value, std::move(req))
    .receive([&](checkout_reply& r) { reply = std::move(r); },
             [&](caf::error& e) {
               reply.err = make_error(error_category::system_error, "actor_error",
                                      caf::to_string(e));
             });
  return reply;
}

std::uint64_t test_caller::checkout_async(checkout_type type, std::chrono::milliseconds deadline) {
  auto token = next_token_++;
  (*self_)->send(pool_.pool(), checkout_atom::value,
                 checkout_request{std::move(type), token, after(deadline), true});
  return token;
}

checkout_reply test_caller::await_checkout(std::chrono::milliseconds timeout) {
  checkout_reply reply{std::nullopt, make_error(error_category::system_error, "no_reply", "")};
  (*self_)->receive([&](checkout_reply& r) { reply = std::move(r); },
                    caf::after(caf::duration{timeout}) >> [] {});
  return reply;
}

std::uint64_t test_caller::checkout_giving_up(std::chrono::milliseconds give_up,
                                              std::chrono::milliseconds deadline) {
  auto token = next_token_++;
  checkout_request req{checkout_type::anonymous(), token, after(deadline), true};
  bool timed_out = false;
  (*self_)
    ->request(pool_.pool(), caf::duration{give_up}, checkout_atom::value, std::move(req))
    .receive([&](checkout_reply&) {}, [&](caf::error&) { timed_out = true; });
  if (timed_out)
    (*self_)->send(pool_.pool(), cancel_atom::value, token);
  return token;
}

outcome test_caller::execute(const lease_grant& lease, const std::string& command,
                             nlohmann::json args, std::chrono::milliseconds timeout) {
  outcome result = outcome::failure(make_error(error_category::system_error, "no_reply", "no reply"));
  call c{command, std::move(args), after(timeout)};
  (*self_)
    ->request(lease.worker, caf::duration{timeout + margin}, execute_atom::value, lease.lease_id,
              std::move(c))
    .receive([&](outcome& o) { result = std::move(o); },
             [&](caf::error& e) {
               result = outcome::failure(
                 make_error(error_category::system_error, "actor_error", caf::to_string(e)));
             });
  return result;
}

void test_caller::execute_async(const lease_grant& lease, const std::string& command) {
  (*self_)->send(lease.worker, execute_atom::value, lease.lease_id, call{command, {}, after(60s)});
}

bool test_caller::checkin(const lease_grant& lease, checkin_status status) {
  bool known = false;
  (*self_)
    ->request(pool_.pool(), caf::duration{10s}, checkin_atom::value, lease.lease_id,
              std::move(status))
    .receive([&](bool k) { known = k; }, [&](caf::error&) {});
  return known;
}

void test_caller::checkin_async(const lease_grant& lease, checkin_status status) {
  (*self_)->send(pool_.pool(), checkin_atom::value, lease.lease_id, std::move(status));
}

void test_caller::die() {
  self_.reset();
}

} // namespace dspex::testing
