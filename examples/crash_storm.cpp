#include "crash_storm.hpp"

#include <dirent.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cstdlib>
#include <memory>

#include "dspex/proc_stats.hpp"
#include "dspex/runtime.hpp"

namespace dspex {

namespace {

template <class F>
void for_each_pid(F&& f) {
  std::unique_ptr<DIR, int (*)(DIR*)> d(::opendir("/proc"), &::closedir);
  if (!d)
    return;
  while (auto* ent = ::readdir(d.get())) {
    char* end = nullptr;
    long n = std::strtol(ent->d_name, &end, 10);
    if (ent->d_name[0] != '\0' && *end == '\0' && n > 0)
      f(static_cast<pid_t>(n));
  }
}

} // namespace

bool process_runs(pid_t pid, const std::string& needle) {
  auto stat = read_process_stat(pid);
  if (!stat || stat->state == 'Z' || stat->state == 'X')
    return false;
  // NUL-separated arguments; a zombie's (or kernel thread's) is empty.
  auto cmdline = read_proc_file(pid, "cmdline").value_or("");
  std::replace(cmdline.begin(), cmdline.end(), '\0', ' ');
  return !cmdline.empty() && (needle.empty() || cmdline.find(needle) != std::string::npos);
}

std::vector<pid_t> python_processes_left(const std::string& worker_script,
                                         const std::set<int>& known_pids) {
  std::set<pid_t> left;
  const auto self = ::getpid();
  for_each_pid([&](pid_t pid) {
    auto stat = read_process_stat(pid);
    if (stat && stat->ppid == self)
      left.insert(pid);  // zombies count: not reaped is not gone
  });
  for (int pid : known_pids)
    if (pid != self && process_runs(pid, worker_script))
      left.insert(pid);
  return {left.begin(), left.end()};
}

crash_storm::crash_storm(runtime& rt, crash_storm_options opts)
  : rt_(rt), opts_(std::move(opts)), rng_(opts_.seed ? *opts_.seed : std::random_device{}()) {
  if (opts_.worker_script.empty())
    opts_.worker_script = rt_.config().worker.script;
}

crash_storm::~crash_storm() {
  stop();
}

void crash_storm::start() {
  std::lock_guard<std::mutex> guard{mtx_};
  if (thread_.joinable() || finished_)
    return;
  started_at_ = clock_type::now();
  thread_ = std::thread([this] { run(); });
}

void crash_storm::stop() {
  {
    std::lock_guard<std::mutex> guard{mtx_};
    stop_requested_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable() && thread_.get_id() != std::this_thread::get_id())
    thread_.join();
}

bool crash_storm::wait_for(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock{mtx_};
  return cv_.wait_for(lock, timeout, [this] { return finished_; });
}

void crash_storm::wait() {
  if (!thread_.joinable())
    return;  // never started, or already joined
  {
    std::unique_lock<std::mutex> lock{mtx_};
    cv_.wait(lock, [this] { return finished_; });
  }
  thread_.join();
}

void crash_storm::run() {
  const auto begin = clock_type::now();
  for (std::size_t cycle = 0; cycle < opts_.cycles; ++cycle) {
    {
      // The storm's cadence: cycle k starts at begin + k * interval; a stop
      // request ends the wait at once.
      std::unique_lock<std::mutex> lock{mtx_};
      if (cv_.wait_until(lock, begin + cycle * opts_.interval, [this] { return stop_requested_; }))
        break;
    }
    // The real status right before killing: pids of processes the pool
    // still owns (not yet reaped, so not reusable).
    auto st = rt_.status();
    struct candidate {
      int pid;
      std::string id;
      std::string state;
    };
    std::vector<candidate> live;
    std::vector<int> seen;
    for (auto& w : st.workers) {
      if (w.pid <= 0)
        continue;
      seen.push_back(w.pid);
      if (w.state == "removing" || w.state == "stopping")
        continue;
      if (!process_runs(w.pid, opts_.worker_script))
        continue;  // already dead (zombie), or not the worker any more
      live.push_back({w.pid, w.id, w.state});
    }
    std::shuffle(live.begin(), live.end(), rng_);
    auto n = std::min(opts_.kills_per_cycle, live.size());
    std::vector<crash_storm_kill> done;
    std::size_t refused = 0;
    const double stop_fraction = std::clamp(opts_.stop_fraction, 0.0, 1.0);
    for (std::size_t i = 0; i < n; ++i) {
      const auto stops_due = 1 + static_cast<std::size_t>(static_cast<double>(hits_) * stop_fraction + 1e-9);
      int sig = stop_fraction > 0 && stops_ < stops_due ? SIGSTOP : SIGKILL;
      if (::kill(live[i].pid, sig) != 0) {
        ++refused;
        continue;
      }
      ++hits_;
      stops_ += sig == SIGSTOP ? 1 : 0;
      done.push_back({cycle, live[i].pid, live[i].id, live[i].state, sig, clock_type::now()});
    }
    std::lock_guard<std::mutex> guard{mtx_};
    pids_seen_.insert(seen.begin(), seen.end());
    kills_.insert(kills_.end(), done.begin(), done.end());
    failed_kills_ += refused;
    if (live.size() < opts_.kills_per_cycle)
      ++short_cycles_;
    live_per_cycle_.push_back(live.size());
    ++cycles_run_;
  }
  {
    std::lock_guard<std::mutex> guard{mtx_};
    ended_at_ = clock_type::now();
    finished_ = true;
  }
  cv_.notify_all();
}

bool crash_storm::finished() const {
  std::lock_guard<std::mutex> guard{mtx_};
  return finished_;
}

std::vector<crash_storm_kill> crash_storm::kills() const {
  std::lock_guard<std::mutex> guard{mtx_};
  return kills_;
}

std::size_t crash_storm::cycles_run() const {
  std::lock_guard<std::mutex> guard{mtx_};
  return cycles_run_;
}

std::size_t crash_storm::short_cycles() const {
  std::lock_guard<std::mutex> guard{mtx_};
  return short_cycles_;
}

std::vector<std::size_t> crash_storm::live_per_cycle() const {
  std::lock_guard<std::mutex> guard{mtx_};
  return live_per_cycle_;
}

std::size_t crash_storm::failed_kills() const {
  std::lock_guard<std::mutex> guard{mtx_};
  return failed_kills_;
}

std::optional<crash_storm::clock_type::time_point> crash_storm::started_at() const {
  std::lock_guard<std::mutex> guard{mtx_};
  return started_at_;
}

std::optional<crash_storm::clock_type::time_point> crash_storm::ended_at() const {
  std::lock_guard<std::mutex> guard{mtx_};
  return ended_at_;
}

std::set<int> crash_storm::pids_seen() const {
  std::lock_guard<std::mutex> guard{mtx_};
  return pids_seen_;
}

} // namespace dspex
