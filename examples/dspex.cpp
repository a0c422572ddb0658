// dspex: the command-line program of the runtime.
//
//   dspex run [--requests=N] [--concurrency=N] [--programs=N] [--quiet]
//             [--storm [--storm-cycles=N] [--storm-interval-ms=N] [--storm-kills=N]]
//             [--config-file=PATH | --topology=FILE] [--pool.size=8 ...any setting...]
//   dspex call COMMAND [JSON] [--session=ID] [--json]  one call, its reply as JSON
//   dspex doctor [--json]                            what a pool needs, and what to fix
//   dspex metrics [--requests=N]                     the Prometheus exposition
//   dspex config [--config-file=PATH] [overrides]   print the effective settings
//   dspex help                                       keys, defaults and commands
#include <algorithm>
#include <filesystem>
#include <memory>
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "dspex/config.hpp"
#include "dspex/runtime.hpp"
#include "bench.hpp"
#include "http_service.hpp"
#include "node_process.hpp"
#include "operator_commands.hpp"
#include "storm_run.hpp"
#include "workload.hpp"

namespace {

constexpr int exit_ok = 0;
constexpr int exit_failed_requests = 1;
constexpr int exit_usage = 2;
constexpr int exit_start_failed = 3;
constexpr int exit_storm_violation = 4;

void print_help(std::ostream& out) {
  out << "usage: dspex <command> [options] [--group.key=value ...]\n\n"
         "commands:\n"
         "  run      start the pool, run a workload, print a summary (progress on a terminal)\n"
         "           --requests=N (400) --concurrency=N (8) --programs=N (8) --quiet\n"
         "           --json: the summary as one JSON object\n"
         "           --storm: SIGKILL (and SIGSTOP some) random workers in any state while the\n"
         "             workload runs, then check\n"
         "             that every request succeeded or failed with a structured error, the\n"
         "             pool is back at full size within 1000 ms, and no Python process is\n"
         "             left after stop (exit 4 otherwise); the workload runs at least the\n"
         "             storm's duration + 500 ms\n"
         "           --storm-cycles=N (40) --storm-interval-ms=N (25) --storm-kills=N (3 per cycle)\n"
         "           --storm-stop-percent=N (10: share of the hits that are SIGSTOP; the pool\n"
         "             finds stopped processes at its maintenance tick, so --storm lowers\n"
         "             pool.health_interval to 100ms unless it is set explicitly)\n"
         "           --topology=FILE: the configuration of a topology (config/topologies/): the\n"
         "             workload's callers are spread over all of its pools; the nodes it lists\n"
         "             in topology.nodes are started here first (dspex node) and used\n"
         "  call     COMMAND [JSON-ARGS] [--session=ID] [--pool=NAME] [--json]: start the pools\n"
         "           (the default one with 1 worker unless --pool.size is given), run one command\n"
         "           on pool NAME (default: default), print its reply as JSON; exit code\n"
         "           by outcome: 0 ok, 1 the command failed (python_error), 2 usage or\n"
         "           configuration, 3 the pool could not start, 4 timeout, 5 the worker was lost,\n"
         "           6 no capacity (resource or session error), 7 any other error\n"
         "  doctor   [--json]: check the interpreter, the worker script, a worker's start, dspy,\n"
         "           the LM key variable and the file limit; say what to fix (exit 1 if any fails)\n"
         "  metrics  [--requests=N]: start the pool, run N pings, print the metrics in\n"
         "           Prometheus' text format\n"
         "  bench    [--quick] [--anchor] [--iterations=N] [--python=PATH] ...: the benchmark of\n"
         "           the request path (bench_pool's options), with a progress bar on a terminal\n"
         "  serve    [--bind=127.0.0.1] [--port=8080]: the example HTTP/JSON service (README);\n"
         "           0 picks a free port; SIGTERM drains it (finishes the calls in flight)\n"
         "  node     serve this runtime's pools to other runtimes (CAF's middleman) on\n"
         "           node.bind:node.port (0: any free port); prints 'dspex node: serving POOLS on\n"
         "           HOST:PORT'; SIGTERM or SIGINT stops it (--exit-with-parent: so does its\n"
         "           parent's death). A runtime uses nodes through\n"
         "           --remote.nodes='[\"127.0.0.1:PORT\"]' and calls their pools by name\n"
         "  config   print the effective settings as JSON and exit\n"
         "  help     this text\n\n"
         "configuration: --config-file=PATH (default "
      << dspex::bundled_config_file() << ")\n"
      << dspex::describe_settings()
      << "note: scheduler.policy defaults to 'sharing' in dspex (CAF's own default is "
         "'stealing').\n";
}

// The options of `run` itself; any --storm-* option implies --storm.
struct run_options {
  dspex::workload_options workload;
  std::string topology;  // --topology=FILE
  bool storm = false;
  std::size_t storm_cycles = 40;
  std::size_t storm_interval_ms = 25;
  std::size_t storm_kills = 3;
  std::size_t storm_stop_percent = 10;
};

// Takes the options that belong to `run` itself out of `args`.
bool take_run_options(std::vector<std::string>& args, run_options& run, std::string& bad) {
  auto& opts = run.workload;
  std::vector<std::string> rest;
  for (auto& a : args) {
    auto take = [&](const char* name, std::size_t& field) {
      std::string prefix = std::string{"--"} + name + "=";
      if (a.rfind(prefix, 0) != 0)
        return false;
      auto value = a.substr(prefix.size());
      if (auto n = dspex::parse_count(value, 10'000'000))
        field = *n;
      else
        bad = fmt::format("--{} must be a non-negative integer (got '{}')", name, value);
      return true;
    };
    if (take("requests", opts.requests) || take("concurrency", opts.concurrency)
        || take("programs", opts.programs))
      continue;
    if (take("storm-cycles", run.storm_cycles) || take("storm-interval-ms", run.storm_interval_ms)
        || take("storm-kills", run.storm_kills)
        || take("storm-stop-percent", run.storm_stop_percent)) {
      run.storm = true;
      continue;
    }
    if (a == "--storm") {
      run.storm = true;
      continue;
    }
    if (a == "--quiet") {
      opts.progress = false;
      continue;
    }
    if (a == "--json") {
      opts.json = true;
      continue;
    }
    // A topology is a configuration file that declares pools (and, later,
    // nodes): it is read as --config-file.
    if (a.rfind("--topology=", 0) == 0) {
      if (std::any_of(args.begin(), args.end(),
                      [](const std::string& x) { return x.rfind("--config-file=", 0) == 0; }))
        bad = "--topology is a configuration file: give it or --config-file, not both";
      run.topology = a.substr(11);
      rest.push_back("--config-file=" + run.topology);
      continue;
    }
    rest.push_back(a);
  }
  args.swap(rest);
  if (bad.empty() && run.storm && run.storm_interval_ms == 0)
    bad = "--storm-interval-ms must be at least 1";
  if (bad.empty() && run.storm_stop_percent > 100)
    bad = "--storm-stop-percent must be between 0 and 100";
  return bad.empty();
}

} // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty() || args[0] == "help" || args[0] == "--help" || args[0] == "-h") {
    print_help(args.empty() ? std::cerr : std::cout);
    return args.empty() ? exit_usage : exit_ok;
  }
  auto command = args[0];
  args.erase(args.begin());
  if (command == "bench") {
    // The benchmark's own options (bench_pool's); a progress bar on a terminal.
    std::vector<std::string> argv_strings{"dspex bench"};
    argv_strings.insert(argv_strings.end(), args.begin(), args.end());
    std::vector<char*> bench_argv;
    for (auto& a : argv_strings)
      bench_argv.push_back(a.data());
    dspex::bench::progress_fn progress;
    if (dspex::is_terminal(std::cerr)) {
      progress = [done = 0](const std::string& row) mutable {
        ++done;
        constexpr int width = 30;
        int filled = std::min(width, done * width / dspex::bench::expected_rows);
        std::cerr << "\r[" << std::string(static_cast<std::size_t>(filled), '#')
                  << std::string(static_cast<std::size_t>(width - filled), ' ') << "] "
                  << fmt::format("{:<48.48}", row) << std::flush;
      };
    }
    auto rc = dspex::bench::run(static_cast<int>(bench_argv.size()), bench_argv.data(), progress);
    if (progress)
      std::cerr << "\n";
    return rc;
  }
  if (command != "run" && command != "config" && command != "call" && command != "doctor"
      && command != "node"
      && command != "metrics" && command != "serve") {
    std::cerr << "dspex: unknown command '" << command << "' (try: dspex help)\n";
    return exit_usage;
  }
  run_options opts;
  std::string bad;
  if (command == "run" && !take_run_options(args, opts, bad)) {
    std::cerr << "dspex: " << bad << "\n";
    return exit_usage;
  }
  // The operator commands' own arguments (positional, --json, ...) are theirs;
  // the --group.key=value settings and --config-file go to the configuration.
  std::vector<std::string> own;
  if (command == "call" || command == "doctor" || command == "metrics" || command == "serve"
      || command == "node") {
    std::vector<std::string> setting_args;
    for (auto& a : args) {
      auto dot = a.find('.');
      auto eq = a.find('=');
      bool setting = a.rfind("--", 0) == 0
                     && (a.rfind("--config-file=", 0) == 0
                         || (dot != std::string::npos && (eq == std::string::npos || dot < eq)));
      (setting ? setting_args : own).push_back(a);
    }
    args.swap(setting_args);
  }
  std::vector<std::string> remainder;
  auto loaded = dspex::load_settings(args, dspex::bundled_config_file(), &remainder);
  if (auto* err = std::get_if<dspex::error>(&loaded)) {
    if (command == "doctor")  // a finding like any other
      return dspex::report_configuration_failure(own, *err, std::cout, std::cerr);
    std::cerr << "dspex: configuration error: " << err->message << "\n";
    return exit_usage;
  }
  if (!remainder.empty()) {
    std::cerr << "dspex: unexpected argument '" << remainder.front() << "' (try: dspex help)\n";
    return exit_usage;
  }
  auto& config = std::get<dspex::settings>(loaded);
  // A stopped worker is found at the pool's maintenance tick (half of
  // pool.health_interval): a storm that stops workers needs a short one.
  auto health_interval_given = std::any_of(args.begin(), args.end(), [](const std::string& a) {
    return a.rfind("--pool.health_interval=", 0) == 0;
  });
  if (opts.storm && opts.storm_stop_percent > 0 && !health_interval_given
      && config.pool.health_interval > std::chrono::milliseconds{100}) {
    config.pool.health_interval = std::chrono::milliseconds{100};
    std::cerr << "dspex: storm: pool.health_interval lowered to 100ms to find stopped workers\n";
  }
  if (command == "config") {
    std::cout << dspex::to_json(config).dump(2) << "\n";
    return exit_ok;
  }
  if (command == "call") {
    auto size_given = std::any_of(args.begin(), args.end(), [](const std::string& a) {
      return a.rfind("--pool.size=", 0) == 0;
    });
    return dspex::run_call(own, config, size_given, std::cout, std::cerr);
  }
  if (command == "doctor")
    return dspex::run_doctor(own, config, std::cout, std::cerr);
  if (command == "metrics")
    return dspex::run_metrics(own, config, std::cout, std::cerr);
  if (command == "node")
    return dspex::run_node(own, config, std::cout, std::cerr);
  if (command == "serve") {
    dspex::service_options so;
    for (auto& a : own) {
      if (a.rfind("--bind=", 0) == 0) {
        so.bind = a.substr(7);
      } else if (a.rfind("--port=", 0) == 0) {
        auto port = dspex::parse_count(a.substr(7), 65535);
        if (!port) {
          std::cerr << "dspex serve: --port must be 0..65535 (got '" << a.substr(7) << "')\n";
          return exit_usage;
        }
        so.port = static_cast<std::uint16_t>(*port);
      } else {
        std::cerr << "dspex serve: unknown argument '" << a << "' (try: dspex help)\n";
        return exit_usage;
      }
    }
    return dspex::run_service(config, so, std::cout, std::cerr);
  }
  // A topology's nodes (topology.nodes): `dspex node` processes on this
  // machine, each from its own configuration file (relative to the
  // topology's), with this command's --worker.* and --log.* settings; they
  // are stopped (SIGTERM, reaped) when run returns.
  std::vector<std::unique_ptr<dspex::node_process>> nodes;
  if (command == "run" && !config.topology_nodes.empty()) {
    auto base = std::filesystem::path{opts.topology}.parent_path();
    std::vector<std::string> forwarded;
    for (auto& a : args)
      if (a.rfind("--worker.", 0) == 0 || a.rfind("--log.", 0) == 0)
        forwarded.push_back(a);
    for (const auto& file : config.topology_nodes) {
      auto path = std::filesystem::path{file}.is_absolute() ? std::filesystem::path{file}
                                                            : base / file;
      auto node_args = forwarded;
      node_args.insert(node_args.begin(), "--config-file=" + path.string());
      try {
        nodes.push_back(std::make_unique<dspex::node_process>(
          std::filesystem::read_symlink("/proc/self/exe").string(), node_args));
      } catch (const std::exception& e) {
        std::cerr << "dspex: topology: " << e.what() << "\n";
        return exit_start_failed;
      }
      config.remote.nodes.push_back(nodes.back()->address());
      std::cerr << "dspex: topology: node " << path.filename().string() << " serves on "
                << nodes.back()->address() << "\n";
    }
  }
  try {
    if (config.pools.empty()) {
      std::cerr << fmt::format("dspex: starting {} workers ({} LM)...\n", config.pool.size,
                               config.lm.provider.empty() ? "no" : config.lm.provider);
    } else {
      std::string which;
      for (const auto& name : config.pool_names())
        which += fmt::format("{}{} {}", which.empty() ? "" : ", ", name,
                             config.find_pool(name)->pool.size);
      std::cerr << fmt::format("dspex: starting {} pools ({})...\n", config.pools.size() + 1,
                               which);
    }
    auto rt = dspex::runtime::start(config);
    if (opts.storm) {
      dspex::storm_run_options storm;
      storm.workload = opts.workload;
      storm.storm.cycles = opts.storm_cycles;
      storm.storm.interval = std::chrono::milliseconds{opts.storm_interval_ms};
      storm.storm.kills_per_cycle = opts.storm_kills;
      storm.storm.stop_fraction = static_cast<double>(opts.storm_stop_percent) / 100.0;
      std::cerr << fmt::format(
        "dspex: crash storm: {} cycles, every {} ms, {} hit(s) each ({}% SIGSTOP)\n",
        opts.storm_cycles, opts.storm_interval_ms, opts.storm_kills, opts.storm_stop_percent);
      auto report = dspex::run_storm(*rt, storm, std::cout, std::cerr);
      rt->stop();  // reaps every child: the check below is for what it missed
      auto left = dspex::python_processes_left(config.worker.script, report.worker_pids);
      dspex::print_storm_summary(report, storm, left, std::cout);
      return dspex::storm_violations(report, storm, left).empty() ? exit_ok
                                                                  : exit_storm_violation;
    }
    // Progress on a terminal only: a pipe gets the summary alone.
    if (!dspex::is_terminal(std::cerr))
      opts.workload.progress = false;
    auto failed = dspex::run_workload(*rt, opts.workload, std::cout, std::cerr);
    rt->stop();
    return failed == 0 ? exit_ok : exit_failed_requests;
  } catch (const dspex::start_error& e) {
    std::cerr << "dspex: could not start the pool: " << e.details().message << "\n";
    return exit_start_failed;
  }
}
