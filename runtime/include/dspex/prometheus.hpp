// The runtime's metrics in Prometheus' text exposition format (version
// 0.0.4): one function renders them, for the example service's /metrics and
// for `dspex metrics`. Names start with dspex_, carry their unit
// (_seconds), counters end in _total, latencies are histograms with
// cumulative buckets; every sample has the label pool="<name>".
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace dspex {

/// One latency histogram with fixed buckets.
struct histogram_snapshot {
  std::vector<double> bounds_seconds;  ///< the buckets' upper bounds, ascending (le)
  std::vector<std::uint64_t> counts;   ///< calls at or below each bound, then all (+Inf)
  double sum_seconds = 0;
};

/// Everything /metrics shows of one pool, read at one moment.
struct metrics_snapshot {
  std::string pool = "default";
  // gauges
  std::size_t size = 0;      ///< configured pool.size
  std::size_t idle = 0;
  std::size_t busy = 0;
  std::size_t leased = 0;
  std::size_t queued = 0;
  std::size_t starting = 0;
  std::size_t overflow = 0;
  std::int64_t in_flight = 0;
  double utilisation = 0;
  std::string circuit = "closed";  ///< closed, open or half_open
  std::string health = "healthy";  ///< healthy, degraded or broken
  std::size_t sessions = 0;        ///< live sessions
  // counters
  std::uint64_t workers_started = 0;
  std::map<std::string, std::uint64_t> workers_removed;  ///< by reason (the error's type)
  std::uint64_t workers_recycled = 0;
  std::uint64_t worker_start_failures = 0;
  std::uint64_t health_check_failures = 0;
  std::uint64_t pool_restarts = 0;  ///< the pool actor restarted by its supervisor
  std::map<std::pair<std::string, std::string>, std::uint64_t> calls;  ///< (command, outcome)
  // histograms
  histogram_snapshot queue_wait;
  histogram_snapshot run;
  histogram_snapshot total;
};

/// The bucket bounds of the latency histograms, in seconds (50 µs to 60 s).
const std::vector<double>& latency_bucket_bounds();

/// @returns the text exposition of `m`, every family with its # HELP and
///          # TYPE lines, label values escaped; ends with a newline.
std::string render_prometheus(const metrics_snapshot& m);

/// The exposition of several pools (a runtime's named pools): each family
/// once, with the samples of every pool (told apart by their pool label).
/// @param pools one snapshot per pool, in the order their samples appear
/// @returns the whole text, as render_prometheus of one pool formats it
std::string render_prometheus(const std::vector<metrics_snapshot>& pools);

} // namespace dspex
