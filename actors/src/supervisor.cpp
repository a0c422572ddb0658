#include "dspex/actors/supervisor.hpp"

#include <algorithm>
#include <deque>
#include <exception>
#include <memory>
#include <set>
#include <stdexcept>
#include <unordered_map>
#include <utility>

#include <caf/all.hpp>

#include "dspex/logging.hpp"

namespace dspex {

// -- names ------------------------------------------------------------------------------

const char* to_string(restart_type x) noexcept {
  switch (x) {
    case restart_type::permanent: return "permanent";
    case restart_type::transient: return "transient";
    case restart_type::temporary: return "temporary";
  }
  return "unknown";
}

const char* to_string(restart_strategy x) noexcept {
  switch (x) {
    case restart_strategy::one_for_one: return "one_for_one";
    case restart_strategy::one_for_all: return "one_for_all";
    case restart_strategy::rest_for_one: return "rest_for_one";
  }
  return "unknown";
}

const char* to_string(supervisor_event_kind x) noexcept {
  switch (x) {
    case supervisor_event_kind::child_started: return "child_started";
    case supervisor_event_kind::child_restarted: return "child_restarted";
    case supervisor_event_kind::child_start_failed: return "child_start_failed";
    case supervisor_event_kind::child_exited: return "child_exited";
    case supervisor_event_kind::child_stopped: return "child_stopped";
    case supervisor_event_kind::gave_up: return "gave_up";
  }
  return "unknown";
}

const char* to_string(supervisor_exit x) noexcept {
  switch (x) {
    case supervisor_exit::gave_up: return "gave_up";
    case supervisor_exit::start_failed: return "start_failed";
  }
  return "unknown";
}

// -- exit reasons -------------------------------------------------------------------------

caf::error make_supervisor_exit(supervisor_exit code, const std::string& supervisor,
                                const std::string& child_id, const caf::error& child_reason,
                                std::size_t restarts) {
  return caf::error{static_cast<std::uint8_t>(code), supervisor_exit_category,
                    caf::make_message(supervisor, child_id, child_reason,
                                      static_cast<std::uint64_t>(restarts))};
}

bool is_supervisor_exit(const caf::error& reason) {
  return reason && reason.category() == supervisor_exit_category;
}

std::optional<supervisor_exit_info> decode_supervisor_exit(const caf::error& reason) {
  if (!is_supervisor_exit(reason))
    return std::nullopt;
  auto code = reason.code();
  if (code != static_cast<std::uint8_t>(supervisor_exit::gave_up)
      && code != static_cast<std::uint8_t>(supervisor_exit::start_failed))
    return std::nullopt;
  const auto& ctx = reason.context();
  if (!ctx.match_elements<std::string, std::string, caf::error, std::uint64_t>())
    return std::nullopt;
  supervisor_exit_info info;
  info.code = static_cast<supervisor_exit>(code);
  info.supervisor = ctx.get_as<std::string>(0);
  info.child_id = ctx.get_as<std::string>(1);
  info.child_reason = ctx.get_as<caf::error>(2);
  info.restarts = static_cast<std::size_t>(ctx.get_as<std::uint64_t>(3));
  return info;
}

error to_error(const supervisor_exit_info& info) {
  nlohmann::json ctx{{"supervisor", info.supervisor},
                     {"child_id", info.child_id},
                     {"child_reason", caf::to_string(info.child_reason)},
                     {"restarts", info.restarts}};
  if (auto nested = decode_supervisor_exit(info.child_reason))
    ctx["cause"] = to_error(*nested).to_json();
  if (info.code == supervisor_exit::start_failed)
    return make_error(error_category::initialization_error, "child_start_failed",
                      describe(info), std::move(ctx));
  return make_error(error_category::resource_error, "supervisor_gave_up", describe(info),
                    std::move(ctx));
}

std::string describe(const supervisor_exit_info& info) {
  if (info.code == supervisor_exit::start_failed)
    return "supervisor '" + info.supervisor + "' could not start child '" + info.child_id
           + "': " + caf::to_string(info.child_reason);
  return "supervisor '" + info.supervisor + "' gave up (" + std::to_string(info.restarts)
         + " restarts within max_seconds): child '" + info.child_id
         + "' exited with " + caf::to_string(info.child_reason);
}

bool is_normal_exit(const caf::error& reason) {
  return !reason || reason == caf::exit_reason::user_shutdown;
}

// -- the supervisor actor -----------------------------------------------------------------

namespace {

using clock_type = std::chrono::steady_clock;

/// (token): the child being stopped under this token had its shutdown_timeout.
using sup_timeout_atom = caf::atom_constant<caf::atom("suptmo")>;
/// (child id, last reason): try a failed restart again.
using sup_retry_atom = caf::atom_constant<caf::atom("supretry")>;

/// How long the address of a terminated child is remembered, so that an
/// exit_msg it sent through its link before the supervisor unlinked it is
/// recognised (and ignored) after its down_msg.
constexpr auto former_child_memory = std::chrono::seconds{60};

enum class child_status { down, running, stopping };

struct child_rec {
  child_spec spec;
  caf::actor handle;  ///< valid while running or stopping
  child_status status = child_status::down;
  std::size_t restarts = 0;
  bool started_once = false;
  bool stop_marked = false;      ///< to be stopped by the ordered stop in progress
  bool restart_pending = false;  ///< to be started when that ordered stop completes
  bool killed = false;           ///< the current stop had to kill it
  std::uint64_t stop_token = 0;
};

struct supervisor_state {
  supervisor_flags flags;
  std::vector<child_rec> children;  ///< in start order
  caf::actor_addr parent;           ///< set by spawn_linked_supervisor
  std::deque<clock_type::time_point> restart_log;
  /// The children alive, shared with the termination functor, which runs
  /// after the state is destroyed and kills whatever is still in here.
  std::shared_ptr<std::vector<caf::actor>> live = std::make_shared<std::vector<caf::actor>>();
  std::unordered_map<caf::actor_addr, clock_type::time_point> former;
  bool busy = false;           ///< an ordered stop is in progress (group restart or shutdown)
  bool shutting_down = false;
  caf::error final_reason;
  std::vector<caf::response_promise> stop_waiters;
  /// Failures of children outside a running group restart, handled after it.
  std::deque<std::pair<std::string, caf::error>> deferred;
  std::uint64_t next_token = 0;

  static inline const char* name = "dspex.supervisor";
};

using sup_actor = caf::stateful_actor<supervisor_state>;

std::string render(sup_actor* self, const caf::error& reason) {
  if (!reason)
    return "normal";
  return self->system().render(reason);
}

child_rec* find_child(sup_actor* self, const std::string& id) {
  for (auto& c : self->state.children)
    if (c.spec.id == id)
      return &c;
  return nullptr;
}

child_rec* find_child(sup_actor* self, const caf::actor_addr& addr) {
  if (!addr)
    return nullptr;
  for (auto& c : self->state.children)
    if (c.handle && c.handle.address() == addr)
      return &c;
  return nullptr;
}

void erase_child(sup_actor* self, const std::string& id) {
  auto& xs = self->state.children;
  xs.erase(std::remove_if(xs.begin(), xs.end(), [&](const child_rec& c) { return c.spec.id == id; }),
           xs.end());
}

std::vector<std::string> child_ids(sup_actor* self) {
  std::vector<std::string> ids;
  for (auto& c : self->state.children)
    ids.push_back(c.spec.id);
  return ids;
}

/// Reports a child's event to the observer. Returns false when there is
/// none: the caller logs the event itself. With an observer, the event is
/// the observer's to log (the runtime's publishes it on its event bus, which
/// logs each event once), so no event has two log lines.
bool emit(sup_actor* self, supervisor_event_kind kind, const child_rec& c,
          caf::actor_addr child, caf::error reason = caf::error{}, bool killed = false) {
  auto& obs = self->state.flags.observer;
  if (!obs)
    return false;
  supervisor_event ev;
  ev.kind = kind;
  ev.supervisor = self->state.flags.name;
  ev.child_id = c.spec.id;
  ev.child = std::move(child);
  ev.reason = std::move(reason);
  ev.restarts = c.restarts;
  ev.killed = killed;
  try {
    obs(ev);
  } catch (const std::exception& e) {
    log().error("supervisor={} event=observer_failed what=\"{}\"", self->state.flags.name,
                e.what());
  } catch (...) {
    log().error("supervisor={} event=observer_failed what=unknown", self->state.flags.name);
  }
  return true;
}

void remember_former(sup_actor* self, const caf::actor_addr& addr) {
  auto& former = self->state.former;
  auto now = clock_type::now();
  for (auto it = former.begin(); it != former.end();)
    it = now - it->second > former_child_memory ? former.erase(it) : std::next(it);
  former[addr] = now;
}

void forget_live(sup_actor* self, const caf::actor& h) {
  auto& live = *self->state.live;
  live.erase(std::remove(live.begin(), live.end(), h), live.end());
}

/// Starts (or restarts) one child. Returns none, or why it could not start.
caf::error start_child(sup_actor* self, child_rec& c) {
  auto& st = self->state;
  caf::actor h;
  caf::error why;
  try {
    h = c.spec.start(self);
    if (!h)
      why = caf::make_error(caf::sec::runtime_error,
                            "start function of child '" + c.spec.id + "' returned no actor");
  } catch (const std::exception& e) {
    why = caf::make_error(caf::sec::runtime_error, "start function of child '" + c.spec.id
                                                     + "' threw: " + e.what());
  } catch (...) {
    why = caf::make_error(caf::sec::runtime_error,
                          "start function of child '" + c.spec.id + "' threw");
  }
  if (why) {
    c.status = child_status::down;
    if (!emit(self, supervisor_event_kind::child_start_failed, c, caf::actor_addr{}, why))
      log().error("supervisor={} event=child_start_failed child={} reason=\"{}\"", st.flags.name,
                  c.spec.id, render(self, why));
    return why;
  }
  // Supervised by monitor, not by link: see the header (kill through a link).
  self->unlink_from(h);
  self->monitor(h);
  c.handle = h;
  c.status = child_status::running;
  st.live->push_back(h);
  if (c.started_once) {
    ++c.restarts;
    if (!emit(self, supervisor_event_kind::child_restarted, c, h.address()))
      log().info("supervisor={} event=child_restarted child={} restarts={} actor={}",
                 st.flags.name, c.spec.id, c.restarts, h.id());
  } else {
    c.started_once = true;
    if (!emit(self, supervisor_event_kind::child_started, c, h.address()))
      log().debug("supervisor={} event=child_started child={} actor={}", st.flags.name,
                  c.spec.id, h.id());
  }
  return caf::error{};
}

/// Restarts one child; a failed start is retried through the mailbox.
void restart_child(sup_actor* self, child_rec& c) {
  if (auto why = start_child(self, c))
    self->send(self, sup_retry_atom::value, c.spec.id, std::move(why));
}

/// Records a restart; false when it exceeds the intensity.
bool record_restart(sup_actor* self) {
  auto& st = self->state;
  auto now = clock_type::now();
  st.restart_log.push_back(now);
  while (!st.restart_log.empty() && now - st.restart_log.front() > st.flags.max_seconds)
    st.restart_log.pop_front();
  return st.restart_log.size() <= st.flags.max_restarts;
}

void stop_next(sup_actor* self);

void finish_shutdown(sup_actor* self) {
  auto& st = self->state;
  st.busy = false;
  for (auto& rp : st.stop_waiters)
    rp.deliver(true);
  st.stop_waiters.clear();
  log().info("supervisor={} event=stopped reason=\"{}\"", st.flags.name,
             render(self, st.final_reason));
  self->quit(st.final_reason);
}

void handle_failure(sup_actor* self, const std::string& id, const caf::error& reason);

/// The ordered stop in progress has stopped every marked child.
void operation_done(sup_actor* self) {
  auto& st = self->state;
  if (st.shutting_down) {
    finish_shutdown(self);
    return;
  }
  st.busy = false;
  // A group restart: start the group again in start order.
  for (auto& id : child_ids(self)) {
    auto c = find_child(self, id);
    if (!c || !c->restart_pending)
      continue;
    c->restart_pending = false;
    if (c->spec.restart == restart_type::temporary && c->status == child_status::down) {
      log().info("supervisor={} event=child_removed child={} restart=temporary", st.flags.name,
                 id);
      erase_child(self, id);
      continue;
    }
    if (c->status == child_status::down)
      restart_child(self, *c);
  }
  // Then the failures that happened meanwhile outside the group.
  while (!st.busy && !st.shutting_down && !st.deferred.empty()) {
    auto [id, reason] = std::move(st.deferred.front());
    st.deferred.pop_front();
    handle_failure(self, id, reason);
  }
}

void begin_stop(sup_actor* self, child_rec& c) {
  auto& st = self->state;
  c.status = child_status::stopping;
  c.killed = false;
  c.stop_token = ++st.next_token;
  auto timeout = c.spec.shutdown_timeout;
  if (timeout <= std::chrono::milliseconds::zero()) {
    c.killed = true;
    log().info("supervisor={} event=child_stopping child={} exit=kill", st.flags.name, c.spec.id);
    self->send_exit(c.handle, caf::exit_reason::kill);
    return;
  }
  log().info("supervisor={} event=child_stopping child={} exit=user_shutdown timeout_ms={}",
             st.flags.name, c.spec.id, timeout.count());
  self->send_exit(c.handle, caf::exit_reason::user_shutdown);
  self->delayed_send(self, timeout, sup_timeout_atom::value, c.stop_token);
}

/// Stops the last started child still marked, or completes the operation.
void stop_next(sup_actor* self) {
  auto& xs = self->state.children;
  for (auto i = xs.size(); i-- > 0;) {
    auto& c = xs[i];
    if (c.status == child_status::stopping)
      return;  // still waiting for this one
    if (!c.stop_marked)
      continue;
    if (c.status != child_status::running) {
      c.stop_marked = false;
      continue;
    }
    begin_stop(self, c);
    return;
  }
  operation_done(self);
}

/// Ordered shutdown of every child, then quit with `reason`. The first
/// reason wins when shutdown is asked for again.
void begin_shutdown(sup_actor* self, caf::error reason) {
  auto& st = self->state;
  if (st.shutting_down)
    return;
  st.shutting_down = true;
  st.final_reason = std::move(reason);
  st.deferred.clear();
  std::size_t running = 0;
  for (auto& c : st.children) {
    c.restart_pending = false;
    if (c.status == child_status::running) {
      c.stop_marked = true;
      ++running;
    }
  }
  log().info("supervisor={} event=shutdown children={} reason=\"{}\"", st.flags.name, running,
             render(self, st.final_reason));
  if (!st.busy) {
    st.busy = true;
    stop_next(self);
  }
  // Otherwise a child is being stopped now; its down_msg continues with the
  // newly marked children.
}

void give_up(sup_actor* self, child_rec& c, const caf::error& reason) {
  auto& st = self->state;
  auto restarts = st.restart_log.size();
  auto exit_reason = make_supervisor_exit(supervisor_exit::gave_up, st.flags.name, c.spec.id,
                                          reason, restarts);
  if (!emit(self, supervisor_event_kind::gave_up, c, caf::actor_addr{}, exit_reason))
    log().error("supervisor={} event=gave_up child={} restarts={} max_restarts={} "
                "max_seconds_ms={} reason=\"{}\"",
                st.flags.name, c.spec.id, restarts, st.flags.max_restarts,
                st.flags.max_seconds.count(), render(self, reason));
  begin_shutdown(self, std::move(exit_reason));
}

bool should_restart(restart_type type, const caf::error& reason) {
  switch (type) {
    case restart_type::permanent: return true;
    case restart_type::transient: return !is_normal_exit(reason);
    case restart_type::temporary: return false;
  }
  return false;
}

/// A child that is down failed with `reason`: apply its restart type, the
/// intensity and the strategy. Only called while no ordered stop runs.
void handle_failure(sup_actor* self, const std::string& id, const caf::error& reason) {
  auto& st = self->state;
  auto c = find_child(self, id);
  if (!c || c->status != child_status::down)
    return;
  if (!should_restart(c->spec.restart, reason)) {
    if (c->spec.restart == restart_type::temporary) {
      log().info("supervisor={} event=child_removed child={} restart=temporary", st.flags.name,
                 id);
      erase_child(self, id);
    } else {
      log().info("supervisor={} event=child_not_restarted child={} restart={}", st.flags.name,
                 id, to_string(c->spec.restart));
    }
    return;
  }
  if (!record_restart(self)) {
    give_up(self, *c, reason);
    return;
  }
  auto& xs = st.children;
  auto pos = static_cast<std::size_t>(c - xs.data());
  std::size_t first = 0;
  switch (st.flags.strategy) {
    case restart_strategy::one_for_one:
      log().info("supervisor={} event=restarting strategy=one_for_one child={}", st.flags.name,
                 id);
      restart_child(self, *c);
      return;
    case restart_strategy::one_for_all:
      first = 0;
      break;
    case restart_strategy::rest_for_one:
      first = pos;
      break;
  }
  std::size_t to_stop = 0;
  for (auto i = first; i < xs.size(); ++i) {
    auto& x = xs[i];
    if (i == pos) {
      x.restart_pending = true;
    } else if (x.status == child_status::running) {
      x.restart_pending = true;
      x.stop_marked = true;
      ++to_stop;
    }
  }
  log().info("supervisor={} event=restarting strategy={} child={} siblings_to_stop={}",
             st.flags.name, to_string(st.flags.strategy), id, to_stop);
  st.busy = true;
  stop_next(self);
}

void on_child_down(sup_actor* self, const caf::down_msg& dm) {
  auto& st = self->state;
  auto c = find_child(self, dm.source);
  if (!c)
    return;  // not (or no longer) one of ours
  forget_live(self, c->handle);
  remember_former(self, dm.source);
  c->handle = nullptr;
  auto was = c->status;
  c->status = child_status::down;
  if (was == child_status::stopping) {
    c->stop_marked = false;
    if (!emit(self, supervisor_event_kind::child_stopped, *c, dm.source, dm.reason, c->killed))
      log().info("supervisor={} event=child_stopped child={} killed={} reason=\"{}\"",
                 st.flags.name, c->spec.id, c->killed, render(self, dm.reason));
    stop_next(self);
    return;
  }
  // It ended on its own.
  auto lvl = is_normal_exit(dm.reason) ? spdlog::level::info : spdlog::level::warn;
  if (!emit(self, supervisor_event_kind::child_exited, *c, dm.source, dm.reason))
    log().log(lvl, "supervisor={} event=child_exited child={} restart={} reason=\"{}\"",
              st.flags.name, c->spec.id, to_string(c->spec.restart), render(self, dm.reason));
  if (st.shutting_down) {
    // Never restarted during a shutdown; it is simply one fewer to stop.
    c->stop_marked = false;
    return;
  }
  if (st.busy) {
    if (c->stop_marked || c->restart_pending) {
      // Part of the group being restarted: it starts again with the group.
      c->stop_marked = false;
      return;
    }
    st.deferred.emplace_back(c->spec.id, dm.reason);
    return;
  }
  handle_failure(self, c->spec.id, dm.reason);
}

void on_exit_msg(sup_actor* self, const caf::exit_msg& em) {
  auto& st = self->state;
  // A child's exit through its link, sent before the supervisor unlinked it:
  // its down_msg is (or was) the one that counts.
  if (find_child(self, em.source))
    return;
  if (auto it = st.former.find(em.source); it != st.former.end()) {
    st.former.erase(it);
    return;
  }
  bool from_parent = st.parent && em.source == st.parent;
  if (!from_parent && !em.reason)
    return;  // a normal exit from anybody else is no reason to stop (CAF's default)
  log().info("supervisor={} event=exit_received from_parent={} reason=\"{}\"", st.flags.name,
             from_parent, render(self, em.reason));
  begin_shutdown(self, em.reason);
}

caf::behavior supervisor_impl(sup_actor* self, supervisor_flags flags,
                              std::vector<child_spec> specs, caf::actor_addr parent) {
  auto& st = self->state;
  st.flags = std::move(flags);
  st.parent = std::move(parent);
  self->attach_functor([live = st.live](const caf::error&) {
    // Normally empty: the supervisor stops its children before it quits.
    // After a kill or an exception, nothing may outlive it.
    for (auto& h : *live)
      caf::anon_send_exit(h, caf::exit_reason::kill);
    live->clear();
  });
  self->set_exit_handler([=](caf::exit_msg& em) { on_exit_msg(self, em); });
  self->set_down_handler([=](caf::down_msg& dm) { on_child_down(self, dm); });
  for (auto& spec : specs) {
    child_rec c;
    c.spec = std::move(spec);
    st.children.push_back(std::move(c));
  }
  log().info("supervisor={} event=starting strategy={} children={} max_restarts={} "
             "max_seconds_ms={}",
             st.flags.name, to_string(st.flags.strategy), st.children.size(),
             st.flags.max_restarts, st.flags.max_seconds.count());
  for (auto& c : st.children) {
    if (auto why = start_child(self, c)) {
      begin_shutdown(self, make_supervisor_exit(supervisor_exit::start_failed, st.flags.name,
                                                c.spec.id, why));
      break;
    }
  }
  return {
    [=](which_children_atom) {
      std::vector<child_info> xs;
      for (auto& c : self->state.children)
        xs.push_back(child_info{c.spec.id, c.handle, c.restarts, c.spec.restart});
      return xs;
    },
    [=](supervisor_stop_atom) -> caf::result<bool> {
      auto rp = self->make_response_promise();
      self->state.stop_waiters.push_back(rp);
      begin_shutdown(self, caf::error{});
      return rp;
    },
    [=](sup_timeout_atom, std::uint64_t token) {
      for (auto& c : self->state.children) {
        if (c.status == child_status::stopping && c.stop_token == token && c.handle) {
          c.killed = true;
          log().warn("supervisor={} event=child_shutdown_timeout child={} timeout_ms={} exit=kill",
                     self->state.flags.name, c.spec.id, c.spec.shutdown_timeout.count());
          self->send_exit(c.handle, caf::exit_reason::kill);
          return;
        }
      }
    },
    [=](sup_retry_atom, const std::string& id, const caf::error& reason) {
      auto& st = self->state;
      if (st.shutting_down)
        return;
      if (st.busy) {
        st.deferred.emplace_back(id, reason);
        return;
      }
      handle_failure(self, id, reason);
    },
  };
}

void validate(const std::vector<child_spec>& specs) {
  std::set<std::string> ids;
  for (auto& s : specs) {
    if (s.id.empty())
      throw std::invalid_argument("supervisor: a child spec has an empty id");
    if (!s.start)
      throw std::invalid_argument("supervisor: child '" + s.id + "' has no start function");
    if (!ids.insert(s.id).second)
      throw std::invalid_argument("supervisor: duplicate child id '" + s.id + "'");
  }
}

} // namespace

caf::actor spawn_supervisor(caf::actor_system& sys, supervisor_flags flags,
                            std::vector<child_spec> children) {
  validate(children);
  return sys.spawn(supervisor_impl, std::move(flags), std::move(children), caf::actor_addr{});
}

caf::actor spawn_linked_supervisor(caf::event_based_actor* parent, supervisor_flags flags,
                                   std::vector<child_spec> children) {
  validate(children);
  return parent->spawn<caf::linked>(supervisor_impl, std::move(flags), std::move(children),
                                    parent->address());
}

child_spec supervisor_child(std::string id, supervisor_flags flags,
                            std::vector<child_spec> children, restart_type restart,
                            std::optional<std::chrono::milliseconds> shutdown_timeout) {
  validate(children);
  child_spec spec;
  spec.id = std::move(id);
  spec.restart = restart;
  if (shutdown_timeout) {
    spec.shutdown_timeout = *shutdown_timeout;
  } else {
    std::chrono::milliseconds sum{1000};
    for (auto& c : children)
      sum += c.shutdown_timeout;
    spec.shutdown_timeout = sum;
  }
  spec.start = [flags = std::move(flags), children = std::move(children)](
                 caf::event_based_actor* parent) {
    return spawn_linked_supervisor(parent, flags, children);
  };
  return spec;
}

} // namespace dspex
