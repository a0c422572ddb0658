// dspex_consumer: starts a one-worker runtime with the installed package's
// defaults (the bundled worker script under the install prefix), makes one
// call and prints what it got, as JSON on one line:
//   {"worker_script": "...", "reply": {...}}
// Exit status 0 when the call succeeded, 1 when it failed (its error is
// printed instead of the reply), 2 when the runtime could not start.
#include <iostream>

#include <nlohmann/json.hpp>

#include "dspex/runtime.hpp"

int main() {
  dspex::settings cfg;  // worker.script: dspex::bundled_worker_script()
  cfg.pool.size = 1;
  nlohmann::json out{{"worker_script", cfg.worker.script}};
  std::unique_ptr<dspex::runtime> rt;
  try {
    rt = dspex::runtime::start(cfg);
  } catch (const dspex::start_error& e) {
    out["start_error"] = e.details().to_json();
    std::cout << out.dump() << std::endl;
    return 2;
  }
  auto r = rt->execute_anonymous("ping", nlohmann::json::object());
  rt->stop();
  if (!r) {
    out["error"] = r.error().to_json();
    std::cout << out.dump() << std::endl;
    return 1;
  }
  out["reply"] = r.value();
  std::cout << out.dump() << std::endl;
  return 0;
}
