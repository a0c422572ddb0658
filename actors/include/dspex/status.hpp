// A pool's real status, as the pool actor sees it at the moment of the query.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <optional>

#include <nlohmann/json.hpp>

#include "dspex/error.hpp"
#include "dspex/pool_metrics.hpp"

namespace dspex {

/// Worker statistics, updated by one helper at every checkin (seed Fix 6).
struct worker_stats {
  std::uint64_t checkouts = 0;
  std::uint64_t successful_checkins = 0;
  std::uint64_t error_checkins = 0;
  double last_activity_s = 0;  ///< seconds since the last checkout or checkin
};

struct worker_info {
  std::string id;
  int pid = 0;                 ///< 0 while the process is not yet started
  std::string state;           ///< in the pool: starting, idle, busy, leased, checking, degraded, configuring, removing, stopping
  double uptime_s = 0;         ///< since the worker actor started
  worker_stats stats;
};

struct pool_status {
  std::string pool;            ///< the pool's name ("default" or a [pools.NAME])
  std::size_t size = 0;        ///< configured pool.size
  std::size_t idle = 0;
  std::size_t busy = 0;         ///< running a call or out under a lease
  std::size_t leased = 0;       ///< leases held by callers
  std::size_t removing = 0;     ///< removed or stopping, exit not yet seen
  std::size_t overflow = 0;     ///< overflow workers alive
  std::size_t starting = 0;
  std::size_t queued = 0;      ///< callers waiting for a worker
  std::uint64_t replaced = 0;  ///< workers removed and replaced so far
  std::uint64_t start_failures = 0;  ///< worker starts that failed so far
  std::uint64_t workers_started = 0;  ///< workers that started (and had the pool's setting) so far
  /// Workers removed so far, by the type of the error that removed them
  /// (worker_exited, request_timeout, recycled, overflow_retired, ...).
  std::map<std::string, std::uint64_t> removed_by_reason;
  bool stopping = false;
  /// healthy: serving as configured; degraded: a worker start failed lately
  /// (or fewer workers run than configured); broken: pool.broken_after
  /// starts failed in a row: callers fail fast with pool_unavailable.
  std::string health = "healthy";
  std::uint32_t consecutive_start_failures = 0;
  std::optional<error> last_start_failure;  ///< the newest start failure, until a start succeeds
  std::uint64_t recycled = 0;               ///< healthy workers replaced at a recycling limit
  std::uint64_t health_check_failures = 0;  ///< failed health pings so far
  std::string circuit = "closed";
  std::uint64_t affinity_hits = 0;     ///< session calls served by their preferred worker
  std::uint64_t affinity_misses = 0;   ///< ... by another worker while it lived (hint: it was busy)
  std::uint64_t affinity_rebinds = 0;  ///< ... by another worker because it was gone           ///< the circuit breaker in front of the pool (runtime::status)
  /// Queue wait, run and whole-call latency percentiles, calls in flight and
  /// utilisation, recorded on every call (see dspex/pool_metrics.hpp).
  pool_metrics_summary metrics;
  /// A remote pool (served by other runtimes, remote.nodes): the nodes that
  /// serve it now, "host:port"; its counts are their sums. Empty for a local pool.
  std::vector<std::string> nodes;
  std::vector<worker_info> workers;
  std::vector<worker_info> retired;  ///< the last removed workers (bounded), for summaries

  /// @returns every field as JSON (status output, dspex run, /v1/status).
  nlohmann::json to_json() const;
};

} // namespace dspex
