// event_bus: an unsubscribe that returns leaves no handler running, so a
// subscriber may be destroyed right after it (an event published at that
// moment used to run a destroyed recorder's handler: a double free seen in
// the contract tests), and a handler may unsubscribe itself.
#include <atomic>
#include <chrono>
#include <thread>

#include <doctest/doctest.h>

#include "dspex/events.hpp"

using namespace std::chrono_literals;

namespace {

// Spins until `flag` is set; a hang guard, not a timing assumption.
bool await(const std::atomic<bool>& flag, std::chrono::seconds bound = 30s) {
  auto until = std::chrono::steady_clock::now() + bound;
  while (!flag.load()) {
    if (std::chrono::steady_clock::now() > until)
      return false;
    std::this_thread::yield();
  }
  return true;
}

} // namespace

TEST_CASE("event_bus: unsubscribe returns only once the handler's running call has returned") {
  dspex::event_bus bus;
  std::atomic<bool> entered{false}, unsubscribing{false}, finished{false};
  auto id = bus.subscribe([&](const dspex::event&) {
    entered = true;
    await(unsubscribing);
    // Still running well after unsubscribe was called: a bus that does not
    // wait returns during this span.
    auto until = std::chrono::steady_clock::now() + 50ms;
    while (std::chrono::steady_clock::now() < until)
      std::this_thread::yield();
    finished = true;
  });
  std::thread publisher{[&] { bus.publish(dspex::event{}); }};
  REQUIRE(await(entered));
  bool finished_at_return = false;
  std::thread unsubscriber{[&] {
    unsubscribing = true;
    bus.unsubscribe(id);
    finished_at_return = finished.load();
  }};
  unsubscriber.join();
  publisher.join();
  CHECK(finished_at_return);
  CHECK_FALSE(bus.has_subscribers());
}

TEST_CASE("event_bus: a handler may unsubscribe itself, it is never called again") {
  dspex::event_bus bus;
  int calls = 0;
  std::uint64_t id = 0;
  id = bus.subscribe([&](const dspex::event&) {
    ++calls;
    bus.unsubscribe(id);  // must not wait for this very call
  });
  int other = 0;
  bus.subscribe([&](const dspex::event&) { ++other; });
  bus.publish(dspex::event{});
  bus.publish(dspex::event{});
  CHECK(calls == 1);
  CHECK(other == 2);
}

TEST_CASE("event_bus: a subscription removed before its turn in a running publish is skipped") {
  dspex::event_bus bus;
  int second_calls = 0;
  std::uint64_t second = 0;
  bus.subscribe([&](const dspex::event&) { bus.unsubscribe(second); });
  second = bus.subscribe([&](const dspex::event&) { ++second_calls; });
  bus.publish(dspex::event{});
  CHECK(second_calls == 0);
}
