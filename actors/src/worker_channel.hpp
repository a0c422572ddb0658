// worker_channel: the direct lane to one worker's process. A caller that
// took an idle worker from its pool (idle_workers::take_direct) writes its
// request frame here itself, and the worker's I/O thread completes the call
// itself when the reply comes: no actor and no scheduler thread on the way
// (issue 11). Everything that is not a clean reply (an exit, a broken
// frame, a passed deadline) is not handled here: the call is handed to the
// worker actor (direct_call), whose rules for failures are the only ones.
//
// Internal to actors/: no CAF in this header.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "dspex/checkout.hpp"
#include "dspex/envelope.hpp"
#include "dspex/framing.hpp"

namespace dspex {

class child_process;
class pool_metrics;

namespace detail {

class idle_workers;

/// The answer to one direct call, delivered exactly once: by the I/O thread
/// on a reply, or by the worker actor once it took the call over. Whatever
/// drops it unanswered (a message to a worker actor that is already gone)
/// answers communication_error/worker_exited from its destructor: a caller
/// is never left waiting.
class direct_reply {
public:
  using handler = std::function<void(outcome)>;

  /// @param fn receives the outcome, on the thread that delivers it.
  direct_reply(handler fn, std::string worker_id, std::string command);
  ~direct_reply();
  direct_reply(const direct_reply&) = delete;
  direct_reply& operator=(const direct_reply&) = delete;

  /// The first call delivers; later ones are ignored.
  void deliver(outcome o);
  /// For a call that was never sent: nothing is delivered, ever.
  void disarm() noexcept { delivered_.store(true); }

private:
  std::atomic<bool> delivered_{false};
  handler fn_;
  std::string worker_id_;
  std::string command_;
};

/// A direct call in flight, or handed to the worker actor.
struct direct_call {
  std::uint64_t id = 0;
  std::string command;
  std::chrono::steady_clock::time_point deadline;
  std::chrono::steady_clock::time_point started;
  std::shared_ptr<direct_reply> reply;
};

/// A worker's reply as the caller sees it: the result, or python_error/
/// command_failed with the worker's error text (shared by both lanes).
outcome reply_outcome(reply r, const std::string& worker_id, int pid, const std::string& command);

class worker_channel : public std::enable_shared_from_this<worker_channel> {
public:
  using clock_type = std::chrono::steady_clock;

  worker_channel(std::string worker_id, std::size_t max_frame_bytes, std::size_t max_json_depth);

  /// The pool whose idle list this worker goes back to after a direct call
  /// (set by the pool actor; no direct call can start before).
  void set_board(const std::shared_ptr<idle_workers>& board);

  const std::string& worker_id() const noexcept { return worker_id_; }

  // -- the worker actor ------------------------------------------------------

  /// What a caller that read a broken reply itself reports, as the I/O
  /// thread would (the worker's observer: the call goes to the worker actor).
  using broken_fn = std::function<void(protocol_error)>;

  /// The process is spawned: direct calls may reach it from now on.
  void attach(child_process* child, int pid, broken_fn broken);
  /// Before the worker actor lets its process go: no direct call starts
  /// after this returns, and a caller reading a reply directly has stopped
  /// (one in flight is handed over through take_over).
  void detach();
  /// Request ids, shared by both lanes: a reply can never be taken for
  /// another lane's request.
  std::uint64_t next_request_id() noexcept { return next_id_.fetch_add(1); }

  // -- a caller that took the worker from idle_workers -------------------------

  enum class start_result {
    sent,      ///< the frame is written or queued: the reply (or the worker actor) answers
    refused,   ///< nothing sent: the request itself cannot go this way (its
               ///< encoding failed, or it is over max_frame_bytes); the worker is fine
    unusable,  ///< nothing sent: the worker cannot take it (its process is
               ///< going, stdin closed); it must go to the pool actor
  };
  /// Writes the request frame. `args` (an object with a session_id) stay
  /// the caller's, for a retry. Whatever the result, the caller then owns
  /// nothing: a call not sent may go anywhere else.
  /// `direct_read`: non-null asks for a direct read of the reply: set to
  /// the read's id when the process allows one (see
  /// child_process::begin_direct_read), else to 0 (the I/O thread reads it).
  /// Whoever gets a read id must call read_reply with it: until then the
  /// I/O thread does not read this worker's stdout.
  start_result start(const std::string& command, const nlohmann::json& args,
                     clock_type::time_point deadline, std::shared_ptr<direct_reply> reply,
                     std::uint64_t* direct_read = nullptr);
  /// The direct read `read_id` (from start; any thread, once): reads the
  /// reply on this thread and answers the call here; whatever it cannot
  /// read cleanly stays with the I/O thread (a passed deadline, an exit) or
  /// goes to the worker actor (a broken frame). Does nothing when that read
  /// is not open (0, or a read that ended).
  void read_reply(std::uint64_t read_id, clock_type::time_point deadline);

  // -- the worker's I/O thread (its child_observer) ----------------------------

  /// What on_frame did with a frame.
  enum class frame_use { not_direct, answered, hand_over };
  /// A frame from the process. `answered`: the direct call's clean reply,
  /// delivered (the worker went back to `board` first). `hand_over`: the
  /// frame breaks the protocol for the direct call in flight: take_over()
  /// gives the call, to go to the worker actor before the frame.
  /// `not_direct`: no direct call in flight; the frame is the actor's.
  frame_use on_frame(const std::string& payload);
  /// The process exited or broke its stream: the direct call in flight, if
  /// any, for the worker actor.
  std::optional<direct_call> take_over();
  /// The alarm came: the direct call, if its deadline passed (for the worker
  /// actor, which kills the process); else the alarm is re-armed.
  std::optional<direct_call> on_alarm();

  // -- the pool ------------------------------------------------------------------

  /// Calls served directly since the pool last folded them into its stats.
  struct served {
    std::uint64_t started = 0;  ///< direct calls sent (each a checkout)
    std::uint64_t ok = 0;
    std::uint64_t failed = 0;  ///< python errors (the program's, not the worker's)
    std::optional<clock_type::time_point> last;  ///< when the newest one ended
  };
  /// @returns the direct calls served since the last call, and resets them.
  served take_served();
  /// How many more direct calls before the worker must go back to the pool
  /// (its recycling limit); unlimited by default.
  void set_budget(std::uint64_t calls);
  /// True once the budget is spent.
  bool budget_spent() const noexcept { return budget_.load() == 0; }

private:
  const std::string worker_id_;
  const std::size_t max_frame_bytes_;
  const std::size_t max_json_depth_;
  std::atomic<std::uint64_t> next_id_{1};
  std::atomic<std::uint64_t> budget_{~std::uint64_t{0}};

  mutable std::mutex mtx_;
  /// Answers the direct call in flight with `payload`, its worker given back
  /// first (see on_frame for the results; `bad`, when set, says why a frame
  /// is handed over). `by_caller`: read by the caller's thread (counted).
  frame_use answer(const std::string& payload, std::optional<protocol_error>* bad, bool by_caller);

  std::weak_ptr<idle_workers> board_;
  child_process* child_ = nullptr;  ///< set by attach, cleared by detach
  broken_fn broken_;
  bool reading_ = false;            ///< a caller reads the reply directly
  std::uint64_t read_id_ = 0;       ///< that read's id (its request's)
  std::condition_variable read_done_;
  int pid_ = 0;
  std::optional<direct_call> in_flight_;
  served served_;
};

} // namespace detail
} // namespace dspex
