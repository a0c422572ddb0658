#include "support/worker_fixture.hpp"

namespace dspex::testing {

worker_fixture::~worker_fixture() {
  if (worker) {
    (*self)->send_exit(worker, caf::exit_reason::kill);
    await_down();
  }
  events.reset();
  self.reset();
}

void worker_fixture::start(settings s, const std::string& id) {
  worker_config wc{id, std::make_shared<const settings>(s), *self};
  wc.events = bus;
  worker = spawn_worker(sys, std::move(wc));
  (*self)->monitor(worker);
}

int worker_fixture::await_ready() {
  bool done = false;
  while (!done) {
    (*self)->receive(
      [&](worker_ready_atom, const std::string&, int p) {
        pid = p;
        done = true;
      },
      [&](caf::down_msg& dm) {
        down_reason = dm.reason;
        worker = nullptr;
        done = true;
      },
      caf::after(hang_catch) >> [&] { done = true; });
  }
  return pid;
}

outcome test_failure(const caf::error& e) {
  return outcome::failure(make_error(error_category::system_error, "test", caf::to_string(e)));
}

outcome worker_fixture::execute(const std::string& command, nlohmann::json args,
                                std::chrono::milliseconds timeout) {
  outcome result;
  call c{command, std::move(args), std::chrono::steady_clock::now() + timeout};
  (*self)
    ->request(worker, caf::duration{timeout + std::chrono::seconds{5}}, execute_atom::value,
              std::move(c))
    .receive([&](outcome& o) { result = std::move(o); },
             [&](caf::error& e) { result = test_failure(e); });
  return result;
}

caf::error worker_fixture::await_down() {
  bool done = false;
  while (!done && worker) {
    (*self)->receive([&](caf::down_msg& dm) { down_reason = dm.reason; done = true; },
                     [&](checkin_atom, const std::string&, const checkin_status&) {},
                     [&](worker_gone_atom, const std::string&, const dspex::error&) {
                       (*self)->send(worker, stop_atom::value);
                     },
                     [&](worker_ready_atom, const std::string&, int) {},
                     caf::after(hang_catch) >> [&] { done = true; });
  }
  worker = nullptr;
  return down_reason;
}

} // namespace dspex::testing
