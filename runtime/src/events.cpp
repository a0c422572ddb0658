#include "dspex/events.hpp"

#include <algorithm>
#include <array>

#include "dspex/logging.hpp"

namespace dspex {

namespace {

constexpr std::array<const char*, 15> kind_names = {
  "worker_transition", "worker_started",   "worker_ready",      "worker_start_failed",
  "worker_removed",    "worker_recycled",  "restart_scheduled", "health_check_failed",
  "pool_health_changed", "circuit_changed", "retry_scheduled",  "retry_gave_up",
  "supervisor",        "node_up",          "node_down",
};

bool routine(const event& e) {
  // A request's ready <-> busy moves: twice per call, so never above trace.
  return e.kind == event_kind::worker_transition
         && ((e.from == "ready" && e.to == "busy") || (e.from == "busy" && e.to == "ready"));
}

spdlog::level::level_enum level_of(const event& e) {
  if (routine(e))
    return spdlog::level::trace;
  switch (e.kind) {
    case event_kind::worker_start_failed:
    case event_kind::restart_scheduled:
    case event_kind::health_check_failed:
    case event_kind::retry_gave_up:
    case event_kind::node_down:
      return spdlog::level::warn;
    case event_kind::pool_health_changed:
      return e.to == "healthy" ? spdlog::level::info : spdlog::level::warn;
    case event_kind::circuit_changed:
      return e.to == "closed" ? spdlog::level::info : spdlog::level::warn;
    case event_kind::supervisor:
      // A supervisor's own view: giving up and a child that cannot start are
      // errors, a child that ended on its own a warning.
      if (e.to == "gave_up" || e.to == "child_start_failed")
        return spdlog::level::err;
      return e.to == "child_exited" ? spdlog::level::warn : spdlog::level::info;
    case event_kind::worker_transition:
    case event_kind::worker_started:
    case event_kind::worker_ready:
      return spdlog::level::debug;
    default:
      return spdlog::level::info;
  }
}

} // namespace

const char* to_string(event_kind k) noexcept {
  auto i = static_cast<std::size_t>(k);
  return i < kind_names.size() ? kind_names[i] : "unknown";
}

nlohmann::json event::to_json() const {
  nlohmann::json j{{"event", to_string(kind)}, {"source", source}};
  if (!pool.empty())
    j["pool"] = pool;
  if (!worker_id.empty())
    j["worker_id"] = worker_id;
  if (!from.empty())
    j["from"] = from;
  if (!to.empty())
    j["to"] = to;
  if (!reason.empty())
    j["reason"] = reason;
  if (attempt > 0)
    j["attempt"] = attempt;
  if (delay.count() > 0)
    j["delay_ms"] = delay.count();
  if (err)
    j["error"] = err->to_json();
  if (!fields.empty())
    j["fields"] = fields;
  return j;
}

std::string event::describe() const {
  std::string out = "event=";
  out += to_string(kind);
  if (!pool.empty())
    out += " pool=" + pool;
  out += " source=" + source;
  if (!worker_id.empty())
    out += " worker=" + worker_id;
  if (!from.empty())
    out += " from=" + from;
  if (!to.empty())
    out += " to=" + to;
  if (attempt > 0)
    out += " attempt=" + std::to_string(attempt);
  if (delay.count() > 0)
    out += " delay_ms=" + std::to_string(delay.count());
  if (!reason.empty())
    out += " reason=\"" + reason + "\"";
  if (err)
    out += " error=\"" + err->describe() + "\"";
  for (auto& [k, v] : fields.items())
    // Replace, never throw: a field may carry bytes a worker sent.
    out += " " + k + "="
           + (v.is_string() ? v.get<std::string>()
                            : v.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
  return out;
}

struct event_bus::subscription {
  std::uint64_t id = 0;
  handler fn;
  bool removed = false;  ///< unsubscribed: never called again
  std::size_t running = 0;  ///< calls in progress, on any thread
};

namespace {

// The subscriptions whose handler this thread is running (innermost last):
// an unsubscribe from inside a handler must not wait for its own call.
thread_local std::vector<const void*> running_here;

} // namespace

std::uint64_t event_bus::subscribe(handler h) {
  std::lock_guard<std::mutex> guard{mtx_};
  auto sub = std::make_shared<subscription>();
  sub->id = next_id_++;
  sub->fn = std::move(h);
  handlers_.push_back(sub);
  count_ = handlers_.size();
  return sub->id;
}

void event_bus::unsubscribe(std::uint64_t id) {
  std::unique_lock<std::mutex> lk{mtx_};
  auto it = std::find_if(handlers_.begin(), handlers_.end(),
                         [id](const auto& s) { return s->id == id; });
  if (it == handlers_.end())
    return;
  auto sub = *it;
  handlers_.erase(it);
  count_ = handlers_.size();
  sub->removed = true;
  // A publish that copied the list before this point may still be calling
  // it: wait for those calls, but not for this thread's own.
  auto own = static_cast<std::size_t>(
    std::count(running_here.begin(), running_here.end(), static_cast<const void*>(sub.get())));
  auto waited = std::chrono::seconds{0};
  while (!calls_done_.wait_for(lk, std::chrono::seconds{5}, [&] { return sub->running <= own; })) {
    waited += std::chrono::seconds{5};
    log().warn("event_bus: unsubscribe({}) has waited {} s for a handler that is still running",
               id, waited.count());
  }
}

bool event_bus::trace_enabled() noexcept {
  return log().should_log(spdlog::level::trace);
}

event_bus::event_bus(std::shared_ptr<event_bus> parent, std::string pool)
    : parent_(std::move(parent)), pool_(std::move(pool)) {
}

bool event_bus::has_subscribers() const noexcept {
  return count_.load(std::memory_order_relaxed) > 0 || (parent_ && parent_->has_subscribers());
}

void event_bus::publish(const event& e) {
  if (parent_) {
    // A pool's bus: its events name the pool; the runtime's bus logs them.
    if (e.pool.empty()) {
      auto stamped = e;
      stamped.pool = pool_;
      deliver(stamped);
      parent_->publish(stamped);
    } else {
      deliver(e);
      parent_->publish(e);
    }
    return;
  }
  auto level = level_of(e);
  if (log().should_log(level))
    log().log(level, "{}", e.describe());
  deliver(e);
}

void event_bus::deliver(const event& e) {
  if (count_.load(std::memory_order_relaxed) == 0)
    return;
  std::vector<std::shared_ptr<subscription>> copy;
  {
    std::lock_guard<std::mutex> guard{mtx_};
    copy = handlers_;
  }
  // Outside the lock: a handler may subscribe or unsubscribe. Each call is
  // counted, so that unsubscribe can wait for it.
  for (auto& sub : copy) {
    {
      std::lock_guard<std::mutex> guard{mtx_};
      if (sub->removed)
        continue;
      ++sub->running;
    }
    running_here.push_back(sub.get());
    try {
      sub->fn(e);
    } catch (const std::exception& ex) {
      log().error("an event subscriber threw: {}", ex.what());
    } catch (...) {
      log().error("an event subscriber threw");
    }
    running_here.pop_back();
    std::lock_guard<std::mutex> guard{mtx_};
    --sub->running;
    if (sub->removed)
      calls_done_.notify_all();
  }
}

} // namespace dspex
