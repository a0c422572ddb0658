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
  return demo_program_definition(fmt::format("demo-{}", i));
}

struct tally {
  std::mutex mtx;
  latency_recorder latencies;
  workload_result result;

  void add(const std::string& pool, const outcome& o, clock_type::duration took) {
    std::lock_guard<std::mutex> guard{mtx};
    latencies.record(took);
    ++result.requests;
    if (o) {
      ++result.ok;
      ++result.ok_by_pool[pool];
      return;
    }
    if (!is_structured(o.error())) {
      unstructured(o.error().to_json().dump());
      return;
    }
    auto key = std::string{to_string(o.error().category)} + "/" + o.error().type;
    if (result.errors[key]++ == 0)
      result.first_message[key] = o.error().message;
  }

  void add_exception(const std::string& what, clock_type::duration took) {
    std::lock_guard<std::mutex> guard{mtx};
    latencies.record(took);
    ++result.requests;
    unstructured("exception: " + what);
  }

  std::size_t failed() { return result.failed(); }

private:
  void unstructured(std::string what) {  // mtx held
    ++result.unstructured;
    if (result.unstructured_examples.size() < 5)
      result.unstructured_examples.push_back(std::move(what));
  }
};

// execute_* never throw by contract; a throw is counted, not propagated, so
// the workload (and a storm around it) always completes.
// `session`: the call runs in that session (empty: anonymously) of `pool`.
outcome timed(runtime& rt, tally& t, const std::string& pool, const std::string& session,
              const std::string& command, nlohmann::json args) {
  auto start = clock_type::now();
  try {
    session_call_options in_session;
    in_session.pool = pool;
    call_options anonymous;
    anonymous.pool = pool;
    auto o = session.empty()
               ? rt.execute_anonymous(command, std::move(args), anonymous)
               : rt.execute_in_session(session, command, std::move(args), in_session);
    t.add(pool, o, clock_type::now() - start);
    return o;
  } catch (const std::exception& e) {
    t.add_exception(e.what(), clock_type::now() - start);
  } catch (...) {
    t.add_exception("unknown exception", clock_type::now() - start);
  }
  return outcome::failure(make_error(error_category::system_error, "exception",
                                     "execute_anonymous threw"));
}

} // namespace

nlohmann::json demo_program_definition(const std::string& id) {
  return {{"id", id},
          {"program_type", "predict"},
          {"signature",
           {{"name", "QuestionAnswer"},
            {"description", "Answer a question with a confidence"},
            {"inputs", {{{"name", "question"}, {"type", "str"}}}},
            {"outputs",
             {{{"name", "answer"}, {"type", "str"}}, {{"name", "confidence"}, {"type", "float"}}}}}}};
}

std::size_t workload_result::failed() const {
  std::size_t n = unstructured;
  for (auto& [k, v] : errors)
    n += v;
  return n;
}

bool is_structured(const error& e) {
  return category_from_string(to_string(e.category)).has_value()
         && static_cast<std::size_t>(e.category)
              <= static_cast<std::size_t>(error_category::configuration_error)
         && !e.type.empty() && !e.message.empty() && e.context.is_object();
}

std::size_t run_workload(runtime& rt, const workload_options& opts, std::ostream& out,
                         std::ostream& progress_out) {
  return run_workload_detailed(rt, opts, out, progress_out).failed();
}

workload_result run_workload_detailed(runtime& rt, const workload_options& opts,
                                      std::ostream& out, std::ostream& progress_out) {
  tally t;
  auto started = clock_type::now();

  // One session per caller: it creates its own programs, then executes them
  // (the session adds each program's definition, so any worker can serve
  // it, whichever worker died), and at the end lists them: a session that
  // lists fewer programs than it created lost some.
  std::vector<nlohmann::json> defs;
  for (std::size_t i = 0; i < opts.programs; ++i)
    defs.push_back(program_definition(i));
  const auto sessions = std::max<std::size_t>(1, opts.concurrency);
  auto session_name = [](std::size_t c) { return fmt::format("session-{}", c); };
  // Sessions are spread over every pool of the runtime (a topology's named
  // pools too): session c belongs to pool c mod the pools' count.
  const auto pools = rt.pools();
  auto pool_of = [&](std::size_t c) -> const std::string& { return pools[c % pools.size()]; };

  // Phase 1: each session creates its programs (counted when created).
  std::vector<std::size_t> created(sessions, 0);
  for (std::size_t c = 0; c < sessions; ++c)
    for (auto& def : defs)
      created[c] += timed(rt, t, pool_of(c), session_name(c), "create_program", def) ? 1 : 0;

  // Phase 2: executions from concurrent callers, one session each.
  std::atomic<std::size_t> next{0};
  std::atomic<std::size_t> done{0};
  const auto run_until = clock_type::now() + opts.min_duration;
  // Beyond `requests`, callers go on while min_duration has not passed.
  auto more = [&](std::size_t i) {
    return i < opts.requests || clock_type::now() < run_until;
  };
  std::vector<std::thread> callers;
  for (std::size_t c = 0; c < sessions; ++c)
    callers.emplace_back([&, c] {
      auto session = session_name(c);
      for (auto i = next++; more(i); i = next++) {
        const auto& def = defs.empty() ? program_definition(0) : defs[i % defs.size()];
        timed(rt, t, pool_of(c), session, "execute_program",
              {{"program_id", def["id"]},
               {"inputs", {{"question", fmt::format("What is {} + {}?", i, i)}}}});
        ++done;
      }
    });
  std::size_t last_shown = 0;
  auto show = [&](std::size_t n) {
    auto errors = [&] {
      std::lock_guard<std::mutex> guard{t.mtx};
      return t.failed();
    }();
    if (n <= opts.requests)
      progress_out << fmt::format("progress: {:>5}/{} executions ({:>3}%), {} errors so far\n", n,
                                  opts.requests, opts.requests ? n * 100 / opts.requests : 100,
                                  errors);
    else
      progress_out << fmt::format("progress: {:>5} executions (running for {} ms), {} errors so far\n",
                                  n, opts.min_duration.count(), errors);
    progress_out.flush();
  };
  if (opts.progress) {
    // Progress from the caller side; the join below is the real completion.
    std::size_t step = std::max<std::size_t>(1, opts.requests / 10);
    for (;;) {
      std::this_thread::sleep_for(std::chrono::milliseconds{100});
      auto n = done.load();
      if (n >= last_shown + step && (n < opts.requests || opts.min_duration.count() > 0)) {
        last_shown = n - n % step;
        show(n);
      }
      if (n >= opts.requests && clock_type::now() >= run_until)
        break;
    }
  }
  for (auto& th : callers)
    th.join();
  if (opts.progress)
    show(done.load());

  // Phase 3: every session lists its programs (seed Fix 3's shape).
  std::size_t listed_total = 0;
  std::size_t programs_lost = 0;
  for (std::size_t c = 0; c < sessions; ++c) {
    auto listed = timed(rt, t, pool_of(c), session_name(c), "list_programs",
                        nlohmann::json::object());
    auto n = listed ? listed.value().value("total_count", std::size_t{0}) : std::size_t{0};
    listed_total += n;
    programs_lost += created[c] - std::min(created[c], n);
  }
  std::size_t created_total = 0;
  for (auto n : created)
    created_total += n;
  auto elapsed = std::chrono::duration<double>(clock_type::now() - started).count();

  // Summary.
  std::lock_guard<std::mutex> guard{t.mtx};
  auto& r = t.result;
  r.executions = done.load();
  r.sessions = sessions;
  r.programs_lost = programs_lost;
  r.elapsed_s = elapsed;
  auto total = t.latencies.count();
  if (opts.json) {
    auto st = rt.status();
    nlohmann::json errors = nlohmann::json::object();
    for (auto& [key, n] : r.errors)
      errors[key] = {{"count", n}, {"example", r.first_message[key]}};
    out << nlohmann::json{
             {"requests", total},
             {"succeeded", r.ok},
             {"failed", r.failed()},
             {"errors", errors},
             {"unstructured", r.unstructured},
             {"latency_us", {{"p50", t.latencies.percentile_us(50)},
                             {"p99", t.latencies.percentile_us(99)}}},
             {"throughput_rps", elapsed > 0 ? static_cast<double>(total) / elapsed : 0.0},
             {"wall_time_s", elapsed},
             {"sessions", {{"count", sessions}, {"programs_listed", listed_total},
                           {"programs_created", created_total}, {"programs_lost", programs_lost}}},
             {"pool", st.to_json()},
             {"pools", [&] {
                auto j = nlohmann::json::object();
                for (const auto& name : pools) {
                  auto ps = name == st.pool ? st : rt.status(name);
                  j[name] = {{"succeeded", r.ok_by_pool[name]},
                             {"health", ps.health},
                             {"size", ps.size},
                             {"replaced", ps.replaced}};
                }
                return j;
              }()}}
             .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace)
        << "\n";
    out.flush();
    return r;
  }
  out << "\n== dspex run summary ==\n";
  out << fmt::format("{:<28}{}\n", "requests", total);
  out << fmt::format("{:<28}{}\n", "succeeded", r.ok);
  out << fmt::format("{:<28}{}\n", "failed", r.failed());
  for (auto& [key, n] : r.errors)
    out << fmt::format("  {:>6}  {}  (e.g. \"{}\")\n", n, key, r.first_message[key]);
  if (r.unstructured > 0) {
    out << fmt::format("  {:>6}  NOT a structured error (contract violation)\n", r.unstructured);
    for (auto& e : r.unstructured_examples)
      out << fmt::format("          {}\n", e);
  }
  out << fmt::format("{:<28}{:.1f} us\n", "latency p50", t.latencies.percentile_us(50));
  out << fmt::format("{:<28}{:.1f} us\n", "latency p99", t.latencies.percentile_us(99));
  out << fmt::format("{:<28}{:.0f} req/s\n", "throughput", elapsed > 0 ? total / elapsed : 0.0);
  out << fmt::format("{:<28}{:.2f} s\n", "wall time", elapsed);
  out << fmt::format("{:<28}{} sessions, {} programs listed of {} created, {} lost\n",
                     "sessions", sessions, listed_total, created_total, programs_lost);
  auto st = rt.status();
  out << fmt::format("{:<28}{} hits, {} misses, {} rebinds\n", "session affinity",
                     st.affinity_hits, st.affinity_misses, st.affinity_rebinds);
  out << fmt::format("{:<28}size {}, idle {}, busy {}, starting {}, queued {}, replaced {}, "
                     "recycled {}, health {}, circuit {}\n",
                     "pool", st.size, st.idle, st.busy, st.starting, st.queued, st.replaced,
                     st.recycled, st.health, st.circuit);
  if (pools.size() > 1)  // a topology: each pool's share
    for (const auto& name : pools) {
      auto ps = rt.status(name);
      out << fmt::format("{:<28}{} calls succeeded; size {}, replaced {}, health {}\n",
                         "pool " + name, r.ok_by_pool[name], ps.size, ps.replaced, ps.health);
    }
  // The pool's own accounting (pool_metrics): every call since start, the
  // pool's view, beside the workload's view above.
  out << fmt::format("\n{:<12}{:>9}{:>10}{:>10}{:>10}{:>11}{:>10}\n", "pool latency", "calls",
                     "p50 us", "p90 us", "p99 us", "max us", "mean us");
  auto latency_row = [&](const char* name, const latency_summary& l) {
    out << fmt::format("{:<12}{:>9}{:>10.1f}{:>10.1f}{:>10.1f}{:>11.1f}{:>10.1f}\n", name, l.count,
                       l.p50_us, l.p90_us, l.p99_us, l.max_us, l.mean_us);
  };
  latency_row("queue wait", st.metrics.queue_wait);
  latency_row("run", st.metrics.run);
  latency_row("total", st.metrics.total);
  out << fmt::format("{:<28}{:.1f}% of pool.size x wall time; {} calls in flight\n",
                     "utilisation", st.metrics.utilisation * 100, st.metrics.in_flight);
  out << fmt::format("\n{:<8}{:>8}{:>10}{:>11}{:>10}{:>10}{:>11}  {}\n", "worker", "pid", "state",
                     "checkouts", "ok_in", "error_in", "uptime_s", "");
  auto row = [&](const worker_info& w, const char* note) {
    out << fmt::format("{:<8}{:>8}{:>10}{:>11}{:>10}{:>10}{:>11.1f}  {}\n", w.id, w.pid, w.state,
                       w.stats.checkouts, w.stats.successful_checkins, w.stats.error_checkins,
                       w.uptime_s, note);
  };
  for (auto& w : st.workers)
    row(w, "");
  for (auto& w : st.retired)
    row(w, "(removed)");
  out.flush();
  return r;
}

} // namespace dspex
