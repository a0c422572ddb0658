// direct_lane: see direct_lane.hpp. A direct call's answer and its way back
// are the sinks' business; what stays here is what every owner's direct
// call must do alike: take a worker or a place in line, hold a breaker
// permit and settle it once, record the queue wait (direct_job::start_on).
#include "direct_lane.hpp"

#include <mutex>
#include <shared_mutex>

#include <caf/actor_cast.hpp>
#include <caf/send.hpp>

namespace dspex::runtime_detail {

void hand_back(idle_workers& idle, const std::shared_ptr<worker_channel>& channel, bool to_pool) {
  if (to_pool)
    idle.recall(channel->worker_id());
  auto next = idle.give_back(channel);
  if (next.what == idle_workers::next_use::to_pool)
    idle.to_pool(channel->worker_id());
  else if (next.what == idle_workers::next_use::serve)
    next.waiter->run(channel);
}

std::shared_ptr<const direct_sinks> sinks_to_client(std::shared_ptr<detail::api_gate> gate,
                                                    caf::actor_addr client) {
  // While the gate is open the system lives (stop closes it first); the
  // client is held weakly: the sinks may outlive it.
  auto send = [gate, client](auto&&... xs) {
    std::shared_lock<std::shared_timed_mutex> lk{gate->mtx};
    auto to = caf::actor_cast<pool_client_handle>(client);
    if (gate->closed || !to)
      return false;
    caf::anon_send(to, std::forward<decltype(xs)>(xs)...);
    return true;
  };
  auto sinks = std::make_shared<direct_sinks>();
  sinks->fail = [send](detail::direct_failure f) { return send(std::move(f)); };
  sinks->reroute = [send](call usual, completion then, detail::client_call_options opts) {
    return send(execute_atom::value, std::move(usual), std::move(then), opts);
  };
  return sinks;
}

std::shared_ptr<direct_job> start_direct(const std::shared_ptr<detail::client_shared>& shared,
                                         call& c, detail::client_call_options opts,
                                         const completion& done,
                                         std::shared_ptr<blocked_caller> blocked,
                                         const std::string& preferred,
                                         std::shared_ptr<const direct_sinks> sinks) {
  if (shared->circuit.load() != circuit_state::closed)
    return nullptr;
  auto idle = shared->current_idle();
  if (!idle)
    return nullptr;
  std::optional<circuit_permit> permit;
  {
    std::lock_guard<std::mutex> guard{shared->breaker_mtx};
    if (shared->breaker) {
      auto admission = shared->breaker->allow();
      if (!admission)
        return nullptr;  // the pool client gives the rejection
      permit = admission.permit;
    }
  }
  if (c.args.find("session_id") == c.args.end())
    c.args["session_id"] = "anonymous";
  auto job = std::make_shared<direct_job>();
  job->idle = idle;
  job->c = std::move(c);
  // The permit is settled once: a success here, a failure by the pool
  // client (which publishes a transition), a reroute releases it.
  auto held = std::make_shared<std::optional<circuit_permit>>(permit);
  std::weak_ptr<detail::client_shared> sh = shared;
  job->on_answer = [sh, done, opts, held, sinks](direct_job& j, outcome o) {
    if (o.ok()) {
      auto r = sh.lock();
      if (r && *held) {
        std::lock_guard<std::mutex> guard{r->breaker_mtx};
        if (r->breaker)
          r->breaker->record_success(**held);  // never a transition: see shared->breaker
      }
      run_callback(done, std::move(o));
      return;
    }
    auto command = j.c.command;
    if (!sinks->fail(detail::direct_failure{std::move(j.c), done, opts, *held, o}))
      run_callback(done, outcome::failure(stopped_error(command)));
  };
  job->on_reroute = [sh, done, opts, held, sinks](direct_job& j) {
    auto r = sh.lock();
    if (r && *held) {
      std::lock_guard<std::mutex> guard{r->breaker_mtx};
      if (r->breaker)
        r->breaker->release(**held);
    }
    held->reset();
    auto command = j.c.command;
    if (!sinks->reroute(std::move(j.c), done, opts))
      run_callback(done, outcome::failure(stopped_error(command)));
  };
  job->blocked = std::move(blocked);
  if (job->take(*idle, preferred))
    return job;
  if (permit) {
    std::lock_guard<std::mutex> guard{shared->breaker_mtx};
    shared->breaker->release(*permit);
  }
  c = std::move(job->c);
  return nullptr;
}

} // namespace dspex::runtime_detail
