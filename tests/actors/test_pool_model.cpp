// Layer 1: a randomized sequence test of the pool against a simple model.
//
// A seeded PRNG picks thousands of steps (checkouts, checkins, requests under
// leases and under stale leases, worker crashes, caller deaths with and
// without a request in flight, deadlines passing while the pool is held, a
// grant racing the caller's give-up, the contract removing a worker at
// checkout). After every step the test waits (bounded: only a hang times
// out) until the pool's real status matches the model, then checks the
// invariants: no worker lost, none leased twice, the counters add up.
//
// The seed is printed; DSPEX_MODEL_SEED=<n> replays one seed and
// DSPEX_MODEL_STEPS=<n> changes the number of steps per seed.
// DSPEX_MODEL_EXPIRED_IDLE=1 also lets deadlines pass while a worker is idle
// (see the note at step_expired_checkout).
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <deque>
#include <filesystem>
#include <iostream>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <doctest/doctest.h>

#include "support/scripted_contract.hpp"
#include "support/test_pool.hpp"

using namespace dspex;
using namespace dspex::testing;

namespace {

using clock_type = std::chrono::steady_clock;

constexpr std::size_t pool_size = 3;
constexpr std::size_t n_callers = 4;
constexpr std::size_t max_waiters = 2;         // callers queued at once
constexpr std::size_t max_stale = 16;          // ended leases kept for stale requests
constexpr std::uint32_t failure_threshold = 3; // the pool's default, set explicitly below
constexpr auto hang = std::chrono::milliseconds{5000};  // bounds every wait: only a hang times out

std::string worker_name(std::uint64_t n) {
  return "w" + std::to_string(n);
}

// -- the model -------------------------------------------------------------------------

struct held_lease {
  lease_grant grant;
  std::size_t caller = 0;
  bool in_flight = false;  ///< a "hold" request is in flight on its worker
};

struct model {
  std::set<std::string> live;                // worker ids in the pool (replacements included)
  std::vector<held_lease> leases;            // held leases, in grant order
  std::deque<std::size_t> queue;             // callers waiting in a blocking checkout, FIFO
  std::map<std::string, std::uint32_t> failures;  // consecutive non-Python error checkins
  std::uint64_t replaced = 0;                // removals so far
  std::uint64_t next_worker = pool_size + 1; // number of the next replacement's id
  std::deque<lease_grant> stale;             // leases that ended (checked in, revoked, lost)

  std::size_t idle() const { return live.size() - leases.size(); }

  bool leased(const std::string& id) const {
    return std::any_of(leases.begin(), leases.end(),
                       [&](const held_lease& l) { return l.grant.worker_id == id; });
  }

  std::vector<std::string> idle_ids() const {
    std::vector<std::string> out;
    for (auto& id : live)
      if (!leased(id))
        out.push_back(id);
    return out;
  }

  // The pool removes `id` and starts its replacement (synchronous init).
  void remove(const std::string& id) {
    live.erase(id);
    failures.erase(id);
    live.insert(worker_name(next_worker++));
    ++replaced;
  }

  void end_lease(std::size_t index) {
    stale.push_back(leases[index].grant);
    if (stale.size() > max_stale)
      stale.pop_front();
    leases.erase(leases.begin() + static_cast<std::ptrdiff_t>(index));
  }

  // A checkin the pool accepted: the contract's handle_checkin answers ok, so
  // the worker stays unless the failure threshold removes it.
  void checkin(std::size_t index, const checkin_status& status) {
    auto id = leases[index].grant.worker_id;
    end_lease(index);
    count_checkin(id, status);
  }

  void count_checkin(const std::string& id, const checkin_status& status) {
    if (status.what == checkin_status::kind::ok)
      failures[id] = 0;
    else if (status.what == checkin_status::kind::error
             && (!status.reason || status.reason->category != error_category::python_error))
      if (++failures[id] >= failure_threshold)
        remove(id);
  }
};

// -- the run ---------------------------------------------------------------------------

enum class op {
  checkout_nonblocking,
  checkout_blocking,
  checkin,
  execute,
  execute_stale,
  checkin_stale,
  start_held_request,
  resume_held_request,
  kill_leased,
  kill_idle,
  caller_dies,
  expired_checkout,
  grant_races_give_up,
  pool_call,
  checkout_removed_by_contract,
};

const char* name_of(op o) {
  switch (o) {
    case op::checkout_nonblocking: return "checkout_nonblocking";
    case op::checkout_blocking: return "checkout_blocking";
    case op::checkin: return "checkin";
    case op::execute: return "execute";
    case op::execute_stale: return "execute_stale";
    case op::checkin_stale: return "checkin_stale";
    case op::start_held_request: return "start_held_request";
    case op::resume_held_request: return "resume_held_request";
    case op::kill_leased: return "kill_leased";
    case op::kill_idle: return "kill_idle";
    case op::caller_dies: return "caller_dies";
    case op::expired_checkout: return "expired_checkout";
    case op::grant_races_give_up: return "grant_races_give_up";
    case op::pool_call: return "pool_call";
    case op::checkout_removed_by_contract: return "checkout_removed_by_contract";
  }
  return "?";
}

std::string describe(const pool_status& s) {
  std::ostringstream out;
  out << "size=" << s.size << " idle=" << s.idle << " busy=" << s.busy << " leased=" << s.leased
      << " starting=" << s.starting << " removing=" << s.removing << " queued=" << s.queued
      << " replaced=" << s.replaced << " start_failures=" << s.start_failures << " workers=[";
  for (auto& w : s.workers)
    out << " " << w.id << ":" << w.state;
  out << " ]";
  return out.str();
}

std::string describe(const error& e) {
  return std::string{to_string(e.category)} + "/" + e.type;
}

bool env_flag(const char* name) {
  auto v = std::getenv(name);
  return v && *v && std::string{v} != "0";
}

std::size_t thread_count() {
  std::size_t n = 0;
  for ([[maybe_unused]] auto& entry : std::filesystem::directory_iterator("/proc/self/task"))
    ++n;
  return n;
}

class model_run {
public:
  model_run(std::uint64_t seed, std::size_t steps) : seed_(seed), steps_(steps), rng_(seed) {
    expired_with_idle_ = env_flag("DSPEX_MODEL_EXPIRED_IDLE");
    contract_ = std::make_shared<scripted_contract>();  // no script: every callback ok, sync init
    auto s = test_settings(pool_size);
    s.pool.max_overflow = 0;
    s.pool.lazy = false;
    s.pool.failure_threshold = failure_threshold;
    pool_ = std::make_unique<test_pool>(test_pool_options{s, contract_});
    for (std::size_t i = 0; i < n_callers; ++i)
      callers_.push_back(std::make_unique<test_caller>(*pool_));
    waiting_.assign(n_callers, false);
  }

  void run() {
    if (!pool_->wait_for_pool_ready(hang))
      fail("the pool never became ready");
    for (std::uint64_t i = 1; i <= pool_size; ++i)
      m_.live.insert(worker_name(i));
    settle();
    for (step_ = 1; step_ <= steps_; ++step_) {
      auto o = choose();
      ++counts_[o];
      note(name_of(o));
      perform(o);
      settle();
      queue_age_ = m_.queue.empty() ? 0 : queue_age_ + 1;
      if (step_ % 1000 == 0)
        contract_->clear_calls();  // the call log only grows
    }
    if (!contract_->unmet().empty())
      fail("scripted contract: " + contract_->unmet().front());
    stop_and_check_nothing_left();
  }

  void print_summary() const {
    std::cout << "[pool model] seed " << seed_ << ": " << steps_ << " steps, replaced "
              << m_.replaced << ";";
    for (auto& [o, n] : counts_)
      std::cout << " " << name_of(o) << "=" << n;
    std::cout << std::endl;
  }

private:
  // -- failure report -------------------------------------------------------------------

  [[noreturn]] void fail(const std::string& what) {
    std::ostringstream out;
    out << "pool model FAILED: " << what << "\n  seed " << seed_
        << " (replay: DSPEX_MODEL_SEED=" << seed_ << "), step " << step_ << "\n  last steps:\n";
    for (auto& h : history_)
      out << "    " << h << "\n";
    out << "  model: live={";
    for (auto& id : m_.live)
      out << " " << id;
    out << " } leases={";
    for (auto& l : m_.leases)
      out << " " << l.grant.worker_id << "@c" << l.caller << (l.in_flight ? "(in flight)" : "");
    out << " } queue={";
    for (auto c : m_.queue)
      out << " c" << c;
    out << " } replaced=" << m_.replaced << "\n  last status: " << describe(last_)
        << "\n  last contract callbacks:";
    auto calls = contract_->calls();
    for (auto i = calls.size() > 30 ? calls.size() - 30 : 0; i < calls.size(); ++i)
      out << "\n    " << calls[i];
    out << "\n";
    std::cerr << out.str() << std::flush;
    pool_->resume();  // in case it is held: the teardown must not wait on it
    FAIL(out.str());
    throw std::logic_error("unreachable");
  }

  void note(std::string what) {
    history_.push_back("#" + std::to_string(step_) + " " + std::move(what));
    if (history_.size() > 20)
      history_.pop_front();
  }

  void detail(const std::string& what) {
    if (!history_.empty())
      history_.back() += " " + what;
  }

  // -- randomness ---------------------------------------------------------------------------

  std::size_t below(std::size_t n) { return std::uniform_int_distribution<std::size_t>{0, n - 1}(rng_); }
  bool chance(double p) { return std::bernoulli_distribution{p}(rng_); }

  template <class T>
  const T& pick(const std::vector<T>& xs) {
    return xs.at(below(xs.size()));
  }

  std::vector<std::size_t> free_callers() const {
    std::vector<std::size_t> out;
    for (std::size_t c = 0; c < n_callers; ++c)
      if (!waiting_[c])
        out.push_back(c);
    return out;
  }

  std::vector<std::size_t> leases_where(bool in_flight) const {
    std::vector<std::size_t> out;
    for (std::size_t i = 0; i < m_.leases.size(); ++i)
      if (m_.leases[i].in_flight == in_flight)
        out.push_back(i);
    return out;
  }

  checkout_type random_type() {
    switch (below(3)) {
      case 0: return checkout_type::anonymous();
      case 1: return checkout_type::any_worker();
      default: return checkout_type::session("s" + std::to_string(below(5)));
    }
  }

  op choose() {
    // A queued caller waits for a freed worker; free one if it waits long.
    if (queue_age_ > 25) {
      if (!leases_where(false).empty())
        return op::checkin;
      return op::kill_leased;
    }
    std::vector<std::pair<int, op>> options;
    auto add = [&](bool allowed, int weight, op o) {
      if (allowed)
        options.emplace_back(weight, o);
    };
    bool caller_free = !free_callers().empty();
    bool full = m_.idle() == 0;
    add(caller_free, 14, op::checkout_nonblocking);
    add(caller_free && (!full || m_.queue.size() < max_waiters), 6, op::checkout_blocking);
    add(!leases_where(false).empty(), 14, op::checkin);
    add(!m_.leases.empty(), 10, op::execute);
    add(!m_.stale.empty(), 3, op::execute_stale);
    add(!m_.stale.empty(), 3, op::checkin_stale);
    add(!leases_where(false).empty(), 4, op::start_held_request);
    add(!leases_where(true).empty(), 2, op::resume_held_request);
    add(!m_.leases.empty(), 4, op::kill_leased);
    add(!full, 3, op::kill_idle);
    add(true, 4, op::caller_dies);
    add(caller_free && m_.queue.empty() && (full || expired_with_idle_), 8, op::expired_checkout);
    add(caller_free, 3, op::grant_races_give_up);
    add(true, 3, op::pool_call);
    add(caller_free && !full, 2, op::checkout_removed_by_contract);
    int total = 0;
    for (auto& [w, o] : options)
      total += w;
    auto r = static_cast<int>(below(static_cast<std::size_t>(total)));
    for (auto& [w, o] : options) {
      if (r < w)
        return o;
      r -= w;
    }
    return options.back().second;
  }

  // -- steps ----------------------------------------------------------------------------------

  void perform(op o) {
    switch (o) {
      case op::checkout_nonblocking: return step_checkout_nonblocking();
      case op::checkout_blocking: return step_checkout_blocking();
      case op::checkin: return step_checkin();
      case op::execute: return step_execute();
      case op::execute_stale: return step_execute_stale();
      case op::checkin_stale: return step_checkin_stale();
      case op::start_held_request: return step_start_held_request();
      case op::resume_held_request: return step_resume_held_request();
      case op::kill_leased: return step_kill_leased();
      case op::kill_idle: return step_kill_idle();
      case op::caller_dies: return step_caller_dies();
      case op::expired_checkout: return step_expired_checkout();
      case op::grant_races_give_up: return step_grant_races_give_up();
      case op::pool_call: return step_pool_call();
      case op::checkout_removed_by_contract: return step_checkout_removed_by_contract();
    }
  }

  // A new grant: the worker must be one the model has idle (never a leased one).
  void take_grant(std::size_t caller, const checkout_reply& r, const char* what) {
    if (!r.grant)
      fail(std::string{what} + ": expected a grant, got " + describe(r.err));
    auto& g = *r.grant;
    detail("c" + std::to_string(caller) + " got " + g.worker_id);
    if (!m_.live.count(g.worker_id))
      fail(std::string{what} + ": granted " + g.worker_id + ", not a worker of the pool");
    if (m_.leased(g.worker_id))
      fail(std::string{what} + ": granted " + g.worker_id + ", which is already leased");
    if (g.lease_id == 0 || !g.worker)
      fail(std::string{what} + ": a grant without a lease id or worker handle");
    m_.leases.push_back(held_lease{g, caller, false});
  }

  void expect_error(const checkout_reply& r, error_category cat, const std::string& type,
                    const char* what) {
    if (r.grant)
      fail(std::string{what} + ": expected " + to_string(cat) + "/" + type + ", got a grant of "
           + r.grant->worker_id);
    if (r.err.category != cat || r.err.type != type)
      fail(std::string{what} + ": expected " + to_string(cat) + "/" + type + ", got "
           + describe(r.err));
  }

  void step_checkout_nonblocking() {
    auto c = pick(free_callers());
    detail("c" + std::to_string(c));
    auto r = callers_[c]->checkout(random_type(), hang, false);
    if (m_.idle() > 0)
      take_grant(c, r, "non-blocking checkout with an idle worker");
    else
      expect_error(r, error_category::resource_error, "full", "non-blocking checkout, none idle");
  }

  void step_checkout_blocking() {
    auto c = pick(free_callers());
    detail("c" + std::to_string(c));
    if (m_.idle() > 0 && m_.queue.empty()) {
      take_grant(c, callers_[c]->checkout(random_type(), hang, true), "blocking checkout");
      return;
    }
    // Queues: a long deadline, served when a worker is freed (see settle).
    callers_[c]->checkout_async(random_type(), std::chrono::seconds{60});
    waiting_[c] = true;
    m_.queue.push_back(c);
    detail("queued");
  }

  checkin_status random_checkin_status() {
    auto r = below(20);
    if (r < 11)
      return checkin_status::ok();
    if (r < 14)
      return checkin_status::close();
    if (r < 16)
      return checkin_status::failed(make_error(error_category::python_error, "boom", "python"));
    return checkin_status::failed(make_error(error_category::resource_error, "broken", "broken"));
  }

  static const char* status_name(const checkin_status& s) {
    switch (s.what) {
      case checkin_status::kind::ok: return "ok";
      case checkin_status::kind::close: return "close";
      case checkin_status::kind::error:
        return s.reason && s.reason->category == error_category::python_error ? "error(python)"
                                                                              : "error(resource)";
    }
    return "?";
  }

  void step_checkin() {
    auto i = pick(leases_where(false));
    auto l = m_.leases[i];
    auto status = random_checkin_status();
    detail(std::string{status_name(status)} + " " + l.grant.worker_id + " by c"
           + std::to_string(l.caller));
    if (!callers_[l.caller]->checkin(l.grant, status))
      fail("checkin of a held lease of " + l.grant.worker_id + " returned false");
    m_.checkin(i, status);
  }

  void step_execute() {
    auto& l = m_.leases[below(m_.leases.size())];
    detail(l.grant.worker_id + (l.in_flight ? " (in flight)" : ""));
    auto o = callers_[l.caller]->execute(l.grant, "work", {{"n", step_}}, hang);
    if (l.in_flight) {
      if (o.ok() || o.error().type != "worker_busy")
        fail("a request beside one in flight must fail with worker_busy, got "
             + (o.ok() ? std::string{"ok"} : describe(o.error())));
      return;
    }
    if (!o.ok())
      fail("execute under a held lease of " + l.grant.worker_id + " failed: "
           + describe(o.error()));
    if (o.value().value("worker_id", "") != l.grant.worker_id || o.value()["args"]["n"] != step_)
      fail("execute under a lease of " + l.grant.worker_id + " answered " + o.value().dump());
  }

  void step_execute_stale() {
    auto g = m_.stale[below(m_.stale.size())];
    auto c = below(n_callers);
    detail(g.worker_id + " by c" + std::to_string(c));
    auto o = callers_[c]->execute(g, "work", {}, hang);
    if (o.ok())
      fail("a request under a stale lease of " + g.worker_id + " succeeded");
    // A live worker refuses it; a dead one cannot answer at all.
    if (m_.live.count(g.worker_id) && o.error().type != "not_lease_holder")
      fail("a stale lease on live " + g.worker_id + ": expected not_lease_holder, got "
           + describe(o.error()));
  }

  void step_checkin_stale() {
    auto g = m_.stale[below(m_.stale.size())];
    auto c = below(n_callers);
    detail(g.worker_id + " by c" + std::to_string(c));
    if (callers_[c]->checkin(g, checkin_status::ok()))
      fail("the checkin of a stale lease of " + g.worker_id + " returned true");
  }

  void step_start_held_request() {
    auto i = pick(leases_where(false));
    auto& l = m_.leases[i];
    detail(l.grant.worker_id);
    callers_[l.caller]->execute_async(l.grant, "hold");
    l.in_flight = true;
  }

  void step_resume_held_request() {
    auto i = pick(leases_where(true));
    auto& l = m_.leases[i];
    detail(l.grant.worker_id);
    caf::anon_send(worker_handle(l.grant.worker_id), resume_atom::value);
    l.in_flight = false;
  }

  caf::actor worker_handle(const std::string& id) {
    auto h = contract_->worker(id);
    if (!h)
      fail("no fake worker " + id);
    return h;
  }

  // A crash (the fake worker fails its request in flight, then quits) or an
  // exit signal. Not exit_reason::kill: CAF never lets a linked actor trap
  // that reason, so it would take the pool down with the worker (reported).
  void crash(const std::string& id) {
    auto h = worker_handle(id);
    if (chance(0.5)) {
      detail("(stop)");
      caf::anon_send(h, stop_atom::value);
    } else {
      detail("(exit)");
      caf::anon_send_exit(h, caf::exit_reason::user_shutdown);
    }
  }

  void step_kill_leased() {
    auto i = below(m_.leases.size());
    auto id = m_.leases[i].grant.worker_id;
    detail(id + (m_.leases[i].in_flight ? " (in flight)" : ""));
    crash(id);
    m_.end_lease(i);
    m_.remove(id);
  }

  void step_kill_idle() {
    auto id = pick(m_.idle_ids());
    detail(id);
    crash(id);
    m_.remove(id);
  }

  void step_caller_dies() {
    auto c = below(n_callers);
    detail("c" + std::to_string(c) + (waiting_[c] ? " (queued)" : ""));
    callers_[c]->die();
    // Its queued checkout is dropped, its leases revoked: a worker in sync
    // goes back, one with a request in flight is replaced.
    m_.queue.erase(std::remove(m_.queue.begin(), m_.queue.end(), c), m_.queue.end());
    waiting_[c] = false;
    for (std::size_t i = m_.leases.size(); i-- > 0;) {
      if (m_.leases[i].caller != c)
        continue;
      auto id = m_.leases[i].grant.worker_id;
      auto in_flight = m_.leases[i].in_flight;
      detail(id + (in_flight ? "(in flight)" : ""));
      m_.end_lease(i);
      if (in_flight)
        m_.remove(id);
    }
    callers_[c] = std::make_unique<test_caller>(*pool_);
  }

  // A deadline passes while the pool is held: on resume the caller must get
  // timeout_error/checkout_timeout and no worker. Variant: a checkin frees a
  // worker right behind the expired checkout, so dispatch (not only the
  // queue timer) meets the expired caller.
  //
  // Note: offered only when no worker is idle (unless DSPEX_MODEL_EXPIRED_IDLE
  // is set). With an idle worker the pool hands an already expired caller a
  // worker (enqueue offers at once, without a deadline check): reported.
  void step_expired_checkout() {
    auto c = pick(free_callers());
    std::optional<std::size_t> freed;
    if (m_.idle() == 0 && chance(0.5) && !leases_where(false).empty())
      freed = pick(leases_where(false));
    detail("c" + std::to_string(c) + (freed ? " + checkin of " + m_.leases[*freed].grant.worker_id
                                            : std::string{}));
    pool_->hold();
    callers_[c]->checkout_async(random_type(), std::chrono::milliseconds{1});
    auto sent = clock_type::now();
    // The deadline (at most 1 ms after `sent`) passes on the clock; the pool is still.
    std::this_thread::sleep_until(sent + std::chrono::milliseconds{3});
    if (freed)
      caf::anon_send(pool_->pool(), checkin_atom::value, m_.leases[*freed].grant.lease_id,
                     checkin_status::ok());
    pool_->resume();
    auto r = callers_[c]->await_checkout(hang);
    if (r.grant)
      // Give it back so that the report shows the first fault, not its aftermath.
      callers_[c]->checkin(*r.grant);
    expect_error(r, error_category::timeout_error, "checkout_timeout", "expired checkout");
    if (freed)
      m_.checkin(*freed, checkin_status::ok());
  }

  // The caller's own wait gives up before the held pool answers; on resume
  // the grant (or the queued request) is dropped by the caller's cancel.
  void step_grant_races_give_up() {
    auto c = pick(free_callers());
    detail("c" + std::to_string(c) + (m_.idle() > 0 ? " (grant dropped)" : " (queued, dropped)"));
    pool_->hold();
    callers_[c]->checkout_giving_up(std::chrono::milliseconds{20}, std::chrono::seconds{5});
    pool_->resume();
    // Nothing changes in the model: the worker comes back, the queue entry goes.
  }

  // A pool-mediated call (non-blocking): the worker serves it and checks in.
  void step_pool_call() {
    auto fail_cmd = chance(0.3);
    detail(fail_cmd ? "fail" : "work");
    auto o = pool_->execute(fail_cmd ? "fail" : "work", nlohmann::json::object(), hang,
                            checkout_type::anonymous(), false);
    if (m_.idle() == 0) {
      if (o.ok() || o.error().category != error_category::resource_error
          || o.error().type != "full")
        fail("a non-blocking pool call with no idle worker: expected full, got "
             + (o.ok() ? std::string{"ok"} : describe(o.error())));
      return;
    }
    std::string id;
    if (fail_cmd) {
      if (o.ok() || o.error().category != error_category::python_error)
        fail("pool call 'fail': expected a python_error, got "
             + (o.ok() ? std::string{"ok"} : describe(o.error())));
      id = o.error().context.value("worker_id", "");
      m_.count_checkin(id, checkin_status::failed(o.error()));
    } else {
      if (!o.ok())
        fail("pool call 'work' failed: " + describe(o.error()));
      id = o.value().value("worker_id", "");
      m_.count_checkin(id, checkin_status::ok());
    }
    detail("on " + id);
    if (!m_.live.count(id) || m_.leased(id))
      fail("a pool call was served by " + id + ", which is not an idle worker");
  }

  // handle_checkout answers remove for one worker: it is replaced (at once,
  // synchronous init) and the same checkout is retried, so it is granted.
  void step_checkout_removed_by_contract() {
    auto c = pick(free_callers());
    detail("c" + std::to_string(c));
    contract_->clear_calls();
    contract_->expect(step::checkout(step::action::remove));
    auto r = callers_[c]->checkout(random_type(), hang, false);
    std::string removed;
    for (auto& call : contract_->calls())
      if (call.rfind("terminate_worker ", 0) == 0) {
        auto rest = call.substr(std::string{"terminate_worker "}.size());
        removed = rest.substr(0, rest.find(' '));
      }
    auto unmet = contract_->unmet();
    if (!unmet.empty())
      fail("scripted checkout remove: " + unmet.front());
    detail("removed " + removed);
    if (removed.empty() || !m_.live.count(removed) || m_.leased(removed))
      fail("handle_checkout remove: expected an idle worker to be terminated, got '" + removed
           + "'");
    m_.remove(removed);
    take_grant(c, r, "checkout retried after a contract removal");
    if (r.grant->worker_id == removed)
      fail("the removed worker " + removed + " was handed out");
  }

  // -- after every step: wait until the pool matches the model, then check ---------------

  // Holds in every status the pool answers, however transient.
  void check_always(const pool_status& s) {
    std::size_t idle = 0, busy = 0, starting = 0, removing = 0, leased_state = 0;
    for (auto& w : s.workers) {
      if (w.state == "idle")
        ++idle;
      else if (w.state == "busy")
        ++busy;
      else if (w.state == "leased")
        ++busy, ++leased_state;
      else if (w.state == "starting")
        ++starting;
      else if (w.state == "removing" || w.state == "stopping")
        ++removing;
      else
        fail("unknown worker state " + w.state);
    }
    if (s.idle + s.busy + s.starting + s.removing != s.workers.size())
      fail("idle + busy + starting + removing != workers: " + describe(s));
    if (idle != s.idle || busy != s.busy || starting != s.starting || removing != s.removing)
      fail("the counters disagree with the workers' states: " + describe(s));
    if (s.workers.size() - removing != pool_size)
      fail("not pool.size workers outside removal (a replacement is missing): " + describe(s));
    if (s.leased > leased_state)
      fail("more leases than leased workers: " + describe(s));
    if (s.start_failures != 0 || s.overflow != 0 || s.stopping)
      fail("unexpected start failures, overflow or stopping: " + describe(s));
  }

  bool matches(const pool_status& s, std::size_t pending) const {
    auto leased = m_.leases.size() + pending;
    if (s.size != pool_size || s.workers.size() != pool_size || s.starting != 0 || s.removing != 0
        || s.leased != leased || s.busy != leased || s.idle != pool_size - leased
        || s.queued != m_.queue.size() || s.replaced != m_.replaced)
      return false;
    std::set<std::string> ids, leased_ids;
    for (auto& w : s.workers) {
      ids.insert(w.id);
      if (w.state == "leased")
        leased_ids.insert(w.id);
    }
    if (ids != m_.live || leased_ids.size() != leased)
      return false;
    for (auto& l : m_.leases)
      if (!leased_ids.count(l.grant.worker_id))
        return false;
    return true;
  }

  void settle() {
    // Callers in the queue are served, oldest first, by the workers freed.
    std::vector<std::size_t> served;
    while (!m_.queue.empty() && m_.idle() > served.size()) {
      served.push_back(m_.queue.front());
      m_.queue.pop_front();
    }
    auto ok = pool_->wait_for(
      [&](const pool_status& s) {
        last_ = s;
        check_always(s);
        return matches(s, served.size());
      },
      hang);
    if (!ok)
      fail("the pool never matched the model (expecting " + std::to_string(served.size())
           + " queued caller(s) served)");
    for (auto c : served) {
      auto r = callers_[c]->await_checkout(hang);
      waiting_[c] = false;
      take_grant(c, r, "a queued caller served by a freed worker");
    }
    // The invariants, on one more status.
    last_ = pool_->status();
    check_always(last_);
    if (!matches(last_, 0))
      fail("the pool does not match the model after the queued grants");
    std::set<std::string> held;
    for (auto& l : m_.leases)
      if (!held.insert(l.grant.worker_id).second)
        fail("worker " + l.grant.worker_id + " is leased twice");
    std::set<std::string> leased_state;
    for (auto& w : last_.workers)
      if (w.state == "leased")
        leased_state.insert(w.id);
    if (held != leased_state)
      fail("the leased workers differ from the leases held");
    if (last_.replaced != m_.replaced || last_.queued != m_.queue.size()
        || last_.leased != m_.leases.size() || last_.workers.size() != pool_size)
      fail("counters differ from the model");
  }

  // -- the end: the pool stops, and no worker actor is left ----------------------------

  void stop_and_check_nothing_left() {
    caf::scoped_actor self{pool_->system()};
    bool stopped = false;
    self->request(pool_->pool(), caf::duration{hang}, stop_atom::value)
      .receive([&](bool b) { stopped = b; }, [&](caf::error&) {});
    if (!stopped)
      fail("the pool did not stop");
    std::vector<caf::actor> actors{pool_->pool()};
    for (std::uint64_t n = 1; n < m_.next_worker; ++n)
      actors.push_back(worker_handle(worker_name(n)));
    for (auto& a : actors)
      self->monitor(a);
    std::size_t down = 0;
    bool timed_out = false;
    while (down < actors.size() && !timed_out)
      self->receive([&](caf::down_msg&) { ++down; },
                    caf::after(std::chrono::seconds{5}) >> [&] { timed_out = true; });
    if (down != actors.size())
      fail(std::to_string(actors.size() - down) + " actors still alive after the pool stopped");
  }

  std::uint64_t seed_;
  std::size_t steps_;
  std::mt19937_64 rng_;
  bool expired_with_idle_ = false;
  std::shared_ptr<scripted_contract> contract_;
  std::unique_ptr<test_pool> pool_;  // declared before the callers: destroyed after them
  std::vector<std::unique_ptr<test_caller>> callers_;
  std::vector<bool> waiting_;
  model m_;
  std::size_t step_ = 0;
  std::size_t queue_age_ = 0;
  std::deque<std::string> history_;
  std::map<op, std::size_t> counts_;
  pool_status last_;
};

std::optional<std::uint64_t> env_number(const char* name) {
  auto v = std::getenv(name);
  if (!v || !*v)
    return std::nullopt;
  return std::stoull(v);
}

} // namespace

TEST_CASE("the pool follows its model over a long random sequence of steps") {
  auto steps = env_number("DSPEX_MODEL_STEPS").value_or(10'000);
  std::vector<std::uint64_t> seeds;
  if (auto s = env_number("DSPEX_MODEL_SEED"))
    seeds.push_back(*s);
  else
    // One fixed seed (the same sequence every run) and one fresh one.
    seeds = {20240917, std::random_device{}()};
  auto threads_before = thread_count();
  for (auto seed : seeds) {
    std::cout << "[pool model] seed " << seed << " (" << steps
              << " steps; replay with DSPEX_MODEL_SEED=" << seed << ")" << std::endl;
    auto started = clock_type::now();
    {
      model_run run{seed, steps};
      run.run();
      run.print_summary();
    }
    std::cout << "[pool model] seed " << seed << " passed in "
              << std::chrono::duration<double>(clock_type::now() - started).count() << " s"
              << std::endl;
  }
  // Every actor system is gone with its threads.
  CHECK(thread_count() == threads_before);
}
