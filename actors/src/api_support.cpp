// api_support: see api_support.hpp. The flag that marks a thread running an
// asynchronous callback lives here only: run_callback sets it and
// must_not_block reads it, so no other file can leave it set.
#include "api_support.hpp"

#include <atomic>
#include <exception>
#include <memory>
#include <utility>

#include <caf/actor_system.hpp>
#include <caf/error.hpp>
#include <caf/sec.hpp>

#include "dspex/actors/runtime_thread.hpp"
#include "dspex/logging.hpp"

namespace dspex::runtime_detail {

namespace {

// Set while an asynchronous callback runs on the caller actor's thread: a
// blocking call from there would wait for that very thread, forever.
thread_local bool in_async_callback = false;

} // namespace

outcome from_caf_error(caf::actor_system& sys, const caf::error& err, const std::string& command) {
  if (err == caf::sec::request_timeout)
    return outcome::failure(make_error(error_category::timeout_error, "caller_timeout",
                                       "no reply from the pool in time", {{"command", command}}));
  return outcome::failure(make_error(error_category::system_error, "actor_error",
                                     sys.render(err), {{"command", command}}));
}

void run_callback(const completion& done, outcome o) {
  // Restored, not cleared: a continuation may run inside another's (answer_once).
  const bool was = std::exchange(in_async_callback, true);
  try {
    done.fn(std::move(o));
  } catch (const std::exception& e) {
    log().error("an asynchronous callback threw: {}", e.what());
  } catch (...) {
    log().error("an asynchronous callback threw");
  }
  in_async_callback = was;
}

namespace {

// Shared by every copy of one answer_once completion.
struct one_answer {
  completion done;
  error on_loss;
  std::atomic<bool> answered{false};

  void answer(outcome o) {
    if (!answered.exchange(true))
      run_callback(done, std::move(o));
  }
  ~one_answer() { answer(outcome::failure(std::move(on_loss))); }
};

} // namespace

completion answer_once(completion done, error on_loss) {
  auto shared = std::make_shared<one_answer>();
  shared->done = std::move(done);
  shared->on_loss = std::move(on_loss);
  return completion{[shared](outcome o) { shared->answer(std::move(o)); }};
}

bool must_not_block() noexcept {
  return in_async_callback || on_runtime_thread();
}

error blocking_in_callback(const std::string& what) {
  return make_error(error_category::system_error, "blocking_in_callback",
                    "a blocking " + what
                      + " from a runtime thread (an asynchronous callback, an event handler "
                        "or an actor) would wait forever; use the asynchronous form",
                    {{"command", what}});
}

error stopped_error(const std::string& command) {
  return make_error(error_category::resource_error, "pool_stopping", "the runtime is stopped",
                    {{"command", command}});
}

} // namespace dspex::runtime_detail
