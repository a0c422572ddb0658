// A generic supervisor actor in the style of OTP. Children are described by
// specs with a start function; the supervisor restarts them by restart type
// and strategy, bounds restarts by an intensity (more than max_restarts
// within max_seconds: it gives up), and stops them in an ordered, bounded
// way. A supervisor is itself a valid child (supervisor_child), so trees nest.
// Included only by translation units that use CAF.
//
// Messages it answers:
//  - (which_children_atom) → std::vector<child_info>, in start order; a child
//    that is not running (a transient child that ended normally, a child
//    whose restart failed and waits for its retry) has an invalid actor.
//  - (supervisor_stop_atom) → bool: ordered shutdown (see below), answered
//    once every child is gone; then the supervisor quits normally.
//  - An exit_msg (send_exit) with an abnormal reason, or any exit_msg from its
//    parent (the actor that spawned it with spawn_linked_supervisor): ordered
//    shutdown, then the supervisor quits with that reason.
//
// Supervision:
//  - A child's start function spawns it linked (sup->spawn<caf::linked>(...)).
//    The supervisor then unlinks it and monitors it: in CAF 0.17 an exit_msg
//    with reason kill is fatal even to an actor that traps exits, so a link
//    would let a child killed by anybody (kill) take the supervisor, and with
//    it the whole tree, down. Unlike Erlang, CAF does not turn kill into
//    killed on the way through a link. Instead, whenever the supervisor
//    terminates for any reason (even a kill), it kills the children still
//    alive (attach_functor), so none outlives it.
//  - Restart types: permanent: always restarted; transient: restarted only
//    after an abnormal exit (a reason other than normal and user_shutdown, as
//    OTP treats normal and shutdown); temporary: never restarted, and removed
//    from the children when it ends.
//  - Strategies: one_for_one restarts the failed child only; one_for_all
//    stops the other running children (reverse start order) and restarts all
//    of them with the failed one (start order); rest_for_one does the same
//    for the running children started after the failed one. Children that
//    were not running (a transient child that ended normally) stay down.
//    Temporary children stopped by a group restart are removed, not
//    restarted (OTP).
//  - Intensity: every failure that leads to a restart (one per failure, even
//    when a group restarts) and every retry of a failed restart counts. More
//    than max_restarts within max_seconds: the supervisor gives up. It emits
//    gave_up, stops its remaining children (reverse start order) and exits
//    with make_supervisor_exit(gave_up, ...), naming the child and the
//    child's last exit reason. A parent supervisor sees that as an abnormal
//    exit of that child.
//  - A restart whose start function throws or returns an invalid actor emits
//    child_start_failed and is retried through the mailbox (OTP's
//    try_again_restart), counting against the intensity each time.
//  - A child that fails to start while the supervisor starts up makes the
//    supervisor stop the children started so far and exit with
//    make_supervisor_exit(start_failed, ...).
//
// Ordered, bounded shutdown: children stop one at a time in reverse start
// order. Each gets send_exit(user_shutdown) and has its shutdown_timeout to
// terminate, then gets exit_reason::kill (a timeout of 0 kills at once); the
// supervisor waits for its down_msg before it moves on to the next. The same
// ordered stop is used for the siblings in group restarts. A child that exits
// on its own during a shutdown is never restarted (it is one fewer to stop);
// one of the group during a group restart just starts again with the group;
// one outside the group is handled once the group is back. A stop (or an
// exit) during a group restart wins: the group is not started again.
//
// One window remains: a child that quits with reason kill by itself before
// its start function has returned reaches the supervisor through the link
// while it still exists, and such an exit_msg is fatal in CAF 0.17.
//
// Events: every start, restart, exit, stop step and give-up is logged
// through dspex::log() with key=value fields and passed to flags.observer (if
// set), on the supervisor's own thread: the observer must be quick and
// thread-safe with respect to whoever reads what it records.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <caf/actor.hpp>
#include <caf/actor_addr.hpp>
#include <caf/allowed_unsafe_message_type.hpp>
#include <caf/atom.hpp>
#include <caf/error.hpp>
#include <caf/fwd.hpp>

#include "dspex/error.hpp"

namespace dspex {

enum class restart_type : std::uint8_t {
  permanent,  ///< always restarted
  transient,  ///< restarted only after an abnormal exit
  temporary,  ///< never restarted
};

enum class restart_strategy : std::uint8_t {
  one_for_one,
  one_for_all,
  rest_for_one,
};

/// @returns the snake_case name (permanent, transient, temporary).
const char* to_string(restart_type x) noexcept;
/// @returns the snake_case name (one_for_one, one_for_all, rest_for_one).
const char* to_string(restart_strategy x) noexcept;

/// One child of a supervisor.
struct child_spec {
  /// Unique among the supervisor's children; names the child in events,
  /// logs and exit reasons.
  std::string id;
  /// Spawns the child linked to the supervisor, e.g.
  /// `[](caf::event_based_actor* sup) { return sup->spawn<caf::linked>(fn); }`.
  /// Runs on the supervisor's thread. Throwing or returning an invalid actor
  /// is a start failure.
  std::function<caf::actor(caf::event_based_actor* supervisor)> start;
  restart_type restart = restart_type::permanent;
  /// How long the child has after send_exit(user_shutdown) before it is
  /// killed. Zero kills it at once (OTP's brutal_kill).
  std::chrono::milliseconds shutdown_timeout = std::chrono::seconds{5};
};

enum class supervisor_event_kind : std::uint8_t {
  child_started,       ///< first start of a child (child: the new actor)
  child_restarted,     ///< a later start (child: the new actor; restarts: its count now)
  child_start_failed,  ///< the start function threw or returned an invalid actor (reason: why)
  child_exited,        ///< a child ended on its own (reason: its exit reason)
  child_stopped,       ///< a child ended by an ordered stop (reason; killed: after its timeout)
  gave_up,             ///< intensity exceeded (child_id: the last failed child;
                       ///< reason: the supervisor's own exit reason)
};

/// @returns the snake_case name (child_started, child_restarted, ...).
const char* to_string(supervisor_event_kind x) noexcept;

struct supervisor_event {
  supervisor_event_kind kind = supervisor_event_kind::child_started;
  std::string supervisor;  ///< supervisor_flags::name
  std::string child_id;
  caf::actor_addr child;   ///< the actor concerned (weak: observers keep no child alive)
  caf::error reason;
  std::size_t restarts = 0;  ///< the child's restart count
  bool killed = false;       ///< child_stopped: it needed exit_reason::kill
};

struct supervisor_flags {
  /// Names the supervisor in events, logs and exit reasons.
  std::string name = "supervisor";
  restart_strategy strategy = restart_strategy::one_for_one;
  std::size_t max_restarts = 3;
  std::chrono::milliseconds max_seconds = std::chrono::seconds{5};
  /// Optional; called on the supervisor's thread for every event.
  std::function<void(const supervisor_event&)> observer;
};

/// One entry of the which_children answer.
struct child_info {
  std::string id;
  caf::actor actor;  ///< invalid while the child is not running
  std::size_t restarts = 0;
  restart_type restart = restart_type::permanent;
};

/// (which_children_atom) → std::vector<child_info>
using which_children_atom = caf::atom_constant<caf::atom("whichchild")>;
/// (supervisor_stop_atom) → bool. The same atom as dspex::stop_atom, so one
/// `stop` message stops a pool or a supervisor alike.
using supervisor_stop_atom = caf::atom_constant<caf::atom("stop")>;

// -- exit reasons of a supervisor ---------------------------------------------

/// Category atom of the caf::error a supervisor quits with when it gives up or
/// cannot start. Its code is a supervisor_exit; its context is
/// (std::string supervisor, std::string child_id, caf::error child_reason,
/// std::uint64_t restarts).
constexpr caf::atom_value supervisor_exit_category = caf::atom("dspexsup");

enum class supervisor_exit : std::uint8_t {
  gave_up = 1,   ///< restart intensity exceeded
  start_failed,  ///< a child failed to start while the supervisor started
};

/// @returns the snake_case name of a supervisor's exit code.
const char* to_string(supervisor_exit x) noexcept;

struct supervisor_exit_info {
  supervisor_exit code = supervisor_exit::gave_up;
  std::string supervisor;   ///< the name of the supervisor that exited
  std::string child_id;     ///< the child whose failure made it exit
  caf::error child_reason;  ///< that child's last exit (or start failure) reason
  std::size_t restarts = 0; ///< gave_up: restarts counted within max_seconds
};

caf::error make_supervisor_exit(supervisor_exit code, const std::string& supervisor,
                                const std::string& child_id, const caf::error& child_reason,
                                std::size_t restarts = 0);

/// The details of a supervisor's exit reason; nullopt for any other reason.
std::optional<supervisor_exit_info> decode_supervisor_exit(const caf::error& reason);

/// True for a supervisor's exit reason (category supervisor_exit_category).
bool is_supervisor_exit(const caf::error& reason);

/// The structured error of a supervisor's exit: resource_error/supervisor_gave_up
/// (what it supervised is unavailable) or initialization_error/child_start_failed;
/// context {supervisor, child_id, child_reason (rendered), restarts}, and
/// "cause" with the nested supervisor's error when the child was one.
error to_error(const supervisor_exit_info& info);

/// "supervisor 'root' gave up (4 restarts within max_seconds): child 'b' exited with ..."
std::string describe(const supervisor_exit_info& info);

/// True for the reasons that count as a normal end for a transient child:
/// none (normal) and exit_reason::user_shutdown.
bool is_normal_exit(const caf::error& reason);

// -- spawning -----------------------------------------------------------------

/// Spawns a top-level supervisor, which starts its children in order at
/// once. Throws std::invalid_argument for an empty or duplicate child id or
/// a missing start function. The caller keeps the handle: in CAF 0.17 an
/// actor nobody references is terminated (exit_reason::unreachable).
caf::actor spawn_supervisor(caf::actor_system& sys, supervisor_flags flags,
                            std::vector<child_spec> children);

/// Spawns a supervisor linked to `parent` (for nesting; a supervisor as a
/// child's start function). An exit from the parent, for any reason, shuts
/// it down in order and it quits with the parent's reason.
caf::actor spawn_linked_supervisor(caf::event_based_actor* parent, supervisor_flags flags,
                                   std::vector<child_spec> children);

/// A child_spec whose start function spawns a nested supervisor. Without
/// `shutdown_timeout`, it is the sum of the children's timeouts plus one
/// second: enough for the nested supervisor's own ordered shutdown.
child_spec supervisor_child(std::string id, supervisor_flags flags,
                            std::vector<child_spec> children,
                            restart_type restart = restart_type::permanent,
                            std::optional<std::chrono::milliseconds> shutdown_timeout
                            = std::nullopt);

} // namespace dspex

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(dspex::child_info)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(std::vector<dspex::child_info>)
