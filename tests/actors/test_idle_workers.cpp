// idle_workers (actors/src/idle_workers.hpp): the pool's one list of idle
// workers and the direct lane's line of waiting callers. Pure logic, no
// actor system: each rule of its header, one case each.
#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include "dspex/pool_metrics.hpp"
#include "idle_workers.hpp"
#include "worker_channel.hpp"

using namespace std::chrono_literals;
using dspex::detail::direct_waiter;
using dspex::detail::idle_workers;
using dspex::detail::worker_channel;
using clock_type = std::chrono::steady_clock;

namespace {

std::shared_ptr<worker_channel> channel(const std::string& id) {
  return std::make_shared<worker_channel>(id, 1 << 20, 100);
}

struct fixture {
  explicit fixture(bool lifo = false, std::size_t max_waiting = 8)
    : idle(std::make_shared<idle_workers>(lifo, std::make_shared<dspex::pool_metrics>(2),
                                          max_waiting)) {
    idle->set_to_pool([this](const std::string& id) { to_pool.push_back(id); },
                      [this](clock_type::time_point at) { armed.push_back(at); });
  }

  /// A waiter that records which worker it ran on ("" = sent the usual way).
  direct_waiter waiter(const std::string& name, clock_type::time_point deadline) {
    return direct_waiter{deadline, [this, name](std::shared_ptr<worker_channel> ch) {
                           ran.push_back(name + "@" + (ch ? ch->worker_id() : std::string{}));
                         }};
  }

  std::shared_ptr<idle_workers> idle;
  std::vector<std::string> to_pool;
  std::vector<clock_type::time_point> armed;
  std::vector<std::string> ran;
};

std::string id_of(const std::shared_ptr<worker_channel>& ch) {
  return ch ? ch->worker_id() : std::string{"(none)"};
}

} // namespace

TEST_CASE("idle_workers: direct takes go oldest first (fifo) or newest first (lifo), channels only") {
  SUBCASE("fifo") {
    fixture f{false};
    auto a = channel("a"), b = channel("b");
    CHECK_FALSE(f.idle->put("x", nullptr));  // no lane: only the pool takes it
    CHECK_FALSE(f.idle->put("a", a));
    CHECK_FALSE(f.idle->put("b", b));
    CHECK(id_of(f.idle->take_direct()) == "a");
    CHECK(f.idle->out_on_direct_call("a"));
    CHECK(id_of(f.idle->take_direct()) == "b");
    CHECK(f.idle->take_direct() == nullptr);
    CHECK(f.idle->take_any() == std::optional<std::string>{"x"});
  }
  SUBCASE("lifo") {
    fixture f{true};
    CHECK_FALSE(f.idle->put("a", channel("a")));
    CHECK_FALSE(f.idle->put("b", channel("b")));
    CHECK_FALSE(f.idle->put("x", nullptr));
    CHECK(id_of(f.idle->take_direct()) == "b");
    CHECK(f.idle->take_any() == std::optional<std::string>{"x"});
  }
}

TEST_CASE("idle_workers: the lane yields while callers wait in the pool, while paused, once closed") {
  fixture f;
  (void)f.idle->put("a", channel("a"));
  f.idle->set_pool_waiting(true);
  CHECK(f.idle->take_direct() == nullptr);
  f.idle->set_pool_waiting(false);
  f.idle->pause();
  f.idle->pause();
  CHECK(f.idle->take_direct() == nullptr);
  CHECK(f.idle->resume().empty());
  CHECK(f.idle->take_direct() == nullptr);  // nested: one pause left
  CHECK(f.idle->resume().empty());
  auto a = f.idle->take_direct();
  CHECK(id_of(a) == "a");
  (void)f.idle->close();
  CHECK(f.idle->give_back(a).what == idle_workers::next_use::to_pool);
  CHECK_FALSE(f.idle->put("b", channel("b")).has_value());
  CHECK(f.idle->take_direct() == nullptr);
}

TEST_CASE("idle_workers: give_back returns a worker to the list, to the next waiter, or to the pool") {
  fixture f;
  auto a = channel("a");
  (void)f.idle->put("a", a);
  REQUIRE(f.idle->take_direct() == a);
  CHECK(f.idle->give_back(a).what == idle_workers::next_use::idle);
  CHECK(f.idle->contains("a"));

  // Two callers wait: the worker serves them in order and stays out.
  REQUIRE(f.idle->take_direct() == a);
  std::shared_ptr<worker_channel> taken;
  auto w1 = f.waiter("w1", clock_type::now() + 60s);
  auto w2 = f.waiter("w2", clock_type::now() + 60s);
  CHECK(f.idle->take_or_wait(w1, taken) == idle_workers::wait_answer::queued);
  CHECK(f.idle->take_or_wait(w2, taken) == idle_workers::wait_answer::queued);
  CHECK(f.idle->waiting() == 2);
  auto next = f.idle->give_back(a);
  REQUIRE(next.what == idle_workers::next_use::serve);
  next.waiter->run(a);
  CHECK(f.idle->out_on_direct_call("a"));
  next = f.idle->give_back(a);
  REQUIRE(next.what == idle_workers::next_use::serve);
  next.waiter->run(a);
  CHECK(f.ran == std::vector<std::string>{"w1@a", "w2@a"});
  CHECK(f.idle->give_back(a).what == idle_workers::next_use::idle);

  SUBCASE("recalled") {
    REQUIRE(f.idle->take_direct() == a);
    f.idle->recall("a");
    CHECK(f.idle->give_back(a).what == idle_workers::next_use::to_pool);
    CHECK_FALSE(f.idle->out_on_direct_call("a"));
  }
  SUBCASE("forgotten (removed by the pool)") {
    REQUIRE(f.idle->take_direct() == a);
    f.idle->forget("a");
    CHECK(f.idle->give_back(a).what == idle_workers::next_use::to_pool);
  }
  SUBCASE("its recycling budget spent") {
    a->set_budget(0);
    REQUIRE(f.idle->take_direct() == a);
    CHECK(f.idle->give_back(a).what == idle_workers::next_use::to_pool);
  }
  SUBCASE("callers wait in the pool") {
    REQUIRE(f.idle->take_direct() == a);
    f.idle->set_pool_waiting(true);
    CHECK(f.idle->give_back(a).what == idle_workers::next_use::to_pool);
  }
}

TEST_CASE("idle_workers: take_or_wait takes, queues, or refuses (full, not allowed, pool waiting)") {
  fixture f{false, 2};
  std::shared_ptr<worker_channel> taken;
  (void)f.idle->put("a", channel("a"));
  auto w0 = f.waiter("w0", clock_type::now() + 60s);
  CHECK(f.idle->take_or_wait(w0, taken) == idle_workers::wait_answer::taken);
  CHECK(id_of(taken) == "a");
  auto w1 = f.waiter("w1", clock_type::now() + 60s);
  auto w2 = f.waiter("w2", clock_type::now() + 60s);
  auto w3 = f.waiter("w3", clock_type::now() + 60s);
  CHECK(f.idle->take_or_wait(w1, taken) == idle_workers::wait_answer::queued);
  CHECK(f.idle->take_or_wait(w2, taken) == idle_workers::wait_answer::queued);
  CHECK(f.idle->take_or_wait(w3, taken) == idle_workers::wait_answer::refused);  // max 2
  // Not allowed (a broken pool): the line is handed back, to go the usual way.
  auto left = f.idle->set_waiting_allowed(false);
  CHECK(left.size() == 2);
  auto w4 = f.waiter("w4", clock_type::now() + 60s);
  CHECK(f.idle->take_or_wait(w4, taken) == idle_workers::wait_answer::refused);
  (void)f.idle->set_waiting_allowed(true);
  f.idle->set_pool_waiting(true);
  CHECK(f.idle->take_or_wait(w4, taken) == idle_workers::wait_answer::refused);
  CHECK(f.ran.empty());  // a refused or handed-back waiter is never run by the list
}

TEST_CASE("idle_workers: the pool is asked to wake only for a waiter due before every wake-up asked") {
  fixture f;
  std::shared_ptr<worker_channel> taken;
  auto now = clock_type::now();
  auto w1 = f.waiter("w1", now + 30s);
  auto w2 = f.waiter("w2", now + 40s);  // later: no new wake-up
  auto w3 = f.waiter("w3", now + 10s);  // sooner: a new one
  REQUIRE(f.idle->take_or_wait(w1, taken) == idle_workers::wait_answer::queued);
  REQUIRE(f.idle->take_or_wait(w2, taken) == idle_workers::wait_answer::queued);
  REQUIRE(f.idle->take_or_wait(w3, taken) == idle_workers::wait_answer::queued);
  CHECK(f.armed == std::vector<clock_type::time_point>{now + 30s, now + 10s});
  // At now + 35 s: w1 and w3 are due, in line order; w2 is next.
  auto [late, next] = f.idle->expire(now + 35s);
  REQUIRE(late.size() == 2);
  late[0].run(nullptr);
  late[1].run(nullptr);
  CHECK(f.ran == std::vector<std::string>{"w1@", "w3@"});
  CHECK(next == std::optional<clock_type::time_point>{now + 40s});
  CHECK(f.idle->waiting() == 1);
  // The next wake-up asked for is w2's: a waiter due after it asks nothing.
  auto w4 = f.waiter("w4", now + 50s);
  REQUIRE(f.idle->take_or_wait(w4, taken) == idle_workers::wait_answer::queued);
  CHECK(f.armed.size() == 2);
}

TEST_CASE("idle_workers: a worker put back, or a resume, serves the line, close hands it back") {
  fixture f;
  std::shared_ptr<worker_channel> taken;
  auto w1 = f.waiter("w1", clock_type::now() + 60s);
  auto w2 = f.waiter("w2", clock_type::now() + 60s);
  auto w3 = f.waiter("w3", clock_type::now() + 60s);
  REQUIRE(f.idle->take_or_wait(w1, taken) == idle_workers::wait_answer::queued);
  REQUIRE(f.idle->take_or_wait(w2, taken) == idle_workers::wait_answer::queued);
  REQUIRE(f.idle->take_or_wait(w3, taken) == idle_workers::wait_answer::queued);
  auto a = channel("a");
  auto served = f.idle->put("a", a);
  REQUIRE(served);
  served->run(a);
  CHECK(f.idle->out_on_direct_call("a"));
  // Paused, a worker put back waits; the resume serves the line with it.
  f.idle->pause();
  auto b = channel("b");
  CHECK_FALSE(f.idle->put("b", b).has_value());
  auto resumed = f.idle->resume();
  REQUIRE(resumed.size() == 1);
  CHECK(resumed[0].second == b);
  resumed[0].first.run(resumed[0].second);
  CHECK(f.ran == std::vector<std::string>{"w1@a", "w2@b"});
  auto left = f.idle->close();
  REQUIRE(left.size() == 1);
  left[0].run(nullptr);
  CHECK(f.ran.back() == "w3@");
  CHECK(f.idle->waiting() == 0);
}
