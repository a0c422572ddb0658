// command_adapter: what the runtime knows of the commands its workers run.
// The pool, the pool client, the direct lane and the sessions are generic;
// everything that depends on what the commands mean (DSPy's programs and
// LM: dspy_adapter.hpp) is an adapter's:
//  - anonymous_adapter (the pool client's): which anonymous calls must pass
//    the pool client and the pool (never the direct lane), and what they
//    must carry to run on any worker;
//  - session_adapter (one per session actor): which calls the session
//    answers from its own state, what a call must carry to run on any
//    worker, what a worker's answer changes, and what the workers that
//    served the session must do when it ends.
//
// Internal to actors/.
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "dspex/actors/messages.hpp"
#include "dspex/actors/session_actor.hpp"

namespace dspex::detail {

/// Anonymous calls (execute_anonymous). prepare() and what it wraps run on
/// the pool client's thread; lane_may_take on any thread.
class anonymous_adapter {
public:
  virtual ~anonymous_adapter() = default;

  /// False for commands the pool client and the pool must see (never the
  /// direct lane): their answers change what the runtime holds.
  virtual bool lane_may_take(const std::string& command) const = 0;

  /// Makes an anonymous call whole before its first attempt, and may wrap
  /// `done` to take note of its answer (on the pool client's thread).
  virtual void prepare(call& c, completion& done) = 0;
};

/// One session's: used by the holder of its card only (session_card.hpp:
/// the session actor, or one caller running one call).
class session_adapter {
public:
  virtual ~session_adapter() = default;

  /// A command for every worker that served the session (the session's
  /// next call waits until each answered).
  struct worker_sweep {
    std::string command;
    nlohmann::json args = nlohmann::json::object();
  };

  /// A call the session answers itself.
  struct local_answer {
    outcome result;                     ///< the caller's answer
    std::optional<worker_sweep> then;   ///< and then, on the session's workers
  };

  /// A command to run on one worker before a call is sent again.
  struct repair {
    std::string worker;
    std::string command;
    nlohmann::json args = nlohmann::json::object();
  };

  /// @returns the answer to a call served from the session's own state, or
  ///          nullopt: the call goes to a worker.
  virtual std::optional<local_answer> answer_locally(const call& c) = 0;

  /// False when answer_locally(c) surely gives nullopt: such a call may be
  /// run by its caller (session_card.hpp) instead of the session actor.
  virtual bool may_answer_locally(const call& c) const = 0;

  /// Makes a call whole before it goes to a worker, so that any worker can
  /// run it (and says when running it again is safe).
  virtual void complete(call& c, client_call_options& opts) const = 0;

  /// A worker answered the caller's call `c` with `o` (`repairs` made for
  /// it so far): the adapter takes note.
  /// @returns a repair to make before `c` is sent again, or nullopt: `o`
  ///          goes to the caller.
  virtual std::optional<repair> on_reply(const call& c, const outcome& o, int repairs) = 0;

  /// What every worker that served the session runs when it ends.
  virtual worker_sweep end_sweep() const = 0;

  /// What of a worker's answer to a sweep goes into the session's record
  /// of it (`entry`: worker_id, served_by, ok, error).
  virtual void note_sweep_answer(const outcome& o, nlohmann::json& entry) const = 0;

  /// Fields added to the session's info (get_session_info, list_sessions).
  virtual nlohmann::json info() const = 0;

  /// Fields added to the summary end_session answers, from the sweep's entries.
  virtual nlohmann::json end_summary(const nlohmann::json& sweep_entries) const = 0;
};

} // namespace dspex::detail
