#include "dspex/status.hpp"

namespace dspex {

namespace {

nlohmann::json to_json(const worker_info& w) {
  return {{"id", w.id},
          {"pid", w.pid},
          {"state", w.state},
          {"uptime_s", w.uptime_s},
          {"checkouts", w.stats.checkouts},
          {"successful_checkins", w.stats.successful_checkins},
          {"error_checkins", w.stats.error_checkins},
          {"last_activity_s", w.stats.last_activity_s}};
}

} // namespace

nlohmann::json pool_status::to_json() const {
  auto workers_json = nlohmann::json::array();
  for (auto& w : workers)
    workers_json.push_back(dspex::to_json(w));
  auto retired_json = nlohmann::json::array();
  for (auto& w : retired)
    retired_json.push_back(dspex::to_json(w));
  nlohmann::json j = {{"pool", pool}, {"size", size},         {"idle", idle},
          {"busy", busy},         {"starting", starting},
          {"leased", leased},     {"removing", removing},
          {"overflow", overflow},
          {"queued", queued},     {"replaced", replaced},
          {"start_failures", start_failures}, {"stopping", stopping},
          {"workers_started", workers_started}, {"removed_by_reason", removed_by_reason},
          {"health", health}, {"consecutive_start_failures", consecutive_start_failures},
          {"recycled", recycled}, {"health_check_failures", health_check_failures},
          {"circuit", circuit},
          {"affinity", {{"hits", affinity_hits}, {"misses", affinity_misses},
                        {"rebinds", affinity_rebinds}}},
          {"metrics", metrics.to_json()},
          {"workers", workers_json}, {"retired", retired_json}};
  if (!nodes.empty())
    j["nodes"] = nodes;
  if (last_start_failure)
    j["last_start_failure"] = last_start_failure->to_json();
  return j;
}

} // namespace dspex
