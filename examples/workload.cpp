#include "workload.hpp"

#include <atomic>
#include <map>
#include <mutex>
#include <ostream>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "dspex/latency.hpp"
#include "dspex/runtime.hpp"

namespace dspex {

namespace {

using clock_type = std::chrono::steady_clock;

nlohmann::json program_definition(std::size_t i) {
  return {{"id", fmt::format("demo-{}", i)},
          {"program_type", "predict"},
          {"signature",
           {{"name", "QuestionAnswer"},
            {"description", "Answer a question with a confidence"},
            {"inputs", {{{"name", "question"}, {"type", "str"}}}},
            {"outputs",
             {{{"name", "answer"}, {"type", "str"}}, {{"name", "confidence"}, {"type", "float"}}}}}}};
}

struct tally {
  std::mutex mtx;
  latency_recorder latencies;
  std::size_t ok = 0;
  std::map<std::string, std::size_t> errors;  ///< "category/type" → count
  std::map<std::string, std::string> first_message;

  void add(const outcome& o, clock_type::duration took) {
    std::lock_guard<std::mutex> guard{mtx};
    latencies.record(took);
    if (o) {
      ++ok;
      return;
    }
    auto key = std::string{to_string(o.error().category)} + "/" + o.error().type;
    if (errors[key]++ == 0)
      first_message[key] = o.error().message;
  }

  std::size_t failed() {
    std::size_t n = 0;
    for (auto& [k, v] : errors)
      n += v;
    return n;
  }
};

outcome timed(runtime& rt, tally& t, const std::string& command, nlohmann::json args) {
  auto start = clock_type::now();
  auto o = rt.execute_anonymous(command, std::move(args));
  t.add(o, clock_type::now() - start);
  return o;
}

} // namespace

std::size_t run_workload(runtime& rt, const workload_options& opts, std::ostream& out,
                         std::ostream& progress_out) {
  tally t;
  auto started = clock_type::now();

  // Phase 1: programs. Executions carry the definition (program_data), so
  // any worker can serve any program.
  std::vector<nlohmann::json> defs;
  for (std::size_t i = 0; i < opts.programs; ++i) {
    defs.push_back(program_definition(i));
    timed(rt, t, "create_program", defs.back());
  }

  // Phase 2: executions from concurrent callers.
  std::atomic<std::size_t> next{0};
  std::atomic<std::size_t> done{0};
  std::vector<std::thread> callers;
  for (std::size_t c = 0; c < std::max<std::size_t>(1, opts.concurrency); ++c)
    callers.emplace_back([&] {
      for (auto i = next++; i < opts.requests; i = next++) {
        const auto& def = defs.empty() ? program_definition(0) : defs[i % defs.size()];
        timed(rt, t, "execute_program",
              {{"program_id", def["id"]},
               {"inputs", {{"question", fmt::format("What is {} + {}?", i, i)}}},
               {"program_data", def}});
        ++done;
      }
    });
  std::size_t last_shown = 0;
  auto show = [&](std::size_t n) {
    progress_out << fmt::format("progress: {:>5}/{} executions ({:>3}%), {} errors so far\n", n,
                                opts.requests, opts.requests ? n * 100 / opts.requests : 100,
                                [&] {
                                  std::lock_guard<std::mutex> guard{t.mtx};
                                  return t.failed();
                                }());
    progress_out.flush();
  };
  if (opts.progress) {
    // Progress from the caller side; the join below is the real completion.
    std::size_t step = std::max<std::size_t>(1, opts.requests / 10);
    while (done.load() < opts.requests) {
      std::this_thread::sleep_for(std::chrono::milliseconds{100});
      auto n = done.load();
      if (n >= last_shown + step && n < opts.requests) {
        last_shown = n - n % step;
        show(n);
      }
    }
  }
  for (auto& th : callers)
    th.join();
  if (opts.progress)
    show(done.load());

  // Phase 3: list programs (seed Fix 3's shape).
  auto listed = timed(rt, t, "list_programs", nlohmann::json::object());
  auto elapsed = std::chrono::duration<double>(clock_type::now() - started).count();

  // Summary.
  auto total = t.latencies.count();
  out << "\n== dspex run summary ==\n";
  out << fmt::format("{:<28}{}\n", "requests", total);
  out << fmt::format("{:<28}{}\n", "succeeded", t.ok);
  out << fmt::format("{:<28}{}\n", "failed", t.failed());
  for (auto& [key, n] : t.errors)
    out << fmt::format("  {:>6}  {}  (e.g. \"{}\")\n", n, key, t.first_message[key]);
  out << fmt::format("{:<28}{:.1f} us\n", "latency p50", t.latencies.percentile_us(50));
  out << fmt::format("{:<28}{:.1f} us\n", "latency p99", t.latencies.percentile_us(99));
  out << fmt::format("{:<28}{:.0f} req/s\n", "throughput", elapsed > 0 ? total / elapsed : 0.0);
  out << fmt::format("{:<28}{:.2f} s\n", "wall time", elapsed);
  if (listed)
    out << fmt::format("{:<28}{} (on the worker that answered)\n", "list_programs total_count",
                       listed.value().value("total_count", 0));
  auto st = rt.status();
  out << fmt::format("{:<28}size {}, idle {}, busy {}, starting {}, queued {}, replaced {}\n",
                     "pool", st.size, st.idle, st.busy, st.starting, st.queued, st.replaced);
  out << fmt::format("\n{:<8}{:>8}{:>7}{:>11}{:>10}{:>10}{:>11}  {}\n", "worker", "pid", "state",
                     "checkouts", "ok_in", "error_in", "uptime_s", "");
  auto row = [&](const worker_info& w, const char* note) {
    out << fmt::format("{:<8}{:>8}{:>7}{:>11}{:>10}{:>10}{:>11.1f}  {}\n", w.id, w.pid, w.state,
                       w.stats.checkouts, w.stats.successful_checkins, w.stats.error_checkins,
                       w.uptime_s, note);
  };
  for (auto& w : st.workers)
    row(w, "");
  for (auto& w : st.retired)
    row(w, "(removed)");
  out.flush();
  return t.failed();
}

} // namespace dspex
