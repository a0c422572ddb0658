#include "support/harness.hpp"

#include <thread>

#include <unistd.h>

#include <doctest/doctest.h>

namespace dspex::testing {

settings test_settings(std::size_t pool_size) {
  settings s;
  s.pool.size = pool_size;
  s.worker.python = DSPEX_TEST_PYTHON;
  s.worker.script = DSPEX_TEST_WORKER_SCRIPT;
  s.worker.test_commands = true;
  s.worker.shutdown_grace = 500ms;
  s.worker.kill_grace = 500ms;
  s.log_level = "warn";
  return s;
}

status_wait wait_for_status(runtime& rt, const std::function<bool(const pool_status&)>& pred,
                            std::chrono::milliseconds timeout, const std::string& pool) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  status_wait w;
  for (;;) {
    w.status = rt.status(pool);
    if (pred(w.status)) {
      w.ok = true;
      return w;
    }
    if (std::chrono::steady_clock::now() >= deadline)
      return w;
    std::this_thread::sleep_for(5ms);
  }
}

std::unique_ptr<runtime> start_runtime(settings s) {
  auto rt = runtime::start(std::move(s));
  for (const auto& pool : rt->pools())
    REQUIRE_MESSAGE(wait_for_status(*rt, full_and_idle, 15s, pool).ok, "pool " << pool);
  return rt;
}

void stop_and_check_no_children(runtime& rt) {
  rt.stop();
  CHECK(wait_no_children(::getpid(), 10s).empty());
}

bool full_and_idle(const pool_status& s) {
  return s.workers.size() == s.size && s.idle == s.size && s.starting == 0 && s.busy == 0;
}

std::vector<int> worker_pids(const pool_status& s) {
  std::vector<int> pids;
  for (auto& w : s.workers)
    pids.push_back(w.pid);
  return pids;
}

} // namespace dspex::testing
