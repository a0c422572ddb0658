// dspex_soak: a long run that checks the runtime's own resources stay flat.
//
//   dspex_soak [--calls=1000000] [--callers=16] [--warmup-percent=20] [--settle-ms=500]
//              [--checkpoints=10] [--session-length=300] [--program-length=200] [--quiet]
//              [--config-file=PATH] [--group.key=value ...]
//
// `--callers` threads make `--calls` calls in all (every runtime call counts:
// execute_anonymous, execute_in_session, end_session) while the pool recycles
// its workers (default pool.max_requests=2000, so hundreds of recycles in a
// full run). Half the callers work through sessions: each session creates its
// program once, executes it, lists its programs every 25 calls, and is ended
// with end_session after a few hundred calls, when the caller moves on to a new
// session id (so sessions come and go). The other half call anonymously: ping,
// get_stats (echo when worker.test_commands is on) and a program of their own
// (create_program, execute_program, delete_program after 200 calls, then a new
// program id), all without a session_id.
//
// The host process's own VmRSS, open fds and threads are sampled at the end of
// the warm-up (--warmup-percent of the calls, 20 by default: the runtime's
// bounded histories fill during the first ~200k calls here, e.g. the records
// of the last 64 retired workers, and pending timeouts reach their steady
// count only after the first request deadline, 30 s, has passed), at
// --checkpoints points after
// it (the last one at the end; shown as a trend, with glibc's heap in use as a
// hint: a leak grows it, fragmentation does not), each time with no call in
// flight, the pool back at full size and --settle-ms later. The verdict
// compares the warm-up's sample with the end's. Exit 0
// only when each grew less than 5%, every failure was a structured error,
// failures stayed below 0.1% of the calls and no child process is left after
// stop(); 1 otherwise, 2 bad usage or configuration, 3 the pool did not start.
//
// Only the public API (dspex/runtime.hpp, dspex/config.hpp) is used.
#include <dirent.h>
#include <unistd.h>
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 33))
#include <malloc.h>
#define DSPEX_SOAK_MALLINFO2 1
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "dspex/config.hpp"
#include "dspex/proc_stats.hpp"
#include "dspex/runtime.hpp"
#include "workload.hpp"

namespace {

using clock_type = std::chrono::steady_clock;

constexpr int exit_ok = 0;
constexpr int exit_violation = 1;
constexpr int exit_usage = 2;
constexpr int exit_start_failed = 3;

constexpr double max_growth_percent = 5.0;
constexpr double max_failure_ratio = 0.001;  // 0.1 %

// ---------------------------------------------------------------------------------
// /proc

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in)
    return {};
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

template <class F>
void for_each_numeric_entry(const char* dir, F&& f) {
  std::unique_ptr<DIR, int (*)(DIR*)> d(::opendir(dir), &::closedir);
  if (!d)
    return;
  while (auto* ent = ::readdir(d.get())) {
    char* end = nullptr;
    long n = std::strtol(ent->d_name, &end, 10);
    if (ent->d_name[0] != '\0' && *end == '\0' && n >= 0)
      f(n);
  }
}

struct resources {
  long rss_kb = 0;
  long fds = 0;
  long threads = 0;
  /// Bytes malloc has handed out and not got back (all arenas and mmapped
  /// blocks; glibc's mallinfo2), in kB; -1 when unknown. Not part of the
  /// verdict: it tells a leak (it grows) from fragmentation (only RSS grows).
  long heap_kb = -1;
};

long status_field(const std::string& status, const char* name) {
  auto at = status.find(std::string{"\n"} + name + ":");
  if (at == std::string::npos)
    return -1;
  return std::strtol(status.c_str() + at + std::char_traits<char>::length(name) + 2, nullptr, 10);
}

resources sample_self() {
  resources r;
  auto status = dspex::read_proc_file(::getpid(), "status").value_or("");
  r.rss_kb = status_field(status, "VmRSS");
  r.threads = status_field(status, "Threads");
  long n = 0;
  for_each_numeric_entry("/proc/self/fd", [&](long) { ++n; });
  r.fds = n - 1;  // the directory stream's own descriptor
#ifdef DSPEX_SOAK_MALLINFO2
  auto mi = ::mallinfo2();
  r.heap_kb = static_cast<long>((mi.uordblks + mi.hblkhd) / 1024);
#endif
  return r;
}

/// "N cores, <model name>" from /proc/cpuinfo.
std::string machine() {
  auto info = read_file("/proc/cpuinfo");
  std::string model = "unknown CPU";
  auto at = info.find("model name");
  if (at != std::string::npos) {
    auto colon = info.find(':', at);
    auto eol = info.find('\n', at);
    if (colon != std::string::npos && colon < eol)
      model = info.substr(colon + 2, eol - colon - 2);
  }
  return fmt::format("{} cores (nproc), {}", std::thread::hardware_concurrency(), model);
}

double growth_percent(long start, long end) {
  return start > 0 ? 100.0 * static_cast<double>(end - start) / static_cast<double>(start) : 0.0;
}

/// Child processes of this process (zombies included: not reaped is not gone).
std::vector<std::string> children_left() {
  std::vector<std::string> left;
  const long self = ::getpid();
  for_each_numeric_entry("/proc", [&](long pid) {
    auto stat = dspex::read_process_stat(static_cast<int>(pid));
    if (!stat || stat->ppid != self)
      return;
    const char state = stat->state;
    auto cmd = dspex::read_proc_file(static_cast<int>(pid), "cmdline").value_or("");
    std::replace(cmd.begin(), cmd.end(), '\0', ' ');
    left.push_back(fmt::format("pid {} state {} {}", pid, state, cmd));
  });
  return left;
}

// ---------------------------------------------------------------------------------
// Outcomes

struct tally {
  std::uint64_t calls = 0;
  std::uint64_t ok = 0;
  std::map<std::string, std::uint64_t> errors;  // "category/type" -> count
  std::map<std::string, std::string> first_message;
  std::uint64_t unstructured = 0;
  std::vector<std::string> unstructured_examples;
  /// delete_program of an anonymous program answered "Program not found" by a
  /// worker that never cached it: the runtime forgot the definition, which is
  /// all an anonymous delete can promise. Not a failure.
  std::uint64_t anonymous_delete_not_found = 0;
  std::uint64_t sessions_ended = 0;
  std::uint64_t list_mismatches = 0;  // a session listed other than its one program

  std::uint64_t failed() const {
    std::uint64_t n = unstructured;
    for (auto& [k, v] : errors)
      n += v;
    return n;
  }

  void add_error(const dspex::error& e) {
    if (!dspex::is_structured(e)) {
      add_unstructured(e.to_json().dump());
      return;
    }
    auto key = std::string{dspex::to_string(e.category)} + "/" + e.type;
    if (errors[key]++ == 0)
      first_message[key] = e.message;
  }

  void add_unstructured(std::string what) {
    ++unstructured;
    if (unstructured_examples.size() < 5)
      unstructured_examples.push_back(std::move(what));
  }

  void merge(const tally& o) {
    calls += o.calls;
    ok += o.ok;
    for (auto& [k, v] : o.errors) {
      if (errors[k] == 0)
        first_message[k] = o.first_message.at(k);
      errors[k] += v;
    }
    unstructured += o.unstructured;
    for (auto& e : o.unstructured_examples)
      if (unstructured_examples.size() < 5)
        unstructured_examples.push_back(e);
    anonymous_delete_not_found += o.anonymous_delete_not_found;
    sessions_ended += o.sessions_ended;
    list_mismatches += o.list_mismatches;
  }
};

// ---------------------------------------------------------------------------------
// Callers

/// The call budget shared by every caller: one ticket per runtime call.
struct budget {
  std::atomic<std::uint64_t> next{0};
  std::uint64_t end = 0;  // this phase's end (exclusive)
  bool take() { return next.fetch_add(1, std::memory_order_relaxed) < end; }
};

class caller {
public:
  /// `session_length`: calls of a session before it is ended (staggered by
  /// up to 40% so sessions do not all end at once); `program_length`: calls
  /// of an anonymous program before it is deleted.
  caller(dspex::runtime& rt, std::size_t index, bool session, bool echo,
         std::size_t session_length, std::size_t program_length)
    : rt_(rt), index_(index), session_(session), echo_(echo),
      rotate_after_(session_length + (index * 37) % (session_length * 2 / 5 + 1)),
      program_length_(program_length) {
    new_identity();
  }

  /// Makes calls until the budget's phase is used up; the state (session,
  /// program) carries over to the next phase.
  void run(budget& b) {
    while (b.take())
      step();
  }

  const tally& counts() const { return t_; }
  bool in_session() const { return session_; }
  const std::string& session_id() const { return session_id_; }

private:
  void new_identity() {
    created_ = false;
    in_gen_ = 0;
    if (session_)
      session_id_ = fmt::format("soak-{}-{}", index_, gen_);
    else
      program_id_ = fmt::format("anon-{}-{}", index_, gen_);
    ++gen_;
  }

  // Every runtime call goes through here: one ticket, one count, never a
  // throw. A failure is tallied (by category/type) unless `tally_failure` is
  // false; nullopt when the call threw (tallied as not structured).
  template <class F>
  std::optional<dspex::outcome> call(F&& f, bool tally_failure = true) {
    ++t_.calls;
    try {
      dspex::outcome o = f();
      if (o)
        ++t_.ok;
      else if (tally_failure)
        t_.add_error(o.error());
      return o;
    } catch (const std::exception& e) {
      t_.add_unstructured(std::string{"exception: "} + e.what());
    } catch (...) {
      t_.add_unstructured("unknown exception");
    }
    return std::nullopt;
  }

  static bool ok(const std::optional<dspex::outcome>& o) { return o && o->ok(); }

  nlohmann::json execute_args() {
    return {{"program_id", session_ ? std::string{"soak-program"} : program_id_},
            {"inputs", {{"question", fmt::format("What is {} + {}?", index_, seq_)}}}};
  }

  void step() {
    ++seq_;
    if (session_)
      session_step();
    else
      anonymous_step();
  }

  void session_step() {
    auto in_session = [&](const std::string& command, nlohmann::json args) {
      return call([&] { return rt_.execute_in_session(session_id_, command, std::move(args)); });
    };
    if (!created_) {
      // Once per session. If it failed, the session is ended at the next
      // step and a new one starts (never "Program already exists").
      created_ = ok(in_session("create_program", dspex::demo_program_definition("soak-program")));
      in_gen_ = created_ ? 1 : rotate_after_;
      return;
    }
    if (in_gen_ >= rotate_after_) {
      call([&] { return rt_.end_session(session_id_); });
      ++t_.sessions_ended;
      new_identity();
      return;
    }
    ++in_gen_;
    if (in_gen_ % 25 == 0) {
      auto o = in_session("list_programs", nlohmann::json::object());
      if (ok(o) && o->value().value("total_count", std::size_t{0}) != 1)
        ++t_.list_mismatches;
      return;
    }
    in_session("execute_program", execute_args());
  }

  void anonymous_step() {
    auto anonymous = [&](const std::string& command, nlohmann::json args, bool tally = true) {
      return call([&] { return rt_.execute_anonymous(command, std::move(args)); }, tally);
    };
    if (!created_) {
      created_ = ok(anonymous("create_program", dspex::demo_program_definition(program_id_)));
      if (created_)
        in_gen_ = 1;
      else
        new_identity();  // a worker may hold it half-created: a fresh id, never "already exists"
      return;
    }
    if (in_gen_ >= program_length_) {
      auto o = anonymous("delete_program", {{"program_id", program_id_}}, false);
      if (o && !o->ok()) {
        const auto& e = o->error();
        if (e.category == dspex::error_category::python_error
            && e.message.find("Program not found") != std::string::npos)
          ++t_.anonymous_delete_not_found;
        else
          t_.add_error(e);
      }
      new_identity();
      return;
    }
    ++in_gen_;
    switch (seq_ % 10) {
      case 0:
        anonymous("ping", nlohmann::json::object());
        break;
      case 5:
        if (echo_)
          anonymous("echo", {{"caller", index_}, {"seq", seq_}, {"text", std::string(256, 'x')}});
        else
          anonymous("get_stats", nlohmann::json::object());
        break;
      default:
        anonymous("execute_program", execute_args());
    }
  }

  dspex::runtime& rt_;
  std::size_t index_;
  bool session_;
  bool echo_;
  std::size_t rotate_after_;
  std::size_t program_length_;
  std::uint64_t gen_ = 0;
  std::uint64_t seq_ = 0;
  std::size_t in_gen_ = 0;
  bool created_ = false;
  std::string session_id_;
  std::string program_id_;
  tally t_;
};

// ---------------------------------------------------------------------------------
// Phases and samples

/// Every configured worker idle with a process, none starting or removing,
/// no caller queued.
bool at_full_size(const dspex::pool_status& st) {
  if (st.size == 0 || st.idle < st.size || st.busy != 0 || st.starting != 0 || st.removing != 0
      || st.queued != 0 || st.workers.size() < st.size)
    return false;
  return std::all_of(st.workers.begin(), st.workers.end(),
                     [](const dspex::worker_info& w) { return w.pid > 0; });
}

struct sample {
  resources res;
  bool full_size = false;
  double full_size_wait_ms = 0;
  dspex::pool_status status;
};

sample quiescent_sample(dspex::runtime& rt, std::chrono::milliseconds settle) {
  sample s;
  auto begin = clock_type::now();
  auto limit = begin + std::chrono::seconds{30};
  for (;;) {
    s.status = rt.status();
    if (at_full_size(s.status)) {
      s.full_size = true;
      break;
    }
    if (clock_type::now() >= limit)
      break;
    std::this_thread::sleep_for(std::chrono::milliseconds{10});
  }
  s.full_size_wait_ms = std::chrono::duration<double, std::milli>(clock_type::now() - begin).count();
  std::this_thread::sleep_for(settle);
  s.res = sample_self();
  return s;
}

/// Runs the callers until the budget reaches `end`. Returns the seconds taken.
double run_phase(std::vector<std::unique_ptr<caller>>& callers, budget& b, std::uint64_t end) {
  b.end = end;
  auto begin = clock_type::now();
  std::vector<std::thread> threads;
  for (auto& c : callers)
    threads.emplace_back([&b, c = c.get()] { c->run(b); });
  for (auto& th : threads)
    th.join();
  // Tickets taken beyond `end` made no call; the next phase starts from `end`.
  b.next.store(end);
  return std::chrono::duration<double>(clock_type::now() - begin).count();
}

// ---------------------------------------------------------------------------------
// Options

struct soak_options {
  std::uint64_t calls = 1'000'000;
  std::size_t callers = 16;
  std::uint64_t warmup_percent = 20;
  std::uint64_t settle_ms = 500;
  std::uint64_t checkpoints = 10;  ///< quiescent samples after the warm-up, the last one at the end
  std::size_t session_length = 300;
  std::size_t program_length = 200;
  bool progress = true;
};

bool take_options(std::vector<std::string>& args, soak_options& o, std::string& bad) {
  std::vector<std::string> rest;
  for (auto& a : args) {
    auto take = [&](const char* name, auto& field, std::uint64_t min, std::uint64_t max) {
      std::string prefix = std::string{"--"} + name + "=";
      if (a.rfind(prefix, 0) != 0)
        return false;
      auto value = a.substr(prefix.size());
      try {
        std::size_t used = 0;
        auto n = std::stoull(value, &used);
        if (used != value.size() || value.empty() || value[0] == '-' || n < min || n > max)
          throw std::invalid_argument{value};
        field = static_cast<std::remove_reference_t<decltype(field)>>(n);
      } catch (const std::exception&) {
        bad = fmt::format("--{} must be an integer in [{}, {}] (got '{}')", name, min, max, value);
      }
      return true;
    };
    if (take("calls", o.calls, 100, 1'000'000'000) || take("callers", o.callers, 2, 1024)
        || take("warmup-percent", o.warmup_percent, 1, 50)
        || take("settle-ms", o.settle_ms, 0, 60'000)
        || take("checkpoints", o.checkpoints, 1, 1000)
        || take("session-length", o.session_length, 3, 100'000'000)
        || take("program-length", o.program_length, 2, 100'000'000))
      continue;
    if (a == "--quiet") {
      o.progress = false;
      continue;
    }
    rest.push_back(a);
  }
  args.swap(rest);
  return bad.empty();
}

bool has_option(const std::vector<std::string>& args, const std::string& key) {
  auto prefix = "--" + key + "=";
  return std::any_of(args.begin(), args.end(),
                     [&](const std::string& a) { return a.rfind(prefix, 0) == 0; });
}

void print_help(std::ostream& out) {
  out << "usage: dspex_soak [--calls=1000000] [--callers=16] [--warmup-percent=20] [--settle-ms=500]\n"
         "                  [--checkpoints=10] [--session-length=300] [--program-length=200] [--quiet]\n"
         "                  [--config-file=PATH] [--group.key=value ...]\n\n"
         "--checkpoints: quiescent samples after the warm-up (the last at the end), shown as a\n"
         "  trend; the verdict compares the warm-up's sample with the last one.\n"
         "--session-length: calls of a session before end_session (+0..40% per caller);\n"
         "--program-length: calls of an anonymous program before delete_program.\n"
         "Half the callers work through sessions (create once, execute, list, end_session now\n"
         "and then), half call anonymously (ping, get_stats/echo, create/execute/delete_program),\n"
         "while workers are recycled. RSS, fds and threads of this process are sampled after\n"
         "the warm-up and at the end (no call in flight, pool at full size); exit 0 only when\n"
         "each grew < 5%, every failure was structured, failures < 0.1% and no child is left.\n"
         "Soak defaults (unless given): --pool.max_requests=2000 --log.level=error.\n\n"
      << dspex::describe_settings();
}

} // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  for (auto& a : args)
    if (a == "help" || a == "--help" || a == "-h") {
      print_help(std::cout);
      return exit_ok;
    }
  soak_options opts;
  std::string bad;
  if (!take_options(args, opts, bad)) {
    std::cerr << "dspex_soak: " << bad << "\n";
    return exit_usage;
  }
  // The soak's own defaults, each unless given on the command line.
  if (!has_option(args, "pool.max_requests"))
    args.insert(args.begin(), "--pool.max_requests=2000");
  if (!has_option(args, "log.level"))
    args.insert(args.begin(), "--log.level=error");
  std::vector<std::string> remainder;
  auto loaded = dspex::load_settings(args, dspex::bundled_config_file(), &remainder);
  if (auto* err = std::get_if<dspex::error>(&loaded)) {
    std::cerr << "dspex_soak: configuration error: " << err->message << "\n";
    return exit_usage;
  }
  if (!remainder.empty()) {
    std::cerr << "dspex_soak: unexpected argument '" << remainder.front() << "' (try --help)\n";
    return exit_usage;
  }
  auto& config = std::get<dspex::settings>(loaded);
  const bool echo = config.worker.test_commands;
  const auto settle = std::chrono::milliseconds{opts.settle_ms};
  const std::uint64_t warmup = std::max<std::uint64_t>(1, opts.calls * opts.warmup_percent / 100);

  std::cerr << fmt::format(
    "dspex_soak: {} calls, {} callers ({} in sessions, {} anonymous), pool.size {}, "
    "pool.max_requests {}, lm {}, worker.python {}, warm-up {} calls\n",
    opts.calls, opts.callers, opts.callers / 2, opts.callers - opts.callers / 2, config.pool.size,
    config.pool.max_requests, config.lm.provider.empty() ? "none" : config.lm.provider,
    config.worker.python, warmup);

  std::unique_ptr<dspex::runtime> rt;
  try {
    rt = dspex::runtime::start(config);
  } catch (const dspex::start_error& e) {
    std::cerr << "dspex_soak: could not start the pool: " << e.details().message << "\n";
    return exit_start_failed;
  }

  std::vector<std::unique_ptr<caller>> callers;
  for (std::size_t i = 0; i < opts.callers; ++i)
    callers.push_back(std::make_unique<caller>(*rt, i, i < opts.callers / 2, echo,
                                              opts.session_length, opts.program_length));

  // The warm-up, then `checkpoints` phases, each followed by a quiescent
  // sample (no call in flight, the pool at full size, settle).
  struct checkpoint {
    std::uint64_t calls;
    double seconds;  // calls made so far: their time, the samples' waits excluded
    sample s;
  };
  std::vector<checkpoint> trend;
  budget b;
  double seconds = 0;
  auto line = [](const checkpoint& c) {
    const auto& r = c.s.res;
    return fmt::format("{:>10} {:>9} {:>9} {:>6} {:>8} {:>9} {:>9.0f}", c.calls, r.rss_kb,
                       r.heap_kb, r.fds, r.threads, c.s.status.recycled,
                       c.seconds > 0 ? static_cast<double>(c.calls) / c.seconds : 0.0);
  };
  const auto header = fmt::format("{:>10} {:>9} {:>9} {:>6} {:>8} {:>9} {:>9}", "calls", "rss_kB",
                                  "heap_kB", "fds", "threads", "recycled", "calls/s");
  if (opts.progress)
    std::cerr << "soak: " << header << "\n";
  for (std::uint64_t k = 0; k <= opts.checkpoints; ++k) {
    auto until = k == 0 ? warmup : warmup + (opts.calls - warmup) * k / opts.checkpoints;
    seconds += run_phase(callers, b, until);
    trend.push_back({until, seconds, quiescent_sample(*rt, settle)});
    if (opts.progress)
      std::cerr << "soak: " << line(trend.back()) << (k == 0 ? "  (warm-up done)" : "") << "\n";
  }
  const auto& start = trend.front().s;
  const auto& end = trend.back().s;

  // Tallies; the sessions still open are ended (beyond --calls, but a failure
  // counts like any other), then the runtime stops.
  tally t;
  for (auto& c : callers)
    t.merge(c->counts());
  for (auto& c : callers)
    if (c->in_session()) {
      auto o = rt->end_session(c->session_id());
      if (!o)
        t.add_error(o.error());
      ++t.sessions_ended;
    }
  auto st = rt->status();
  rt->stop();
  auto left = children_left();

  // Report.
  auto& out = std::cout;
  auto row = [&](const char* what, long a, long z) {
    out << fmt::format("{:<30}start {:>9}  end {:>9}  growth {:+.2f}%\n", what, a, z,
                       growth_percent(a, z));
  };
  out << "\n== dspex soak ==\n";
  out << fmt::format("{:<30}{}\n", "machine", machine());
  out << fmt::format("{:<30}{}\n", "calls", t.calls);
  out << fmt::format("{:<30}{} ({} in sessions, {} anonymous)\n", "callers", opts.callers,
                     opts.callers / 2, opts.callers - opts.callers / 2);
  out << fmt::format("{:<30}{:.0f} calls/s ({:.1f} s)\n", "throughput",
                     seconds > 0 ? static_cast<double>(t.calls) / seconds : 0.0, seconds);
  out << fmt::format("{:<30}{}\n", "succeeded", t.ok);
  out << fmt::format("{:<30}{} ({:.4f}%)\n", "failed", t.failed(),
                     t.calls ? 100.0 * static_cast<double>(t.failed()) / static_cast<double>(t.calls)
                             : 0.0);
  for (auto& [key, n] : t.errors)
    out << fmt::format("  {:>8}  {}  (e.g. \"{}\")\n", n, key, t.first_message[key]);
  out << fmt::format("{:<30}{}\n", "not a structured error", t.unstructured);
  for (auto& e : t.unstructured_examples)
    out << fmt::format("            {}\n", e);
  out << fmt::format("{:<30}{} (python_error \"Program not found\" on a worker that never had it;\n"
                     "{:<30}not counted as failures)\n",
                     "anonymous deletes not found", t.anonymous_delete_not_found, "");
  out << fmt::format("{:<30}{} ended, {} list_programs without exactly their one program\n",
                     "sessions", t.sessions_ended, t.list_mismatches);
  out << fmt::format("{:<30}{} recycled, {} replaced, {} start failures, health {}, circuit {}\n",
                     "workers", st.recycled, st.replaced, st.start_failures, st.health, st.circuit);
  auto waited = [](const sample& s) {
    return s.full_size ? fmt::format("{:.0f} ms", s.full_size_wait_ms) : std::string{"NEVER"};
  };
  out << fmt::format("{:<30}start {}, end {} (sampled {} ms later)\n", "pool back to full size",
                     waited(start), waited(end), opts.settle_ms);
  row("rss (VmRSS, kB)", start.res.rss_kb, end.res.rss_kb);
  if (start.res.heap_kb >= 0)
    row("heap in use (kB, info only)", start.res.heap_kb, end.res.heap_kb);
  row("open fds", start.res.fds, end.res.fds);
  row("threads", start.res.threads, end.res.threads);
  out << fmt::format("{:<30}{}\n", "processes left after stop", left.size());
  for (auto& l : left)
    out << fmt::format("            {}\n", l);
  out << "trend (quiescent samples; heap_kB: glibc mallinfo2 in use, info only)\n  " << header
      << "\n";
  for (auto& c : trend)
    out << "  " << line(c) << "\n";

  std::vector<std::string> violations;
  auto check_growth = [&](const char* what, long a, long z) {
    if (growth_percent(a, z) >= max_growth_percent)
      violations.push_back(fmt::format("{} grew {:+.2f}% ({} -> {}), limit {}%", what,
                                       growth_percent(a, z), a, z, max_growth_percent));
  };
  check_growth("rss", start.res.rss_kb, end.res.rss_kb);
  check_growth("fds", start.res.fds, end.res.fds);
  check_growth("threads", start.res.threads, end.res.threads);
  if (t.unstructured > 0)
    violations.push_back(fmt::format("{} failures were not a structured error", t.unstructured));
  if (static_cast<double>(t.failed()) >= max_failure_ratio * static_cast<double>(t.calls))
    violations.push_back(fmt::format("{} failures of {} calls (limit 0.1%)", t.failed(), t.calls));
  if (!left.empty())
    violations.push_back(fmt::format("{} child process(es) left after stop", left.size()));
  if (!start.full_size || !end.full_size)
    violations.push_back("the pool did not come back to full size within 30 s for a sample");
  if (violations.empty()) {
    out << "verdict                       PASS\n";
    return exit_ok;
  }
  out << "verdict                       FAIL\n";
  for (auto& v : violations)
    out << "  - " << v << "\n";
  return exit_violation;
}
