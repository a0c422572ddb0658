// direct_lane: the caller's side of the direct lane (issue 11).
//
// A call that takes a worker from idle_workers (or waits there in line)
// and writes its frame to the worker's process itself; the worker's I/O
// thread (or, for a blocking caller, the caller's own thread) answers it.
// Who owns the call decides what happens to its answer and to a call the
// lane cannot serve (the sinks): the API for anonymous calls, the session's
// lane (runtime_tree) for the calls a session's card runs. Both enter
// through start_direct, which knows neither, only the sinks it is given; a
// call the lane does not take goes to the pool client, whose attempts and
// retries go through the pool actor.
//
// Internal to actors/ (CAF included).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>

#include "dspex/actors/messages.hpp"
#include "dspex/actors/session_actor.hpp"
#include "dspex/pool_metrics.hpp"
#include "api_support.hpp"
#include "idle_workers.hpp"
#include "pool_client.hpp"
#include "worker_channel.hpp"

namespace dspex::runtime_detail {

using detail::direct_reply;
using detail::direct_waiter;
using detail::idle_workers;
using detail::worker_channel;

// A worker taken for a direct call that did not start: back to the idle
// list (or on to the next waiter), or to the pool actor (`to_pool`: it
// cannot take calls).
void hand_back(idle_workers& idle, const std::shared_ptr<worker_channel>& channel, bool to_pool);

// Where a blocking caller of the direct lane waits: for its outcome, or
// for a reply to read itself. When it waited in line, the thread that gives
// it a worker (the caller before it, reading its own reply, or an I/O
// thread) writes its frame and hands it the read: the caller is woken once,
// as in the raw loop, and the worker never waits for a thread to wake.
class blocked_caller : public std::enable_shared_from_this<blocked_caller> {
public:
  explicit blocked_caller(clock_type::time_point deadline) : deadline_(deadline) {
  }

  // The call's completion: the outcome (once); `dropped` is what its last
  // copy sends when it goes unanswered (an actor that died with it).
  std::function<void(outcome)> completion() {
    struct unanswered {
      std::shared_ptr<blocked_caller> to;
      ~unanswered() {
        if (to)
          to->drop();
      }
    };
    auto guard = std::make_shared<unanswered>();
    guard->to = shared_from_this();
    return [guard](outcome o) { guard->to->deliver(std::move(o)); };
  }

  // A worker was given to it with `read_id` open (worker_channel::start):
  // the caller reads the reply, or, when it stopped waiting, nobody (false:
  // the giver must not open a direct read for it). Called under claim().
  bool wants_read() const { return !gone_; }
  void give_read(std::shared_ptr<worker_channel> channel, std::uint64_t read_id) {
    to_read_ = std::move(channel);
    read_id_ = read_id;
    wake_.notify_one();
  }
  std::unique_lock<std::mutex> claim() { return std::unique_lock<std::mutex>{mtx_}; }

  // Waits until `bound` for the outcome, reading a reply handed to it.
  template <class OnMissing>
  outcome wait(clock_type::time_point bound, OnMissing on_missing) {
    std::unique_lock<std::mutex> lk{mtx_};
    for (;;) {
      if (answer_)
        return std::move(*answer_);
      if (to_read_) {
        auto channel = std::move(to_read_);
        auto id = std::exchange(read_id_, 0);
        lk.unlock();
        channel->read_reply(id, deadline_);
        lk.lock();
        continue;
      }
      if (dropped_) {
        gone_ = true;
        return on_missing(true);
      }
      if (wake_.wait_until(lk, bound) == std::cv_status::timeout && !answer_ && !to_read_) {
        gone_ = true;
        return on_missing(false);
      }
    }
  }

private:
  void deliver(outcome o) {
    {
      std::lock_guard<std::mutex> lk{mtx_};
      if (answer_)
        return;
      answer_ = std::move(o);
    }
    wake_.notify_one();
  }
  void drop() {
    {
      std::lock_guard<std::mutex> lk{mtx_};
      dropped_ = true;
    }
    wake_.notify_one();
  }

  const clock_type::time_point deadline_;
  std::mutex mtx_;
  std::condition_variable wake_;
  std::optional<outcome> answer_;
  std::shared_ptr<worker_channel> to_read_;
  std::uint64_t read_id_ = 0;
  bool dropped_ = false;
  bool gone_ = false;
};

// One call on the direct lane, from the moment it takes a worker or a place
// in idle_workers' line until it is answered or sent the usual way.
struct direct_job : std::enable_shared_from_this<direct_job> {
  std::weak_ptr<idle_workers> idle;
  call c;
  clock_type::time_point queued_at = clock_type::now();
  /// A blocking caller (null: an asynchronous one): it reads its reply on
  /// its own thread.
  std::shared_ptr<blocked_caller> blocked;
  /// The attempt's outcome (any thread).
  std::function<void(direct_job&, outcome)> on_answer;
  /// Not served on the lane after all (its deadline passed in line, the lane
  /// closed, the worker could not take it): the usual way, with `c`.
  std::function<void(direct_job&)> on_reroute;

  // Writes the call to `channel`'s process; false when nothing was sent
  // (the worker has gone back: to the idle list, or to the pool).
  // `read_id`: non-null asks for a direct read (worker_channel::start).
  bool start_on(const std::shared_ptr<worker_channel>& channel, std::uint64_t* read_id = nullptr) {
    if (c.is_abandoned()) {
      // Never sent: the usual way answers it (the worker actor refuses it).
      if (auto board = idle.lock())
        hand_back(*board, channel, false);
      return false;
    }
    auto self = shared_from_this();
    auto reply = std::make_shared<direct_reply>(
      [self](outcome o) { self->on_answer(*self, std::move(o)); }, channel->worker_id(),
      c.command);
    auto result = channel->start(c.command, c.args, c.deadline, reply, read_id);
    auto board = idle.lock();
    if (result == worker_channel::start_result::sent) {
      if (board)
        board->metrics().queue_wait.record(clock_type::now() - queued_at);
      return true;
    }
    reply->disarm();  // not sent: answered the usual way
    if (board)
      hand_back(*board, channel, result == worker_channel::start_result::unusable);
    return false;
  }

  // A waiter's turn: a worker, or none (the usual way). A blocking caller
  // is handed the read of its reply.
  void run_on(const std::shared_ptr<worker_channel>& channel) {
    if (!channel) {
      on_reroute(*this);
      return;
    }
    if (!blocked) {
      if (!start_on(channel))
        on_reroute(*this);
      return;
    }
    bool started = false;
    {
      auto lk = blocked->claim();
      std::uint64_t read_id = 0;
      started = start_on(channel, blocked->wants_read() ? &read_id : nullptr);
      if (started && read_id != 0)
        blocked->give_read(channel, read_id);
    }
    if (!started)
      on_reroute(*this);
  }

  // Takes a worker (the call starts now), or a place in line. False:
  // nothing happened (the lane refuses it, or the worker could not take it).
  // A blocking caller that took a worker is handed the read at once (it
  // reads in blocked_caller::wait).
  bool take(idle_workers& board, const std::string& preferred) {
    auto self = shared_from_this();
    direct_waiter waiter{c.deadline,
                         [self](std::shared_ptr<worker_channel> channel) { self->run_on(channel); },
                         preferred};
    std::shared_ptr<worker_channel> taken;
    switch (board.take_or_wait(waiter, taken)) {
      case idle_workers::wait_answer::queued:
        return true;
      case idle_workers::wait_answer::taken:
        if (!blocked)
          return start_on(taken);
        {
          auto lk = blocked->claim();
          std::uint64_t read_id = 0;
          if (!start_on(taken, &read_id))
            return false;
          if (read_id != 0)
            blocked->give_read(taken, read_id);
        }
        return true;
      case idle_workers::wait_answer::refused:
        break;
    }
    return false;
  }
};

/// Where start_direct sends a call it does not answer itself: its owner's
/// way to the pool client. Each returns false when it cannot send (the
/// runtime is stopping): the call then fails with stopped_error.
struct direct_sinks {
  /// A failed attempt, for the pool client to take over (retry policy,
  /// circuit breaker) as detail::direct_failure.
  std::function<bool(detail::direct_failure)> fail;
  /// A call the lane did not serve after all, sent the usual way:
  /// (execute_atom, call, completion, client_call_options).
  std::function<bool(call, completion, detail::client_call_options)> reroute;
};

/// The pool client's way for start_direct: failures and reroutes are sent
/// to `client` while `gate` is open (stop closes it once the actors are gone).
/// Built once per runtime, shared by its anonymous and session calls.
std::shared_ptr<const direct_sinks> sinks_to_client(std::shared_ptr<detail::api_gate> gate,
                                                    caf::actor_addr client);

/// Starts `c` on the direct lane. A job: `done` will be called (on a
/// worker's I/O thread, the pool's, the pool client's, or, after
/// `blocked`'s wait, the caller's). Null: nothing started, `c` and `done`
/// are untouched; the call goes the usual way. `blocked`: a blocking
/// caller, which reads its reply itself (blocked_caller).
/// @param shared the runtime's shared state: the current idle_workers and
///        the circuit breaker (only the closed state takes the lane; a
///        permit is held until the attempt settles). The job keeps only a
///        weak reference.
/// @param c the call; moved from only when a job is returned
/// @param opts what the pool client needs to retry a failed attempt
/// @param done the call's completion
/// @param blocked a blocking caller, or null (an asynchronous one)
/// @param preferred the worker to take when it is idle (empty: any)
/// @param sinks where a failed or rerouted attempt goes
/// @returns the job, or null when the lane did not take the call
std::shared_ptr<direct_job> start_direct(const std::shared_ptr<detail::client_shared>& shared,
                                         call& c, detail::client_call_options opts,
                                         const completion& done,
                                         std::shared_ptr<blocked_caller> blocked,
                                         const std::string& preferred,
                                         std::shared_ptr<const direct_sinks> sinks);

} // namespace dspex::runtime_detail
