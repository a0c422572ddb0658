// detail::deadline_timer and detail::send_later (actors/src/deadline_timer.hpp):
// a wake-up arrives, an earlier deadline makes the pending one stale, a
// pending wake-up does not keep a terminated actor in memory, and a system
// shuts down cleanly with wake-ups pending.

#include <doctest/doctest.h>

#include <chrono>
#include <thread>

#include <caf/all.hpp>

#include "deadline_timer.hpp"

using namespace std::chrono_literals;

namespace {

constexpr auto hang_guard = 20s; // only catches hangs; never a performance assertion

using wake_atom = caf::atom_constant<caf::atom("testwake")>;
using arm_atom = caf::atom_constant<caf::atom("testarm")>;
using report_atom = caf::atom_constant<caf::atom("testrep")>;

struct timer_state {
  dspex::detail::deadline_timer timer;
  int fired = 0;
  int stale = 0;
  caf::actor observer; ///< told (report, fired, stale) after each wake-up
  int rearm_ms = 0;    ///< after the first wake-up that counts, arm once more this far ahead
};

caf::behavior timed(caf::stateful_actor<timer_state>* self, caf::actor observer, int rearm_ms) {
  self->state.observer = std::move(observer);
  self->state.rearm_ms = rearm_ms;
  return {
    [self](arm_atom, int millis_from_now) {
      self->state.timer.arm(self, std::chrono::steady_clock::now() + std::chrono::milliseconds{millis_from_now},
                            wake_atom::value);
    },
    [self](wake_atom, std::uint64_t generation) {
      auto& st = self->state;
      if (st.timer.fired(generation)) {
        ++st.fired;
        if (st.rearm_ms > 0)
          st.timer.arm(self, std::chrono::steady_clock::now() + std::chrono::milliseconds{st.rearm_ms},
                       wake_atom::value);
        st.rearm_ms = 0;
      } else {
        ++st.stale;
      }
      self->send(st.observer, report_atom::value, st.fired, st.stale);
    },
  };
}

} // namespace

TEST_CASE("a wake-up arrives once, an earlier deadline makes the pending one stale") {
  caf::actor_system_config cfg;
  caf::actor_system sys{cfg};
  caf::scoped_actor self{sys};
  // After generation 2 fires, the actor arms generation 3 (an hour ahead):
  // generation 1, arriving while 3 is pending, must still count as stale.
  auto a = sys.spawn(timed, caf::actor{self}, 3'600'000);
  self->send(a, arm_atom::value, 300); // generation 1
  self->send(a, arm_atom::value, 20);  // earlier: generation 2, 1 is stale now
  self->send(a, arm_atom::value, 100); // later than the pending one: not scheduled
  int fired = 0, stale = 0;
  while (fired + stale < 2) {
    bool got = false;
    self->receive([&](report_atom, int f, int s) { fired = f, stale = s, got = true; },
                  caf::after(hang_guard) >> [] {});
    REQUIRE_MESSAGE(got, "no wake-up within the hang guard");
  }
  CHECK(fired == 1);
  CHECK(stale == 1);
  self->send_exit(a, caf::exit_reason::user_shutdown);
}

TEST_CASE("a pending wake-up does not keep a terminated actor alive") {
  // delayed_send holds its receiver by strong reference until the delay has
  // passed: a recycled worker stayed in memory for its whole request deadline.
  caf::actor_system_config cfg;
  caf::actor_system sys{cfg};
  caf::actor_addr addr;
  {
    caf::scoped_actor self{sys};
    auto a = sys.spawn(timed, caf::actor{self}, 0);
    addr = a.address();
    self->send(a, arm_atom::value, 3'600'000); // an hour from now
    self->monitor(a);
    self->send_exit(a, caf::exit_reason::user_shutdown);
    bool down = false;
    self->receive([&](caf::down_msg&) { down = true; }, caf::after(hang_guard) >> [] {});
    REQUIRE(down);
  }
  // The scheduler drops its own reference right after the actor's last run:
  // wait for that (bounded); only a pending timer could hold it for an hour.
  auto until = std::chrono::steady_clock::now() + hang_guard;
  while (caf::actor_cast<caf::strong_actor_ptr>(addr) && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(5ms);
  CHECK_FALSE(caf::actor_cast<caf::strong_actor_ptr>(addr));
}

TEST_CASE("a system shuts down with wake-ups pending (the relay ends with it)") {
  for (int round = 0; round < 3; ++round) {
    caf::actor_system_config cfg;
    caf::actor_system sys{cfg};
    caf::scoped_actor self{sys};
    auto a = sys.spawn(timed, caf::actor{self}, 0);
    self->send(a, arm_atom::value, 3'600'000);
    // The relay exists once the wake-up is scheduled.
    auto until = std::chrono::steady_clock::now() + hang_guard;
    while (!sys.registry().get(caf::atom("dspextimer")) && std::chrono::steady_clock::now() < until)
      std::this_thread::sleep_for(1ms);
    CHECK(sys.registry().get(caf::atom("dspextimer")));
    self->send_exit(a, caf::exit_reason::user_shutdown);
  } // ~actor_system: used to crash in local_actor::cleanup of the registered relay
}
