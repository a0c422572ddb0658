// dspex: the command-line program of the runtime.
//
//   dspex run [--requests=N] [--concurrency=N] [--programs=N] [--quiet]
//             [--config-file=PATH] [--pool.size=8 ...any setting...]
//   dspex config [--config-file=PATH] [overrides]   print the effective settings
//   dspex help                                       keys, defaults and commands
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "dspex/config.hpp"
#include "dspex/runtime.hpp"
#include "workload.hpp"

namespace {

constexpr int exit_ok = 0;
constexpr int exit_failed_requests = 1;
constexpr int exit_usage = 2;
constexpr int exit_start_failed = 3;

void print_help(std::ostream& out) {
  out << "usage: dspex <command> [options] [--group.key=value ...]\n\n"
         "commands:\n"
         "  run      start the pool, run a workload, print a summary\n"
         "           --requests=N (400) --concurrency=N (8) --programs=N (8) --quiet\n"
         "  config   print the effective settings as JSON and exit\n"
         "  help     this text\n\n"
         "configuration: --config-file=PATH (default "
      << dspex::default_config_file << ")\n"
      << dspex::describe_settings()
      << "note: scheduler.policy defaults to 'sharing' in dspex (CAF's own default is "
         "'stealing').\n";
}

// Takes the options that belong to `run` itself out of `args`.
bool take_run_options(std::vector<std::string>& args, dspex::workload_options& opts,
                      std::string& bad) {
  std::vector<std::string> rest;
  for (auto& a : args) {
    auto take = [&](const char* name, std::size_t& field) {
      std::string prefix = std::string{"--"} + name + "=";
      if (a.rfind(prefix, 0) != 0)
        return false;
      auto value = a.substr(prefix.size());
      try {
        std::size_t used = 0;
        auto n = std::stoul(value, &used);
        if (used != value.size() || n > 10'000'000 || value[0] == '-')
          throw std::invalid_argument{value};
        field = n;
      } catch (const std::exception&) {
        bad = fmt::format("--{} must be a non-negative integer (got '{}')", name, value);
      }
      return true;
    };
    if (take("requests", opts.requests) || take("concurrency", opts.concurrency)
        || take("programs", opts.programs))
      continue;
    if (a == "--quiet") {
      opts.progress = false;
      continue;
    }
    rest.push_back(a);
  }
  args.swap(rest);
  return bad.empty();
}

nlohmann::json settings_json(const dspex::settings& s) {
  return {{"pool",
           {{"size", s.pool.size},
            {"init_timeout_ms", s.pool.init_timeout.count()},
            {"request_timeout_ms", s.pool.request_timeout.count()},
            {"max_frame_bytes", s.pool.max_frame_bytes}}},
          {"worker",
           {{"python", s.worker.python},
            {"script", s.worker.script},
            {"extra_args", s.worker.extra_args},
            {"test_commands", s.worker.test_commands},
            {"shutdown_grace_ms", s.worker.shutdown_grace.count()},
            {"kill_grace_ms", s.worker.kill_grace.count()}}},
          {"lm", {{"provider", s.lm.provider}, {"model", s.lm.model}, {"temperature", s.lm.temperature}}},
          {"log", {{"level", s.log_level}}},
          {"scheduler", {{"policy", s.scheduler_policy}, {"max-threads", s.scheduler_max_threads}}}};
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
  if (command != "run" && command != "config") {
    std::cerr << "dspex: unknown command '" << command << "' (try: dspex help)\n";
    return exit_usage;
  }
  dspex::workload_options opts;
  std::string bad;
  if (command == "run" && !take_run_options(args, opts, bad)) {
    std::cerr << "dspex: " << bad << "\n";
    return exit_usage;
  }
  std::vector<std::string> remainder;
  auto loaded = dspex::load_settings(args, dspex::default_config_file, &remainder);
  if (auto* err = std::get_if<dspex::error>(&loaded)) {
    std::cerr << "dspex: configuration error: " << err->message << "\n";
    return exit_usage;
  }
  if (!remainder.empty()) {
    std::cerr << "dspex: unexpected argument '" << remainder.front() << "' (try: dspex help)\n";
    return exit_usage;
  }
  auto& config = std::get<dspex::settings>(loaded);
  if (command == "config") {
    std::cout << settings_json(config).dump(2) << "\n";
    return exit_ok;
  }
  try {
    std::cerr << fmt::format("dspex: starting {} workers ({} LM)...\n", config.pool.size,
                             config.lm.provider.empty() ? "no" : config.lm.provider);
    auto rt = dspex::runtime::start(config);
    auto failed = dspex::run_workload(*rt, opts, std::cout, std::cerr);
    rt->stop();
    return failed == 0 ? exit_ok : exit_failed_requests;
  } catch (const dspex::start_error& e) {
    std::cerr << "dspex: could not start the pool: " << e.details().message << "\n";
    return exit_start_failed;
  }
}
