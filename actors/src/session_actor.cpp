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
#include "session_card.hpp"
#include "session_directory.hpp"

namespace dspex::detail {

struct session_handover {
  call c;                           ///< as its caller made it
  client_call_options opts;
  completion done;                  ///< the caller's (answer_once)
  session_adapter::repair fix;      ///< what the reply asked for
};

} // namespace dspex::detail

namespace dspex {

namespace {

using clock_type = std::chrono::steady_clock;

using session_sweep_atom = caf::atom_constant<caf::atom("sesssweep")>;  // registry: sweep expired sessions

double epoch_now() {
  using namespace std::chrono;
  return duration_cast<duration<double>>(system_clock::now().time_since_epoch()).count();
}

// A call's deadline passed while it waited behind the session's earlier calls.
error waited_too_long(const std::string& session_id, const std::string& command) {
  return make_error(error_category::timeout_error, "checkout_timeout",
                    "the deadline passed while the call waited behind the session's earlier calls",
                    {{"session_id", session_id}, {"command", command}});
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
  /// The session's own state (adapter, preferred worker, workers, use
  /// counts) and who may touch it: this actor only while it holds the card
  /// (acquire_card), else one caller running one call (session_card.hpp).
  std::shared_ptr<detail::session_card> card;
  affinity_mode default_affinity = affinity_mode::hint;
  double created_at = 0;  ///< wall clock, for session info
  clock_type::time_point started = clock_type::now();
  std::uint64_t operations = 0;  ///< calls this actor took in (its callers count theirs on the card)
  std::deque<queued_call> queue;
  detail::deadline_timer queue_timer;  ///< the earliest queued call's deadline
  flight in_flight;
  std::uint64_t next_seq = 1;
  std::uint64_t next_tag = 1;
  bool ending = false;
  std::vector<caf::response_promise> end_waiters;
  std::vector<caf::response_promise> info_waiters;  ///< info asked while a caller held the card

  session_state() = default;
  session_state(const session_state&) = delete;
  session_state& operator=(const session_state&) = delete;
  /// However the actor ends (a kill included: CAF destroys the state), the
  /// calls its callers run or wait with on the card are answered now, as
  /// the actor's own are (answer_once): sessions_unavailable.
  ~session_state();

  static inline const char* name = "dspex.session";
};

using session_actor_t = session_actor_handle::stateful_pointer<session_state>;

session_state::~session_state() {
  if (!card)
    return;
  std::deque<detail::session_card::waiting_call> waiting;
  completion running;
  std::string running_command;
  {
    std::lock_guard<std::mutex> lk{card->mtx};
    card->gone = true;
    waiting.swap(card->waiting);
    if (auto h = card->current.lock()) {
      running = h->done;  // a copy: one answer between it and the flight's own
      running_command = h->c.command;
    }
  }
  for (auto& w : waiting)
    w.done.fn(outcome::failure(session_lost_error(card->id, w.c.command)));
  if (running.fn)
    running.fn(outcome::failure(session_lost_error(card->id, running_command)));
}

void run_next(session_actor_t self);

// Every call the session took: through its actor, or run by its caller
// (read by the card's holder).
std::uint64_t operations(const session_state& st) {
  std::lock_guard<std::mutex> lk{st.card->mtx};
  return st.operations + st.card->operations;
}

// The card (session_card.hpp): the actor holds it whenever it has work, and
// gives it back when it has none.
bool acquire_card(session_actor_t self) {
  auto& k = *self->state.card;
  std::lock_guard<std::mutex> lk{k.mtx};
  if (k.held == detail::session_card::holder::caller) {
    k.actor_waits = true;  // the caller hands it over on return (session_card_atom)
    return false;
  }
  k.held = detail::session_card::holder::actor;
  return true;
}

bool holds_card(session_actor_t self) {
  auto& k = *self->state.card;
  std::lock_guard<std::mutex> lk{k.mtx};
  return k.held == detail::session_card::holder::actor;
}

// The card came to the actor: the calls that waited on it go first in the
// queue (they were made before any call that came through the actor since).
void take_waiting(session_actor_t self) {
  auto& st = self->state;
  std::deque<detail::session_card::waiting_call> waiting;
  {
    std::lock_guard<std::mutex> lk{st.card->mtx};
    waiting.swap(st.card->waiting);
  }
  for (auto it = waiting.rbegin(); it != waiting.rend(); ++it) {
    st.queue_timer.arm(self, it->c.deadline + std::chrono::milliseconds{1},
                       session_qtmo_atom::value);
    st.queue.push_front(queued_call{0, std::move(it->c), std::move(it->opts), std::move(it->done)});
  }
}

nlohmann::json session_info(session_actor_t self);

// The card came (back) to the actor: the calls that waited on it join the
// queue, and the info asked meanwhile is answered.
void card_returned(session_actor_t self) {
  auto& st = self->state;
  take_waiting(self);
  for (auto& rp : st.info_waiters)
    rp.deliver(outcome::success(session_info(self)));
  st.info_waiters.clear();
}

// Gives the card back when nothing is left to do (the end keeps it).
void release_card_if_idle(session_actor_t self) {
  auto& st = self->state;
  if (st.ending || st.in_flight.kind != flight_kind::none || !st.queue.empty()
      || !st.info_waiters.empty())
    return;
  auto& k = *st.card;
  std::lock_guard<std::mutex> lk{k.mtx};
  if (k.held == detail::session_card::holder::actor)
    k.held = detail::session_card::holder::none;
}

nlohmann::json session_info(session_actor_t self) {
  auto& st = self->state;
  auto ttl_s = std::chrono::duration<double>(st.card->config->session.ttl).count();
  auto last_accessed
    = st.created_at + std::chrono::duration<double>(st.card->last_used - st.started).count();
  std::size_t pending = st.queue.size()
                        + (st.in_flight.kind == flight_kind::user
                               || st.in_flight.kind == flight_kind::repair
                             ? 1
                             : 0);
  auto info = st.card->adapter->info();
  info.update(nlohmann::json{{"session_id", st.card->id},
          {"created_at", st.created_at},
          {"last_accessed", last_accessed},
          {"expires_at", last_accessed + ttl_s},
          {"operations", operations(st)},
          {"preferred_worker",
           st.card->preferred_worker.empty() ? nlohmann::json(nullptr) : nlohmann::json(st.card->preferred_worker)},
          {"workers", nlohmann::json(st.card->workers)},
          {"pending", pending},
          {"affinity", to_string(st.default_affinity)}});
  return info;
}

// Sends one of the session's calls on the direct lane, or else through the
// pool client; `done` gets its answer.
void start_call(detail::session_card& k, call c, detail::client_call_options opts,
                completion done) {
  c.type = checkout_type::session(k.id);
  if (!c.args.is_object())
    c.args = nlohmann::json::object();
  c.args["session_id"] = k.id;
  if (k.lane && k.lane(c, opts, done))
    return;
  caf::anon_send(k.client, execute_atom::value, std::move(c), std::move(done), std::move(opts));
}

// The actor's calls: answered as (session_reply_atom, tag, outcome), awaited
// by the flight.
std::uint64_t send_to_pool(session_actor_t self, call c, detail::client_call_options opts) {
  auto& st = self->state;
  auto tag = st.next_tag++;
  st.in_flight.tags.insert(tag);
  auto me = self->address();
  completion done{[me, tag](outcome o) {
    if (auto a = caf::actor_cast<caf::actor>(me))
      caf::anon_send(a, session_reply_atom::value, tag, std::move(o));
  }};
  start_call(*st.card, std::move(c), std::move(opts), std::move(done));
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
  return std::min<std::chrono::milliseconds>(st.card->config->pool.request_timeout,
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
  if (st.card->workers.empty())
    return false;
  for (auto& w : st.card->workers) {
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
  auto summary = st.card->adapter->end_summary(results);
  summary.update(nlohmann::json{{"session_id", st.card->id},
                                {"status", "ended"},
                                {"operations", operations(st)},
                                {"workers_cleaned", std::move(results)}});
  for (auto& rp : st.end_waiters)
    rp.deliver(outcome::success(summary));
  st.end_waiters.clear();
  log().info("event=session_ended session={} operations={}", st.card->id, operations(st));
  self->quit();
}

void begin_end(session_actor_t self) {
  auto& st = self->state;
  for (auto& q : st.queue)
    q.answer(outcome::failure(session_err(
      "session_ended", "the session ended before this call ran", st.card->id, q.c.command)));
  st.queue.clear();
  if (!start_sweep(self, st.card->adapter->end_sweep(), true))
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

void note_served(detail::session_card& k, const outcome& o) {
  if (!o.served_by().empty()) {
    k.preferred_worker = o.served_by();
    k.workers.insert(o.served_by());
  }
}

// Sends the user call in flight to the pool (possibly again, after a repair),
// made whole by the adapter so that any worker can run it.
void send_user_call(session_actor_t self) {
  auto& st = self->state;
  auto c = st.in_flight.q.c;
  c.preferred_worker = st.card->preferred_worker;
  auto opts = st.in_flight.q.opts;
  st.card->adapter->complete(c, opts);
  send_to_pool(self, std::move(c), opts);
}

// Answers the commands the session serves from its own state (its adapter's
// decision); false for the others (sent to a worker). A sweep the answer
// asks for runs before the session's next call.
bool answer_locally(session_actor_t self, queued_call& q) {
  auto& st = self->state;
  auto local = st.card->adapter->answer_locally(q.c);
  if (!local)
    return false;
  q.answer(std::move(local->result));
  if (local->then && !start_sweep(self, *local->then, false))
    st.in_flight = flight{};
  return true;
}

// The calls at the queue's front that need nothing of the actor run as its
// callers' calls do (session_card.hpp): `q` now, on this thread, the others
// waiting on the card behind it. The card comes back to the actor when it
// has more to do (the rest of its queue).
void hand_to_callers(session_actor_t self, queued_call q) {
  auto& st = self->state;
  std::deque<detail::session_card::waiting_call> plain;
  while (!st.queue.empty() && !st.card->adapter->may_answer_locally(st.queue.front().c)) {
    auto& f = st.queue.front();
    plain.push_back(detail::session_card::waiting_call{std::move(f.c), std::move(f.opts),
                                                       std::move(f.done)});
    st.queue.pop_front();
  }
  for (auto& w : plain)  // the timer answers them at their deadline if they wait that long
    st.queue_timer.arm(self, w.c.deadline + std::chrono::milliseconds{1},
                       session_qtmo_atom::value);
  {
    std::lock_guard<std::mutex> lk{st.card->mtx};
    st.card->held = detail::session_card::holder::caller;
    st.card->flight_deadline = q.c.deadline;
    for (auto& w : plain)
      st.card->waiting.push_back(std::move(w));
    st.card->actor_waits = !st.queue.empty();
  }
  detail::run_held_call(st.card, std::move(q.c), std::move(q.opts), std::move(q.done));
}

void run_next(session_actor_t self) {
  auto& st = self->state;
  if (st.in_flight.kind == flight_kind::none && !st.queue.empty() && !acquire_card(self))
    return;  // a caller's call runs: the card comes back with session_card_atom
  while (st.in_flight.kind == flight_kind::none && !st.queue.empty()) {
    auto q = std::move(st.queue.front());
    st.queue.pop_front();
    if (clock_type::now() >= q.c.deadline) {
      q.answer(outcome::failure(waited_too_long(st.card->id, q.c.command)));
      continue;
    }
    if (!st.card->adapter->may_answer_locally(q.c)) {
      hand_to_callers(self, std::move(q));
      return;
    }
    st.card->last_used = clock_type::now();
    if (answer_locally(self, q))
      continue;  // (its answer may have started a sweep: the loop ends)
    st.in_flight = flight{};
    st.in_flight.kind = flight_kind::user;
    st.in_flight.q = std::move(q);
    send_user_call(self);
  }
  release_card_if_idle(self);
}

void on_user_reply(session_actor_t self, outcome o) {
  auto& st = self->state;
  auto& fl = st.in_flight;
  note_served(*st.card, o);
  st.card->last_used = clock_type::now();
  if (auto r = st.card->adapter->on_reply(fl.q.c, o, fl.repairs)) {
    ++fl.repairs;
    fl.kind = flight_kind::repair;
    send_to_pool(self,
                 worker_call(r->command, r->args, r->worker, affinity_mode::strict_queue,
                             cleanup_timeout(st)),
                 detail::client_call_options{true, 1});
    return;
  }
  // The answers keep the order of the calls: with nothing left to do, the
  // card goes back first (the caller's next call finds it free); else the
  // answer goes first, then the next call.
  auto q = std::move(fl.q);
  if (!st.ending && st.queue.empty() && st.info_waiters.empty()) {
    flight_done(self);
    q.answer(std::move(o));
  } else {
    q.answer(std::move(o));
    flight_done(self);
  }
}

// `card`: filled by the registry (session_card.hpp), published in the
// directory once this actor exists.
session_actor_handle::behavior_type session_actor(session_actor_t self,
                                                  std::shared_ptr<detail::session_card> card) {
  auto& st = self->state;
  st.card = std::move(card);
  st.default_affinity = affinity_mode_from_string(st.card->config->session.affinity)
                          .value_or(affinity_mode::hint);
  st.created_at = epoch_now();
  return {
    [=](session_call_atom, call& c, detail::client_call_options& opts, completion& done) {
      auto& st = self->state;
      {
        // Taken in: callers may run their calls themselves again (session_card.hpp).
        std::lock_guard<std::mutex> lk{st.card->mtx};
        if (st.card->via_actor > 0)
          --st.card->via_actor;
      }
      if (st.ending) {
        done.fn(outcome::failure(session_err("session_ended", "the session is ending", st.card->id,
                                             c.command)));
        return;
      }
      ++st.operations;
      auto seq = st.next_seq++;
      auto deadline = c.deadline;
      st.queue.push_back(queued_call{seq, std::move(c), std::move(opts), std::move(done)});
      run_next(self);
      // Still waiting (behind a call in flight, or a caller's): just past its
      // deadline, so that the call has expired when the timer fires.
      if (!st.queue.empty() && st.queue.back().seq == seq)
        st.queue_timer.arm(self, deadline + std::chrono::milliseconds{1},
                           session_qtmo_atom::value);
    },
    [=](session_idle_atom) {
      auto& st = self->state;
      if (st.ending || st.in_flight.kind != flight_kind::none || !st.queue.empty())
        return false;
      auto& k = *st.card;
      std::lock_guard<std::mutex> lk{k.mtx};
      // A caller's call runs: not idle (and its last_used is the caller's now).
      return k.held != detail::session_card::holder::caller
             && clock_type::now() - k.last_used >= k.config->session.ttl;
    },
    [=](session_qtmo_atom, std::uint64_t generation) {
      auto& st = self->state;
      if (!st.queue_timer.fired(generation))
        return;
      auto next = detail::expire_passed(
        st.queue, [](const queued_call& q) { return q.c.deadline; },
        [&](queued_call& q) { q.answer(outcome::failure(waited_too_long(st.card->id, q.c.command))); });
      // And the calls waiting on the card behind a caller's (session_card.hpp).
      std::vector<detail::session_card::waiting_call> expired;
      {
        std::lock_guard<std::mutex> lk{st.card->mtx};
        auto later = detail::expire_passed(
          st.card->waiting, [](const auto& w) { return w.c.deadline; },
          [&](auto& w) { expired.push_back(std::move(w)); });
        if (later && (!next || *later < *next))
          next = later;
      }
      for (auto& w : expired)
        w.done.fn(outcome::failure(waited_too_long(st.card->id, w.c.command)));
      if (next)
        st.queue_timer.arm(self, *next + std::chrono::milliseconds{1}, session_qtmo_atom::value);
    },
    [=](session_watch_atom) {
      // A call waits on the card, due before the call in flight ends.
      auto& st = self->state;
      std::optional<clock_type::time_point> earliest;
      {
        std::lock_guard<std::mutex> lk{st.card->mtx};
        for (auto& w : st.card->waiting)
          if (!earliest || w.c.deadline < *earliest)
            earliest = w.c.deadline;
      }
      if (earliest)
        st.queue_timer.arm(self, *earliest + std::chrono::milliseconds{1},
                           session_qtmo_atom::value);
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
            st.card->adapter->note_sweep_answer(o, r);
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
    [=](session_info_atom) -> caf::result<outcome> {
      auto& st = self->state;
      if (st.in_flight.kind != flight_kind::none || acquire_card(self)) {
        auto info = outcome::success(session_info(self));
        release_card_if_idle(self);
        return info;
      }
      auto rp = self->make_response_promise<outcome>();
      st.info_waiters.push_back(rp);  // answered with the card (session_card_atom)
      return rp;
    },
    [=](session_end_atom) -> caf::result<outcome> {
      auto& st = self->state;
      auto rp = self->make_response_promise<outcome>();
      st.end_waiters.push_back(rp);
      if (!st.ending) {
        st.ending = true;
        if (st.in_flight.kind == flight_kind::none && acquire_card(self))
          begin_end(self);
        // else: the call (or delete fan-out) in flight finishes first
        // (flight_done), or the caller's call (session_card_atom).
      }
      return rp;
    },
    [=](session_card_atom) {
      // A caller gave the card back to us: what waited for it runs now.
      auto& st = self->state;
      if (!holds_card(self))
        return;
      card_returned(self);
      if (st.in_flight.kind != flight_kind::none)
        return;
      if (st.ending)
        begin_end(self);
      else
        run_next(self);
    },
    [=](session_adopt_atom, std::shared_ptr<detail::session_handover>& h) {
      // A caller's call whose reply asks for a repair, handed over with the
      // card: the repair, then the call again, as for the actor's own calls.
      auto& st = self->state;
      if (!h)
        return;
      st.in_flight = flight{};
      st.in_flight.kind = flight_kind::repair;
      st.in_flight.repairs = 1;
      st.in_flight.q = queued_call{st.next_seq++, std::move(h->c), std::move(h->opts),
                                   std::move(h->done)};
      send_to_pool(self,
                   worker_call(h->fix.command, h->fix.args, h->fix.worker,
                               affinity_mode::strict_queue, cleanup_timeout(st)),
                   detail::client_call_options{true, 1});
      card_returned(self);  // the waiting calls behind it, as they were
    },
  };
}

// -- the registry ---------------------------------------------------------------------------

struct registry_state {
  std::shared_ptr<const settings> config;
  runtime_detail::pool_client_handle client;
  caf::actor_addr parent;
  /// The live sessions; the directory mirrors it for callers (every change
  /// here is made there too, in the same handler).
  struct live_session {
    session_actor_handle actor;
    std::shared_ptr<detail::session_card> card;
  };
  std::unordered_map<std::string, live_session> sessions;
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
  auto actor = it->second.actor;
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
  for (auto& [id, live] : st.sessions)
    self->request(live.actor, caf::infinite, session_idle_atom::value)
      .then(
        [=, id = id, addr = live.actor.address()](bool expired) {
          auto it = self->state.sessions.find(id);
          if (!expired || it == self->state.sessions.end() || it->second.actor.address() != addr)
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
    auto card = std::make_shared<detail::session_card>();
    card->id = r.session_id;
    card->config = st.config;
    card->client = st.client;
    card->lane = st.lane;
    card->adapter = st.make_adapter(r.session_id);
    auto actor = self->spawn<caf::linked>(session_actor, card);
    card->actor = actor.address();  // before the card is published
    it = st.sessions.emplace(r.session_id, registry_state::live_session{actor, card}).first;
    st.directory->add(r.session_id, actor, card);
  }
  it->second.card->count_call_to_actor();  // no caller's call overtakes it
  self->send(it->second.actor, session_call_atom::value, std::move(r.c), std::move(r.opts),
             std::move(done));
}

caf::behavior session_registry(registry_t* self, std::shared_ptr<const settings> config,
                               caf::actor client, caf::actor_addr parent,
                               std::shared_ptr<detail::session_directory> directory,
                               session_lane lane, detail::session_adapter_factory make_adapter) {
  auto& st = self->state;
  st.config = std::move(config);
  // The runtime's pool client (the public spawn function takes it untyped:
  // its interface is internal to actors/).
  st.client = caf::actor_cast<runtime_detail::pool_client_handle>(client);
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
        if (it->second.actor.address() == msg.source) {
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
    for (auto& [id, live] : st.sessions)
      self->send_exit(live.actor, caf::exit_reason::kill);
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
          self->request(it->second.actor, caf::infinite, session_info_atom::value)
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
          for (auto& [id, live] : st.sessions)
            self->request(live.actor, caf::infinite, session_info_atom::value)
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

// -- a session's call run by its caller (session_card.hpp) ---------------------------------

namespace detail {

namespace {

// The holder's call is over: the card goes to the actor when it waits (with
// the waiting calls), else to the next waiting call, started here, else it
// is free. Calls whose deadline passed while they waited are answered.
// `answer`, the holder's own answer, runs once the card is decided and
// before anything after it: a caller's next call finds the card free (or
// queues behind the next waiting call), and the session's answers keep the
// order of its calls.
void pass_card(const std::shared_ptr<session_card>& card, completion* done = nullptr,
               outcome* o = nullptr) {
  std::vector<session_card::waiting_call> expired;
  std::optional<session_card::waiting_call> next;
  bool tell = false;
  bool watch = false;
  {
    std::lock_guard<std::mutex> lk{card->mtx};
    if (card->gone) {
      card->held = session_card::holder::none;  // its calls were answered with it
    } else if (card->actor_waits) {
      card->held = session_card::holder::actor;
      card->actor_waits = false;
      tell = true;
    } else {
      const auto now = std::chrono::steady_clock::now();
      while (!card->waiting.empty() && !next) {
        auto w = std::move(card->waiting.front());
        card->waiting.pop_front();
        if (w.c.deadline <= now)
          expired.push_back(std::move(w));
        else
          next = std::move(w);
      }
      if (next) {
        card->flight_deadline = next->c.deadline;  // still held by a caller: this one
        for (auto& w : card->waiting)
          if (w.c.deadline < card->flight_deadline)
            watch = true;  // due before this one ends: the actor's timer answers it
      } else {
        card->held = session_card::holder::none;
      }
    }
  }
  if (done && done->fn)
    done->fn(std::move(*o));
  if (watch)
    if (auto a = caf::actor_cast<session_actor_handle>(card->actor))
      caf::anon_send(a, session_watch_atom::value);
  if (tell)
    if (auto a = caf::actor_cast<session_actor_handle>(card->actor))
      caf::anon_send(a, session_card_atom::value);
  for (auto& w : expired)
    w.done.fn(outcome::failure(waited_too_long(card->id, w.c.command)));
  if (next)
    run_held_call(card, std::move(next->c), next->opts, std::move(next->done));
}

// One call run while its caller holds the card. However it ends, the card
// passes on (a completion dropped unanswered included; answer_once answers
// the caller).
struct fast_flight {
  std::shared_ptr<session_card> card;
  session_handover h;  ///< the call, as the actor would take it over
  bool settled = false;

  explicit fast_flight(std::shared_ptr<session_card> k) : card(std::move(k)) {
  }
  fast_flight(const fast_flight&) = delete;
  fast_flight& operator=(const fast_flight&) = delete;

  void finish(outcome o) {
    if (std::exchange(settled, true))
      return;
    auto& k = *card;
    note_served(k, o);
    k.last_used = std::chrono::steady_clock::now();
    if (auto fix = k.adapter->on_reply(h.c, o, 0)) {
      // A repair first: the actor's work, with the card and the waiting calls.
      h.fix = std::move(*fix);
      std::shared_ptr<session_handover> handover;
      {
        std::lock_guard<std::mutex> lk{k.mtx};
        handover = std::make_shared<session_handover>(std::move(h));  // the actor's death reads h
        k.held = session_card::holder::actor;
        k.actor_waits = false;
      }
      if (auto a = caf::actor_cast<session_actor_handle>(k.actor))
        caf::anon_send(a, session_adopt_atom::value, std::move(handover));
      // else: the session is gone with its card; the completions answer.
      return;
    }
    completion done;
    {
      std::lock_guard<std::mutex> lk{k.mtx};
      done = std::move(h.done);  // the actor's death may be answering it (a copy)
    }
    pass_card(card, &done, &o);
  }

  ~fast_flight() {
    if (!settled)
      pass_card(card);
  }
};

} // namespace

void run_held_call(const std::shared_ptr<session_card>& card, call c, client_call_options opts,
                   completion done) {
  auto& k = *card;
  k.last_used = std::chrono::steady_clock::now();
  auto flight = std::make_shared<fast_flight>(card);
  auto& h = flight->h;
  h.c = std::move(c);
  h.opts = opts;
  {
    std::lock_guard<std::mutex> lk{k.mtx};
    h.done = std::move(done);
    k.current = std::shared_ptr<session_handover>(flight, &flight->h);  // one allocation per call
  }
  // As the actor sends its calls (send_user_call): made whole by the
  // adapter, the session's worker preferred; h.c stays as the caller made it.
  call sent = h.c;
  sent.preferred_worker = k.preferred_worker;
  auto sent_opts = h.opts;
  k.adapter->complete(sent, sent_opts);
  start_call(k, std::move(sent), std::move(sent_opts),
             completion{[flight](outcome o) { flight->finish(std::move(o)); }});
}

bool try_fast_call(const std::shared_ptr<session_card>& card, call& c,
                   client_call_options& opts, completion& done) {
  auto& k = *card;
  if (k.adapter->may_answer_locally(c))
    return false;  // the actor answers it (may_answer_locally reads only `c`)
  bool queued = false;
  bool watch = false;
  {
    std::lock_guard<std::mutex> lk{k.mtx};
    if (k.gone || k.held == session_card::holder::actor || k.via_actor > 0 || k.actor_waits)
      return false;
    ++k.operations;
    if (k.held == session_card::holder::caller) {
      // Behind the call in flight; the actor's timer answers it at its
      // deadline when that comes first.
      queued = true;
      watch = c.deadline < k.flight_deadline;
      k.waiting.push_back(session_card::waiting_call{std::move(c), opts, std::move(done)});
    } else {
      k.held = session_card::holder::caller;
      k.flight_deadline = c.deadline;
    }
  }
  if (queued) {
    if (watch)
      if (auto a = caf::actor_cast<session_actor_handle>(k.actor))
        caf::anon_send(a, session_watch_atom::value);
    return true;
  }
  run_held_call(card, std::move(c), opts, std::move(done));
  return true;
}

} // namespace detail

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
