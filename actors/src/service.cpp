#include "dspex/actors/service.hpp"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include <caf/all.hpp>

namespace dspex {

namespace {

// Locking rule of this file: no strong actor reference is ever released
// while one of our mutexes is held. Releasing the last reference destroys the
// actor, its destruction runs its attached functors, and ours take these
// mutexes. Likewise attach_functor is never called under a lock: on an actor
// that has already terminated it runs the functor at once.

// -- liveness ---------------------------------------------------------------------

// Attached to an actor for the duration of one is_alive call. CAF runs it at
// once from attach() when the actor has terminated (the check and the
// termination flag share the actor's lock), otherwise never: we detach it
// again right away. It is owned by the actor once attached, so the flag it
// sets lives in a shared_ptr.
class liveness_probe final : public caf::attachable {
public:
  static constexpr std::size_t token_type = 0x64737078;  // "dspx"; CAF's own types are 0..3

  explicit liveness_probe(std::shared_ptr<std::atomic<bool>> exited)
    : exited_(std::move(exited)) {
  }

  void actor_exited(const caf::error&, caf::execution_unit*) override {
    exited_->store(true);
  }

  bool matches(const token& what) override {
    return what.subtype == token_type && what.ptr == this;
  }

private:
  std::shared_ptr<std::atomic<bool>> exited_;
};

// -- CAF registry names -------------------------------------------------------------

// Serialises our get/erase/put sequences on the two names, so that a
// termination functor never erases a newer registration of the same name.
std::mutex& names_mutex() {
  static auto* m = new std::mutex;  // leaked: functors may run during static destruction
  return *m;
}

// Erases `key` if it names the actor `id` (any actor when id is 0).
bool erase_name(caf::actor_system& sys, caf::atom_value key, caf::actor_id id) {
  caf::strong_actor_ptr current;  // released after the lock (declared first)
  std::lock_guard<std::mutex> guard{names_mutex()};
  current = sys.registry().get(key);
  if (!current || (id != 0 && current->id() != id))
    return false;
  sys.registry().erase(key);
  return true;
}

bool register_name(caf::actor_system& sys, caf::atom_value key, const caf::actor& actor) {
  if (!actor || !is_alive(actor))
    return false;
  {
    caf::strong_actor_ptr previous;  // released after the lock (declared first)
    std::lock_guard<std::mutex> guard{names_mutex()};
    auto& reg = sys.registry();
    previous = reg.get(key);
    if (previous)
      reg.erase(key);  // CAF's put does not replace an existing entry
    reg.put(key, actor);
  }
  // On termination, erase the entry if it is still ours. It runs at once if
  // the actor terminated since the check above. The functor holds no strong
  // reference to the actor (that would keep it from ever being destroyed).
  // The system outlives the functor: an actor terminates before its system
  // is destroyed, and CAF joins the scheduler threads (where a terminating
  // actor runs its functors) before it destroys the registry.
  actor->attach_functor([sys = &sys, key, id = actor.id()] { erase_name(*sys, key, id); });
  return true;
}

// -- the fallback registry -------------------------------------------------------------

struct fallback_entry {
  service_kind kind = service_kind::pool;
  caf::weak_actor_ptr handle;  ///< weak: the registry never keeps an actor alive
  const void* system = nullptr; ///< identity of the actor's system, never dereferenced
  std::uint64_t seq = 0;        ///< registration order; also tells registrations apart
};

struct fallback_registry {
  std::mutex mtx;
  std::map<std::string, fallback_entry> entries;
  std::uint64_t next_seq = 1;
};

fallback_registry& fallback() {
  static auto* r = new fallback_registry;  // leaked: see names_mutex
  return *r;
}

// Erases `name` if it still is registration `seq`.
void erase_fallback(const std::string& name, std::uint64_t seq) {
  auto& fb = fallback();
  std::lock_guard<std::mutex> guard{fb.mtx};
  auto it = fb.entries.find(name);
  if (it != fb.entries.end() && it->second.seq == seq)
    fb.entries.erase(it);  // drops a weak reference only
}

service make_service(service_kind kind, caf::actor handle, std::string name, bool fallback) {
  service s;
  s.kind = kind;
  s.handle = std::move(handle);
  s.name = std::move(name);
  s.from_fallback = fallback;
  return s;
}

} // namespace

const char* to_string(service_kind k) noexcept {
  switch (k) {
    case service_kind::pool: return "pool";
    case service_kind::bridge: return "bridge";
  }
  return "unknown";
}

bool is_alive(const caf::actor& actor) {
  if (!actor)
    return false;
  auto exited = std::make_shared<std::atomic<bool>>(false);
  auto probe = std::make_unique<liveness_probe>(exited);
  const void* key = probe.get();
  auto* target = caf::actor_cast<caf::abstract_actor*>(actor);
  target->attach(std::move(probe));  // runs the probe at once if terminated
  if (exited->load())
    return false;
  // Alive when attached. Detach it (it is then destroyed); if the actor
  // terminated in between, its clean-up owns the probe and the flag is set
  // on its own.
  target->detach(caf::attachable::token{liveness_probe::token_type, key});
  return true;
}

detect_result detect_service(caf::actor_system& sys) {
  // 1. and 2.: the registered pool, then the registered bridge, if alive.
  if (auto pool = sys.registry().get<caf::actor>(pool_service_name); pool && is_alive(pool))
    return make_service(service_kind::pool, std::move(pool), "dspexpool", false);
  if (auto bridge = sys.registry().get<caf::actor>(bridge_service_name);
      bridge && is_alive(bridge))
    return make_service(service_kind::bridge, std::move(bridge), "dspexbrdg", false);
  // 3.: the fallback registry, pools first, each kind in registration order.
  std::vector<std::pair<std::string, fallback_entry>> candidates;
  {
    auto& fb = fallback();
    std::lock_guard<std::mutex> guard{fb.mtx};
    candidates.assign(fb.entries.begin(), fb.entries.end());
  }
  std::sort(candidates.begin(), candidates.end(),
            [](const auto& a, const auto& b) { return a.second.seq < b.second.seq; });
  std::vector<std::string> skipped;
  for (auto kind : {service_kind::pool, service_kind::bridge}) {
    for (auto& [name, e] : candidates) {
      if (e.kind != kind || e.system != &sys)
        continue;  // another actor system's actors cannot serve this one's callers
      auto handle = caf::actor_cast<caf::actor>(e.handle);  // null once destroyed
      if (handle && is_alive(handle))
        return make_service(kind, std::move(handle), name, true);
      skipped.push_back(name);
    }
  }
  nlohmann::json ctx{{"checked", {"dspexpool", "dspexbrdg"}}};
  if (!skipped.empty())
    ctx["dead_fallback_entries"] = skipped;
  return make_error(error_category::connection_error, "service_unavailable",
                    service_unavailable_message, std::move(ctx));
}

bool register_pool(caf::actor_system& sys, const caf::actor& pool) {
  return register_name(sys, pool_service_name, pool);
}

bool register_bridge(caf::actor_system& sys, const caf::actor& bridge) {
  return register_name(sys, bridge_service_name, bridge);
}

bool unregister_pool(caf::actor_system& sys, const caf::actor& pool) {
  return erase_name(sys, pool_service_name, pool ? pool.id() : 0);
}

bool unregister_bridge(caf::actor_system& sys, const caf::actor& bridge) {
  return erase_name(sys, bridge_service_name, bridge ? bridge.id() : 0);
}

bool register_service(const std::string& name, service_kind kind, const caf::actor& handle) {
  if (name.empty() || !handle || !is_alive(handle))
    return false;
  auto& fb = fallback();
  std::uint64_t seq = 0;
  {
    std::lock_guard<std::mutex> guard{fb.mtx};
    seq = fb.next_seq++;
    fb.entries[name] = fallback_entry{kind, caf::actor_cast<caf::weak_actor_ptr>(handle),
                                      &handle.home_system(), seq};
  }
  handle->attach_functor([name, seq] { erase_fallback(name, seq); });
  return true;
}

bool unregister_service(const std::string& name) {
  auto& fb = fallback();
  std::lock_guard<std::mutex> guard{fb.mtx};
  return fb.entries.erase(name) > 0;
}

void unregister_services(caf::actor_system& sys) {
  erase_name(sys, pool_service_name, 0);
  erase_name(sys, bridge_service_name, 0);
  auto& fb = fallback();
  std::lock_guard<std::mutex> guard{fb.mtx};
  for (auto it = fb.entries.begin(); it != fb.entries.end();)
    it = it->second.system == &sys ? fb.entries.erase(it) : std::next(it);
}

} // namespace dspex
