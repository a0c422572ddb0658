#include "storm_run.hpp"

#include <csignal>

#include <algorithm>
#include <mutex>
#include <ostream>
#include <thread>

#include <fmt/format.h>

#include "dspex/proc_stats.hpp"
#include "dspex/runtime.hpp"

namespace dspex {

namespace {

using clock_type = std::chrono::steady_clock;

double ms_between(clock_type::time_point from, clock_type::time_point to) {
  return std::chrono::duration<double, std::milli>(to - from).count();
}

// Collects what the event stream says during the storm. The handler runs on
// runtime threads: it only counts and copies a few fields under a mutex.
struct event_log {
  std::mutex mtx;
  clock_type::time_point origin = clock_type::now();
  std::optional<clock_type::time_point> storm_end;
  std::map<std::string, std::size_t> counts;
  std::size_t restarts_after_storm = 0;
  std::chrono::milliseconds longest_restart_delay{0};
  std::vector<std::string> health_changes;
  std::vector<std::string> circuit_changes;

  void on(const event& e) {
    std::lock_guard<std::mutex> guard{mtx};
    ++counts[to_string(e.kind)];
    switch (e.kind) {
      case event_kind::restart_scheduled:
        longest_restart_delay = std::max(longest_restart_delay, e.delay);
        if (storm_end && e.at >= *storm_end)
          ++restarts_after_storm;
        break;
      case event_kind::pool_health_changed:
        health_changes.push_back(
          fmt::format("{}->{} at +{:.0f} ms", e.from, e.to, ms_between(origin, e.at)));
        break;
      case event_kind::circuit_changed:
        circuit_changes.push_back(
          fmt::format("{}->{} at +{:.0f} ms", e.from, e.to, ms_between(origin, e.at)));
        break;
      default:
        break;
    }
  }
};

} // namespace

bool at_full_size(const pool_status& st, const std::string& worker_script,
                  const std::set<int>& killed) {
  if (st.idle + st.busy < st.size || st.starting != 0 || st.removing != 0
      || st.workers.size() < st.size)
    return false;
  // A stopped process (SIGSTOP) runs nothing: it must have been replaced.
  return std::all_of(st.workers.begin(), st.workers.end(), [&](const worker_info& w) {
    return w.pid > 0 && killed.count(w.pid) == 0 && process_runs(w.pid, worker_script)
           && process_state_letter(w.pid) != std::optional<char>{'T'};
  });
}

storm_run_report run_storm(runtime& rt, const storm_run_options& opts, std::ostream& out,
                           std::ostream& progress) {
  storm_run_report report;
  event_log events;
  auto sub = rt.subscribe([&events](const event& e) { events.on(e); });

  crash_storm storm{rt, opts.storm};
  const auto script = storm.options().worker_script;
  auto workload = opts.workload;
  workload.min_duration = std::max(workload.min_duration,
                                   opts.storm.interval * static_cast<long>(opts.storm.cycles)
                                     + opts.workload_margin);

  // The recovery monitor: once the storm is over, the real status every
  // poll_interval until full size (or recovery_watch).
  std::set<int> monitor_pids;
  std::thread monitor([&] {
    while (!storm.wait_for(std::chrono::milliseconds{100})) {
    }
    const auto end = *storm.ended_at();
    {
      std::lock_guard<std::mutex> guard{events.mtx};
      events.storm_end = end;
    }
    std::set<int> killed;
    auto kills_done = storm.kills();
    for (auto& k : kills_done)
      killed.insert(k.pid);
    for (;;) {
      auto st = rt.status();
      ++report.status_polls;
      for (auto& w : st.workers)
        if (w.pid > 0)
          monitor_pids.insert(w.pid);
      auto now = clock_type::now();
      if (at_full_size(st, script, killed)) {
        report.full_size_ms = ms_between(end, now);
        if (!kills_done.empty())
          report.full_size_after_last_kill_ms = ms_between(kills_done.back().at, now);
        report.status_at_end = std::move(st);
        return;
      }
      if (now - end >= opts.recovery_watch) {
        report.status_at_end = std::move(st);
        return;
      }
      std::this_thread::sleep_for(opts.poll_interval);
    }
  });

  storm.start();
  try {
    report.workload = run_workload_detailed(rt, workload, out, progress);
  } catch (...) {
    storm.stop();  // ends the storm, so the monitor ends too
    monitor.join();
    rt.unsubscribe(sub);
    throw;
  }
  storm.wait();
  monitor.join();
  rt.unsubscribe(sub);

  report.kills = storm.kills();
  report.cycles_run = storm.cycles_run();
  report.short_cycles = storm.short_cycles();
  report.failed_kills = storm.failed_kills();
  report.live_per_cycle = storm.live_per_cycle();
  if (storm.started_at() && storm.ended_at())
    report.storm_ms = ms_between(*storm.started_at(), *storm.ended_at());
  report.worker_pids = storm.pids_seen();
  report.worker_pids.insert(monitor_pids.begin(), monitor_pids.end());
  for (auto& k : report.kills)
    report.worker_pids.insert(k.pid);
  for (auto& w : rt.status().workers)
    if (w.pid > 0)
      report.worker_pids.insert(w.pid);
  {
    std::lock_guard<std::mutex> guard{events.mtx};
    report.event_counts = events.counts;
    report.restarts_after_storm = events.restarts_after_storm;
    report.longest_restart_delay = events.longest_restart_delay;
    report.health_changes = events.health_changes;
    report.circuit_changes = events.circuit_changes;
  }
  return report;
}

std::vector<std::string> storm_violations(const storm_run_report& r,
                                          const storm_run_options& opts,
                                          const std::vector<pid_t>& python_left) {
  std::vector<std::string> v;
  if (r.workload.unstructured > 0)
    v.push_back(fmt::format("{} request(s) failed without a structured error",
                            r.workload.unstructured));
  if (!r.full_size_ms)
    v.push_back(fmt::format("the pool was not back at full size within {} ms after the storm",
                            opts.recovery_watch.count()));
  else if (*r.full_size_ms > static_cast<double>(opts.full_size_limit.count()))
    v.push_back(fmt::format("full size took {:.1f} ms after the storm (limit {} ms)",
                            *r.full_size_ms, opts.full_size_limit.count()));
  if (!python_left.empty())
    v.push_back(fmt::format("{} Python process(es) left after stop", python_left.size()));
  if (r.workload.programs_lost > 0)
    v.push_back(fmt::format("{} session program(s) lost", r.workload.programs_lost));
  if (r.kills.empty() && opts.storm.cycles > 0 && opts.storm.kills_per_cycle > 0)
    v.push_back("the storm killed no worker (no live worker pid found)");
  return v;
}

void print_storm_summary(const storm_run_report& r, const storm_run_options& opts,
                         const std::vector<pid_t>& python_left, std::ostream& out) {
  const auto& w = r.workload;
  out << "\n== crash storm ==\n";
  std::size_t stops = 0;
  std::map<std::string, std::size_t> by_state;
  for (auto& k : r.kills) {
    stops += k.signal == SIGSTOP ? 1 : 0;
    ++by_state[k.state];
  }
  out << fmt::format("{:<28}{} in {} cycles of {} ms, up to {} per cycle ({} short cycles, {} refused)\n",
                     "hits", r.kills.size(), r.cycles_run, opts.storm.interval.count(),
                     opts.storm.kills_per_cycle, r.short_cycles, r.failed_kills);
  out << fmt::format("{:<28}{} SIGKILL, {} SIGSTOP\n", "signals", r.kills.size() - stops, stops);
  std::string states;
  for (auto& [state, n] : by_state)
    states += fmt::format("{}{} {}", states.empty() ? "" : ", ", n, state);
  out << fmt::format("{:<28}{}\n", "workers hit while", states);
  out << fmt::format("{:<28}{:.0f} ms\n", "storm duration", r.storm_ms);
  std::string live;
  for (auto n : r.live_per_cycle)
    live += fmt::format("{}{}", live.empty() ? "" : " ", n);
  out << fmt::format("{:<28}{}\n", "live workers per cycle", live);
  out << fmt::format("{:<28}{}\n", "requests succeeded", w.ok);
  out << fmt::format("{:<28}{}\n", "requests failed", w.failed());
  for (auto& [key, n] : w.errors)
    out << fmt::format("  {:>6}  {}\n", n, key);
  out << fmt::format("{:<28}{}\n", "unstructured failures", w.unstructured);
  out << fmt::format("{:<28}{} in {} sessions\n", "session programs lost", w.programs_lost,
                     w.sessions);
  if (r.full_size_ms)
    out << fmt::format("{:<28}{:.1f} ms after the storm (limit {} ms){}\n", "time to full size",
                       *r.full_size_ms, opts.full_size_limit.count(),
                       r.full_size_after_last_kill_ms
                         ? fmt::format(", {:.1f} ms after the last kill",
                                       *r.full_size_after_last_kill_ms)
                         : std::string{});
  else
    out << fmt::format("{:<28}not reached within {} ms (idle {}, busy {}, starting {}, removing {}, "
                       "health {})\n",
                       "time to full size", opts.recovery_watch.count(), r.status_at_end.idle,
                       r.status_at_end.busy, r.status_at_end.starting, r.status_at_end.removing,
                       r.status_at_end.health);
  auto count = [&](const char* kind) {
    auto it = r.event_counts.find(kind);
    return it == r.event_counts.end() ? std::size_t{0} : it->second;
  };
  out << fmt::format("{:<28}{} removed, {} started, {} start failures, {} restarts delayed "
                     "({} after the storm, longest {} ms)\n",
                     "events", count("worker_removed"), count("worker_started"),
                     count("worker_start_failed"), count("restart_scheduled"),
                     r.restarts_after_storm, r.longest_restart_delay.count());
  auto join = [](const std::vector<std::string>& items) {
    std::string s;
    for (auto& i : items)
      s += (s.empty() ? "" : ", ") + i;
    return s.empty() ? std::string{"no change"} : s;
  };
  out << fmt::format("{:<28}{}\n", "pool health", join(r.health_changes));
  out << fmt::format("{:<28}{}\n", "circuit", join(r.circuit_changes));
  std::string pids;
  for (auto p : python_left)
    pids += fmt::format(" {}", p);
  out << fmt::format("{:<28}{}{}\n", "python processes left", python_left.size(),
                     python_left.empty() ? std::string{" (after stop)"} : " (after stop):" + pids);
  auto v = storm_violations(r, opts, python_left);
  if (v.empty()) {
    out << fmt::format("{:<28}PASS\n", "storm checks");
  } else {
    out << fmt::format("{:<28}FAIL\n", "storm checks");
    for (auto& s : v)
      out << "  - " << s << "\n";
  }
  out.flush();
}

} // namespace dspex
