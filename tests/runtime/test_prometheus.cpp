// The Prometheus text exposition (issue 12, item 3) against the format's
// rules (exposition format 0.0.4): names and labels, one HELP and TYPE per
// family before its samples, counters ending in _total, histograms with
// ascending cumulative buckets ending at +Inf equal to _count, label values
// escaped, a final newline. Also the call counts and the histogram buckets.
#include <algorithm>
#include <cmath>
#include <map>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include "dspex/call_counts.hpp"
#include "dspex/latency_histogram.hpp"
#include "dspex/prometheus.hpp"

using namespace dspex;

namespace {

struct sample {
  std::string name;
  std::map<std::string, std::string> labels;  // unescaped
  std::string value;
};

/// Parses one label set, "{a=\"x\",b=\"y\"}", undoing the escapes; false
/// when it breaks a rule (an unknown escape, a raw line feed, bad syntax).
bool parse_labels(const std::string& text, std::map<std::string, std::string>& out) {
  std::size_t i = 0;
  static const std::regex name_re{"[a-zA-Z_][a-zA-Z0-9_]*"};
  while (i < text.size()) {
    auto eq = text.find('=', i);
    if (eq == std::string::npos)
      return false;
    auto name = text.substr(i, eq - i);
    if (!std::regex_match(name, name_re) || name.rfind("__", 0) == 0)
      return false;
    if (eq + 1 >= text.size() || text[eq + 1] != '"')
      return false;
    std::string value;
    std::size_t j = eq + 2;
    for (; j < text.size() && text[j] != '"'; ++j) {
      if (text[j] == '\n')
        return false;
      if (text[j] == '\\') {
        if (++j >= text.size())
          return false;
        if (text[j] == 'n')
          value += '\n';
        else if (text[j] == '\\' || text[j] == '"')
          value += text[j];
        else
          return false;
      } else {
        value += text[j];
      }
    }
    if (j >= text.size())
      return false;
    if (out.count(name))
      return false;  // a label twice
    out[name] = value;
    i = j + 1;
    if (i < text.size()) {
      if (text[i] != ',')
        return false;
      ++i;
    }
  }
  return true;
}

/// Checks every rule; returns the problems found (empty: valid).
std::vector<std::string> check_exposition(const std::string& text, std::vector<sample>& samples) {
  std::vector<std::string> problems;
  if (text.empty() || text.back() != '\n')
    problems.push_back("does not end with a line feed");
  static const std::regex metric_re{"[a-zA-Z_:][a-zA-Z0-9_:]*"};
  std::map<std::string, std::string> types;  // family → type
  std::set<std::string> helped, with_samples;
  std::string current;  // the family whose samples may follow
  std::istringstream in{text};
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("# HELP ", 0) == 0 || line.rfind("# TYPE ", 0) == 0) {
      bool help = line[2] == 'H';
      auto rest = line.substr(7);
      auto sp = rest.find(' ');
      auto name = rest.substr(0, sp);
      if (!std::regex_match(name, metric_re))
        problems.push_back("bad family name: " + name);
      if (with_samples.count(name))
        problems.push_back(name + ": HELP/TYPE after its samples");
      if (help) {
        if (!helped.insert(name).second)
          problems.push_back(name + ": HELP twice");
      } else {
        auto type = sp == std::string::npos ? std::string{} : rest.substr(sp + 1);
        if (type != "counter" && type != "gauge" && type != "histogram")
          problems.push_back(name + ": bad type '" + type + "'");
        if (types.count(name))
          problems.push_back(name + ": TYPE twice");
        types[name] = type;
        if (type == "counter" && (name.size() < 6 || name.compare(name.size() - 6, 6, "_total") != 0))
          problems.push_back(name + ": a counter's name must end in _total");
      }
      current = name;
      continue;
    }
    if (line.empty() || line[0] == '#') {
      problems.push_back("unexpected line: '" + line + "'");
      continue;
    }
    sample s;
    auto brace = line.find('{');
    auto space = line.rfind(' ');
    if (brace == std::string::npos || space == std::string::npos || space < brace) {
      problems.push_back("a sample without labels or value: " + line);
      continue;
    }
    s.name = line.substr(0, brace);
    auto close = line.rfind('}', space);
    if (close == std::string::npos || !parse_labels(line.substr(brace + 1, close - brace - 1), s.labels))
      problems.push_back("bad labels: " + line);
    s.value = line.substr(space + 1);
    if (!std::regex_match(s.name, metric_re))
      problems.push_back("bad sample name: " + s.name);
    // Its family: the name itself, or a histogram's with a suffix.
    std::string family = s.name;
    for (auto* suffix : {"_bucket", "_sum", "_count"}) {
      std::string suf = suffix;
      if (s.name.size() > suf.size() && s.name.compare(s.name.size() - suf.size(), suf.size(), suf) == 0
          && types.count(s.name.substr(0, s.name.size() - suf.size()))
          && types[s.name.substr(0, s.name.size() - suf.size())] == "histogram")
        family = s.name.substr(0, s.name.size() - suf.size());
    }
    if (family != current)
      problems.push_back(s.name + ": not under its family's HELP/TYPE");
    if (!types.count(family))
      problems.push_back(s.name + ": no TYPE");
    with_samples.insert(family);
    if (s.value != "+Inf" && s.value != "-Inf" && s.value != "NaN") {
      try {
        std::size_t used = 0;
        (void)std::stod(s.value, &used);
        if (used != s.value.size())
          problems.push_back(s.name + ": bad value " + s.value);
      } catch (...) {
        problems.push_back(s.name + ": bad value " + s.value);
      }
    }
    samples.push_back(std::move(s));
  }
  for (auto& [name, type] : types)
    if (!helped.count(name))
      problems.push_back(name + ": no HELP");
  // Histograms: per label set (but le), ascending le ending at +Inf,
  // non-decreasing counts, +Inf == _count, a _sum.
  for (auto& [name, type] : types) {
    if (type != "histogram")
      continue;
    std::vector<std::pair<double, double>> buckets;
    double count = -1;
    bool sum = false;
    for (auto& s : samples) {
      if (s.name == name + "_bucket") {
        auto le = s.labels["le"];
        buckets.emplace_back(le == "+Inf" ? INFINITY : std::stod(le), std::stod(s.value));
      } else if (s.name == name + "_count") {
        count = std::stod(s.value);
      } else if (s.name == name + "_sum") {
        sum = true;
      }
    }
    if (buckets.empty() || !std::isinf(buckets.back().first))
      problems.push_back(name + ": no +Inf bucket last");
    for (std::size_t i = 1; i < buckets.size(); ++i) {
      if (!(buckets[i].first > buckets[i - 1].first))
        problems.push_back(name + ": le not ascending");
      if (buckets[i].second < buckets[i - 1].second)
        problems.push_back(name + ": counts not cumulative");
    }
    if (!buckets.empty() && buckets.back().second != count)
      problems.push_back(name + ": +Inf bucket != _count");
    if (!sum)
      problems.push_back(name + ": no _sum");
  }
  return problems;
}

metrics_snapshot sample_snapshot() {
  metrics_snapshot m;
  m.pool = "default";
  m.size = 4;
  m.idle = 3;
  m.busy = 1;
  m.queued = 2;
  m.in_flight = 3;
  m.utilisation = 0.25;
  m.circuit = "half_open";
  m.health = "degraded";
  m.sessions = 7;
  m.workers_started = 6;
  m.workers_removed = {{"worker_exited", 2}, {"recycled", 1}};
  m.pool_restarts = 1;
  // A careless caller's commands: quotes, backslashes, a line feed, UTF-8.
  m.calls = {{{"ping", "ok"}, 10},
             {{"ping", "timeout_error"}, 1},
             {{"say \"hi\"\\now\nbye", "python_error"}, 2},
             {{"caf\xc3\xa9", "ok"}, 1}};
  latency_histogram h;
  for (int us : {40, 90, 120, 800, 3000, 70000})
    h.record(std::chrono::microseconds{us});
  const auto& bounds = latency_bucket_bounds();
  std::vector<std::uint64_t> ns;
  for (auto b : bounds)
    ns.push_back(static_cast<std::uint64_t>(std::llround(b * 1e9)));
  m.total = {bounds, h.counts_at_or_below(ns), static_cast<double>(h.sum_ns()) / 1e9};
  m.queue_wait = {bounds, std::vector<std::uint64_t>(bounds.size() + 1, 0), 0};
  m.run = m.total;
  return m;
}

} // namespace

TEST_CASE("the exposition follows the text format's rules") {
  auto text = render_prometheus(sample_snapshot());
  std::vector<sample> samples;
  auto problems = check_exposition(text, samples);
  for (auto& p : problems)
    FAIL_CHECK(p);
  CAPTURE(text);
  // Every sample names its pool; the hostile command came back as it was.
  for (auto& s : samples)
    CHECK(s.labels["pool"] == "default");
  bool hostile = false, utf8 = false;
  for (auto& s : samples) {
    hostile = hostile || (s.name == "dspex_calls_total" && s.labels["command"] == "say \"hi\"\\now\nbye");
    utf8 = utf8 || (s.name == "dspex_calls_total" && s.labels["command"] == "caf\xc3\xa9");
  }
  CHECK(hostile);
  CHECK(utf8);
  // The families a reader looks for, with their units and kinds.
  for (auto* family : {"# TYPE dspex_calls_total counter", "# TYPE dspex_call_duration_seconds histogram",
                       "# TYPE dspex_call_queue_wait_seconds histogram", "# TYPE dspex_call_run_seconds histogram",
                       "# TYPE dspex_pool_workers gauge", "# TYPE dspex_pool_queued_calls gauge",
                       "# TYPE dspex_workers_started_total counter", "# TYPE dspex_workers_removed_total counter",
                       "# TYPE dspex_workers_recycled_total counter", "# TYPE dspex_pool_restarts_total counter",
                       "# TYPE dspex_circuit_state gauge", "# TYPE dspex_sessions gauge"})
    CHECK(text.find(family) != std::string::npos);
  CHECK(text.find("dspex_circuit_state{pool=\"default\",state=\"half_open\"} 1\n") != std::string::npos);
  CHECK(text.find("dspex_circuit_state{pool=\"default\",state=\"closed\"} 0\n") != std::string::npos);
  CHECK(text.find("dspex_workers_removed_total{pool=\"default\",reason=\"worker_exited\"} 2\n")
        != std::string::npos);
}

TEST_CASE("the checker itself refuses what breaks the rules") {
  auto valid = [](const std::string& text) {
    std::vector<sample> s;
    return check_exposition(text, s).empty();
  };
  CHECK_FALSE(valid("# HELP a_total x\n# TYPE a_total counter\na_total{pool=\"p\"} 1"));  // no final LF
  CHECK_FALSE(valid("# HELP a x\n# TYPE a counter\na{pool=\"p\"} 1\n"));  // counter without _total
  CHECK_FALSE(valid("# HELP a_total x\n# TYPE a_total counter\na_total{pool=\"p\nq\"} 1\n"));  // raw LF
  CHECK_FALSE(valid("# HELP h x\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\n"
                    "h_sum{} 1\nh_count{} 1\n"));  // not cumulative
  CHECK_FALSE(valid("# HELP h x\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum{} 1\nh_count{} 1\n"));  // no +Inf
  CHECK_FALSE(valid("# TYPE g gauge\ng{} 1\n"));  // no HELP
  CHECK(valid("# HELP h x\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\n"
              "h_sum{} 1.5\nh_count{} 2\n"));
}

TEST_CASE("histogram buckets never count a value above their bound") {
  latency_histogram h;
  h.record(std::chrono::microseconds{100});   // exactly a bound
  h.record(std::chrono::microseconds{101});   // just above it
  h.record(std::chrono::milliseconds{2});
  auto counts = h.counts_at_or_below({50'000, 100'000, 250'000, 1'000'000, 5'000'000});
  REQUIRE(counts.size() == 6);
  CHECK(counts[0] == 0);
  CHECK(counts[1] <= 1);           // 100 µs sits in a log bucket that may reach past the bound
  CHECK(counts[2] == 2);
  CHECK(counts[3] == 2);
  CHECK(counts[4] == 3);
  CHECK(counts[5] == 3);           // +Inf: everything
  CHECK(h.count() == 3);
}

TEST_CASE("calls are counted by command and outcome, at most max_commands names") {
  call_counts c;
  c.count("ping", outcome::success(nullptr));
  c.count("ping", outcome::success(nullptr));
  c.count("ping", outcome::failure(make_error(error_category::timeout_error, "request_timeout", "")));
  auto snap = c.snapshot();
  CHECK(snap[{"ping", "ok"}] == 2);
  CHECK(snap[{"ping", "timeout_error"}] == 1);
  for (std::size_t i = 0; i < call_counts::max_commands + 10; ++i)
    c.count("cmd" + std::to_string(i), outcome::success(nullptr));
  c.count("\xff\xfe", outcome::success(nullptr));
  snap = c.snapshot();
  std::set<std::string> names;
  for (auto& [key, n] : snap)
    names.insert(key.first);
  CHECK(names.size() <= call_counts::max_commands + 1);
  CHECK(names.count("other") == 1);
  CHECK(snap[{"other", "ok"}] >= 11);  // the 10 over the cap and the invalid name
}
