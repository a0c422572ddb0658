#include "worker_channel.hpp"

#include <utility>

#include "dspex/child_process.hpp"
#include "dspex/error.hpp"
#include "dspex/pool_metrics.hpp"
#include "idle_workers.hpp"

namespace dspex::detail {

// -- direct_reply ----------------------------------------------------------------

direct_reply::direct_reply(handler fn, std::string worker_id, std::string command)
  : fn_(std::move(fn)), worker_id_(std::move(worker_id)), command_(std::move(command)) {
}

direct_reply::~direct_reply() {
  deliver(outcome::failure(make_error(error_category::communication_error, "worker_exited",
                                      "worker " + worker_id_
                                        + " terminated with the request in flight",
                                      {{"worker_id", worker_id_}, {"command", command_}})));
}

void direct_reply::deliver(outcome o) {
  if (delivered_.exchange(true))
    return;
  if (fn_)
    fn_(std::move(o));
}

outcome reply_outcome(reply r, const std::string& worker_id, int pid, const std::string& command) {
  if (r.success) {
    auto o = outcome::success(std::move(r.result));
    o.set_served_by(worker_id);
    return o;
  }
  nlohmann::json ctx{{"worker_id", worker_id}, {"command", command}};
  if (pid > 0)
    ctx["pid"] = pid;
  auto o = outcome::failure(
    make_error(error_category::python_error, "command_failed", std::move(r.error), std::move(ctx)));
  o.set_served_by(worker_id);
  return o;
}

// -- worker_channel ----------------------------------------------------------------

worker_channel::worker_channel(std::string worker_id, std::size_t max_frame_bytes,
                               std::size_t max_json_depth)
  : worker_id_(std::move(worker_id)), max_frame_bytes_(max_frame_bytes),
    max_json_depth_(max_json_depth) {
}

void worker_channel::set_board(const std::shared_ptr<idle_workers>& board) {
  std::lock_guard<std::mutex> lk{mtx_};
  board_ = board;
}

void worker_channel::attach(child_process* child, int pid, broken_fn broken) {
  std::lock_guard<std::mutex> lk{mtx_};
  child_ = child;
  pid_ = pid;
  broken_ = std::move(broken);
}

void worker_channel::detach() {
  std::unique_lock<std::mutex> lk{mtx_};
  if (reading_ && read_id_ != 0 && child_) {
    // Open but not claimed by its reader yet: it is ended here (a later
    // read_reply finds nothing to read).
    child_->end_direct_read();
    reading_ = false;
    read_id_ = 0;
  }
  if (reading_ && child_)
    child_->abort_direct_read();  // returns at once: the reader lets go of the process
  read_done_.wait(lk, [&] { return !reading_; });
  child_ = nullptr;
}

worker_channel::start_result worker_channel::start(const std::string& command,
                                                   const nlohmann::json& args,
                                                   clock_type::time_point deadline,
                                                   std::shared_ptr<direct_reply> reply,
                                                   std::uint64_t* direct_read) {
  if (direct_read)
    *direct_read = 0;
  auto id = next_request_id();
  std::string payload;
  try {
    payload = encode_prepared_request(id, command, args);
  } catch (const std::exception&) {
    return start_result::refused;  // the pool's lane gives the structured error
  }
  if (payload.size() > max_frame_bytes_)
    return start_result::refused;  // likewise (invalid_request/too_large)
  std::lock_guard<std::mutex> lk{mtx_};
  if (!child_ || in_flight_ || board_.expired())
    return start_result::unusable;
  auto now = clock_type::now();
  in_flight_ = direct_call{id, command, deadline, now, std::move(reply)};
  // Before the frame: the alarm is armed before any reply can come.
  child_->set_alarm(deadline);
  reading_ = direct_read && child_->begin_direct_read();
  read_id_ = reading_ ? id : 0;
  if (!child_->send(payload)) {
    in_flight_.reset();  // nothing reached the process
    if (reading_) {
      child_->end_direct_read();
      reading_ = false;
      read_done_.notify_all();
    }
    return start_result::unusable;
  }
  ++served_.started;
  if (direct_read)
    *direct_read = read_id_;
  return start_result::sent;
}

worker_channel::frame_use worker_channel::on_frame(const std::string& payload) {
  return answer(payload, nullptr, false);
}

void worker_channel::read_reply(std::uint64_t read_id, clock_type::time_point deadline) {
  child_process* child = nullptr;
  broken_fn broken;
  {
    std::lock_guard<std::mutex> lk{mtx_};
    if (!reading_ || read_id == 0 || read_id != read_id_)
      return;
    read_id_ = 0;     // read once
    child = child_;   // alive until reading_ is false: detach waits for it
    broken = broken_;
  }
  std::string payload;
  auto r = child->read_frame(payload, deadline);
  // A broken stream is reported while this thread still has stdout: the
  // I/O thread, waiting for it to report the exit, comes second, as it
  // would have reading the stream itself.
  std::optional<protocol_error> stream_error;
  if (r == child_process::direct_read::truncated)
    stream_error = protocol_error{protocol_errc::truncated, "EOF inside a reply frame"};
  else if (r == child_process::direct_read::oversize)
    stream_error = protocol_error{protocol_errc::oversize,
                                  "a reply header announced more than max_frame_bytes"};
  else if (r == child_process::direct_read::zero_length)
    stream_error = protocol_error{protocol_errc::zero_length, "a reply header announced 0 bytes"};
  if (stream_error && broken)
    broken(std::move(*stream_error));
  child->end_direct_read();
  {
    std::lock_guard<std::mutex> lk{mtx_};
    reading_ = false;
    read_done_.notify_all();
  }
  switch (r) {
    case child_process::direct_read::frame: {
      std::optional<protocol_error> bad;
      if (answer(payload, &bad, true) == frame_use::hand_over && broken)
        broken(std::move(*bad));  // the worker actor takes the call and kills the process
      return;
    }
    case child_process::direct_read::timeout:
      // The I/O thread's alarm hands the call to the worker actor, which
      // kills the process (its rest of the stream is noise now).
      child->set_alarm(clock_type::now());
      return;
    case child_process::direct_read::truncated:
    case child_process::direct_read::oversize:
    case child_process::direct_read::zero_length:
      return;  // reported above: the worker actor has the call
    case child_process::direct_read::ended:
      return;  // the process is going: its exit hands the call over
  }
}

worker_channel::frame_use worker_channel::answer(const std::string& payload,
                                                 std::optional<protocol_error>* bad,
                                                 bool by_caller) {
  std::optional<direct_call> call;
  std::optional<outcome> answer;
  std::shared_ptr<idle_workers> board;
  {
    std::lock_guard<std::mutex> lk{mtx_};
    if (!in_flight_)
      return frame_use::not_direct;  // none, or taken over meanwhile (its deadline)
    board = board_.lock();
    auto parsed = parse_reply(payload, in_flight_->id, max_json_depth_);
    if (auto* err = std::get_if<protocol_error>(&parsed)) {
      if (bad)
        *bad = *err;
      return frame_use::hand_over;  // in_flight_ stays for take_over()
    }
    call = std::move(in_flight_);
    in_flight_.reset();
    auto& rep = std::get<reply>(parsed);
    auto o = reply_outcome(std::move(rep), worker_id_, pid_, call->command);
    auto now = clock_type::now();
    if (o)
      ++served_.ok;
    else
      ++served_.failed;
    served_.last = now;
    auto budget = budget_.load();
    if (budget != ~std::uint64_t{0} && budget > 0)
      budget_.store(budget - 1);
    answer = std::move(o);
    if (board) {
      board->metrics().worker_ran(now - call->started);
      if (by_caller)
        board->metrics().read_by_caller();
    }
  }
  // The worker goes back first, so that once its caller has the reply, the
  // pool already counts it as idle (or has it back); a caller waiting for a
  // worker gets this one at once, its frame written before this reply is
  // delivered (the process works while the caller wakes).
  if (board) {
    auto next = board->give_back(shared_from_this());
    if (next.what == idle_workers::next_use::to_pool)
      board->to_pool(worker_id_);
    else if (next.what == idle_workers::next_use::serve)
      next.waiter->run(shared_from_this());
  }
  call->reply->deliver(std::move(*answer));
  return frame_use::answered;
}

std::optional<direct_call> worker_channel::take_over() {
  std::lock_guard<std::mutex> lk{mtx_};
  return std::exchange(in_flight_, std::nullopt);
}

std::optional<direct_call> worker_channel::on_alarm() {
  std::lock_guard<std::mutex> lk{mtx_};
  if (!in_flight_)
    return std::nullopt;
  if (in_flight_->deadline > clock_type::now()) {
    if (child_)
      child_->set_alarm(in_flight_->deadline);  // an older alarm: this call's is later
    return std::nullopt;
  }
  return std::exchange(in_flight_, std::nullopt);
}

worker_channel::served worker_channel::take_served() {
  std::lock_guard<std::mutex> lk{mtx_};
  return std::exchange(served_, served{});
}

void worker_channel::set_budget(std::uint64_t calls) {
  budget_.store(calls);
}


} // namespace dspex::detail
