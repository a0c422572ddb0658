// The benchmark (bench.hpp; `bench_pool` and `dspex bench`): the same
// Python worker driven, in one benchmark run,
//   (a) by a raw C++ pipe loop with no actors (the floor),
//   (b) by the Elixir design this project rebuilds, NimblePool + Erlang ports
//       (../shared/anchor/run.sh), when Elixir is present, and
//   (c) through the pool's public API (dspex::runtime),
// so every ratio of ARCHITECTURE.md "Performance targets" is computed from
// figures measured in this run, never from remembered constants.
//
//   bench_pool | dspex bench [--iterations=N] [--python=PATH] [--scheduler=sharing|stealing]
//                            [--callers=N] [--anchor] [--anchor-script=PATH] [--quick]
//
// Not a ctest test: run it by hand. Every child is reaped and the runtime is
// stopped before exit.

#include <dirent.h>
#include <malloc.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <fstream>
#include <sstream>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <variant>
#include <vector>

#include <nlohmann/json.hpp>

#include "dspex/envelope.hpp"
#include "dspex/framing.hpp"
#include "dspex/latency.hpp"
#include "dspex/latency_histogram.hpp"
#include "dspex/runtime.hpp"
#include "dspex/settings.hpp"
#include "bench.hpp"
#include "blocking_io.hpp"
#include "network_floor.hpp"

#ifndef DSPEX_BENCH_WORKER_SCRIPT
#error "DSPEX_BENCH_WORKER_SCRIPT must be defined by the build"
#endif

namespace {

using clock_type = std::chrono::steady_clock;
using dspex::bench::read_exact;
using dspex::bench::write_all;
using nanos = std::chrono::nanoseconds;

/// Told of every row measured (dspex bench draws its progress from it).
dspex::bench::progress_fn on_row;

// Issue 11's targets ("Done when").
constexpr double target_seq_p50_vs_raw = 1.15;
constexpr double target_blocking_vs_anchor = 1.5;
constexpr double target_async_vs_raw = 0.8;
constexpr double target_session_vs_anonymous = 1.2;
constexpr double target_payload_vs_raw = 1.2;
constexpr double target_remote_vs_local = 2.0;   // issue 13: a remote call on loopback plaintext
constexpr double target_p99_vs_p50 = 3.0;
constexpr double target_kib_per_worker = 64.0;

// ----------------------------------------------------------------- options

struct options {
  std::size_t sequential = 20000;
  std::size_t concurrent = 40000;
  std::size_t warmup = 2000;
  std::size_t callers = 16;
  std::string python;
  std::string scheduler = "sharing";
  std::size_t max_threads = 0;  ///< scheduler.max-threads; 0 = CAF's default
  bool quick = false;
  bool anchor_required = false;  ///< --anchor: run the anchor or fail
  std::string anchor_script = DSPEX_BENCH_ANCHOR_SCRIPT;
};

[[noreturn]] void usage(const char* argv0, const std::string& problem) {
  std::fprintf(stderr,
               "%s\nusage: %s [--iterations=N] [--python=PATH] [--scheduler=sharing|stealing]\n"
               "          [--max-threads=N] [--callers=N] [--anchor] [--anchor-script=PATH]\n"
               "          [--quick]\n"
               "  --iterations=N  sequential round trips (default 20000); the concurrent\n"
               "                  runs use 2N (default 40000)\n"
               "  --python=PATH   interpreter (default /usr/bin/python3, else python3 in PATH)\n"
               "  --scheduler=P   CAF scheduler policy of the runtime (default sharing)\n"
               "  --max-threads=N scheduler.max-threads of the runtime (default 0: CAF's own\n"
               "                  default, max(4, cores) in CAF 0.17)\n"
               "  --callers=N     concurrent callers of the pool (default 16)\n"
               "  --anchor        run the NimblePool anchor or fail (it installs Elixir when\n"
               "                  missing, as root); without it, the anchor runs only when\n"
               "                  `elixir` is in PATH, else its rows say it was skipped\n"
               "  --anchor-script=PATH  the anchor's run.sh (default ../shared/anchor/run.sh)\n"
               "  --quick         small counts, for a smoke run\n",
               problem.c_str(), argv0);
  std::exit(2);
}

std::size_t parse_count(const char* argv0, const std::string& key, const std::string& text) {
  try {
    std::size_t used = 0;
    auto v = std::stoull(text, &used);
    if (used != text.size() || v == 0)
      throw std::invalid_argument(text);
    return static_cast<std::size_t>(v);
  } catch (const std::exception&) {
    usage(argv0, key + " needs a positive integer (got '" + text + "')");
  }
}

options parse_options(int argc, char** argv) {
  options o;
  std::optional<std::size_t> iterations;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value_of = [&](const std::string& key) -> std::optional<std::string> {
      if (a.rfind(key + "=", 0) == 0)
        return a.substr(key.size() + 1);
      return std::nullopt;
    };
    if (a == "--quick") {
      o.quick = true;
    } else if (a == "--anchor") {
      o.anchor_required = true;
    } else if (auto v = value_of("--anchor-script")) {
      o.anchor_script = *v;
    } else if (auto v = value_of("--iterations")) {
      iterations = parse_count(argv[0], "--iterations", *v);
    } else if (auto v = value_of("--callers")) {
      o.callers = parse_count(argv[0], "--callers", *v);
    } else if (auto v = value_of("--max-threads")) {
      o.max_threads = parse_count(argv[0], "--max-threads", *v);
    } else if (auto v = value_of("--python")) {
      o.python = *v;
    } else if (auto v = value_of("--scheduler")) {
      if (*v != "sharing" && *v != "stealing")
        usage(argv[0], "--scheduler must be sharing or stealing (got '" + *v + "')");
      o.scheduler = *v;
    } else if (a == "--help" || a == "-h") {
      usage(argv[0], "bench_pool: raw pipe loop vs. dspex::runtime, same Python worker");
    } else {
      usage(argv[0], "unknown option '" + a + "'");
    }
  }
  if (o.quick) {
    o.sequential = 500;
    o.concurrent = 2000;
    o.warmup = 100;
  }
  if (iterations) {
    o.sequential = *iterations;
    o.concurrent = 2 * *iterations;
    o.warmup = std::min<std::size_t>(o.warmup, std::max<std::size_t>(*iterations / 10, 10));
  }
  if (o.python.empty()) {
    // The system interpreter starts fast; version-manager shims do not.
    o.python = ::access("/usr/bin/python3", X_OK) == 0 ? "/usr/bin/python3"
                                                       : dspex::find_executable("python3");
    if (o.python.empty())
      usage(argv[0], "no python3 found; pass --python=PATH");
  } else if (dspex::find_executable(o.python).empty()) {
    usage(argv[0], "--python: '" + o.python + "' not found or not executable");
  }
  if (o.python.find('/') == std::string::npos)
    o.python = dspex::find_executable(o.python);
  return o;
}

// ----------------------------------------------------------------- machine

std::string read_first_line(const char* path) {
  std::ifstream in{path};
  std::string line;
  std::getline(in, line);
  return line;
}

std::string cpu_model() {
  std::ifstream in{"/proc/cpuinfo"};
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) {
      auto colon = line.find(':');
      if (colon != std::string::npos) {
        auto v = line.substr(colon + 1);
        v.erase(0, v.find_first_not_of(" \t"));
        return v;
      }
    }
  }
  return "unknown";
}

// CPU used by other processes while a phase runs: the machine is shared (other
// builds and tests), so every row says how much of the 2 cores it really had.
double busy_seconds_total() {
  std::ifstream in{"/proc/stat"};
  std::string cpu;
  unsigned long long user = 0, nice = 0, system = 0, idle = 0, iowait = 0, irq = 0, softirq = 0,
                     steal = 0;
  in >> cpu >> user >> nice >> system >> idle >> iowait >> irq >> softirq >> steal;
  return static_cast<double>(user + nice + system + irq + softirq + steal)
         / static_cast<double>(::sysconf(_SC_CLK_TCK));
}

double process_cpu_seconds(const std::string& stat_path) {
  std::ifstream in{stat_path};
  std::string text;
  std::getline(in, text);
  auto close = text.rfind(')');
  if (close == std::string::npos)
    return 0;
  std::istringstream rest{text.substr(close + 2)};
  std::string field;
  unsigned long long utime = 0, stime = 0;
  // After "pid (comm) ": state is field 3; utime and stime are fields 14 and 15.
  for (int i = 3; i <= 15 && rest >> field; ++i) {
    if (i == 14)
      utime = std::stoull(field);
    if (i == 15)
      stime = std::stoull(field);
  }
  return static_cast<double>(utime + stime) / static_cast<double>(::sysconf(_SC_CLK_TCK));
}

class cpu_probe {
public:
  explicit cpu_probe(std::vector<pid_t> children) : children_(std::move(children)) {
    busy0_ = busy_seconds_total();
    own0_ = own_seconds();
    self0_ = self_seconds();
    workers0_ = workers_seconds();
    t0_ = std::chrono::steady_clock::now();
  }
  /// CPU seconds since construction: this process (the runtime or the raw
  /// loop, and the callers), and the workers.
  std::pair<double, double> own_split() const {
    return {self_seconds() - self0_, workers_seconds() - workers0_};
  }
  /// Average number of cores busy with other processes since construction.
  double foreign_cores() const {
    auto wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
    auto foreign = (busy_seconds_total() - busy0_) - (own_seconds() - own0_);
    return wall > 0 ? std::max(0.0, foreign / wall) : 0;
  }

private:
  /// This process, in µs (getrusage), not clock ticks: a row's calls cost a few µs each.
  static double self_seconds() {
    rusage ru{};
    ::getrusage(RUSAGE_SELF, &ru);
    auto sec = [](const timeval& t) { return static_cast<double>(t.tv_sec) + t.tv_usec / 1e6; };
    return sec(ru.ru_utime) + sec(ru.ru_stime);
  }
  double workers_seconds() const {
    double total = 0;
    for (auto pid : children_)
      total += process_cpu_seconds("/proc/" + std::to_string(pid) + "/stat");
    return total;
  }
  double own_seconds() const { return process_cpu_seconds("/proc/self/stat") + workers_seconds(); }
  std::vector<pid_t> children_;
  double busy0_ = 0, own0_ = 0, self0_ = 0, workers0_ = 0;
  std::chrono::steady_clock::time_point t0_;
};

void print_machine(const options& o) {
  struct utsname u {};
  ::uname(&u);
  std::printf("machine : nproc=%ld, cpu=%s\n", ::sysconf(_SC_NPROCESSORS_ONLN),
              cpu_model().c_str());
  std::printf("kernel  : %s %s %s\n", u.sysname, u.release, u.machine);
  std::printf("loadavg : %s (at start)\n", read_first_line("/proc/loadavg").c_str());
  std::printf("python  : %s\n", o.python.c_str());
  std::printf("worker  : %s\n", DSPEX_BENCH_WORKER_SCRIPT);
  if (o.max_threads == 0)
    std::printf("policy  : scheduler.policy=%s, scheduler.max-threads=0 (dspex default: half the cores, at least 1)\n",
                o.scheduler.c_str());
  else
    std::printf("policy  : scheduler.policy=%s, scheduler.max-threads=%zu\n", o.scheduler.c_str(),
                o.max_threads);
  std::printf("counts  : sequential=%zu, concurrent=%zu, warm-up=%zu, callers=%zu%s\n\n",
              o.sequential, o.concurrent, o.warmup, o.callers, o.quick ? " (--quick)" : "");
  std::fflush(stdout);
}

// ----------------------------------------------------------------- raw worker

/// One worker process with two pipes, driven with blocking syscalls.
class raw_worker {
public:
  raw_worker(const std::string& python, const std::string& id) : id_(id) {
    int to_child[2];
    int from_child[2];
    int exec_err[2];
    if (::pipe2(to_child, O_CLOEXEC) != 0 || ::pipe2(from_child, O_CLOEXEC) != 0
        || ::pipe2(exec_err, O_CLOEXEC) != 0)
      throw std::runtime_error(std::string{"pipe2: "} + std::strerror(errno));
    std::string script = DSPEX_BENCH_WORKER_SCRIPT;
    // --test-commands: `echo` for the payload rows (the pool runs with it too).
    std::vector<std::string> args{python,        script, "--mode", "pool-worker", "--worker-id",
                                  id,            "--test-commands"};
    std::vector<char*> argv;
    for (auto& a : args)
      argv.push_back(a.data());
    argv.push_back(nullptr);
    pid_ = ::fork();
    if (pid_ < 0)
      throw std::runtime_error(std::string{"fork: "} + std::strerror(errno));
    if (pid_ == 0) {
      // Child: only async-signal-safe calls until exec.
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      ::signal(SIGPIPE, SIG_DFL);
      int devnull = ::open("/dev/null", O_WRONLY);
      if (::dup2(to_child[0], 0) < 0 || ::dup2(from_child[1], 1) < 0
          || (devnull >= 0 && ::dup2(devnull, 2) < 0)) {
        int e = errno;
        (void)!::write(exec_err[1], &e, sizeof e);
        ::_exit(127);
      }
      ::execv(argv[0], argv.data());
      int e = errno;
      (void)!::write(exec_err[1], &e, sizeof e);
      ::_exit(127);
    }
    ::close(to_child[0]);
    ::close(from_child[1]);
    ::close(exec_err[1]);
    in_ = to_child[1];
    out_ = from_child[0];
    int e = 0;
    ssize_t r;
    do {
      r = ::read(exec_err[0], &e, sizeof e);
    } while (r < 0 && errno == EINTR);
    ::close(exec_err[0]);
    if (r > 0) {
      reap(std::chrono::milliseconds{1000});
      throw std::runtime_error("exec " + python + ": " + std::strerror(e));
    }
  }

  ~raw_worker() { stop(); }
  pid_t pid() const noexcept { return pid_; }
  raw_worker(const raw_worker&) = delete;
  raw_worker& operator=(const raw_worker&) = delete;

  /// Init ping (id 0) and the same LM configuration the pool applies, so the
  /// ping replies of both paths are byte-for-byte the same size.
  void init() {
    round_trip(dspex::init_request_id, "ping", {{"initialization", true}, {"worker_id", id_}});
    round_trip(next_id_++, "configure_lm",
               {{"provider", "mock"}, {"model", "mock"}, {"temperature", 0.7}});
  }

  /// One ping: encode, blocking write, blocking read of header then body,
  /// parse_reply. Throws on any failure.
  void ping() { round_trip(next_id_++, "ping", nlohmann::json::object()); }

  /// One round trip of any command; throws on failure.
  void call(const char* command, nlohmann::json args) {
    round_trip(next_id_++, command, std::move(args));
  }

  /// EOF on stdin (the worker exits by itself), then waitpid; SIGKILL if slow.
  void stop() {
    if (in_ >= 0) {
      ::close(in_);
      in_ = -1;
    }
    if (pid_ > 0)
      reap(std::chrono::milliseconds{3000});
    if (out_ >= 0) {
      ::close(out_);
      out_ = -1;
    }
  }

private:
  void round_trip(std::uint64_t id, const char* command, nlohmann::json args) {
    auto frame = dspex::encode_frame(dspex::encode_request(id, command, std::move(args)));
    if (!write_all(in_, frame.data(), frame.size()))
      throw std::runtime_error(id_ + ": write failed: " + std::strerror(errno));
    unsigned char header[4];
    if (!read_exact(out_, reinterpret_cast<char*>(header), 4))
      throw std::runtime_error(id_ + ": EOF or error reading a reply header");
    std::uint32_t n = (std::uint32_t{header[0]} << 24) | (std::uint32_t{header[1]} << 16)
                      | (std::uint32_t{header[2]} << 8) | std::uint32_t{header[3]};
    if (n == 0 || n > dspex::default_max_frame_bytes)
      throw std::runtime_error(id_ + ": bad reply header, length " + std::to_string(n));
    body_.resize(n);
    if (!read_exact(out_, body_.data(), n))
      throw std::runtime_error(id_ + ": EOF or error reading a reply body");
    auto parsed = dspex::parse_reply(body_, id);
    if (auto* err = std::get_if<dspex::protocol_error>(&parsed))
      throw std::runtime_error(id_ + ": invalid reply: " + err->message);
    auto& rep = std::get<dspex::reply>(parsed);
    if (!rep.success)
      throw std::runtime_error(id_ + ": " + command + " failed: " + rep.error);
  }

  void reap(std::chrono::milliseconds grace) {
    auto until = clock_type::now() + grace;
    int status = 0;
    while (true) {
      auto r = ::waitpid(pid_, &status, WNOHANG);
      if (r == pid_ || (r < 0 && errno != EINTR))
        break;
      if (r == 0 && clock_type::now() >= until) {
        ::kill(pid_, SIGKILL);
        while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
        }
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds{2});
    }
    pid_ = -1;
  }

  std::string id_;
  pid_t pid_ = -1;
  int in_ = -1;
  int out_ = -1;
  std::uint64_t next_id_ = 1;
  std::string body_;
};

// ----------------------------------------------------------------- results

struct row {
  std::string path;
  std::size_t count = 0;
  double p50 = 0, p99 = 0, mean = 0;
  double rps = 0;
  double other_cores = 0;  ///< CPU used by other processes meanwhile, in cores
  /// CPU per call, µs: this process (runtime or raw loop, callers included)
  /// and the workers; negative: not measured (the anchor's rows).
  double cpu_self_us = -1, cpu_workers_us = -1;
};

row make_row(std::string path, const dspex::latency_recorder& lat, double seconds,
             const cpu_probe& probe) {
  if (on_row)
    on_row(path);
  row r;
  r.other_cores = probe.foreign_cores();
  r.path = std::move(path);
  r.count = lat.count();
  r.p50 = lat.percentile_us(50);
  r.p99 = lat.percentile_us(99);
  r.mean = lat.mean_us();
  r.rps = seconds > 0 ? static_cast<double>(lat.count()) / seconds : 0;
  if (r.count > 0) {
    auto [self, workers] = probe.own_split();
    r.cpu_self_us = self * 1e6 / static_cast<double>(r.count);
    r.cpu_workers_us = workers * 1e6 / static_cast<double>(r.count);
  }
  return r;
}

double seconds_since(clock_type::time_point t0) {
  return std::chrono::duration<double>(clock_type::now() - t0).count();
}

/// Runs `per_thread(i, n_i, recorder_i)` on `threads` threads that start
/// together; returns the wall time from the start signal to the last join.
template <class F>
double run_threads(std::size_t threads, std::size_t total, std::vector<dspex::latency_recorder>& lat,
                   F per_thread) {
  lat.assign(threads, dspex::latency_recorder{});
  std::promise<void> go;
  auto go_f = go.get_future().share();
  std::vector<std::thread> pool;
  std::vector<std::exception_ptr> errors(threads);
  for (std::size_t i = 0; i < threads; ++i) {
    auto n = total / threads + (i < total % threads ? 1 : 0);
    pool.emplace_back([&, i, n] {
      go_f.wait();
      try {
        per_thread(i, n, lat[i]);
      } catch (...) {
        errors[i] = std::current_exception();
      }
    });
  }
  auto t0 = clock_type::now();
  go.set_value();
  for (auto& t : pool)
    t.join();
  auto secs = seconds_since(t0);
  for (auto& e : errors)
    if (e)
      std::rethrow_exception(e);
  return secs;
}

// ----------------------------------------------------------------- raw path

struct raw_results {
  row sequential;
  row concurrent;
  std::vector<row> payloads;  ///< in payload_plan order
  double start_ms = 0;  ///< one worker: fork to init-ping reply (and LM configured)
};

std::vector<std::pair<std::size_t, std::size_t>> payload_plan(const options& o);

std::string payload_label(std::size_t bytes) {
  return bytes >= 1024 * 1024 ? std::to_string(bytes / (1024 * 1024)) + " MiB"
                              : std::to_string(bytes / 1024) + " KiB";
}

raw_results run_raw(const options& o) {
  raw_results res;
  {
    auto t0 = clock_type::now();
    raw_worker w{o.python, "raw-1"};
    w.init();
    res.start_ms = seconds_since(t0) * 1000;
    for (std::size_t i = 0; i < o.warmup; ++i)
      w.ping();
    dspex::latency_recorder lat;
    cpu_probe probe{{w.pid()}};
    auto t1 = clock_type::now();
    for (std::size_t i = 0; i < o.sequential; ++i) {
      auto s = clock_type::now();
      w.ping();
      lat.record(std::chrono::duration_cast<nanos>(clock_type::now() - s));
    }
    res.sequential = make_row("raw pipe, 1 worker, sequential", lat, seconds_since(t1), probe);
    for (auto [bytes, n] : payload_plan(o)) {
      std::string blob(bytes, 'x');
      w.call("echo", {{"blob", blob}});  // warm-up
      dspex::latency_recorder plat;
      cpu_probe pprobe{{w.pid()}};
      auto tp = clock_type::now();
      for (std::size_t i = 0; i < n; ++i) {
        auto s = clock_type::now();
        w.call("echo", {{"blob", blob}});
        plat.record(std::chrono::duration_cast<nanos>(clock_type::now() - s));
      }
      res.payloads.push_back(
        make_row("raw pipe, echo " + payload_label(bytes), plat, seconds_since(tp), pprobe));
    }
    w.stop();
  }
  {
    // Two workers, each owned by one thread in a tight loop. Spawned from the
    // main thread (PDEATHSIG follows the spawning thread).
    std::vector<std::unique_ptr<raw_worker>> ws;
    for (int i = 0; i < 2; ++i) {
      ws.push_back(std::make_unique<raw_worker>(o.python, "raw-" + std::to_string(i + 2)));
      ws.back()->init();
    }
    std::vector<dspex::latency_recorder> lat;
    run_threads(2, std::min<std::size_t>(o.warmup, o.concurrent), lat,
                [&](std::size_t i, std::size_t n, dspex::latency_recorder&) {
                  for (std::size_t k = 0; k < n; ++k)
                    ws[i]->ping();
                });
    cpu_probe probe{{ws[0]->pid(), ws[1]->pid()}};
    auto secs = run_threads(2, o.concurrent, lat,
                            [&](std::size_t i, std::size_t n, dspex::latency_recorder& rec) {
                              for (std::size_t k = 0; k < n; ++k) {
                                auto s = clock_type::now();
                                ws[i]->ping();
                                rec.record(std::chrono::duration_cast<nanos>(clock_type::now() - s));
                              }
                            });
    dspex::latency_recorder all;
    for (auto& l : lat)
      all.merge(l);
    res.concurrent = make_row("raw pipe, 2 workers, 2 threads", all, secs, probe);
    for (auto& w : ws)
      w->stop();
  }
  return res;
}

// ----------------------------------------------------------------- pool path

/// "4 x caf.multiplexer, 1 x caf.clock, ..." for the threads of this process.
std::string thread_census() {
  std::map<std::string, int> names;
  if (DIR* d = ::opendir("/proc/self/task")) {
    while (auto* e = ::readdir(d)) {
      if (e->d_name[0] == '.')
        continue;
      auto name = read_first_line(("/proc/self/task/" + std::string{e->d_name} + "/comm").c_str());
      if (name.rfind("io:", 0) == 0)
        name = "io:<worker>";
      ++names[name];
    }
    ::closedir(d);
  }
  std::string out;
  for (auto& [name, n] : names)
    out += (out.empty() ? "" : ", ") + std::to_string(n) + " x " + name;
  return out;
}

/// Context switches so far of this process's threads whose name starts with
/// `prefix` ("io:" for the workers' I/O threads, "caf." for CAF's): each is a
/// wake-up, so their count per call counts the hops of the request path.
std::uint64_t thread_switches(const std::string& prefix) {
  std::uint64_t total = 0;
  if (DIR* d = ::opendir("/proc/self/task")) {
    while (auto* e = ::readdir(d)) {
      if (e->d_name[0] == '.')
        continue;
      auto task = "/proc/self/task/" + std::string{e->d_name};
      if (read_first_line((task + "/comm").c_str()).rfind(prefix, 0) != 0)
        continue;
      std::ifstream in{task + "/status"};
      std::string line;
      while (std::getline(in, line))
        if (line.rfind("voluntary_ctxt_switches:", 0) == 0
            || line.rfind("nonvoluntary_ctxt_switches:", 0) == 0)
          total += std::stoull(line.substr(line.find(':') + 1));
    }
    ::closedir(d);
  }
  return total;
}

/// Payload round trips (echo of a string of `bytes`), raw and through the pool.
struct payload_row {
  std::size_t bytes = 0;
  row raw;
  row pool;
};

struct pool_results {
  row sequential;
  row blocking;
  row async;
  row sessions;  ///< 8 sessions x 2 calls in flight
  std::vector<payload_row> payloads;
  double start_ms = 0;
  std::size_t workers = 0;
  std::string threads;  ///< the runtime's threads once started, by name
  double io_wakes_per_call = 0;   ///< sequential: wake-ups of the workers' I/O threads per call
  double caf_wakes_per_call = 0;  ///< sequential: wake-ups of CAF's threads per call
  /// Blocking callers: the same per call, and the share of replies their
  /// callers read themselves (pool_metrics::read_by_caller).
  double blocking_io_wakes = 0, blocking_caf_wakes = 0, blocking_read_by_caller = 0;
};

/// The sizes of the payload rows, and how many round trips each.
std::vector<std::pair<std::size_t, std::size_t>> payload_plan(const options& o) {
  if (o.quick)
    return {{1024, 200}, {64 * 1024, 50}, {1024 * 1024, 10}};
  return {{1024, 2000}, {64 * 1024, 500}, {1024 * 1024, 60}};
}

void expect_ok(const dspex::outcome& r, const char* where) {
  if (!r)
    throw std::runtime_error(std::string{where} + ": " + r.error().describe());
}

/// Starts one asynchronous call of chain `chain`; `done` must run once with its outcome.
using async_start = std::function<void(std::size_t chain, std::function<void(dspex::outcome)> done)>;

/// Keeps `in_flight` chains of calls outstanding with the callback form until
/// `total` completed (each completion starts its chain's next call); returns
/// the wall time.
double run_chains(std::size_t total, std::size_t in_flight, const async_start& start,
                  dspex::latency_recorder& out) {
  struct state {
    const async_start* start = nullptr;
    std::size_t total = 0;
    std::atomic<std::size_t> issued{0};
    std::atomic<std::size_t> done{0};
    std::vector<long long> lat_ns;
    std::mutex m;
    std::condition_variable cv;
    bool finished = false;
    std::string first_error;
  };
  auto st = std::make_shared<state>();
  st->start = &start;
  st->total = total;
  st->lat_ns.assign(total, 0);

  // Each completion issues the next call before it counts itself done, so
  // once `done == total` no callback will touch the runtime again.
  struct issuer {
    static void issue(const std::shared_ptr<state>& st, std::size_t chain) {
      auto n = st->issued.fetch_add(1);
      if (n >= st->total)
        return;
      auto t0 = clock_type::now();
      (*st->start)(chain, [st, n, t0, chain](dspex::outcome r) {
        st->lat_ns[n] = std::chrono::duration_cast<nanos>(clock_type::now() - t0).count();
        if (!r) {
          std::lock_guard<std::mutex> g{st->m};
          if (st->first_error.empty())
            st->first_error = r.error().describe();
        }
        issue(st, chain);
        if (st->done.fetch_add(1) + 1 == st->total) {
          std::lock_guard<std::mutex> g{st->m};
          st->finished = true;
          st->cv.notify_all();
        }
      });
    }
  };

  auto t0 = clock_type::now();
  for (std::size_t i = 0; i < std::min(in_flight, total); ++i)
    issuer::issue(st, i);
  {
    std::unique_lock<std::mutex> g{st->m};
    if (!st->cv.wait_for(g, std::chrono::minutes{10}, [&] { return st->finished; }))
      throw std::runtime_error("async run did not finish within 10 minutes");
  }
  auto secs = seconds_since(t0);
  if (!st->first_error.empty())
    throw std::runtime_error("async call failed: " + st->first_error);
  for (auto ns : st->lat_ns)
    out.record(nanos{ns});
  return secs;
}

/// Anonymous pings, `in_flight` outstanding.
double run_async(dspex::runtime& rt, std::size_t total, std::size_t in_flight,
                 dspex::latency_recorder& out) {
  async_start ping = [&rt](std::size_t, std::function<void(dspex::outcome)> done) {
    rt.execute_anonymous_async("ping", nullptr, {}, std::move(done));
  };
  return run_chains(total, in_flight, ping, out);
}

/// Session pings: `sessions` sessions with `per_session` calls in flight each.
double run_sessions(dspex::runtime& rt, std::size_t total, std::size_t sessions,
                    std::size_t per_session, dspex::latency_recorder& out) {
  async_start ping = [&rt, per_session](std::size_t chain,
                                        std::function<void(dspex::outcome)> done) {
    rt.execute_in_session_async("bench-" + std::to_string(chain / per_session), "ping", nullptr, {},
                                std::move(done));
  };
  return run_chains(total, sessions * per_session, ping, out);
}

pool_results run_pool(const options& o) {
  pool_results res;
  dspex::settings s;
  s.pool.size = 2;
  s.lm.provider = "mock";
  s.lm.model = "mock";
  s.worker.python = o.python;
  s.worker.script = DSPEX_BENCH_WORKER_SCRIPT;
  s.worker.test_commands = true;  // `echo` for the payload rows, as in the raw loop
  s.scheduler_policy = o.scheduler;
  s.scheduler_max_threads = o.max_threads;
  s.log_level = "warn";  // the workers' start-up stderr lines would clutter the table
  res.workers = s.pool.size;

  auto t0 = clock_type::now();
  auto rt = dspex::runtime::start(s);
  res.start_ms = seconds_since(t0) * 1000;
  std::vector<pid_t> worker_pids;
  for (auto& w : rt->status().workers)
    worker_pids.push_back(static_cast<pid_t>(w.pid));
  res.threads = thread_census();
  try {
    for (std::size_t i = 0; i < o.warmup; ++i)
      expect_ok(rt->execute_anonymous("ping"), "warm-up");

    {
      dspex::latency_recorder lat;
      cpu_probe probe{worker_pids};
      auto io0 = thread_switches("io:"), caf0 = thread_switches("caf.");
      auto t1 = clock_type::now();
      for (std::size_t i = 0; i < o.sequential; ++i) {
        auto st = clock_type::now();
        auto r = rt->execute_anonymous("ping");
        lat.record(std::chrono::duration_cast<nanos>(clock_type::now() - st));
        expect_ok(r, "sequential ping");
      }
      res.io_wakes_per_call =
        static_cast<double>(thread_switches("io:") - io0) / static_cast<double>(o.sequential);
      res.caf_wakes_per_call =
        static_cast<double>(thread_switches("caf.") - caf0) / static_cast<double>(o.sequential);
      res.sequential = make_row("pool API, sequential", lat, seconds_since(t1),
                                probe);
    }

    {
      std::vector<dspex::latency_recorder> lat;
      auto body = [&](std::size_t, std::size_t n, dspex::latency_recorder& rec) {
        for (std::size_t k = 0; k < n; ++k) {
          auto st = clock_type::now();
          auto r = rt->execute_anonymous("ping");
          rec.record(std::chrono::duration_cast<nanos>(clock_type::now() - st));
          expect_ok(r, "concurrent ping");
        }
      };
      run_threads(o.callers, std::min<std::size_t>(o.warmup, o.concurrent), lat, body);
      cpu_probe probe{worker_pids};
      auto io0 = thread_switches("io:"), caf0 = thread_switches("caf.");
      auto read0 = rt->status().metrics.read_by_caller;
      auto secs = run_threads(o.callers, o.concurrent, lat, body);
      auto n = static_cast<double>(o.concurrent);
      res.blocking_io_wakes = static_cast<double>(thread_switches("io:") - io0) / n;
      res.blocking_caf_wakes = static_cast<double>(thread_switches("caf.") - caf0) / n;
      res.blocking_read_by_caller
        = static_cast<double>(rt->status().metrics.read_by_caller - read0) / n;
      dspex::latency_recorder all;
      for (auto& l : lat)
        all.merge(l);
      res.blocking = make_row("pool API, " + std::to_string(o.callers) + " blocking callers", all,
                              secs, probe);
    }

    {
      dspex::latency_recorder warm;
      run_async(*rt, std::min<std::size_t>(o.warmup, o.concurrent), o.callers, warm);
      dspex::latency_recorder lat;
      cpu_probe probe{worker_pids};
      auto secs = run_async(*rt, o.concurrent, o.callers, lat);
      res.async = make_row("pool API, async, " + std::to_string(o.callers) + " in flight", lat,
                           secs, probe);
    }

    {
      constexpr std::size_t sessions = 8, per_session = 2;
      dspex::latency_recorder warm;
      run_sessions(*rt, std::min<std::size_t>(o.warmup, o.concurrent), sessions, per_session, warm);
      dspex::latency_recorder lat;
      cpu_probe probe{worker_pids};
      auto secs = run_sessions(*rt, o.concurrent, sessions, per_session, lat);
      res.sessions = make_row("pool API, 8 sessions x 2 in flight", lat, secs, probe);
    }

    for (auto [bytes, n] : payload_plan(o)) {
      std::string blob(bytes, 'x');
      expect_ok(rt->execute_anonymous("echo", {{"blob", blob}}), "echo warm-up");
      dspex::latency_recorder lat;
      cpu_probe probe{worker_pids};
      auto t1 = clock_type::now();
      for (std::size_t i = 0; i < n; ++i) {
        auto st = clock_type::now();
        auto r = rt->execute_anonymous("echo", {{"blob", blob}});
        lat.record(std::chrono::duration_cast<nanos>(clock_type::now() - st));
        expect_ok(r, "echo");
      }
      payload_row pr;
      pr.bytes = bytes;
      pr.pool = make_row("pool API, echo " + payload_label(bytes), lat, seconds_since(t1), probe);
      res.payloads.push_back(std::move(pr));
    }

    auto status = rt->status();
    if (status.replaced != 0 || status.start_failures != 0)
      std::printf("note: pool replaced %llu workers, %llu start failures during the run\n",
                  static_cast<unsigned long long>(status.replaced),
                  static_cast<unsigned long long>(status.start_failures));
  } catch (...) {
    rt->stop();
    throw;
  }
  rt->stop();
  return res;
}

// ----------------------------------------------------------------- anchor

/// One line of ../shared/anchor/run.sh:
/// "nimblepool workers=2 clients=16 n=40000 startup_ms=141 rps=26211 p50_us=575.0 p99_us=926.2"
struct anchor_figures {
  row r;
  double startup_ms = 0;
};

struct anchor_results {
  std::string skipped;  ///< why it did not run; empty when it ran
  std::optional<anchor_figures> sequential;
  std::optional<anchor_figures> blocking;
};

std::string shell_quote(const std::string& s) {
  std::string out = "'";
  for (char c : s)
    out += c == '\'' ? std::string{"'\\''"} : std::string(1, c);
  return out + "'";
}

/// Runs the anchor once; its figures, or throws with its last output lines.
anchor_figures run_anchor_once(const options& o, std::size_t workers, std::size_t clients,
                               std::size_t per_client) {
  auto cmd = "SCRIPT=" + shell_quote(DSPEX_BENCH_WORKER_SCRIPT) + " PYTHON=" + shell_quote(o.python)
             + " " + shell_quote(o.anchor_script) + " " + std::to_string(workers) + " "
             + std::to_string(clients) + " " + std::to_string(per_client) + " 2>&1";
  std::fflush(stdout);
  FILE* f = ::popen(cmd.c_str(), "r");
  if (!f)
    throw std::runtime_error(std::string{"anchor: popen: "} + std::strerror(errno));
  std::vector<std::string> tail;
  std::string found;
  char buf[4096];
  while (std::fgets(buf, sizeof buf, f)) {
    std::string line{buf};
    while (!line.empty() && (line.back() == '\n' || line.back() == '\r'))
      line.pop_back();
    if (line.rfind("nimblepool ", 0) == 0)
      found = line;
    tail.push_back(line);
    if (tail.size() > 8)
      tail.erase(tail.begin());
  }
  auto status = ::pclose(f);
  if (found.empty() || status != 0) {
    std::string why = "anchor (" + o.anchor_script + ") failed, exit status "
                      + std::to_string(WIFEXITED(status) ? WEXITSTATUS(status) : -1) + ":";
    for (auto& l : tail)
      why += "\n  " + l;
    throw std::runtime_error(why);
  }
  std::map<std::string, std::string> kv;
  std::istringstream in{found};
  std::string tok;
  while (in >> tok)
    if (auto eq = tok.find('='); eq != std::string::npos)
      kv[tok.substr(0, eq)] = tok.substr(eq + 1);
  auto num = [&](const char* k) {
    auto it = kv.find(k);
    if (it == kv.end())
      throw std::runtime_error("anchor: no " + std::string{k} + " in '" + found + "'");
    return std::stod(it->second);
  };
  anchor_figures a;
  a.r.path = "NimblePool+port, " + std::to_string(workers) + "w x " + std::to_string(clients)
             + " callers";
  a.r.count = static_cast<std::size_t>(num("n"));
  a.r.p50 = num("p50_us");
  a.r.p99 = num("p99_us");
  a.r.rps = num("rps");
  a.r.mean = 0;         // not reported by the anchor
  a.r.other_cores = 0;  // not probed: the anchor is its own process tree
  a.startup_ms = num("startup_ms");
  if (on_row)
    on_row(a.r.path);
  return a;
}

anchor_results run_anchor(const options& o) {
  anchor_results res;
  if (!o.anchor_required) {
    if (::access(o.anchor_script.c_str(), X_OK) != 0) {
      res.skipped = "no anchor script at " + o.anchor_script;
      return res;
    }
    if (dspex::find_executable("elixir").empty()) {
      res.skipped = "elixir is not installed (--anchor installs it, as root, and runs the anchor)";
      return res;
    }
  }
  // The same counts as the raw and pool rows.
  res.sequential = run_anchor_once(o, 1, 1, o.sequential);
  res.blocking = run_anchor_once(o, 2, o.callers, std::max<std::size_t>(o.concurrent / o.callers, 1));
  return res;
}

// ----------------------------------------------------------------- start-up, memory, idle

double rss_kib() {
  std::ifstream in{"/proc/self/status"};
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("VmRSS:", 0) == 0)
      return std::stod(line.substr(6));
  return 0;
}

struct startup_results {
  std::vector<std::pair<std::size_t, double>> start_ms;  ///< (workers, ms to all ready)
  std::vector<std::pair<std::size_t, double>> rss_growth_kib;  ///< (workers, RSS growth)
  double kib_per_worker = 0;
  double idle_seconds = 0;
  double idle_runtime_cpu_s = 0;  ///< this process, over idle_seconds
  double idle_worker_cpu_s = 0;   ///< its Python workers, over idle_seconds
};

dspex::settings bench_settings(const options& o, std::size_t workers) {
  dspex::settings s;
  s.pool.size = workers;
  s.lm.provider = "mock";
  s.lm.model = "mock";
  s.worker.python = o.python;
  s.worker.script = DSPEX_BENCH_WORKER_SCRIPT;
  s.scheduler_policy = o.scheduler;
  s.scheduler_max_threads = o.max_threads;
  s.log_level = "warn";
  return s;
}

// ----------------------------------------------------------------- remote

// Issue 13: a pool on another runtime, reached over CAF's middleman on
// loopback. Both runtimes run in this process (two actor systems): the node
// serves its pool "bench" (2 workers, as the local rows), the caller has no
// pool of that name and sends every call over the network. Once in
// plaintext, once with TLS (mutual certificates made with `openssl`).
struct remote_results {
  std::vector<row> rows;          ///< sequential pings, then echo by payload, per transport
  double plain_p50 = 0;           ///< sequential ping p50, plaintext
  double tls_p50 = 0;             ///< the same with TLS (0: not run)
  std::vector<std::pair<std::size_t, double>> plain_payload_p50;  ///< bytes -> p50
  std::string tls_skipped;        ///< why the TLS rows are missing
  dspex::bench::network_floor floor;  ///< TCP and CAF's middleman alone, same run
};

/// Makes a CA and two certificates it signed in `dir`; false when `openssl` fails.
bool make_certificates(const std::string& dir) {
  auto run = [](const std::string& cmd) { return std::system((cmd + " >/dev/null 2>&1").c_str()) == 0; };
  if (!run("openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=bench-ca -keyout " + dir
           + "/ca.key -out " + dir + "/ca.pem"))
    return false;
  for (std::string who : {"node", "caller"})
    if (!run("openssl req -newkey rsa:2048 -nodes -subj /CN=" + who + " -keyout " + dir + "/" + who
             + ".key -out " + dir + "/" + who + ".csr")
        || !run("openssl x509 -req -days 2 -in " + dir + "/" + who + ".csr -CA " + dir
                + "/ca.pem -CAkey " + dir + "/ca.key -CAcreateserial -out " + dir + "/" + who
                + ".pem"))
      return false;
  return true;
}

void run_remote_transport(const options& o, const std::string& cert_dir, remote_results& res) {
  bool tls = !cert_dir.empty();
  auto with_tls = [&](dspex::settings& s, const std::string& who) {
    if (!tls)
      return;
    s.node.tls.certificate = cert_dir + "/" + who + ".pem";
    s.node.tls.key = cert_dir + "/" + who + ".key";
    s.node.tls.ca_file = cert_dir + "/ca.pem";
  };
  auto node_cfg = bench_settings(o, 1);
  node_cfg.worker.test_commands = true;  // echo
  auto bench_pool = node_cfg;
  bench_pool.pool_name = "bench";
  bench_pool.pool.size = 2;
  node_cfg.pools.push_back(bench_pool);
  node_cfg.node.publish = true;
  with_tls(node_cfg, "node");
  auto node = dspex::runtime::start(node_cfg);
  std::vector<pid_t> worker_pids;
  for (auto& w : node->status("bench").workers)
    worker_pids.push_back(static_cast<pid_t>(w.pid));
  auto caller_cfg = bench_settings(o, 1);
  caller_cfg.remote.nodes = {"127.0.0.1:" + std::to_string(node->node_port())};
  with_tls(caller_cfg, "caller");
  auto caller = dspex::runtime::start(caller_cfg);
  const char* transport = tls ? "TLS" : "plaintext";
  try {
    dspex::call_options on;
    on.pool = "bench";
    for (int i = 0; i < 200 && caller->status("bench").nodes.empty(); ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds{10});  // the node's first load
    for (std::size_t i = 0; i < o.warmup; ++i)
      expect_ok(caller->execute_anonymous("ping", nullptr, on), "remote warm-up");
    auto sequential = [&](const std::string& label, const std::string& command,
                          const nlohmann::json& args, std::size_t n) {
      dspex::latency_recorder lat;
      cpu_probe probe{worker_pids};
      auto t1 = clock_type::now();
      for (std::size_t i = 0; i < n; ++i) {
        auto st = clock_type::now();
        auto r = caller->execute_anonymous(command, args, on);
        lat.record(std::chrono::duration_cast<nanos>(clock_type::now() - st));
        expect_ok(r, label.c_str());
      }
      return make_row(label, lat, seconds_since(t1), probe);
    };
    auto ping = sequential(std::string{"remote pool ("} + transport + "), sequential", "ping",
                           nullptr, o.sequential / 2);
    (tls ? res.tls_p50 : res.plain_p50) = ping.p50;
    res.rows.push_back(ping);
    for (auto [bytes, n] : payload_plan(o)) {
      std::string blob(bytes, 'x');
      auto r = sequential("remote pool (" + std::string{transport} + "), echo " + payload_label(bytes),
                          "echo", {{"blob", blob}}, std::max<std::size_t>(n / 2, 20));
      if (!tls)
        res.plain_payload_p50.emplace_back(bytes, r.p50);
      res.rows.push_back(r);
    }
  } catch (...) {
    caller->stop();
    node->stop();
    throw;
  }
  caller->stop();
  node->stop();
}

remote_results run_remote(const options& o) {
  remote_results res;
  res.floor = dspex::bench::measure_network_floor(o.sequential / 2, o.scheduler, o.max_threads);
  run_remote_transport(o, {}, res);
  char dir_template[] = "/tmp/dspex-bench-tls-XXXXXX";
  if (::mkdtemp(dir_template) == nullptr) {
    res.tls_skipped = "no temporary directory";
    return res;
  }
  std::string dir = dir_template;
  if (make_certificates(dir))
    run_remote_transport(o, dir, res);
  else
    res.tls_skipped = "the openssl command failed (scripts/packages.sh installs it)";
  std::system(("rm -rf " + dir).c_str());
  return res;
}

// Start-up of 1, 2 and 8 workers; the runtime's memory per worker from the
// RSS growth of a fresh start (heap trimmed before each); the CPU an idle
// 2-worker pool uses (it must not poll).
startup_results run_startup(const options& o) {
  startup_results res;
  for (std::size_t n : {std::size_t{1}, std::size_t{2}, std::size_t{8}}) {
    ::malloc_trim(0);
    auto rss0 = rss_kib();
    auto t0 = clock_type::now();
    auto rt = dspex::runtime::start(bench_settings(o, n));
    res.start_ms.emplace_back(n, seconds_since(t0) * 1000);
    expect_ok(rt->execute_anonymous("ping"), "start-up ping");
    res.rss_growth_kib.emplace_back(n, rss_kib() - rss0);
    if (n == 2) {
      std::vector<pid_t> pids;
      for (auto& w : rt->status().workers)
        pids.push_back(static_cast<pid_t>(w.pid));
      auto idle = o.quick ? std::chrono::seconds{1} : std::chrono::seconds{5};
      auto own0 = process_cpu_seconds("/proc/self/stat");
      double workers0 = 0;
      for (auto pid : pids)
        workers0 += process_cpu_seconds("/proc/" + std::to_string(pid) + "/stat");
      std::this_thread::sleep_for(idle);  // the span measured: nothing to wait for
      res.idle_seconds = std::chrono::duration<double>(idle).count();
      res.idle_runtime_cpu_s = process_cpu_seconds("/proc/self/stat") - own0;
      double workers1 = 0;
      for (auto pid : pids)
        workers1 += process_cpu_seconds("/proc/" + std::to_string(pid) + "/stat");
      res.idle_worker_cpu_s = workers1 - workers0;
    }
    rt->stop();
  }
  double g1 = res.rss_growth_kib.front().second, g8 = res.rss_growth_kib.back().second;
  res.kib_per_worker = (g8 - g1) / 7.0;
  return res;
}

// ----------------------------------------------------------------- one thread hop

/// The cost of waking another thread on this machine: two threads hand a
/// token back and forth through futures, as the direct lane's I/O thread
/// hands a reply to a blocking caller. p50 of one hand-off (half a round trip).
double thread_handoff_p50_us(std::size_t rounds) {
  dspex::latency_recorder lat;
  std::mutex m;
  std::condition_variable cv;
  bool b_turn = false;
  std::thread b{[&] {
    for (std::size_t i = 0; i < rounds; ++i) {
      {
        std::unique_lock<std::mutex> lk{m};
        cv.wait(lk, [&] { return b_turn; });
        b_turn = false;
      }
      cv.notify_all();
    }
  }};
  for (std::size_t i = 0; i < rounds; ++i) {
    auto s = clock_type::now();
    {
      std::lock_guard<std::mutex> lk{m};
      b_turn = true;
    }
    cv.notify_all();
    {
      std::unique_lock<std::mutex> lk{m};
      cv.wait(lk, [&] { return !b_turn; });
    }
    lat.record(std::chrono::duration_cast<nanos>(clock_type::now() - s) / 2);
  }
  b.join();
  return lat.percentile_us(50);
}

// ----------------------------------------------------------------- accounting cost

/// ns per latency_histogram::record, one thread alone and two at once.
std::pair<double, double> histogram_record_cost() {
  constexpr std::size_t n = 5'000'000;
  dspex::latency_histogram h;
  auto t0 = clock_type::now();
  for (std::size_t i = 0; i < n; ++i)
    h.record(nanos{static_cast<long long>(50'000 + (i & 4095))});
  auto one = seconds_since(t0) * 1e9 / n;
  dspex::latency_histogram shared;
  auto t1 = clock_type::now();
  std::thread a{[&] {
    for (std::size_t i = 0; i < n; ++i)
      shared.record(nanos{static_cast<long long>(50'000 + (i & 4095))});
  }};
  for (std::size_t i = 0; i < n; ++i)
    shared.record(nanos{static_cast<long long>(70'000 + (i & 4095))});
  a.join();
  auto two = seconds_since(t1) * 1e9 / n;
  if (shared.summary().count != 2 * n || h.summary().count != n)
    throw std::runtime_error("latency_histogram lost records");
  return {one, two};
}

// ----------------------------------------------------------------- report

void print_table(const std::vector<row>& rows) {
  // printf pads bytes, not characters: "µ" is 2 bytes in UTF-8, hence 11 for 10.
  std::printf("%-40s %7s %11s %11s %11s %9s %7s %17s\n", "path", "n", "p50 µs", "p99 µs",
              "mean µs", "req/s", "other*", "CPU µs/call**");
  std::printf("%s\n", std::string(120, '-').c_str());
  for (auto& r : rows) {
    std::printf("%-40s %7zu %10.1f %10.1f ", r.path.c_str(), r.count, r.p50, r.p99);
    if (r.mean > 0)
      std::printf("%10.1f", r.mean);
    else
      std::printf("%10s", "-");  // the anchor reports no mean
    std::printf(" %9.0f %7.2f", r.rps, r.other_cores);
    if (r.cpu_self_us >= 0)
      std::printf(" %7.1f + %6.1f\n", r.cpu_self_us, r.cpu_workers_us);
    else
      std::printf(" %16s\n", "-");
  }
  std::printf("* other: average cores busy with other processes during that row (0 = quiet)\n");
  std::printf("** CPU per call: this process (the raw loop or the runtime, callers included) + the "
              "Python workers;\n   with 2 cores, req/s cannot exceed 2 / (their sum)\n\n");
}

const char* verdict(bool ok) {
  return ok ? "MET" : "NOT MET";
}

void print_ratio(const char* what, double value, const char* cmp, double target) {
  bool ok = std::string{cmp} == "<=" ? value <= target : value >= target;
  std::printf("  %-50s: %6.2f  (target %s %.2f: %s)\n", what, value, cmp, target, verdict(ok));
}

void print_ratios(const raw_results& raw, const anchor_results& anchor, const pool_results& pool,
                  std::size_t callers) {
  std::printf("ratios (every figure from this run)\n");
  print_ratio("pool sequential p50 / raw p50", pool.sequential.p50 / raw.sequential.p50, "<=",
              target_seq_p50_vs_raw);
  if (anchor.sequential)
    print_ratio("pool sequential p50 / NimblePool p50", pool.sequential.p50 / anchor.sequential->r.p50,
                "<=", 1.0);
  print_ratio("pool sequential p99 / p50", pool.sequential.p99 / pool.sequential.p50, "<=",
              target_p99_vs_p50);
  auto label = "pool " + std::to_string(callers) + " blocking callers req/s / NimblePool req/s";
  if (anchor.blocking)
    print_ratio(label.c_str(), pool.blocking.rps / anchor.blocking->r.rps, ">=",
                target_blocking_vs_anchor);
  std::printf("  %-50s: %6.2f\n", "pool blocking req/s / raw 2-worker req/s",
              pool.blocking.rps / raw.concurrent.rps);
  print_ratio("pool async req/s / raw 2-worker req/s", pool.async.rps / raw.concurrent.rps, ">=",
              target_async_vs_raw);
  print_ratio("session p50 / anonymous async p50", pool.sessions.p50 / pool.async.p50, "<=",
              target_session_vs_anonymous);
  std::printf("  %-50s: %6.2f\n", "session req/s / anonymous async req/s",
              pool.sessions.rps / pool.async.rps);
  for (std::size_t i = 0; i < pool.payloads.size() && i < raw.payloads.size(); ++i) {
    auto what = "pool echo " + payload_label(pool.payloads[i].bytes) + " p50 / raw p50";
    auto ratio = pool.payloads[i].pool.p50 / raw.payloads[i].p50;
    if (pool.payloads[i].bytes >= 1024 * 1024)
      print_ratio(what.c_str(), ratio, "<=", target_payload_vs_raw);
    else
      std::printf("  %-50s: %6.2f\n", what.c_str(), ratio);
  }
  if (!anchor.skipped.empty())
    std::printf("  (NimblePool ratios skipped: %s)\n", anchor.skipped.c_str());
}

void print_remote_ratios(const pool_results& pool, const remote_results& remote) {
  std::printf("remote pools (loopback; every figure from this run)\n");
  print_ratio("remote plaintext p50 / local pool p50", remote.plain_p50 / pool.sequential.p50,
              "<=", target_remote_vs_local);
  // The floor under that ratio: the same loopback round trip without this
  // project, once on a bare TCP socket and once through CAF's middleman (a
  // blocking request to an echo actor on another actor system).
  const auto& f = remote.floor;
  std::printf("  %-50s: %6.1f us  (%.2f x local pool p50)\n", "floor: TCP round trip p50",
              f.tcp_p50_us, f.tcp_p50_us / pool.sequential.p50);
  std::printf("  %-50s: %6.1f us  (%.2f x local pool p50)\n", "floor: CAF middleman echo p50",
              f.middleman_p50_us, f.middleman_p50_us / pool.sequential.p50);
  std::printf("  %-50s: %6.1f us\n", "remote plaintext p50 - middleman echo p50",
              remote.plain_p50 - f.middleman_p50_us);
  if (remote.tls_p50 > 0)
    std::printf("  %-50s: %6.2f\n", "remote TLS p50 / local pool p50",
                remote.tls_p50 / pool.sequential.p50);
  else
    std::printf("  (TLS rows skipped: %s)\n", remote.tls_skipped.c_str());
  // How the network's share grows with the payload: the remote p50 over
  // the local pool's, size by size.
  for (auto [bytes, p50] : remote.plain_payload_p50)
    for (const auto& local : pool.payloads)
      if (local.bytes == bytes) {
        auto what = "remote plaintext echo " + payload_label(bytes) + " p50 / local p50";
        std::printf("  %-50s: %6.2f  (+%.1f us)\n", what.c_str(), p50 / local.pool.p50,
                    p50 - local.pool.p50);
      }
  std::printf("\n");
}

void print_startup(const raw_results& raw, const anchor_results& anchor, const pool_results& pool,
                   const startup_results& su) {
  std::printf("runtime threads (after start): %s\n", pool.threads.c_str());
  std::printf("sequential calls: %.2f wake-ups of the workers' I/O threads and %.2f of CAF's threads per "
              "call (0 and 0: the caller alone talks to the process)\n",
              pool.io_wakes_per_call, pool.caf_wakes_per_call);
  std::printf("blocking callers: %.2f wake-ups of the I/O threads and %.2f of CAF's threads per call; "
              "%.0f%% of the replies read by their callers' own threads\n",
              pool.blocking_io_wakes, pool.blocking_caf_wakes, pool.blocking_read_by_caller * 100);
  std::printf("start-up (runtime::start until every worker answered its init ping)\n");
  std::printf("  raw: 1 worker ready in %.1f ms", raw.start_ms);
  if (anchor.blocking)
    std::printf("; NimblePool: 2 workers in %.0f ms", anchor.blocking->startup_ms);
  std::printf("\n");
  auto cores = std::max<long>(1, ::sysconf(_SC_NPROCESSORS_ONLN));
  for (auto [n, ms] : su.start_ms) {
    auto bound = (static_cast<double>(n) / static_cast<double>(cores) + 1.0) * raw.start_ms;
    std::printf("  pool: %zu worker%s ready in %6.1f ms (target <= %.1f ms: %s)\n", n,
                n == 1 ? " " : "s", ms, bound, verdict(ms <= bound));
  }
  std::printf("memory (this process's RSS growth over a fresh start, heap trimmed first)\n");
  for (auto [n, kib] : su.rss_growth_kib)
    std::printf("  %zu worker%s: +%.0f KiB\n", n, n == 1 ? " " : "s", kib);
  std::printf("  C++ side per worker ((8 workers - 1 worker) / 7): %.1f KiB (target <= %.0f: %s)\n",
              su.kib_per_worker, target_kib_per_worker,
              verdict(su.kib_per_worker <= target_kib_per_worker));
  std::printf("idle 2-worker pool over %.0f s: runtime %.3f s CPU (%.2f%% of a core), workers %.3f s\n",
              su.idle_seconds, su.idle_runtime_cpu_s,
              su.idle_seconds > 0 ? 100.0 * su.idle_runtime_cpu_s / su.idle_seconds : 0.0,
              su.idle_worker_cpu_s);
}

bool any_child_left() {
  // Every child of ours must be reaped by now. WNOWAIT: only look, never reap
  // (reaping is the runtime's job; stealing its zombies would confuse it).
  siginfo_t info{};
  return ::waitid(P_ALL, 0, &info, WEXITED | WNOHANG | WNOWAIT) == 0;
}

} // namespace

int dspex::bench::run(int argc, char** argv, progress_fn progress) {
  on_row = std::move(progress);
  // A dead worker must surface as EPIPE on write, not kill the benchmark.
  ::signal(SIGPIPE, SIG_IGN);
  auto o = parse_options(argc, argv);
  std::printf("bench_pool: ping round trips to %s\n\n", "dspex_worker.py (pool-worker mode)");
  print_machine(o);
  try {
    // The raw path runs first, while the process has one thread, so fork()
    // is plain; the pool then runs with the same worker and interpreter.
    auto raw = run_raw(o);
    auto anchor = run_anchor(o);
    auto pool = run_pool(o);
    auto remote = run_remote(o);
    auto startup = run_startup(o);
    std::vector<row> rows{raw.sequential};
    if (anchor.sequential)
      rows.push_back(anchor.sequential->r);
    rows.push_back(pool.sequential);
    rows.push_back(raw.concurrent);
    if (anchor.blocking)
      rows.push_back(anchor.blocking->r);
    rows.push_back(pool.blocking);
    rows.push_back(pool.async);
    rows.push_back(pool.sessions);
    for (std::size_t i = 0; i < pool.payloads.size() && i < raw.payloads.size(); ++i) {
      rows.push_back(raw.payloads[i]);
      rows.push_back(pool.payloads[i].pool);
    }
    rows.insert(rows.end(), remote.rows.begin(), remote.rows.end());
    print_table(rows);
    if (!anchor.skipped.empty())
      std::printf("NimblePool anchor: skipped: %s\n\n", anchor.skipped.c_str());
    print_ratios(raw, anchor, pool, o.callers);
    print_remote_ratios(pool, remote);
    print_startup(raw, anchor, pool, startup);
    std::printf("one thread hand-off (condition variable, set -> waiter running), p50: %.1f us: what a "
                "reply costs when the I/O thread hands it to a caller (a blocking caller of the direct "
                "lane reads its own reply and pays none)\n",
                thread_handoff_p50_us(o.quick ? 2000 : 20000));
    auto [one, two] = histogram_record_cost();
    std::printf("latency accounting: %.1f ns per record alone, %.1f ns with 2 threads recording "
                "into one histogram\n",
                one, two);
    std::printf("loadavg : %s (at end)\n", read_first_line("/proc/loadavg").c_str());
  } catch (const dspex::start_error& e) {
    std::fprintf(stderr, "bench_pool: the runtime did not start: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_pool: %s\n", e.what());
    return 1;
  }
  if (any_child_left()) {
    std::fprintf(stderr, "bench_pool: a child process is still running\n");
    return 1;
  }
  return 0;
}
