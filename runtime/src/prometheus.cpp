#include "dspex/prometheus.hpp"

#include <cmath>
#include <cstdio>

#include "dspex/json_limits.hpp"

namespace dspex {

namespace {

/// A label value as the format wants it: backslash, double quote and line
/// feed escaped; invalid UTF-8 replaced.
std::string escape_label(const std::string& value) {
  std::string out;
  for (char c : sanitize_utf8(value)) {
    if (c == '\\')
      out += "\\\\";
    else if (c == '"')
      out += "\\\"";
    else if (c == '\n')
      out += "\\n";
    else
      out += c;
  }
  return out;
}

std::string number(double v) {
  if (std::isnan(v))
    return "NaN";
  if (std::isinf(v))
    return v > 0 ? "+Inf" : "-Inf";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

class writer {
public:
  explicit writer(const std::string& pool) : pool_("pool=\"" + escape_label(pool) + "\"") {}

  void family(const char* name, const char* type, const char* help) {
    out_ += "# HELP ";
    out_ += name;
    out_ += ' ';
    out_ += help;
    out_ += "\n# TYPE ";
    out_ += name;
    out_ += ' ';
    out_ += type;
    out_ += '\n';
  }

  /// One sample; `labels` are extra name="escaped value" pairs.
  void sample(const std::string& name, const std::vector<std::pair<std::string, std::string>>& labels,
              const std::string& value) {
    out_ += name;
    out_ += '{';
    out_ += pool_;
    for (auto& [k, v] : labels)
      out_ += "," + k + "=\"" + escape_label(v) + "\"";
    out_ += "} ";
    out_ += value;
    out_ += '\n';
  }
  void sample(const std::string& name, double value) { sample(name, {}, number(value)); }
  void sample(const std::string& name, std::uint64_t value) {
    sample(name, {}, std::to_string(value));
  }

  void gauge(const char* name, const char* help, double value) {
    family(name, "gauge", help);
    sample(name, value);
  }
  void counter(const char* name, const char* help, std::uint64_t value) {
    family(name, "counter", help);
    sample(name, value);
  }

  void histogram(const char* name, const char* help, const histogram_snapshot& h) {
    family(name, "histogram", help);
    std::string base = name;
    for (std::size_t i = 0; i < h.bounds_seconds.size() && i < h.counts.size(); ++i)
      sample(base + "_bucket", {{"le", number(h.bounds_seconds[i])}}, std::to_string(h.counts[i]));
    auto all = h.counts.empty() ? 0 : h.counts.back();
    sample(base + "_bucket", {{"le", "+Inf"}}, std::to_string(all));
    sample(base + "_sum", h.sum_seconds);
    sample(base + "_count", all);
  }

  std::string take() { return std::move(out_); }

private:
  std::string pool_;
  std::string out_;
};

} // namespace

const std::vector<double>& latency_bucket_bounds() {
  static const std::vector<double> bounds{0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025,
                                          0.005,   0.01,   0.025,   0.05,   0.1,   0.25,
                                          0.5,     1,      2.5,     5,      10,    30,
                                          60};
  return bounds;
}

std::string render_prometheus(const metrics_snapshot& m) {
  writer w{m.pool};
  w.gauge("dspex_pool_size", "Workers the pool keeps (pool.size).", static_cast<double>(m.size));
  w.family("dspex_pool_workers", "gauge", "Workers of the pool by state.");
  for (auto& [state, n] : {std::pair<const char*, std::size_t>{"idle", m.idle},
                           {"busy", m.busy},
                           {"leased", m.leased},
                           {"starting", m.starting},
                           {"overflow", m.overflow}})
    w.sample("dspex_pool_workers", {{"state", state}}, std::to_string(n));
  w.gauge("dspex_pool_queued_calls", "Callers waiting for a worker.", static_cast<double>(m.queued));
  w.gauge("dspex_calls_in_flight", "Calls made and not yet answered.",
          static_cast<double>(m.in_flight));
  w.gauge("dspex_pool_utilisation_ratio",
          "Worker time spent on calls over pool.size times the time since start.", m.utilisation);
  w.family("dspex_circuit_state", "gauge", "The circuit breaker's state: 1 for the current one.");
  for (auto* state : {"closed", "open", "half_open"})
    w.sample("dspex_circuit_state", {{"state", state}}, m.circuit == state ? "1" : "0");
  w.family("dspex_pool_health", "gauge", "The pool's health: 1 for the current one.");
  for (auto* state : {"healthy", "degraded", "broken"})
    w.sample("dspex_pool_health", {{"state", state}}, m.health == state ? "1" : "0");
  w.gauge("dspex_sessions", "Live sessions.", static_cast<double>(m.sessions));

  w.counter("dspex_workers_started_total", "Workers that started and served.", m.workers_started);
  w.family("dspex_workers_removed_total", "counter", "Workers removed, by reason.");
  for (auto& [reason, n] : m.workers_removed)
    w.sample("dspex_workers_removed_total", {{"reason", reason}}, std::to_string(n));
  w.counter("dspex_workers_recycled_total", "Healthy workers replaced at a recycling limit.",
            m.workers_recycled);
  w.counter("dspex_worker_start_failures_total", "Worker starts that failed.",
            m.worker_start_failures);
  w.counter("dspex_health_check_failures_total", "Failed health pings.", m.health_check_failures);
  w.counter("dspex_pool_restarts_total", "Times the supervisor restarted the pool.",
            m.pool_restarts);
  w.family("dspex_calls_total", "counter", "Calls, by command and outcome (ok or the error's category).");
  for (auto& [key, n] : m.calls)
    w.sample("dspex_calls_total", {{"command", key.first}, {"outcome", key.second}},
             std::to_string(n));

  w.histogram("dspex_call_queue_wait_seconds", "From a call reaching the pool to a worker taking it.",
              m.queue_wait);
  w.histogram("dspex_call_run_seconds", "From a worker taking a call to the worker being free.",
              m.run);
  w.histogram("dspex_call_duration_seconds", "A whole call as its caller saw it, retries included.",
              m.total);
  return w.take();
}

std::string render_prometheus(const std::vector<metrics_snapshot>& pools) {
  // The format wants each family once (HELP, TYPE, then all its samples):
  // render every pool, then put each family's samples of all pools together.
  std::vector<std::string> order;                      // families, first seen first
  std::map<std::string, std::string> heads, samples;  // family -> its HELP+TYPE, its samples
  for (const auto& m : pools) {
    auto text = render_prometheus(m);
    std::string family;
    std::size_t pos = 0;
    while (pos < text.size()) {
      auto end = text.find('\n', pos);
      auto line = text.substr(pos, end - pos + 1);
      pos = end + 1;
      if (line.rfind("# HELP ", 0) == 0) {
        family = line.substr(7, line.find(' ', 7) - 7);
        if (!heads.count(family))
          order.push_back(family);
        heads[family] = line;
      } else if (line.rfind("# TYPE ", 0) == 0) {
        heads[family] = heads[family].substr(0, heads[family].find('\n') + 1) + line;
      } else {
        samples[family] += line;
      }
    }
  }
  std::string out;
  for (const auto& family : order)
    out += heads[family] + samples[family];
  return out;
}

} // namespace dspex
