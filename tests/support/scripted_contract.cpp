#include "support/scripted_contract.hpp"

#include <cstdlib>
#include <iostream>

#include <caf/all.hpp>
#include <doctest/doctest.h>

#include "dspex/actors/messages.hpp"

namespace dspex::testing {

namespace {

const char* name_of(step::callback cb) {
  switch (cb) {
    case step::callback::init_worker: return "init_worker";
    case step::callback::handle_checkout: return "handle_checkout";
    case step::callback::handle_checkin: return "handle_checkin";
    case step::callback::handle_info: return "handle_info";
    case step::callback::handle_ping: return "handle_ping";
    case step::callback::terminate_worker: return "terminate_worker";
  }
  return "?";
}

const char* name_of(step::action a) {
  switch (a) {
    case step::action::ok: return "ok";
    case step::action::remove: return "remove";
    case step::action::skip: return "skip";
    case step::action::fail: return "fail";
    case step::action::async: return "async";
    case step::action::raise: return "raise";
  }
  return "?";
}

const char* name_of(checkin_status::kind k) {
  switch (k) {
    case checkin_status::kind::ok: return "ok";
    case checkin_status::kind::error: return "error";
    case checkin_status::kind::close: return "close";
  }
  return "?";
}

error scripted_error(const char* what, const std::string& worker_id) {
  return make_error(error_category::resource_error, std::string{"scripted_"} + what,
                    std::string{"scripted "} + what, {{"worker_id", worker_id}});
}

struct fake_state {
  std::string id;
  caf::actor owner;
  std::uint64_t lease = 0;
  std::optional<caf::response_promise> held;
  bool held_checks_in = false;
  static inline const char* name = "dspex.fake_worker";
};

using fake_actor_t = fake_worker_handle::stateful_pointer<fake_state>;

// Ends a held request (if any) with `err`, as a real worker's process loss does.
void fail_held(fake_actor_t self, error err) {
  auto& st = self->state;
  if (!st.held)
    return;
  st.held->deliver(outcome::failure(std::move(err)));
  st.held.reset();
}

caf::result<outcome> serve(fake_actor_t self, call& c, bool check_in) {
  auto& st = self->state;
  if (st.held)
    return outcome::failure(make_error(error_category::resource_error, "worker_busy",
                                       "fake worker already holds a request"));
  if (c.command == "hold") {
    auto rp = self->make_response_promise();
    st.held = rp;
    st.held_checks_in = check_in;
    return rp;
  }
  if (c.command == "fail") {
    auto err = make_error(error_category::python_error, "command_failed", "scripted failure",
                          {{"worker_id", st.id}});
    if (check_in)
      caf::anon_send(st.owner, checkin_atom::value, st.id, checkin_status::failed(err));
    return outcome::failure(err);
  }
  if (check_in)
    caf::anon_send(st.owner, checkin_atom::value, st.id, checkin_status::ok());
  return outcome::success({{"worker_id", st.id}, {"command", c.command}, {"args", c.args}});
}

fake_worker_handle::behavior_type fake_worker(fake_actor_t self, std::string id, caf::actor owner,
                                             bool announce_ready) {
  self->state.id = id;
  self->state.owner = owner;
  if (announce_ready)
    caf::anon_send(owner, worker_ready_atom::value, id, 0);
  return {
    [=](execute_atom, call& c) { return serve(self, c, true); },
    [=](execute_atom, std::uint64_t lease, call& c) -> caf::result<outcome> {
      if (lease == 0 || lease != self->state.lease)
        return outcome::failure(make_error(error_category::resource_error, "not_lease_holder",
                                           "not checked out under this lease"));
      return serve(self, c, false);
    },
    // A health ping through the "process": a fake worker is always healthy.
    [=](health_check_atom) {
      return outcome::success({{"worker_id", self->state.id}, {"health_check", true}});
    },
    [=](lease_atom, std::uint64_t lease) { self->state.lease = lease; },
    [=](revoke_atom, std::uint64_t lease) -> bool {
      if (self->state.lease == lease)
        self->state.lease = 0;
      return !self->state.held;
    },
    [=](resume_atom) {
      auto& st = self->state;
      if (!st.held)
        return;
      if (st.held_checks_in)
        caf::anon_send(st.owner, checkin_atom::value, st.id, checkin_status::ok());
      st.held->deliver(outcome::success({{"worker_id", st.id}, {"command", "hold"}}));
      st.held.reset();
    },
    // Its "process" seen stopped: ended as the real worker ends one.
    [=](process_stopped_atom) {
      auto err = make_error(error_category::health_check_error, "process_stopped",
                            "fake worker stopped", {{"worker_id", self->state.id}});
      fail_held(self, err);
      self->quit(make_exit_reason(worker_exit::health_timeout, err));
    },
    // Stop, or a crash as the real worker has one: the request in flight fails first.
    [=](stop_atom) {
      fail_held(self, make_error(error_category::communication_error, "worker_exited",
                                 "fake worker crashed", {{"worker_id", self->state.id}}));
      self->quit();
    },
  };
}

} // namespace

fake_worker_handle spawn_fake_worker(caf::local_actor* pool, const std::string& id,
                             bool announce_ready) {
  return pool->spawn<caf::linked>(fake_worker, id, caf::actor_cast<caf::actor>(pool), announce_ready);
}

std::string step::describe() const {
  std::string out = name_of(cb);
  out += " " + (worker_id.empty() ? std::string{"*"} : worker_id);
  if (!detail.empty())
    out += " " + detail;
  if (cb != callback::terminate_worker)
    out += std::string{" -> "} + name_of(act);
  return out;
}

namespace {

bool matches(const step& s, step::callback cb, const std::string& worker_id,
             const std::string& detail) {
  return s.cb == cb && (s.worker_id.empty() || s.worker_id == worker_id)
         && (s.detail.empty() || s.detail == detail);
}

// The default reporter: doctest failures on the test thread; anywhere else
// doctest is not safe (and the test may be over), so the process fails.
void report_default(std::thread::id owner, const std::vector<std::string>& problems) {
  if (std::this_thread::get_id() == owner) {
    for (auto& p : problems)
      FAIL_CHECK("scripted contract: " << p);
    return;
  }
  std::cerr << "scripted contract destroyed off the test thread with problems never verified:\n";
  for (auto& p : problems)
    std::cerr << "  " << p << "\n";
  std::cerr << std::flush;
  std::abort();
}

} // namespace

scripted_contract::scripted_contract(bool async_start)
  : async_start_(async_start), owner_(std::this_thread::get_id()) {
}

scripted_contract::~scripted_contract() {
  auto left = verify();
  if (left.empty())
    return;
  if (reporter_)
    reporter_(left);
  else
    report_default(owner_, left);
}

void scripted_contract::expect(step s) {
  std::lock_guard<std::mutex> guard{mtx_};
  script_.push_back(std::move(s));
}

void scripted_contract::expect(std::initializer_list<step> steps) {
  std::lock_guard<std::mutex> guard{mtx_};
  script_.insert(script_.end(), steps.begin(), steps.end());
}

void scripted_contract::allow(step pattern) {
  std::lock_guard<std::mutex> guard{mtx_};
  allowed_.push_back(std::move(pattern));
}

std::vector<std::string> scripted_contract::calls() const {
  std::lock_guard<std::mutex> guard{mtx_};
  return calls_;
}

void scripted_contract::clear_calls() {
  std::lock_guard<std::mutex> guard{mtx_};
  calls_.clear();
}

std::vector<std::string> scripted_contract::problems_locked() const {
  auto out = unscripted_;
  for (auto& s : script_)
    out.push_back("scripted step never ran: " + s.describe());
  return out;
}

std::vector<std::string> scripted_contract::problems() const {
  std::lock_guard<std::mutex> guard{mtx_};
  return problems_locked();
}

std::vector<std::string> scripted_contract::verify() {
  std::lock_guard<std::mutex> guard{mtx_};
  auto out = problems_locked();
  unscripted_.clear();
  script_.clear();
  return out;
}

void scripted_contract::on_failure(failure_reporter r) {
  std::lock_guard<std::mutex> guard{mtx_};
  reporter_ = std::move(r);
}

bool check_script(scripted_contract& contract) {
  auto problems = contract.verify();
  for (auto& p : problems)
    FAIL_CHECK("scripted contract: " << p);
  return problems.empty();
}

fake_worker_handle scripted_contract::worker(const std::string& worker_id) const {
  std::lock_guard<std::mutex> guard{mtx_};
  for (auto& [id, handle] : workers_)
    if (id == worker_id)
      return handle;
  return {};
}

// The next scripted step if it matches, else a standing allowance, else an
// unscripted call: recorded (failed at verification) and answered with the
// default. A scripted step that does not match stays next in line.
std::optional<step::action> scripted_contract::next(step::callback cb,
                                                    const std::string& worker_id,
                                                    const std::string& detail,
                                                    std::string call) {
  std::lock_guard<std::mutex> guard{mtx_};
  calls_.push_back(call);
  if (!script_.empty() && matches(script_.front(), cb, worker_id, detail)) {
    auto act = script_.front().act;
    script_.pop_front();
    return act;
  }
  for (auto& a : allowed_)
    if (matches(a, cb, worker_id, detail))
      return a.act;
  unscripted_.push_back("unscripted call: " + call
                        + (script_.empty() ? std::string{" (nothing scripted left)"}
                                           : " (next scripted: " + script_.front().describe()
                                               + ")"));
  return std::nullopt;
}

init_result scripted_contract::init_worker(pool_worker& w, caf::local_actor* pool) {
  auto act = next(step::callback::init_worker, w.id, {}, "init_worker " + w.id);
  if (act == step::action::raise)
    throw std::runtime_error("scripted init_worker exception");
  if (act == step::action::fail)
    return init_result::failed(scripted_error("init_failure", w.id));
  // async_start: ready a moment later (announced); a scripted `async` step:
  // a worker that never becomes ready.
  auto never_ready = act == step::action::async;
  auto async = async_start_ || never_ready;
  auto fake = spawn_fake_worker(pool, w.id, async_start_ && !never_ready);
  w.handle = fake;
  {
    std::lock_guard<std::mutex> guard{mtx_};
    workers_.emplace_back(w.id, fake);
  }
  return async ? init_result::async() : init_result::ready();
}

checkout_result scripted_contract::handle_checkout(const checkout_type& type,
                                                   const caller_info& caller, pool_worker& w) {
  auto detail = type.to_string();
  auto act = next(step::callback::handle_checkout, w.id, detail,
                  "handle_checkout " + w.id + " " + detail
                    + (caller.alive ? "" : " (caller dead)"));
  switch (act.value_or(step::action::ok)) {
    case step::action::remove:
      return checkout_result::remove(checkout_failed("scripted remove", w.id));
    case step::action::skip:
      return checkout_result::skip(scripted_error("skip", w.id));
    case step::action::raise:
      throw std::runtime_error("scripted handle_checkout exception");
    default:
      return checkout_result::ok(w.handle);
  }
}

keep_or_remove scripted_contract::handle_checkin(const checkin_status& status, pool_worker& w) {
  std::string detail = name_of(status.what);
  auto act = next(step::callback::handle_checkin, w.id, detail,
                  "handle_checkin " + w.id + " " + detail);
  switch (act.value_or(step::action::ok)) {
    case step::action::remove:
      return keep_or_remove::remove(scripted_error("checkin_remove", w.id));
    case step::action::raise:
      throw std::runtime_error("scripted handle_checkin exception");
    default:
      return keep_or_remove::ok();
  }
}

keep_or_remove scripted_contract::handle_info(const caf::message&, pool_worker& w) {
  auto act = next(step::callback::handle_info, w.id, {}, "handle_info " + w.id);
  switch (act.value_or(step::action::ok)) {
    case step::action::remove:
      return keep_or_remove::remove(scripted_error("info_remove", w.id));
    case step::action::raise:
      throw std::runtime_error("scripted handle_info exception");
    default:
      return keep_or_remove::ok();
  }
}

keep_or_remove scripted_contract::handle_ping(pool_worker& w) {
  auto act = next(step::callback::handle_ping, w.id, {}, "handle_ping " + w.id);
  switch (act.value_or(step::action::ok)) {
    case step::action::remove:
      return keep_or_remove::remove(scripted_error("ping_remove", w.id));
    case step::action::raise:
      throw std::runtime_error("scripted handle_ping exception");
    default:
      return keep_or_remove::ok();
  }
}

void scripted_contract::terminate_worker(const error& reason, pool_worker& w) {
  next(step::callback::terminate_worker, w.id, reason.type,
       "terminate_worker " + w.id + " " + reason.type);
  if (w.handle)
    caf::anon_send(w.handle, stop_atom::value);
}

} // namespace dspex::testing
