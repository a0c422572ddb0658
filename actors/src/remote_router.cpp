// remote_router: see remote_router.hpp.
#include "remote_router.hpp"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <map>
#include <set>

#include <caf/all.hpp>
#include <caf/io/middleman.hpp>
#include <caf/openssl/manager.hpp>

#include "dspex/backoff.hpp"
#include "dspex/logging.hpp"
#include "api_support.hpp"
#include "node_actor.hpp"

namespace dspex::detail {

bool remote_directory::knows(const std::string& pool) const {
  std::lock_guard<std::mutex> guard{mtx_};
  for (const auto& n : nodes_)
    if (std::find(n.served.begin(), n.served.end(), pool) != n.served.end())
      return true;
  return false;
}

std::vector<std::string> remote_directory::pools() const {
  std::set<std::string> names;
  std::lock_guard<std::mutex> guard{mtx_};
  for (const auto& n : nodes_)
    names.insert(n.served.begin(), n.served.end());
  return {names.begin(), names.end()};
}

std::optional<pool_status> remote_directory::status(const std::string& pool) const {
  std::lock_guard<std::mutex> guard{mtx_};
  pool_status st;
  st.pool = pool;
  st.health = "unavailable";  // until a node that serves it is up
  bool known = false;
  for (const auto& n : nodes_) {
    if (std::find(n.served.begin(), n.served.end(), pool) != n.served.end())
      known = true;
    auto it = n.load.pools.find(pool);
    if (!n.up || it == n.load.pools.end())
      continue;
    const auto& l = it->second;
    st.size += l.size;
    st.idle += l.idle;
    st.busy += l.busy;
    st.queued += l.queued;
    st.nodes.push_back(n.address);
    // The best health of the nodes that serve it: one healthy node serves.
    if (l.health == "healthy" || (l.health == "degraded" && st.health != "healthy")
        || st.health == "unavailable")
      st.health = l.health;
  }
  if (!known)
    return std::nullopt;
  return st;
}

std::vector<remote_directory::node_view> remote_directory::nodes() const {
  std::lock_guard<std::mutex> guard{mtx_};
  return nodes_;
}

void remote_directory::replace(std::vector<node_view> nodes) {
  std::lock_guard<std::mutex> guard{mtx_};
  nodes_ = std::move(nodes);
}

} // namespace dspex::detail

namespace dspex::runtime_detail {

namespace {

using detail::remote_call;
using detail::remote_directory;

using connect_tick_atom = caf::atom_constant<caf::atom("remconn")>;  // (link index)
using poll_tick_atom = caf::atom_constant<caf::atom("rempoll")>;     // ()
using retry_tick_atom = caf::atom_constant<caf::atom("remretry")>;   // (call id)

// One node as the router sees it.
struct link {
  std::string address;  // "host:port"
  std::string host;
  std::uint16_t port = 0;
  node_handle handle;   // valid while up
  bool up = false;
  bool tried = false;   // a first attempt ended (for remote_ready_atom)
  std::size_t failures = 0;  // failed attempts since it was last up
  node_load load;
  std::set<std::string> served;
};

// One call on its way to a node.
struct pending {
  remote_call call;
  std::size_t attempts = 0;      // sent so far
  std::size_t max_attempts = 1;
  bool idempotent = false;
  std::size_t node = 0;          // the link of the current attempt
  std::string session_key;       // "pool\nsession" for a session's call, else empty
};

struct router_state {
  static inline const char* name = "dspex.remote_router";
  std::shared_ptr<const settings> config;
  std::shared_ptr<remote_directory> directory;
  std::shared_ptr<event_bus> events;
  std::vector<link> links;
  std::map<std::uint64_t, pending> calls;
  std::map<std::string, std::size_t> session_node;  // session key -> link
  std::vector<caf::response_promise> ready_waiters;
  std::uint64_t next_id = 1;
  std::size_t round_robin = 0;
  std::unique_ptr<backoff> reconnect;
  bool stopping = false;
};

using router_t = caf::stateful_actor<router_state>*;

// Margin on a remote request's own timeout: the node answers by the
// deadline it was given, so this only catches a partition.
constexpr auto network_margin = std::chrono::seconds{2};

void publish_directory(router_t self) {
  std::vector<remote_directory::node_view> view;
  for (const auto& l : self->state.links) {
    remote_directory::node_view v;
    v.address = l.address;
    v.up = l.up;
    if (l.up)
      v.load = l.load;
    v.served.assign(l.served.begin(), l.served.end());
    view.push_back(std::move(v));
  }
  self->state.directory->replace(std::move(view));
}

void deliver_ready_if_tried(router_t self) {
  auto& st = self->state;
  if (!std::all_of(st.links.begin(), st.links.end(), [](const link& l) { return l.tried; }))
    return;
  for (auto& rp : st.ready_waiters)
    rp.deliver(true);
  st.ready_waiters.clear();
}

error node_down_error(const std::string& pool, const std::string& node, const std::string& why) {
  nlohmann::json ctx{{"pool", pool}};
  if (!node.empty())
    ctx["node"] = node;
  return make_error(error_category::communication_error, "node_down", why, std::move(ctx));
}

void answer(router_t self, std::uint64_t id, outcome o) {
  auto it = self->state.calls.find(id);
  if (it == self->state.calls.end())
    return;
  // An ended session needs no node any more.
  if (it->second.call.request.op == node_op::end_session && !it->second.session_key.empty())
    self->state.session_node.erase(it->second.session_key);
  auto done = std::move(it->second.call.done);
  self->state.calls.erase(it);
  run_callback(done, std::move(o));
}

void send_attempt(router_t self, std::uint64_t id);

// The call's attempt failed because its node is gone: an idempotent call
// with attempts and time left goes to another node, any other fails.
void node_failed_call(router_t self, std::uint64_t id, const std::string& node,
                      const std::string& why) {
  auto it = self->state.calls.find(id);
  if (it == self->state.calls.end())
    return;
  auto& p = it->second;
  if (!p.session_key.empty())
    self->state.session_node.erase(p.session_key);
  auto now = std::chrono::steady_clock::now();
  if (p.idempotent && p.attempts < p.max_attempts && now < p.call.deadline
      && !self->state.stopping) {
    send_attempt(self, id);
    return;
  }
  answer(self, id, outcome::failure(node_down_error(p.call.request.pool, node, why)));
}

void schedule_connect(router_t self, std::size_t idx);

void link_lost(router_t self, std::size_t idx, const std::string& why) {
  auto& st = self->state;
  auto& l = st.links[idx];
  bool was_up = l.up;
  l.up = false;
  l.handle = nullptr;
  l.load = {};
  publish_directory(self);
  for (auto it = st.session_node.begin(); it != st.session_node.end();)
    it = it->second == idx ? st.session_node.erase(it) : std::next(it);
  std::vector<std::uint64_t> lost;
  for (auto& [id, p] : st.calls)
    if (p.node == idx && p.attempts > 0)
      lost.push_back(id);
  if (was_up)
    log().warn("node {} lost: {} ({} calls in flight)", l.address, why, lost.size());
  for (auto id : lost)
    node_failed_call(self, id, l.address, "node " + l.address + " was lost: " + why);
  if (!st.stopping)
    schedule_connect(self, idx);
}

// A load `link` published (its answer to node_load_atom), kept while the
// link is still the one that asked.
void apply_load(router_t self, std::size_t idx, const node_handle& asked, const std::string& text) {
  auto& link = self->state.links[idx];
  if (!link.up || link.handle != asked)
    return;
  auto load = decode_node_load(text);
  if (!load) {
    log().warn("node {} published a malformed load; ignored", link.address);
    return;
  }
  link.load = std::move(*load);
  for (auto& [name, _] : link.load.pools)
    link.served.insert(name);
  publish_directory(self);
}

void poll(router_t self, std::size_t idx) {
  auto& l = self->state.links[idx];
  if (!l.up)
    return;
  auto handle = l.handle;
  auto timeout = std::max<std::chrono::milliseconds>(self->state.config->remote.status_interval * 4,
                                                     std::chrono::seconds{1});
  self->request(handle, timeout, node_load_atom::value)
    .then(
      [=](std::string& text) { apply_load(self, idx, handle, text); },
      [=](caf::error&) {
        // A lost node is noticed by its down message; a slow one keeps its last load.
      });
}

void connect(router_t self, std::size_t idx) {
  auto& st = self->state;
  if (st.stopping)
    return;
  auto& l = st.links[idx];
  // With TLS configured, every connection goes through CAF's OpenSSL
  // manager: the node must present a certificate signed by node.tls.ca_file.
  auto mm = st.config->node.tls_enabled() ? self->system().openssl_manager().actor_handle()
                                          : self->system().middleman().actor_handle();
  self->request(mm, st.config->remote.connect_timeout, caf::connect_atom::value, l.host, l.port)
    .then(
      [=](const caf::node_id&, caf::strong_actor_ptr& ptr, const std::set<std::string>& ifs) {
        auto& st = self->state;
        auto& link = st.links[idx];
        link.tried = true;
        if (!ptr || ifs != self->system().message_types<node_handle>()) {
          log().error("{} is not a dspex node (no actor, or another interface); not used",
                      link.address);
          ++link.failures;
          schedule_connect(self, idx);
          deliver_ready_if_tried(self);
          return;
        }
        link.handle = caf::actor_cast<node_handle>(ptr);
        link.up = true;
        link.failures = 0;
        self->monitor(link.handle);
        st.events->publish([&] {
          event e;
          e.kind = event_kind::node_up;
          e.source = link.address;
          return e;
        }());
        // Routing waits for the node's first load: ask for it now.
        auto handle = link.handle;
        self->request(handle, st.config->remote.connect_timeout, node_load_atom::value)
          .then(
            [=](std::string& text) {
              apply_load(self, idx, handle, text);
              publish_directory(self);  // the node is up, whatever its load said
              deliver_ready_if_tried(self);
            },
            [=](caf::error&) {
              publish_directory(self);
              deliver_ready_if_tried(self);
            });
      },
      [=](caf::error& e) {
        auto& link = self->state.links[idx];
        link.tried = true;
        ++link.failures;
        if (link.failures == 1 || link.failures % 10 == 0)
          log().warn("node {} unreachable: {} (attempt {})", link.address,
                     self->system().render(e), link.failures);
        schedule_connect(self, idx);
        deliver_ready_if_tried(self);
      });
}

void schedule_connect(router_t self, std::size_t idx) {
  auto& st = self->state;
  auto& l = st.links[idx];
  auto delay = st.reconnect->delay(std::max<std::size_t>(l.failures, 1));
  st.events->publish([&] {
    event e;
    e.kind = event_kind::node_down;
    e.source = l.address;
    e.attempt = l.failures;
    e.delay = delay;
    e.reason = l.failures == 0 ? "lost" : "unreachable";
    return e;
  }());
  self->delayed_send(self, delay, connect_tick_atom::value, idx);
}

// The least loaded node that serves the call's pool now; a session's call
// goes to its session's node while that node is up.
std::optional<std::size_t> choose(router_t self, const pending& p) {
  auto& st = self->state;
  if (!p.session_key.empty()) {
    auto it = st.session_node.find(p.session_key);
    if (it != st.session_node.end() && st.links[it->second].up)
      return it->second;
  }
  std::optional<std::size_t> best;
  double best_load = std::numeric_limits<double>::max();
  auto n = st.links.size();
  for (std::size_t k = 0; k < n; ++k) {
    auto idx = (st.round_robin + k) % n;  // ties go round
    const auto& l = st.links[idx];
    auto it = l.load.pools.find(p.call.request.pool);
    if (!l.up || it == l.load.pools.end() || !it->second.serving())
      continue;
    if (it->second.load() < best_load) {
      best = idx;
      best_load = it->second.load();
    }
  }
  ++st.round_robin;
  return best;
}

void send_attempt(router_t self, std::uint64_t id) {
  auto& st = self->state;
  auto& p = st.calls.at(id);
  auto now = std::chrono::steady_clock::now();
  if (now >= p.call.deadline) {
    answer(self, id, outcome::failure(make_error(
                       error_category::timeout_error, "request_timeout",
                       "the call's deadline passed before a node could take it",
                       {{"pool", p.call.request.pool}, {"command", p.call.request.command}})));
    return;
  }
  auto chosen = choose(self, p);
  if (!chosen) {
    answer(self, id, outcome::failure(node_down_error(
                       p.call.request.pool, "",
                       "no node that serves pool '" + p.call.request.pool + "' is reachable")));
    return;
  }
  p.node = *chosen;
  ++p.attempts;
  if (!p.session_key.empty()) {
    // Bounded like the sessions themselves: sessions a node let expire are
    // never ended here, so beyond session.max_sessions some other key goes
    // (its session's next call may land on another node, as after a loss).
    if (!st.session_node.count(p.session_key)
        && st.session_node.size() >= st.config->session.max_sessions)
      st.session_node.erase(st.session_node.begin());
    st.session_node[p.session_key] = *chosen;
  }
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(p.call.deadline - now);
  p.call.request.timeout_ms = static_cast<std::uint64_t>(std::max<std::int64_t>(left.count(), 1));
  auto attempt = p.attempts;
  auto& l = st.links[*chosen];
  auto address = l.address;
  self->request(l.handle, left + network_margin, node_call_atom::value,
                encode_node_request(p.call.request))
    .then(
      [=](std::string& text) {
        auto it = self->state.calls.find(id);
        if (it == self->state.calls.end() || it->second.attempts != attempt)
          return;  // this attempt was already given up (its node was lost)
        answer(self, id, decode_node_reply(text, address));
      },
      [=](caf::error& e) {
        auto it = self->state.calls.find(id);
        if (it == self->state.calls.end() || it->second.attempts != attempt)
          return;
        if (e == caf::sec::request_timeout) {
          answer(self, id, outcome::failure(make_error(
                             error_category::timeout_error, "request_timeout",
                             "node " + address + " did not answer by the call's deadline",
                             {{"node", address}, {"pool", it->second.call.request.pool}})));
          return;
        }
        node_failed_call(self, id, address,
                         "node " + address + " failed the call: " + self->system().render(e));
      });
}

void fail_all(router_t self, const error& err) {
  auto& st = self->state;
  auto calls = std::move(st.calls);
  st.calls.clear();
  for (auto& [id, p] : calls)
    run_callback(p.call.done, outcome::failure(err));
  for (auto& rp : st.ready_waiters)
    rp.deliver(false);
  st.ready_waiters.clear();
}

caf::behavior router(router_t self, std::shared_ptr<const settings> config,
                     std::shared_ptr<remote_directory> directory,
                     std::shared_ptr<event_bus> events) {
  auto& st = self->state;
  st.config = config;
  st.directory = std::move(directory);
  st.events = std::move(events);
  backoff_config bc;
  bc.kind = backoff_kind::exponential;
  bc.base = config->remote.reconnect_base;
  bc.max_delay = config->remote.reconnect_max;
  bc.jitter = 0.2;
  st.reconnect = std::make_unique<backoff>(bc, std::random_device{}());
  for (const auto& address : config->remote.nodes) {
    link l;
    l.address = address;
    auto colon = address.rfind(':');
    l.host = address.substr(0, colon);
    if (l.host.size() > 2 && l.host.front() == '[' && l.host.back() == ']')
      l.host = l.host.substr(1, l.host.size() - 2);
    l.port = static_cast<std::uint16_t>(std::stoul(address.substr(colon + 1)));
    st.links.push_back(std::move(l));
  }
  publish_directory(self);
  for (std::size_t i = 0; i < st.links.size(); ++i)
    connect(self, i);
  self->delayed_send(self, config->remote.status_interval, poll_tick_atom::value);
  self->set_down_handler([=](caf::down_msg& dm) {
    auto& links = self->state.links;
    for (std::size_t i = 0; i < links.size(); ++i)
      if (links[i].up && links[i].handle.address() == dm.source)
        link_lost(self, i, self->system().render(dm.reason));
  });
  self->set_exit_handler([=](caf::exit_msg& em) {
    self->state.stopping = true;
    fail_all(self, make_error(error_category::resource_error, "pool_stopping",
                              "the runtime is stopping"));
    self->quit(em.reason);
  });
  return {
    [=](remote_call_atom, remote_call& c) {
      auto& st = self->state;
      if (st.stopping) {
        run_callback(c.done, outcome::failure(make_error(error_category::resource_error,
                                                         "pool_stopping", "the runtime is stopping")));
        return;
      }
      auto id = st.next_id++;
      pending p;
      p.idempotent = c.request.op != node_op::execute
                     || resolve_idempotent(c.request.command, c.request.idempotent);
      p.max_attempts = c.request.max_attempts ? static_cast<std::size_t>(*c.request.max_attempts)
                                              : st.config->retry.max_attempts;
      if (!c.request.session_id.empty())
        p.session_key = c.request.pool + "\n" + c.request.session_id;
      p.call = std::move(c);
      st.calls.emplace(id, std::move(p));
      send_attempt(self, id);
    },
    [=](remote_ready_atom) -> caf::result<bool> {
      auto rp = self->make_response_promise();
      self->state.ready_waiters.push_back(rp);
      deliver_ready_if_tried(self);
      return caf::delegated<bool>{};
    },
    [=](connect_tick_atom, std::size_t idx) {
      if (idx < self->state.links.size() && !self->state.links[idx].up)
        connect(self, idx);
    },
    [=](poll_tick_atom) {
      for (std::size_t i = 0; i < self->state.links.size(); ++i)
        poll(self, i);
      self->delayed_send(self, self->state.config->remote.status_interval, poll_tick_atom::value);
    },
  };
}

} // namespace

caf::actor spawn_remote_router(caf::actor_system& sys, std::shared_ptr<const settings> config,
                               std::shared_ptr<detail::remote_directory> directory,
                               std::shared_ptr<event_bus> events) {
  return sys.spawn(router, std::move(config), std::move(directory), std::move(events));
}

} // namespace dspex::runtime_detail
