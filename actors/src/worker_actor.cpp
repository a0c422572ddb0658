#include "dspex/actors/worker_actor.hpp"

#include <csignal>
#include <chrono>
#include <optional>

#include <caf/all.hpp>

#include "dspex/actors/messages.hpp"
#include "deadline_timer.hpp"
#include "dspex/child_process.hpp"
#include "dspex/envelope.hpp"
#include "dspex/logging.hpp"
#include "idle_workers.hpp"
#include "worker_channel.hpp"

// A direct call handed to the worker actor (see worker_channel.hpp): local
// only, never serialized.
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(dspex::detail::direct_call)

namespace dspex {

namespace {

using clock_type = std::chrono::steady_clock;
using detail::direct_call;
using detail::worker_channel;

/// (direct_call): the I/O thread hands over a direct call that ended in
/// anything but a clean reply; it is the worker's request in flight now.
using direct_adopt_atom = caf::atom_constant<caf::atom("dadopt")>;

// The worker's one state is its lifecycle (worker_lifecycle.hpp): initializing,
// ready, busy, degraded, terminating, terminated. Terminating has two causes
// the actor tells apart: a stop (stop_requested: the process is being shut
// down) or a process lost while serving ("gone": the actor waits for its
// owner's release, handing back calls that arrive meanwhile).
using ls = lifecycle_state;

// Bridges the child's I/O thread into the actor's mailbox. Holds only a weak
// reference: a message to a worker that is already gone is simply dropped.
// A direct call's clean reply is answered right here, on the I/O thread
// (worker_channel); anything else about a direct call goes to the actor
// first (direct_adopt_atom), so the actor's rules for failures apply to it.
class mailbox_observer final : public child_observer {
public:
  mailbox_observer(caf::actor_addr addr, std::shared_ptr<worker_health> health,
                   std::shared_ptr<worker_channel> channel)
    : addr_(std::move(addr)), health_(std::move(health)), channel_(std::move(channel)) {
  }

  void on_frame(std::string payload) override {
    switch (channel_->on_frame(payload)) {
      case worker_channel::frame_use::answered:
        return;
      case worker_channel::frame_use::hand_over:
        hand_over();
        break;
      case worker_channel::frame_use::not_direct:
        break;
    }
    send(child_frame_atom::value, std::move(payload));
  }

  void on_protocol_error(protocol_error err) override {
    health_->pipes_open = false;
    hand_over();
    send(child_broken_atom::value, std::string{to_string(err.code)}, std::move(err.message));
  }

  void on_stderr_line(std::string_view line) override {
    send(child_stderr_atom::value, std::string{line});
  }

  void on_alarm() override {
    if (auto call = channel_->on_alarm())
      send(direct_adopt_atom::value, std::move(*call));
  }

  void on_exit(exit_status status) override {
    // Visible to the pool's checkout validation at once, before the message.
    health_->process_alive = false;
    health_->pipes_open = false;
    hand_over();
    send(child_exit_atom::value, status.signaled, status.code);
  }

private:
  // Before the event that ends it: the actor answers the call by its rules.
  void hand_over() {
    if (auto call = channel_->take_over())
      send(direct_adopt_atom::value, std::move(*call));
  }

  // A message to an actor that is gone is dropped; a direct call in it then
  // answers worker_exited from its destructor (direct_reply).
  template <class... Ts>
  void send(Ts&&... xs) {
    if (auto dest = caf::actor_cast<caf::actor>(addr_))
      caf::anon_send(dest, std::forward<Ts>(xs)...);
  }

  caf::actor_addr addr_;
  std::shared_ptr<worker_health> health_;
  std::shared_ptr<worker_channel> channel_;
};

struct in_flight_request {
  std::uint64_t id = 0;
  std::string command;
  clock_type::time_point deadline;
  caf::response_promise promise;
  bool check_in = false;  ///< pool-mediated: check in with the owner before replying
  bool health = false;    ///< a health ping (health_check_atom), not a caller's request
  /// A direct call taken over from the I/O thread: answered here instead of `promise`.
  std::shared_ptr<detail::direct_reply> direct;

  void answer(outcome o) {
    if (direct)
      direct->deliver(std::move(o));
    else
      promise.deliver(std::move(o));
  }
};

struct worker_state {
  worker_config cfg;
  std::unique_ptr<child_process> child;
  worker_lifecycle lifecycle{std::string{}, clock_type::now()};
  bool stop_requested = false;  ///< terminating because of a stop (else: gone)
  std::optional<in_flight_request> in_flight;
  // One timer per worker, re-armed lazily: arming CAF's clock per request
  // would wake its timer thread on every round trip.
  detail::deadline_timer request_timer;  ///< the in-flight request's deadline
  std::string last_stderr_line;
  bool killed_child = false;  ///< we sent the child SIGKILL (else a signal came from outside)
  caf::error exit_reason;  ///< kept while `gone`, until the owner releases us
  std::uint64_t lease = 0; ///< the lease whose holder may send requests; 0 = none
  /// The direct lane to the process (worker_channel), and the source of
  /// every request id.
  std::shared_ptr<worker_channel> channel;

  worker_state() = default;
  worker_state(const worker_state&) = delete;
  worker_state& operator=(const worker_state&) = delete;

  /// Runs on every termination, an untrappable `kill` included (CAF destroys
  /// the state in on_exit): a caller whose request is in flight gets an
  /// answer instead of waiting for its own deadline (or forever).
  ~worker_state() {
    if (channel)
      channel->detach();  // before the child goes: no direct call reaches it
    if (!in_flight || (!in_flight->direct && !in_flight->promise.pending()))
      return;
    in_flight->answer(outcome::failure(make_error(
      error_category::communication_error, "worker_exited",
      "worker " + cfg.id + " terminated with the request in flight",
      {{"worker_id", cfg.id}, {"command", in_flight->command}})));
  }

  static inline const char* name = "dspex.worker";
};

/// The worker actor's whole interface: its public one (worker_actor_handle)
/// and what its child's I/O thread and its own timers send it.
using worker_actor_type = worker_actor_handle::extend<
  caf::reacts_to<direct_adopt_atom, direct_call>,
  caf::reacts_to<child_frame_atom, std::string>,
  caf::reacts_to<child_broken_atom, std::string, std::string>,
  caf::reacts_to<child_stderr_atom, std::string>,
  caf::reacts_to<child_exit_atom, bool, int>,
  caf::reacts_to<init_timeout_atom>,
  caf::reacts_to<request_timeout_atom, std::uint64_t>>;

using worker_actor_t = worker_actor_type::stateful_pointer<worker_state>;

nlohmann::json worker_context(worker_actor_t self) {
  auto& st = self->state;
  nlohmann::json ctx{{"worker_id", st.cfg.id}};
  if (st.child)
    ctx["pid"] = st.child->pid();
  return ctx;
}

// -- lifecycle ---------------------------------------------------------------------

void publish_transition(worker_actor_t self, const lifecycle_record& rec, const error* cause) {
  auto& st = self->state;
  if (!st.cfg.events)
    return;
  auto make = [&] {
    event e;
    e.kind = event_kind::worker_transition;
    e.source = st.cfg.id;
    e.worker_id = st.cfg.id;
    e.from = to_string(rec.from);
    e.to = to_string(rec.to);
    e.reason = rec.reason;
    e.at = rec.at;
    if (cause)
      e.err = *cause;
    e.fields["time_in_from_ms"] =
      std::chrono::duration_cast<std::chrono::milliseconds>(rec.time_in_from).count();
    return e;
  };
  using ls = lifecycle_state;
  bool routine = (rec.from == ls::ready && rec.to == ls::busy)
                 || (rec.from == ls::busy && rec.to == ls::ready);
  if (routine)
    st.cfg.events->publish_lazy(make);  // twice per request: free when nobody listens
  else
    st.cfg.events->publish(make());
}

// Asks the lifecycle for `to`; publishes the transition, or logs and
// publishes the refusal (which changes nothing). True when accepted.
bool transition(worker_actor_t self, lifecycle_state to, std::string reason,
                const error* cause = nullptr, clock_type::time_point now = clock_type::now()) {
  auto& st = self->state;
  auto from = st.lifecycle.state();
  if (auto refused = st.lifecycle.transition(to, std::move(reason), now)) {
    log().error("[{}] {}", st.cfg.id, refused->describe());
    if (st.cfg.events) {
      event e;
      e.kind = event_kind::worker_transition;
      e.source = st.cfg.id;
      e.worker_id = st.cfg.id;
      e.from = to_string(from);
      e.reason = refused->context.value("reason", "");
      e.err = *refused;
      e.fields["rejected_to"] = to_string(to);
      if (cause)
        e.fields["cause"] = cause->to_json();
      st.cfg.events->publish(e);
    }
    return false;
  }
  if (!st.lifecycle.history().empty())
    publish_transition(self, st.lifecycle.history().back(), cause);
  return true;
}

// Moves the lifecycle to `to` unless it is there already. A refused
// transition changes nothing.
bool set_state(worker_actor_t self, ls to, std::string reason, const error* cause = nullptr,
               clock_type::time_point now = clock_type::now()) {
  auto& st = self->state;
  return to == st.lifecycle.state() || transition(self, to, std::move(reason), cause, now);
}

ls state_of(const worker_state& st) {
  return st.lifecycle.state();
}

/// Terminating because the process was lost while serving.
bool gone(const worker_state& st) {
  return st.lifecycle.state() == ls::terminating && !st.stop_requested;
}

/// Terminating because of a stop.
bool stopping(const worker_state& st) {
  return st.lifecycle.state() == ls::terminating && st.stop_requested;
}

// The one place the actor quits: the lifecycle ends in terminated (through
// terminating when it is not there yet), published before the state is gone.
void quit_worker(worker_actor_t self, caf::error reason, const std::string& why,
                 const error* cause = nullptr) {
  auto& st = self->state;
  auto now = clock_type::now();
  if (st.lifecycle.state() != lifecycle_state::terminating
      && st.lifecycle.state() != lifecycle_state::terminated)
    transition(self, lifecycle_state::terminating, why, cause, now);
  if (st.lifecycle.state() == lifecycle_state::terminating)
    transition(self, lifecycle_state::terminated, why, cause, now);
  self->quit(std::move(reason));
}

// Our own SIGKILL, remembered so that the exit it causes is not taken for a
// signal from outside (see external_signal).
void kill_child(worker_actor_t self) {
  auto& st = self->state;
  st.killed_child = true;
  if (st.child)
    st.child->kill();
}

// A signal that ended the child without our asking, and that the process
// cannot have raised itself by crashing: somebody outside killed it (an
// operator, a storm, the OOM killer). The pool does not count such a death
// against its crash-loop guard (see pool_actor: crash-loop guard).
bool external_signal(const worker_state& st, const exit_status& status) {
  if (!status.signaled || st.killed_child)
    return false;
  switch (status.code) {
    case SIGSEGV: case SIGABRT: case SIGBUS: case SIGFPE: case SIGILL: case SIGSYS:
    case SIGTRAP: case SIGXCPU: case SIGXFSZ:
      return false;  // the process crashed by itself
    default:
      return true;
  }
}

// The request in flight (if any) fails with resource_error/worker_stopping:
// the worker is going away on purpose, not because the process broke.
void fail_in_flight_stopping(worker_actor_t self, const std::string& what) {
  auto& st = self->state;
  if (!st.in_flight)
    return;
  auto req = std::move(*st.in_flight);
  st.in_flight.reset();
  auto ctx = worker_context(self);
  ctx["command"] = req.command;
  req.answer(outcome::failure(make_error(error_category::resource_error, "worker_stopping",
                                         "worker " + st.cfg.id + " " + what, ctx)));
}

// Quits with a reason the owner sees; the request in flight, if any, gets
// `err` first, so no caller is ever left waiting on a dead worker.
void fail_worker(worker_actor_t self, worker_exit code, error err) {
  auto& st = self->state;
  if (st.in_flight) {
    auto req = std::move(*st.in_flight);
    st.in_flight.reset();
    auto ctx = err.context;
    ctx["command"] = req.command;
    req.answer(outcome::failure(make_error(err.category, err.type, err.message, ctx)));
  }
  st.channel->detach();  // no direct call starts on a process that is going
  log().warn("[{}] removed: {}", st.cfg.id, err.describe());
  if (st.child)
    kill_child(self);
  auto reason = make_exit_reason(code, err);
  if (state_of(st) == ls::ready || state_of(st) == ls::busy
      || state_of(st) == ls::degraded) {
    // The owner may have handed us calls already: wait for its release.
    st.exit_reason = std::move(reason);
    // The table allows terminating from these states: it is never refused.
    set_state(self, ls::terminating, err.type, &err);
    caf::anon_send(st.cfg.owner, worker_gone_atom::value, st.cfg.id, err);
    return;
  }
  quit_worker(self, std::move(reason), err.type, &err);
}

void arm_timer(worker_actor_t self, clock_type::time_point due) {
  self->state.request_timer.arm(self, due, request_timeout_atom::value);
}

void become_ready(worker_actor_t self) {
  auto& st = self->state;
  set_state(self, ls::ready, "initialized");
  log().info("[{}] ready (pid {})", st.cfg.id, st.child->pid());
  caf::anon_send(st.cfg.owner, worker_ready_atom::value, st.cfg.id,
             static_cast<int>(st.child->pid()));
}

std::string start_failure_detail(worker_actor_t self, const std::string& what) {
  auto& line = self->state.last_stderr_line;
  return line.empty() ? what : what + ": " + line;
}

void handle_start_frame(worker_actor_t self, const std::string& payload) {
  auto& st = self->state;
  auto parsed = parse_reply(payload, init_request_id, st.cfg.config->pool.max_json_depth);
  if (auto* perr = std::get_if<protocol_error>(&parsed)) {
    fail_worker(self, worker_exit::init_failed,
                make_error(error_category::initialization_error, "init_failed",
                           "worker " + st.cfg.id + " broke the protocol during start: "
                             + perr->message,
                           worker_context(self)));
    return;
  }
  auto& rep = std::get<reply>(parsed);
  if (!rep.success) {
    fail_worker(self, worker_exit::init_failed,
                make_error(error_category::initialization_error, "init_failed",
                           "worker " + st.cfg.id + " init ping refused: " + rep.error,
                           worker_context(self)));
    return;
  }
  become_ready(self);
}

void handle_reply_frame(worker_actor_t self, const std::string& payload) {
  auto& st = self->state;
  if (!st.in_flight) {
    fail_worker(self, worker_exit::protocol_violation,
                make_error(error_category::communication_error, "protocol_violation",
                           "worker " + st.cfg.id + " sent a frame with no request in flight",
                           worker_context(self)));
    return;
  }
  auto parsed = parse_reply(payload, st.in_flight->id, st.cfg.config->pool.max_json_depth);
  if (auto* perr = std::get_if<protocol_error>(&parsed)) {
    auto ctx = worker_context(self);
    ctx["protocol_error"] = to_string(perr->code);
    fail_worker(self, worker_exit::protocol_violation,
                make_error(error_category::communication_error, "protocol_violation",
                           "worker " + st.cfg.id + ": " + perr->message, ctx));
    return;
  }
  auto& rep = std::get<reply>(parsed);
  auto req = std::move(*st.in_flight);
  st.in_flight.reset();
  if (req.health) {
    // The owner asked with a request: the answer is its checkin.
    if (rep.success) {
      set_state(self, ls::ready, "health_check_passed");
      req.answer(outcome::success(std::move(rep.result)));
      return;
    }
    auto ctx = worker_context(self);
    ctx["command"] = req.command;
    auto err = make_error(error_category::health_check_error, "ping_failed",
                          "worker " + st.cfg.id + " failed its health ping: " + rep.error, ctx);
    if (state_of(st) == ls::busy)
      set_state(self, ls::degraded, "health_check_failed", &err);
    // else: already degraded, and stays so
    req.answer(outcome::failure(std::move(err)));
    return;
  }
  set_state(self, ls::ready, "reply");
  auto o = detail::reply_outcome(std::move(rep), st.cfg.id, st.child ? st.child->pid() : 0,
                                 req.command);
  // Checkin first: once the caller has its reply, the pool already counts
  // the worker as free, so a status query made after a reply sees it.
  if (req.check_in)
    caf::anon_send(st.cfg.owner, checkin_atom::value, st.cfg.id,
               o ? checkin_status::ok() : checkin_status::failed(o.error()));
  req.answer(std::move(o));
}

// Sends one request to the process. `check_in`: the call came through the
// pool (not a lease holder), so the worker checks itself back in.
caf::result<outcome> start_request(worker_actor_t self, call& c, bool check_in) {
  auto& st = self->state;
  auto check_in_now = [&] {
    if (check_in)
      caf::anon_send(st.cfg.owner, checkin_atom::value, st.cfg.id, checkin_status::ok());
  };
  if (state_of(st) != ls::ready) {
    auto ctx = worker_context(self);
    ctx["state"] = to_string(st.lifecycle.state());
    return outcome::failure(make_error(error_category::resource_error, "worker_not_ready",
                                       "worker " + st.cfg.id + " is not ready ("
                                         + to_string(st.lifecycle.state()) + ")",
                                       ctx));
  }
  auto now = clock_type::now();
  if (c.deadline <= now) {
    auto ctx = worker_context(self);
    ctx["command"] = c.command;
    check_in_now();
    return outcome::failure(make_error(error_category::timeout_error, "request_timeout",
                                       "deadline passed before the request was sent", ctx));
  }
  if (c.is_abandoned()) {
    check_in_now();
    return outcome::failure(caller_lost_error(c.command, st.cfg.id));
  }
  auto id = st.channel->next_request_id();
  std::string payload;
  try {
    payload = encode_request(id, c.command, c.args);
  } catch (const std::exception& e) {
    check_in_now();
    return outcome::failure(make_error(error_category::system_error, "invalid_request", e.what(),
                                       worker_context(self)));
  }
  if (payload.size() > st.cfg.config->pool.max_frame_bytes) {
    // The worker would take it for a broken stream and exit (and a retry
    // would do the same to the next one): refused here, nothing sent.
    auto ctx = worker_context(self);
    ctx["command"] = c.command;
    ctx["reason"] = "too_large";
    ctx["bytes"] = payload.size();
    ctx["max_frame_bytes"] = st.cfg.config->pool.max_frame_bytes;
    check_in_now();
    return outcome::failure(make_error(
      error_category::system_error, "invalid_request",
      "the request is " + std::to_string(payload.size()) + " bytes; pool.max_frame_bytes is "
        + std::to_string(st.cfg.config->pool.max_frame_bytes),
      ctx));
  }
  auto rp = self->make_response_promise();
  if (!st.child->send(payload)) {
    // No whole request reached the process, so nothing ran: a call that
    // came through the pool goes back to it and is served by the next worker.
    st.cfg.health->pipes_open = false;
    auto err = make_error(error_category::communication_error, "send_failed",
                          "cannot write to worker " + st.cfg.id + " (stdin closed)",
                          worker_context(self));
    fail_worker(self, worker_exit::process_exited, err);
    if (check_in)
      rp.delegate(st.cfg.owner, retry_atom::value, std::move(c));
    else
      rp.deliver(outcome::failure(std::move(err)));
    return rp;
  }
  st.in_flight = in_flight_request{id, c.command, c.deadline, rp, check_in, false, nullptr};
  set_state(self, ls::busy, "request", nullptr, now);
  arm_timer(self, c.deadline);
  return rp;
}

// health_check_atom: see worker_actor.hpp and messages.hpp.
caf::result<outcome> start_health_check(worker_actor_t self) {
  auto& st = self->state;
  if (st.in_flight || (state_of(st) != ls::ready && state_of(st) != ls::degraded)) {
    auto ctx = worker_context(self);
    ctx["state"] = to_string(st.lifecycle.state());
    return outcome::failure(make_error(error_category::resource_error, "worker_busy",
                                       "worker " + st.cfg.id + " is "
                                         + to_string(st.lifecycle.state())
                                         + (st.in_flight ? " with a request in flight" : "")
                                         + ": no health check",
                                       ctx));
  }
  const auto timeout = st.cfg.config->pool.health_timeout;
  auto now = clock_type::now();
  auto id = st.channel->next_request_id();
  auto payload = encode_request(id, "ping", {{"health_check", true}});
  auto rp = self->make_response_promise();
  if (!st.child->send(payload)) {
    st.cfg.health->pipes_open = false;
    auto ctx = worker_context(self);
    ctx["command"] = "ping";
    auto err = make_error(error_category::communication_error, "send_failed",
                          "cannot write the health ping to worker " + st.cfg.id
                            + " (stdin closed)",
                          ctx);
    fail_worker(self, worker_exit::process_exited, err);
    rp.deliver(outcome::failure(std::move(err)));
    return rp;
  }
  st.in_flight = in_flight_request{id, "ping", now + timeout, rp, false, true, nullptr};
  if (state_of(st) == ls::ready)
    set_state(self, ls::busy, "health_check", nullptr, now);
  // degraded: stays degraded while the recovery ping runs
  arm_timer(self, now + timeout);
  return rp;
}

worker_actor_type::behavior_type worker_actor(worker_actor_t self, worker_config cfg) {
  auto& st = self->state;
  st.cfg = std::move(cfg);
  st.lifecycle = worker_lifecycle{st.cfg.id, clock_type::now()};  // spawn → initializing
  const auto& conf = *st.cfg.config;
  process_spec spec{conf.worker.python, conf.worker_args(st.cfg.id, st.cfg.mode), st.cfg.id,
                  conf.pool.max_frame_bytes,
                  log_level_of(conf.log_worker_level).value_or(spdlog::level::info)};
  st.channel = st.cfg.health->channel ? st.cfg.health->channel
                              : std::make_shared<worker_channel>(st.cfg.id, conf.pool.max_frame_bytes,
                                                                 conf.pool.max_json_depth);
  auto observer = std::make_shared<mailbox_observer>(self->address(), st.cfg.health, st.channel);
  try {
    st.child = child_process::spawn(std::move(spec), observer);
  } catch (const spawn_error& e) {
    fail_worker(self, worker_exit::spawn_failed,
                make_error(error_category::initialization_error, "spawn_failed", e.what(),
                           {{"worker_id", st.cfg.id}, {"python", conf.worker.python}}));
    return worker_actor_type::behavior_type::make_empty_behavior();
  }
  st.cfg.health->process_alive = true;
  st.cfg.health->pipes_open = true;
  // A broken reply read by a caller directly is reported as the I/O thread
  // reports one.
  st.channel->attach(st.child.get(), static_cast<int>(st.child->pid()),
                     [weak = std::weak_ptr<mailbox_observer>{observer}](protocol_error e) {
                       if (auto o = weak.lock())
                         o->on_protocol_error(std::move(e));
                     });
  // The pid is known from now on (status, and whoever must find the process).
  caf::anon_send(st.cfg.owner, worker_spawned_atom::value, st.cfg.id,
             static_cast<int>(st.child->pid()));
  self->attach_functor([health = st.cfg.health] { health->actor_alive = false; });
  // As CAF's default (quit on any reason but normal), with the lifecycle
  // ending in terminated first. exit_reason::kill cannot be trapped: that
  // one ends the actor without a published `terminated`.
  self->set_exit_handler([=](caf::exit_msg& msg) {
    if (!msg.reason)
      return;
    auto& st = self->state;
    auto why = "exit: " + self->system().render(msg.reason);
    fail_in_flight_stopping(self, "is terminating (" + why + ")");
    if (st.child)
      kill_child(self);
    quit_worker(self, std::move(msg.reason), why);
  });
  auto ping = encode_request(init_request_id, "ping",
                             {{"initialization", true}, {"worker_id", st.cfg.id}});
  // A process that cannot take the init ping has closed its stdin or died:
  // its exit (with its last stderr line, the useful part) or the init
  // timeout ends the start, so the failure names the real cause.
  if (!st.child->send(ping))
    log().debug("[{}] the init ping could not be written; waiting for the exit", st.cfg.id);
  detail::send_later(self, conf.pool.init_timeout, caf::make_message(init_timeout_atom::value));

  return {
    [=](execute_atom, call& c) -> caf::result<outcome> {
      auto& st = self->state;
      if (gone(st)) {
        // Never reached the process: back to the owner, same caller.
        auto rp = self->make_response_promise();
        rp.delegate(st.cfg.owner, retry_atom::value, std::move(c));
        return rp;
      }
      return start_request(self, c, true);
    },
    [=](execute_atom, std::uint64_t lease, call& c) -> caf::result<outcome> {
      auto& st = self->state;
      if (gone(st))
        return outcome::failure(decode_exit_reason(st.exit_reason)
                                  .value_or(make_error(error_category::communication_error,
                                                       "worker_exited",
                                                       "worker " + st.cfg.id + " is gone")));
      if (lease == 0 || lease != st.lease) {
        auto ctx = worker_context(self);
        ctx["command"] = c.command;
        return outcome::failure(make_error(error_category::resource_error, "not_lease_holder",
                                           "worker " + st.cfg.id
                                             + " is not checked out under this lease",
                                           ctx));
      }
      return start_request(self, c, false);
    },
    [=](health_check_atom) -> caf::result<outcome> { return start_health_check(self); },
    [=](direct_adopt_atom, direct_call& c) {
      // A direct call that did not end in a clean reply: it is this worker's
      // request in flight now, and the next message (the frame, the broken
      // stream, the exit) or its deadline decides it, as for any request.
      auto& st = self->state;
      if (st.in_flight || (state_of(st) != ls::ready)) {
        in_flight_request late{c.id, c.command, c.deadline, {}, false, false, std::move(c.reply)};
        auto ctx = worker_context(self);
        ctx["command"] = c.command;
        auto stop = stopping(st);
        late.answer(outcome::failure(make_error(
          stop ? error_category::resource_error : error_category::communication_error,
          stop ? "worker_stopping" : "worker_exited",
          "worker " + st.cfg.id + " is " + to_string(st.lifecycle.state())
            + ": the request in flight cannot be answered",
          ctx)));
        return;
      }
      st.in_flight = in_flight_request{c.id, c.command, c.deadline, {}, true, false, std::move(c.reply)};
      set_state(self, ls::busy, "request", nullptr, c.started);
      arm_timer(self, c.deadline);
    },
    [=](process_stopped_atom) {
      auto& st = self->state;
      if (gone(st) || stopping(st))
        return;
      // A stop comes from outside (an operator, a storm), like a signal
      // that kills: it says nothing about whether workers can start, so a
      // worker stopped while starting must cost the pool no backoff.
      auto ctx = worker_context(self);
      ctx["cause"] = "external_signal";
      fail_worker(self, worker_exit::health_timeout,
                  make_error(error_category::health_check_error, "process_stopped",
                             "worker " + st.cfg.id
                               + "'s process was stopped (SIGSTOP) from outside and could "
                                 "answer nothing; it was killed and will be replaced",
                             std::move(ctx)));
    },
    [=](lifecycle_atom) -> lifecycle_history {
      const auto& h = self->state.lifecycle.history();
      return lifecycle_history(h.begin(), h.end());
    },
    [=](lease_atom, std::uint64_t lease) { self->state.lease = lease; },
    [=](revoke_atom, std::uint64_t lease) -> bool {
      // In sync only when no request is in flight: a reply still on its way
      // would reach the next holder.
      auto& st = self->state;
      if (st.lease == lease)
        st.lease = 0;
      return !st.in_flight && state_of(st) == ls::ready;
    },
    [=](child_frame_atom, const std::string& payload) {
      auto& st = self->state;
      switch (state_of(st)) {
        case ls::initializing:
          handle_start_frame(self, payload);
          break;
        case ls::ready:
        case ls::busy:
        case ls::degraded:
          handle_reply_frame(self, payload);
          break;
        case ls::terminating:
        case ls::terminated:
          break; // the reply to `shutdown`, or a late reply nobody waits for
      }
    },
    [=](child_broken_atom, const std::string& code, const std::string& message) {
      auto& st = self->state;
      if (gone(st))
        return;
      if (stopping(st)) {
        kill_child(self);
        return;
      }
      auto ctx = worker_context(self);
      ctx["protocol_error"] = code;
      if (state_of(st) == ls::initializing)
        fail_worker(self, worker_exit::init_failed,
                    make_error(error_category::initialization_error, "init_failed",
                               "worker " + st.cfg.id + " broke the protocol during start: "
                                 + message,
                               ctx));
      else
        fail_worker(self, worker_exit::protocol_violation,
                    make_error(error_category::communication_error, "protocol_violation",
                               "worker " + st.cfg.id + ": " + message, ctx));
    },
    [=](child_stderr_atom, std::string& line) {
      self->state.last_stderr_line = std::move(line);
    },
    [=](child_exit_atom, bool signaled, int code) {
      auto& st = self->state;
      exit_status status{signaled, code};
      if (gone(st))
        return;  // we killed it; the reason is already known
      if (stopping(st)) {
        log().info("[{}] stopped ({})", st.cfg.id, status.describe());
        quit_worker(self, caf::error{}, "stopped");
        return;
      }
      auto ctx = worker_context(self);
      ctx["exit"] = status.describe();
      auto external = external_signal(st, status);
      if (external)
        ctx["cause"] = "external_signal";
      if (external && (state_of(st) == ls::initializing)) {
        // Not a start failure: the process was starting fine when it was killed.
        fail_worker(self, worker_exit::killed_at_start,
                    make_error(error_category::initialization_error, "killed_at_start",
                               "worker " + st.cfg.id + " was killed during start ("
                                 + status.describe() + ", not sent by the runtime)",
                               ctx));
        return;
      }
      if (state_of(st) == ls::initializing) {
        fail_worker(self, worker_exit::init_failed,
                    make_error(error_category::initialization_error, "init_failed",
                               start_failure_detail(self, "worker " + st.cfg.id
                                                            + " exited during start ("
                                                            + status.describe() + ")"),
                               ctx));
        return;
      }
      fail_worker(self, worker_exit::process_exited,
                  make_error(error_category::communication_error, "worker_exited",
                             "worker " + st.cfg.id + " exited (" + status.describe() + ")",
                             ctx));
    },
    [=](init_timeout_atom) {
      auto& st = self->state;
      if (state_of(st) != ls::initializing)
        return;
      fail_worker(self, worker_exit::init_timeout,
                  make_error(error_category::initialization_error, "init_timeout",
                             "worker " + st.cfg.id + " did not answer the init ping within "
                               + std::to_string(st.cfg.config->pool.init_timeout.count())
                               + " ms",
                             worker_context(self)));
    },
    [=](request_timeout_atom, std::uint64_t generation) {
      auto& st = self->state;
      if (!st.request_timer.fired(generation))
        return;
      if (!st.in_flight)  // only ever set in busy, or in degraded for a recovery ping
        return;
      if (st.in_flight->deadline > clock_type::now()) {
        arm_timer(self, st.in_flight->deadline);
        return;
      }
      if (st.in_flight->health) {
        // A ping unanswered: the process is hung. Killed, never reused.
        auto ctx = worker_context(self);
        ctx["timeout_ms"] = st.cfg.config->pool.health_timeout.count();
        fail_worker(self, worker_exit::health_timeout,
                    make_error(error_category::health_check_error, "health_timeout",
                               "worker " + st.cfg.id + " did not answer its health ping within "
                                 + std::to_string(st.cfg.config->pool.health_timeout.count())
                                 + " ms; it was killed and will be replaced",
                               ctx));
        return;
      }
      // Killed, never reused: its late reply must not reach the next caller.
      fail_worker(self, worker_exit::request_timeout,
                  make_error(error_category::timeout_error, "request_timeout",
                             "worker " + st.cfg.id + " did not reply before the deadline; "
                               "it was killed and will be replaced",
                             worker_context(self)));
    },
    [=](stop_atom) {
      auto& st = self->state;
      if (gone(st)) {
        // The owner's release: it sends this worker no more calls.
        quit_worker(self, std::move(st.exit_reason), "released");
        return;
      }
      if (stopping(st))
        return;  // a second stop: nothing more to do
      // Idle (ready, or degraded with no ping running): the process reads
      // `shutdown` at once; a busy one is stopped by the stop sequence.
      auto was_idle = !st.in_flight
                      && (state_of(st) == ls::ready || state_of(st) == ls::degraded);
      st.stop_requested = true;
      set_state(self, ls::terminating, "stop");  // allowed from every state but the last two
      fail_in_flight_stopping(self, "is stopping");
      const auto& w = st.cfg.config->worker;
      if (was_idle)
        st.child->send(encode_request(st.channel->next_request_id(), "shutdown", nullptr));
      st.child->stop(w.shutdown_grace, w.kill_grace);
    },
  };
}

} // namespace

worker_actor_handle spawn_worker(caf::actor_system& sys, worker_config cfg) {
  return sys.spawn(worker_actor, std::move(cfg));
}

worker_actor_handle spawn_linked_worker(caf::local_actor* parent, worker_config cfg) {
  return parent->spawn<caf::linked>(worker_actor, std::move(cfg));
}

} // namespace dspex
