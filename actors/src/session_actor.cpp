#include "dspex/actors/session_actor.hpp"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <deque>
#include <map>
#include <set>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include <caf/all.hpp>

#include "dspex/logging.hpp"
#include "deadline_timer.hpp"
#include "command_adapter.hpp"
#include "session_directory.hpp"

namespace dspex {

namespace {

using clock_type = std::chrono::steady_clock;

using session_sweep_atom = caf::atom_constant<caf::atom("sesssweep")>;  // registry: sweep expired sessions

double epoch_now() {
  using namespace std::chrono;
  return duration_cast<duration<double>>(system_clock::now().time_since_epoch()).count();
}

error session_err(std::string type, std::string message, const std::string& session_id,
                  const std::string& command = {}) {
  nlohmann::json ctx{{"session_id", session_id}};
  if (!command.empty())
    ctx["command"] = command;
  return make_error(error_category::session_error, std::move(type), std::move(message),
                    std::move(ctx));
}

// -- the session actor --------------------------------------------------------------------

struct queued_call {
  std::uint64_t seq = 0;
  call c;
  detail::client_call_options opts;
  completion done;  ///< the caller's (answer_once: a session that dies still answers)

  void answer(outcome o) const { done.fn(std::move(o)); }
};

// user: the caller's call; repair: a command its adapter asked for on one
// worker before the call is sent again; sweep: a command on every worker
// that served the session (the adapter's, or the end's).
enum class flight_kind { none, user, repair, sweep };

struct flight {
  flight_kind kind = flight_kind::none;
  queued_call q;                        ///< user / repair: the caller's call
  std::unordered_set<std::uint64_t> tags;  ///< pool calls whose answers are awaited
  int repairs = 0;                      ///< repairs made for the user call
  nlohmann::json results = nlohmann::json::array();  ///< sweep: one entry per answer
  std::unordered_map<std::uint64_t, std::string> targets;  ///< sweep: tag -> the worker asked
  bool end_after = false;               ///< sweep: end the session when done
};

struct session_state {
  std::string id;
  std::shared_ptr<const settings> config;
  caf::actor client;
  session_lane lane;  ///< the direct lane (empty: every call through the client)
  affinity_mode default_affinity = affinity_mode::hint;
  double created_at = 0;  ///< wall clock, for session info
  clock_type::time_point started = clock_type::now();
  clock_type::time_point last_used = started;  ///< its TTL counts from here
  std::uint64_t operations = 0;
  std::string preferred_worker;
  std::set<std::string> workers;  ///< every worker that served this session
  /// What the session knows of its commands (DSPy: dspy_adapter.hpp).
  std::unique_ptr<detail::session_adapter> adapter;
  std::deque<queued_call> queue;
  detail::deadline_timer queue_timer;  ///< the earliest queued call's deadline
  flight in_flight;
  std::uint64_t next_seq = 1;
  std::uint64_t next_tag = 1;
  bool ending = false;
  std::vector<caf::response_promise> end_waiters;

  static inline const char* name = "dspex.session";
};

using session_actor_t = session_actor_handle::stateful_pointer<session_state>;

void run_next(session_actor_t self);

nlohmann::json session_info(session_actor_t self) {
  auto& st = self->state;
  auto ttl_s = std::chrono::duration<double>(st.config->session.ttl).count();
  auto last_accessed
    = st.created_at + std::chrono::duration<double>(st.last_used - st.started).count();
  std::size_t pending = st.queue.size()
                        + (st.in_flight.kind == flight_kind::user
                               || st.in_flight.kind == flight_kind::repair
                             ? 1
                             : 0);
  auto info = st.adapter->info();
  info.update(nlohmann::json{{"session_id", st.id},
          {"created_at", st.created_at},
          {"last_accessed", last_accessed},
          {"expires_at", last_accessed + ttl_s},
          {"operations", st.operations},
          {"preferred_worker",
           st.preferred_worker.empty() ? nlohmann::json(nullptr) : nlohmann::json(st.preferred_worker)},
          {"workers", nlohmann::json(st.workers)},
          {"pending", pending},
          {"affinity", to_string(st.default_affinity)}});
  return info;
}

// Sends one call on the direct lane, or else through the pool client; its
// answer comes back as (session_reply_atom, tag, outcome) and is awaited by
// the flight.
std::uint64_t send_to_pool(session_actor_t self, call c, detail::client_call_options opts) {
  auto& st = self->state;
  auto tag = st.next_tag++;
  st.in_flight.tags.insert(tag);
  c.type = checkout_type::session(st.id);
  if (!c.args.is_object())
    c.args = nlohmann::json::object();
  c.args["session_id"] = st.id;
  auto me = self->address();
  completion done{[me, tag](outcome o) {
    if (auto a = caf::actor_cast<caf::actor>(me))
      caf::anon_send(a, session_reply_atom::value, tag, std::move(o));
  }};
  if (st.lane && st.lane(c, opts, done))
    return tag;
  caf::anon_send(st.client, execute_atom::value, std::move(c), std::move(done), std::move(opts));
  return tag;
}

// A call for one given worker (preferred, with `mode`): cleanups and deletes.
call worker_call(std::string command, nlohmann::json args,
                 const std::string& worker, affinity_mode mode,
                 std::chrono::milliseconds timeout) {
  call c;
  c.command = std::move(command);
  c.args = std::move(args);
  c.deadline = clock_type::now() + timeout;
  c.preferred_worker = worker;
  c.affinity = mode;
  return c;
}

std::chrono::milliseconds cleanup_timeout(const session_state& st) {
  return std::min<std::chrono::milliseconds>(st.config->pool.request_timeout,
                                             std::chrono::seconds{5});
}

// Starts a sweep: a command to every worker that served the session.
// Returns false when there is no worker to ask.
bool start_sweep(session_actor_t self, const detail::session_adapter::worker_sweep& sweep,
                 bool end_after) {
  auto& st = self->state;
  st.in_flight = flight{};
  st.in_flight.kind = flight_kind::sweep;
  st.in_flight.end_after = end_after;
  if (st.workers.empty())
    return false;
  for (auto& w : st.workers) {
    auto tag = send_to_pool(
      self, worker_call(sweep.command, sweep.args, w, affinity_mode::strict_queue,
                        cleanup_timeout(st)),
      detail::client_call_options{true, 1});
    st.in_flight.targets[tag] = w;
  }
  return true;
}

void finish_end(session_actor_t self, nlohmann::json results) {
  auto& st = self->state;
  auto summary = st.adapter->end_summary(results);
  summary.update(nlohmann::json{{"session_id", st.id},
                                {"status", "ended"},
                                {"operations", st.operations},
                                {"workers_cleaned", std::move(results)}});
  for (auto& rp : st.end_waiters)
    rp.deliver(outcome::success(summary));
  st.end_waiters.clear();
  log().info("event=session_ended session={} operations={}", st.id, st.operations);
  self->quit();
}

void begin_end(session_actor_t self) {
  auto& st = self->state;
  for (auto& q : st.queue)
    q.answer(outcome::failure(session_err(
      "session_ended", "the session ended before this call ran", st.id, q.c.command)));
  st.queue.clear();
  if (!start_sweep(self, st.adapter->end_sweep(), true))
    finish_end(self, nlohmann::json::array());
}

// The call in flight is over: next call, or the end.
void flight_done(session_actor_t self) {
  auto& st = self->state;
  st.in_flight = flight{};
  if (st.ending)
    begin_end(self);
  else
    run_next(self);
}

void note_served(session_state& st, const outcome& o) {
  if (!o.served_by().empty()) {
    st.preferred_worker = o.served_by();
    st.workers.insert(o.served_by());
  }
}

// Sends the user call in flight to the pool (possibly again, after a repair),
// made whole by the adapter so that any worker can run it.
void send_user_call(session_actor_t self) {
  auto& st = self->state;
  auto c = st.in_flight.q.c;
  c.preferred_worker = st.preferred_worker;
  auto opts = st.in_flight.q.opts;
  st.adapter->complete(c, opts);
  send_to_pool(self, std::move(c), opts);
}

// Answers the commands the session serves from its own state (its adapter's
// decision); false for the others (sent to a worker). A sweep the answer
// asks for runs before the session's next call.
bool answer_locally(session_actor_t self, queued_call& q) {
  auto& st = self->state;
  auto local = st.adapter->answer_locally(q.c);
  if (!local)
    return false;
  q.answer(std::move(local->result));
  if (local->then && !start_sweep(self, *local->then, false))
    st.in_flight = flight{};
  return true;
}

void run_next(session_actor_t self) {
  auto& st = self->state;
  while (st.in_flight.kind == flight_kind::none && !st.queue.empty()) {
    auto q = std::move(st.queue.front());
    st.queue.pop_front();
    if (clock_type::now() >= q.c.deadline) {
      q.answer(outcome::failure(make_error(
        error_category::timeout_error, "checkout_timeout",
        "the deadline passed while the call waited behind the session's earlier calls",
        {{"session_id", st.id}, {"command", q.c.command}})));
      continue;
    }
    if (answer_locally(self, q))
      continue;  // (its answer may have started a sweep: the loop ends)
    st.in_flight = flight{};
    st.in_flight.kind = flight_kind::user;
    st.in_flight.q = std::move(q);
    send_user_call(self);
  }
}

void on_user_reply(session_actor_t self, outcome o) {
  auto& st = self->state;
  auto& fl = st.in_flight;
  note_served(st, o);
  st.last_used = clock_type::now();
  if (auto r = st.adapter->on_reply(fl.q.c, o, fl.repairs)) {
    ++fl.repairs;
    fl.kind = flight_kind::repair;
    send_to_pool(self,
                 worker_call(r->command, r->args, r->worker, affinity_mode::strict_queue,
                             cleanup_timeout(st)),
                 detail::client_call_options{true, 1});
    return;
  }
  fl.q.answer(std::move(o));
  flight_done(self);
}

session_actor_handle::behavior_type session_actor(session_actor_t self, std::string id,
                            std::shared_ptr<const settings> config, caf::actor client,
                            session_lane lane, detail::session_adapter_factory make_adapter) {
  auto& st = self->state;
  st.adapter = make_adapter(id);
  st.id = std::move(id);
  st.config = std::move(config);
  st.client = std::move(client);
  st.lane = std::move(lane);
  st.default_affinity = affinity_mode_from_string(st.config->session.affinity)
                          .value_or(affinity_mode::hint);
  st.created_at = epoch_now();
  return {
    [=](session_call_atom, call& c, detail::client_call_options& opts, completion& done) {
      auto& st = self->state;
      if (st.ending) {
        done.fn(outcome::failure(session_err("session_ended", "the session is ending", st.id,
                                             c.command)));
        return;
      }
      ++st.operations;
      st.last_used = clock_type::now();
      queued_call q{st.next_seq++, std::move(c), std::move(opts), std::move(done)};
      bool must_wait = st.in_flight.kind != flight_kind::none || !st.queue.empty();
      // Just past the deadline, so that the call has expired when it fires.
      if (must_wait)
        st.queue_timer.arm(self, q.c.deadline + std::chrono::milliseconds{1},
                           session_qtmo_atom::value);
      st.queue.push_back(std::move(q));
      run_next(self);
    },
    [=](session_idle_atom) {
      auto& st = self->state;
      return !st.ending && st.in_flight.kind == flight_kind::none && st.queue.empty()
             && clock_type::now() - st.last_used >= st.config->session.ttl;
    },
    [=](session_qtmo_atom, std::uint64_t generation) {
      auto& st = self->state;
      if (!st.queue_timer.fired(generation))
        return;
      auto next = detail::expire_passed(
        st.queue, [](const queued_call& q) { return q.c.deadline; },
        [&](queued_call& q) {
          q.answer(outcome::failure(make_error(
            error_category::timeout_error, "checkout_timeout",
            "the deadline passed while the call waited behind the session's earlier calls",
            {{"session_id", st.id}, {"command", q.c.command}})));
        });
      if (next)
        st.queue_timer.arm(self, *next + std::chrono::milliseconds{1}, session_qtmo_atom::value);
    },
    [=](session_reply_atom, std::uint64_t tag, outcome& o) {
      auto& st = self->state;
      auto& fl = st.in_flight;
      if (!fl.tags.erase(tag))
        return;
      switch (fl.kind) {
        case flight_kind::user:
          on_user_reply(self, std::move(o));
          break;
        case flight_kind::repair:
          fl.kind = flight_kind::user;
          send_user_call(self);
          break;
        case flight_kind::sweep: {
          nlohmann::json r{{"worker_id", fl.targets[tag]}, {"served_by", o.served_by()},
                           {"ok", o.ok()}};
          if (o)
            st.adapter->note_sweep_answer(o, r);
          else
            r["error"] = o.error().describe();
          fl.results.push_back(std::move(r));
          if (fl.tags.empty()) {
            if (fl.end_after) {
              auto results = std::move(fl.results);
              finish_end(self, std::move(results));
            } else {
              flight_done(self);
            }
          }
          break;
        }
        case flight_kind::none:
          break;
      }
    },
    [=](session_info_atom) -> outcome { return outcome::success(session_info(self)); },
    [=](session_end_atom) -> caf::result<outcome> {
      auto& st = self->state;
      auto rp = self->make_response_promise<outcome>();
      st.end_waiters.push_back(rp);
      if (!st.ending) {
        st.ending = true;
        if (st.in_flight.kind == flight_kind::none)
          begin_end(self);
        // else: the call (or delete fan-out) in flight finishes first (flight_done).
      }
      return rp;
    },
  };
}

// -- the registry ---------------------------------------------------------------------------

struct registry_state {
  std::shared_ptr<const settings> config;
  caf::actor client;
  caf::actor_addr parent;
  /// The live sessions; the directory mirrors it for callers (every change
  /// here is made there too, in the same handler).
  std::unordered_map<std::string, session_actor_handle> sessions;
  std::shared_ptr<detail::session_directory> directory;
  session_lane lane;
  detail::session_adapter_factory make_adapter;

  static inline const char* name = "dspex.sessions";
};

using registry_t = caf::stateful_actor<registry_state>;

outcome from_session_error(registry_t* self, const caf::error& e, const std::string& session_id,
                           const std::string& command) {
  nlohmann::json ctx{{"session_id", session_id}};
  if (!command.empty())
    ctx["command"] = command;
  if (e == caf::sec::request_receiver_down)
    return outcome::failure(make_error(error_category::session_error, "session_ended",
                                       "the session ended while the call was on its way",
                                       std::move(ctx)));
  return outcome::failure(make_error(error_category::system_error, "actor_error",
                                     self->system().render(e), std::move(ctx)));
}

void end_entry(registry_t* self, const std::string& id, std::optional<caf::response_promise> rp) {
  auto& st = self->state;
  auto it = st.sessions.find(id);
  if (it == st.sessions.end())
    return;
  auto actor = it->second;
  st.sessions.erase(it);  // a new call with this id starts a new session
  // Calls sent through the directory before this are in the session's
  // mailbox ahead of the end (and served); later ones come here.
  st.directory->remove(id, actor.address());
  auto req = self->request(actor, caf::infinite, session_end_atom::value);
  if (rp) {
    auto p = *rp;
    req.then([p](outcome& o) mutable { p.deliver(std::move(o)); },
             [=](caf::error& e) mutable { p.deliver(from_session_error(self, e, id, "end_session")); });
  } else {
    req.then([](outcome&) {}, [](caf::error&) {});
  }
}

// Each session knows whether it is idle past session.ttl (its calls reach
// it without the registry); those that are end.
void sweep(registry_t* self) {
  auto& st = self->state;
  for (auto& [id, actor] : st.sessions)
    self->request(actor, caf::infinite, session_idle_atom::value)
      .then(
        [=, id = id, addr = actor.address()](bool expired) {
          auto it = self->state.sessions.find(id);
          if (!expired || it == self->state.sessions.end() || it->second.address() != addr)
            return;
          log().info("event=session_expired session={}", id);
          end_entry(self, id, std::nullopt);
        },
        [](caf::error&) {});  // it ended meanwhile
  self->delayed_send(self, st.config->session.sweep_interval, session_sweep_atom::value);
}

// A session's call that found no session in the directory: to its actor,
// created here on its first call.
void forward_call(registry_t* self, session_request& r, completion& done) {
  auto& st = self->state;
  // Counted in the directory while on its way here: given back once passed
  // on (or answered), so that the session's later calls may go directly.
  struct passed_on {
    registry_t* self;
    const session_request& r;
    ~passed_on() {
      if (r.transit != 0)
        self->state.directory->arrived(r.session_id, r.transit);
    }
  } counted{self, r};
  auto it = st.sessions.find(r.session_id);
  if (it == st.sessions.end()) {
    if (st.sessions.size() >= st.config->session.max_sessions) {
      auto err = session_err("too_many_sessions",
                             "session.max_sessions (" + std::to_string(st.config->session.max_sessions)
                               + ") sessions are live; end one or wait for one to expire",
                             r.session_id, r.c.command);
      err.context["max_sessions"] = st.config->session.max_sessions;
      done.fn(outcome::failure(std::move(err)));
      return;
    }
    auto actor = self->spawn<caf::linked>(session_actor, r.session_id, st.config, st.client,
                                          st.lane, st.make_adapter);
    it = st.sessions.emplace(r.session_id, actor).first;
    st.directory->add(r.session_id, actor);
  }
  self->send(it->second, session_call_atom::value, std::move(r.c), std::move(r.opts),
             std::move(done));
}

caf::behavior session_registry(registry_t* self, std::shared_ptr<const settings> config,
                               caf::actor client, caf::actor_addr parent,
                               std::shared_ptr<detail::session_directory> directory,
                               session_lane lane, detail::session_adapter_factory make_adapter) {
  auto& st = self->state;
  st.config = std::move(config);
  st.client = std::move(client);
  st.parent = std::move(parent);
  st.directory = std::move(directory);
  st.lane = std::move(lane);
  st.make_adapter = std::move(make_adapter);
  // A registry before this one (restarted by the supervisor) took its sessions with it.
  st.directory->clear();
  // Sessions are linked: they die with the registry, and the registry hears
  // of each session's end through its exit handler.
  self->set_exit_handler([=](caf::exit_msg& msg) {
    auto& st = self->state;
    if (msg.source != st.parent) {
      // A session ended (end_session, expiry, or a failure): forget it if it
      // is still registered. What it had not answered is answered by the
      // completions it took with it (answer_once).
      for (auto it = st.sessions.begin(); it != st.sessions.end(); ++it)
        if (it->second.address() == msg.source) {
          if (msg.reason)
            log().warn("event=session_failed session={} reason=\"{}\"", it->first,
                       self->system().render(msg.reason));
          st.directory->remove(it->first, msg.source);
          st.sessions.erase(it);
          break;
        }
      return;
    }
    // The supervisor: every session goes with the registry.
    st.directory->clear();
    for (auto& [id, actor] : st.sessions)
      self->send_exit(actor, caf::exit_reason::kill);
    st.sessions.clear();
    self->quit(msg.reason);
  });
  self->delayed_send(self, st.config->session.sweep_interval, session_sweep_atom::value);
  return {
    [=](session_op_atom, session_request& r) -> caf::result<outcome> {
      auto& st = self->state;
      auto rp = self->make_response_promise();
      switch (r.op) {
        case session_op::execute:
          rp.deliver(outcome::failure(make_error(error_category::system_error, "invalid_request",
                                                 "a session's call is session_exec_atom",
                                                 {{"session_id", r.session_id}})));
          return rp;
        case session_op::end: {
          if (!st.sessions.count(r.session_id)) {
            rp.deliver(outcome::failure(
              session_err("session_not_found", "no such session: " + r.session_id, r.session_id)));
            return rp;
          }
          end_entry(self, r.session_id, rp);
          return rp;
        }
        case session_op::info: {
          auto it = st.sessions.find(r.session_id);
          if (it == st.sessions.end()) {
            rp.deliver(outcome::failure(
              session_err("session_not_found", "no such session: " + r.session_id, r.session_id)));
            return rp;
          }
          auto id = r.session_id;
          self->request(it->second, caf::infinite, session_info_atom::value)
            .then([=](outcome& o) mutable { rp.deliver(std::move(o)); },
                  [=](caf::error&) mutable {  // it ended meanwhile
                    rp.deliver(outcome::failure(
                      session_err("session_not_found", "no such session: " + id, id)));
                  });
          return rp;
        }
        case session_op::list: {
          struct gather {
            caf::response_promise rp;
            nlohmann::json sessions = nlohmann::json::array();
            std::size_t left = 0;
            void done() {
              std::sort(sessions.begin(), sessions.end(),
                        [](const nlohmann::json& a, const nlohmann::json& b) {
                          return a.value("session_id", "") < b.value("session_id", "");
                        });
              auto n = sessions.size();
              rp.deliver(outcome::success({{"sessions", std::move(sessions)}, {"total_count", n}}));
            }
          };
          auto g = std::make_shared<gather>();
          g->rp = rp;
          g->left = st.sessions.size();
          if (g->left == 0) {
            g->done();
            return rp;
          }
          for (auto& [id, actor] : st.sessions)
            self->request(actor, caf::infinite, session_info_atom::value)
              .then(
                [g](outcome& o) {
                  if (o)
                    g->sessions.push_back(o.value());
                  if (--g->left == 0)
                    g->done();
                },
                [g](caf::error&) {
                  if (--g->left == 0)
                    g->done();
                });
          return rp;
        }
      }
      return rp;
    },
    [=](session_exec_atom, session_request& r, completion& done) { forward_call(self, r, done); },
    [=](session_sweep_atom) { sweep(self); },
  };
}

} // namespace

error session_lost_error(const std::string& session_id, const std::string& command) {
  nlohmann::json ctx{{"session_id", session_id}};
  if (!command.empty())
    ctx["command"] = command;
  return make_error(error_category::resource_error, "sessions_unavailable",
                    "the session layer terminated while serving the request", std::move(ctx));
}

caf::actor spawn_linked_session_registry(caf::event_based_actor* supervisor,
                                         std::shared_ptr<const settings> config,
                                         caf::actor client,
                                         std::shared_ptr<detail::session_directory> directory,
                                         session_lane lane,
                                         detail::session_adapter_factory make_adapter) {
  return supervisor->spawn<caf::linked>(session_registry, std::move(config), std::move(client),
                                        supervisor->address(), std::move(directory),
                                        std::move(lane), std::move(make_adapter));
}

} // namespace dspex
