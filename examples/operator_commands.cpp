#include "operator_commands.hpp"

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <optional>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "dspex/prometheus.hpp"
#include "dspex/runtime.hpp"

extern char** environ;

namespace dspex {

namespace {

using clock_type = std::chrono::steady_clock;

/// A blocking command wants the runtime's own lines only when something is
/// wrong: warnings and up, unless log.level was chosen.
void quiet_logs(settings& config) {
  if (config.log_level == "info")
    config.log_level = "warn";
}

/// Runs `argv` (PATH lookup), returns its stdout when it exits 0 within
/// `limit`; nullopt otherwise (it is killed at the limit). Bounded: never
/// waits longer, whatever the program does.
std::optional<std::string> run_capture(const std::vector<std::string>& argv,
                                       std::chrono::milliseconds limit) {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0)
    return std::nullopt;
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, fds[1], STDOUT_FILENO);
  posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, "/dev/null", O_WRONLY, 0);
  std::vector<char*> args;
  for (auto& a : argv)
    args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = -1;
  int rc = ::posix_spawnp(&pid, args[0], &actions, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  ::close(fds[1]);
  if (rc != 0) {
    ::close(fds[0]);
    return std::nullopt;
  }
  std::string out;
  auto until = clock_type::now() + limit;
  bool timed_out = false;
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(until - clock_type::now());
    if (left.count() <= 0) {
      timed_out = true;
      break;
    }
    pollfd p{fds[0], POLLIN, 0};
    int r = ::poll(&p, 1, static_cast<int>(left.count()));
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0) {
      timed_out = r == 0;
      break;
    }
    char buf[4096];
    auto n = ::read(fds[0], buf, sizeof buf);
    if (n <= 0)
      break;
    if (out.size() < 65536)
      out.append(buf, static_cast<std::size_t>(n));
  }
  ::close(fds[0]);
  if (timed_out)
    ::kill(pid, SIGKILL);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (timed_out || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
    return std::nullopt;
  return out;
}

std::string trimmed(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == '\r' || s.back() == ' '))
    s.pop_back();
  return s;
}

} // namespace

std::optional<std::size_t> parse_count(const std::string& text, std::size_t max) {
  if (text.empty() || text.find_first_not_of("0123456789") != std::string::npos || text.size() > 19)
    return std::nullopt;
  auto n = std::stoull(text);
  if (n > max)
    return std::nullopt;
  return static_cast<std::size_t>(n);
}

bool is_terminal(std::ostream& out) {
  if (&out == &std::cout)
    return ::isatty(STDOUT_FILENO) == 1;
  if (&out == &std::cerr)
    return ::isatty(STDERR_FILENO) == 1;
  return false;
}

int call_exit_code(error_category category) noexcept {
  switch (category) {
    case error_category::python_error: return call_command_failed;
    case error_category::configuration_error: return call_usage;
    case error_category::initialization_error: return call_start_failed;
    case error_category::timeout_error: return call_timeout;
    case error_category::communication_error:
    case error_category::connection_error: return call_worker_lost;
    case error_category::resource_error:
    case error_category::session_error: return call_no_capacity;
    default: return call_runtime_error;
  }
}

// -- dspex call ----------------------------------------------------------------------

int run_call(const std::vector<std::string>& args, settings config, bool size_given,
             std::ostream& out, std::ostream& err) {
  std::vector<std::string> positional;
  std::optional<std::string> session;
  std::string pool;
  bool json_out = false;
  for (auto& a : args) {
    if (a == "--json")
      json_out = true;
    else if (a.rfind("--session=", 0) == 0)
      session = a.substr(10);
    else if (a.rfind("--pool=", 0) == 0)
      pool = a.substr(7);
    else if (a.rfind("--", 0) == 0) {
      err << "dspex call: unknown option '" << a << "' (try: dspex help)\n";
      return call_usage;
    } else
      positional.push_back(a);
  }
  if (positional.empty() || positional.size() > 2) {
    err << "dspex call: usage: dspex call COMMAND [JSON-ARGS] [--session=ID] [--pool=NAME] "
           "[--json]\n";
    return call_usage;
  }
  nlohmann::json call_args = nlohmann::json::object();
  if (positional.size() == 2) {
    call_args = nlohmann::json::parse(positional[1], nullptr, false);
    if (call_args.is_discarded() || !call_args.is_object()) {
      err << "dspex call: the arguments must be one JSON object (got '" << positional[1] << "')\n";
      return call_usage;
    }
  }
  if (!size_given)
    config.pool.size = 1;  // one call: one worker
  quiet_logs(config);
  if (is_terminal(err))
    err << fmt::format("dspex: starting {} worker{}...\n", config.pool.size,
                       config.pool.size == 1 ? "" : "s");
  std::unique_ptr<runtime> rt;
  try {
    rt = runtime::start(config);
  } catch (const start_error& e) {
    if (json_out)
      out << outcome::failure(e.details()).to_json().dump() << "\n";
    err << "dspex call: could not start the pool: " << e.details().message << "\n";
    return e.details().category == error_category::configuration_error ? call_usage
                                                                        : call_start_failed;
  }
  session_call_options in_session;
  in_session.pool = pool;
  call_options anonymous;
  anonymous.pool = pool;
  auto result = session ? rt->execute_in_session(*session, positional[0], std::move(call_args),
                                                 in_session)
                        : rt->execute_anonymous(positional[0], std::move(call_args), anonymous);
  rt->stop();
  auto indent = is_terminal(out) ? 2 : -1;
  auto dump = [&](const nlohmann::json& j) {
    return j.dump(indent, ' ', false, nlohmann::json::error_handler_t::replace);
  };
  if (json_out)
    out << dump(result.to_json()) << "\n";
  else if (result)
    out << dump(result.value()) << "\n";
  if (!result) {
    if (!json_out)
      err << "dspex call: " << result.error().describe() << "\n";
    return call_exit_code(result.error().category);
  }
  return call_ok;
}

// -- dspex doctor ----------------------------------------------------------------------

namespace {

struct check {
  std::string name;
  std::string status;  ///< ok, warn or fail
  std::string detail;
  std::string fix;     ///< what to do; empty when nothing
};

} // namespace

int run_doctor(const std::vector<std::string>& args, const settings& given, std::ostream& out,
               std::ostream& err) {
  bool json_out = false;
  for (auto& a : args) {
    if (a == "--json") {
      json_out = true;
      continue;
    }
    err << "dspex doctor: unknown argument '" << a << "' (try: dspex help)\n";
    return 2;
  }
  std::vector<check> checks;
  auto config = given;
  auto python = find_executable(config.worker.python);
  if (python.empty()) {
    checks.push_back({"interpreter", "fail", "'" + config.worker.python + "' is not in PATH or not executable",
                      "install Python 3 (apt-get install python3) or set worker.python to its path"});
  } else {
    auto version = run_capture({python, "-c", "import sys; print(sys.version.split()[0])"},
                               std::chrono::seconds{20});
    if (version)
      checks.push_back({"interpreter", "ok", python + " (Python " + trimmed(*version) + ")", ""});
    else
      checks.push_back({"interpreter", "fail", python + " did not run (or not within 20 s)",
                        "check that worker.python is a working Python 3 interpreter"});
  }
  if (std::ifstream{config.worker.script})
    checks.push_back({"worker script", "ok", config.worker.script, ""});
  else
    checks.push_back({"worker script", "fail", "cannot read " + config.worker.script,
                      "set worker.script to the bundled dspex_worker.py (default: " +
                        bundled_worker_script() + ")"});
  // dspy, asked of the interpreter itself (a worker says the same in its ping).
  bool dspy = false;
  if (!python.empty()) {
    auto found = run_capture({python, "-c", "import dspy; print(dspy.__version__)"},
                             std::chrono::seconds{60});
    dspy = found.has_value();
    if (dspy)
      checks.push_back({"dspy", "ok", "importable (version " + trimmed(*found) + ")", ""});
    else
      checks.push_back({"dspy", config.lm.provider.empty() || config.lm.provider == "mock" ? "warn" : "fail",
                        "not importable by " + python + "; only the mock LM works",
                        "python3 -m venv ~/dspy-env && ~/dspy-env/bin/pip install dspy, then "
                        "--worker.python=$HOME/dspy-env/bin/python"});
  }
  if (!config.lm.api_key_env.empty()) {
    const char* v = std::getenv(config.lm.api_key_env.c_str());
    if (v && *v)
      checks.push_back({"LM key", "ok", config.lm.api_key_env + " is set (its value is not shown)", ""});
    else
      checks.push_back({"LM key", "fail", config.lm.api_key_env + " (lm.api_key_env) is not set",
                        "export " + config.lm.api_key_env + "=<your key> before starting"});
  } else if (!config.lm.provider.empty() && config.lm.provider != "mock") {
    checks.push_back({"LM key", "warn", "lm.provider is " + config.lm.provider + " but lm.api_key_env is not set",
                      "set lm.api_key_env to the variable holding the key, e.g. --lm.api_key_env=GEMINI_API_KEY"});
  } else {
    checks.push_back({"LM key", "ok", "none needed (lm.provider " +
                                        (config.lm.provider.empty() ? std::string{"none"} : config.lm.provider) + ")", ""});
  }
  rlimit files{};
  ::getrlimit(RLIMIT_NOFILE, &files);
  // Each worker holds ~8 descriptors (pipes, pidfd, its guardian's pipe).
  auto needed = static_cast<rlim_t>(64 + 8 * config.pool.size);
  if (files.rlim_cur == RLIM_INFINITY || files.rlim_cur >= needed)
    checks.push_back({"file limit", "ok",
                      fmt::format("{} open files allowed, {} needed for pool.size={}",
                                  files.rlim_cur == RLIM_INFINITY ? std::string{"unlimited"}
                                                                  : std::to_string(files.rlim_cur),
                                  needed, config.pool.size), ""});
  else
    checks.push_back({"file limit", "fail",
                      fmt::format("{} open files allowed, {} needed for pool.size={}", files.rlim_cur,
                                  needed, config.pool.size),
                      fmt::format("ulimit -n {}", needed * 2)});
  // The whole start: the configuration, a worker's start and init ping, its LM.
  bool startable = std::none_of(checks.begin(), checks.end(), [](const check& c) {
    return c.status == "fail" && c.name != "dspy";
  });
  if (startable) {
    config.pool.size = 1;
    quiet_logs(config);
    try {
      auto rt = runtime::start(config);
      auto pong = rt->execute_anonymous("ping");
      rt->stop();
      if (pong)
        checks.push_back({"worker start", "ok",
                          fmt::format("a worker started, applied the LM ({}) and answered a ping",
                                      pong.value().value("lm", nlohmann::json("none")).is_string()
                                        ? pong.value()["lm"].get<std::string>() : "none"),
                          ""});
      else
        checks.push_back({"worker start", "fail", pong.error().describe(), "see the error above"});
    } catch (const start_error& e) {
      checks.push_back({"worker start", "fail", e.details().describe(),
                        e.details().category == error_category::configuration_error
                          ? "fix the setting it names"
                          : "run the worker by hand to see its error: " + config.worker.python + " " +
                              config.worker.script + " --mode pool-worker"});
    }
  } else {
    checks.push_back({"worker start", "fail", "not tried: fix the failures above first", ""});
  }
  bool failed = std::any_of(checks.begin(), checks.end(), [](const check& c) { return c.status == "fail"; });
  if (json_out) {
    auto list = nlohmann::json::array();
    for (auto& c : checks)
      list.push_back({{"name", c.name}, {"status", c.status}, {"detail", c.detail}, {"fix", c.fix}});
    out << nlohmann::json{{"ok", !failed}, {"checks", list}}.dump(is_terminal(out) ? 2 : -1) << "\n";
  } else {
    for (auto& c : checks) {
      out << fmt::format("{:<5} {:<14} {}\n", c.status, c.name, c.detail);
      if (!c.fix.empty() && c.status != "ok")
        out << fmt::format("{:<5} {:<14} fix: {}\n", "", "", c.fix);
    }
    out << (failed ? "doctor: something needs fixing (above)\n" : "doctor: ready\n");
  }
  return failed ? 1 : 0;
}

int report_configuration_failure(const std::vector<std::string>& args, const error& why,
                                 std::ostream& out, std::ostream&) {
  bool json_out = std::find(args.begin(), args.end(), "--json") != args.end();
  std::string fix = "correct " + why.context.value("key", std::string{"the setting it names"});
  if (json_out)
    out << nlohmann::json{{"ok", false},
                          {"checks", {{{"name", "configuration"}, {"status", "fail"},
                                       {"detail", why.message}, {"fix", fix}}}}}
             .dump(is_terminal(out) ? 2 : -1)
        << "\n";
  else
    out << fmt::format("{:<5} {:<14} {}\n{:<5} {:<14} fix: {}\ndoctor: something needs fixing (above)\n",
                       "fail", "configuration", why.message, "", "", fix);
  return 1;
}

// -- dspex metrics ----------------------------------------------------------------------

int run_metrics(const std::vector<std::string>& args, settings config, std::ostream& out,
                std::ostream& err) {
  std::size_t requests = 0;
  for (auto& a : args) {
    if (a.rfind("--requests=", 0) == 0) {
      auto n = parse_count(a.substr(11), 1'000'000);
      if (!n) {
        err << "dspex metrics: --requests must be an integer from 0 to 1000000\n";
        return 2;
      }
      requests = *n;
      continue;
    }
    err << "dspex metrics: unknown argument '" << a << "' (try: dspex help)\n";
    return 2;
  }
  quiet_logs(config);
  try {
    auto rt = runtime::start(config);
    std::size_t failed = 0;
    for (std::size_t i = 0; i < requests; ++i)
      failed += rt->execute_anonymous("ping") ? 0 : 1;
    std::vector<metrics_snapshot> pools;
    for (const auto& name : rt->pools())
      pools.push_back(rt->metrics(name));
    out << render_prometheus(pools);
    rt->stop();
    return failed == 0 ? 0 : 1;
  } catch (const start_error& e) {
    err << "dspex metrics: could not start the pool: " << e.details().message << "\n";
    return 3;
  }
}

// -- dspex node -------------------------------------------------------------------------

int run_node(const std::vector<std::string>& args, settings config, std::ostream& out,
             std::ostream& err) {
  bool exit_with_parent = false;
  for (const auto& a : args) {
    if (a == "--exit-with-parent") {
      exit_with_parent = true;
      continue;
    }
    err << "dspex node: unknown argument '" << a << "' (try: dspex help)\n";
    return call_usage;
  }
  config.node.publish = true;  // checked with the rest by runtime::start
  // SIGTERM and SIGINT are waited for below; blocked before any thread
  // starts, so that every runtime thread inherits the mask.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  // A node started by another program (dspex run --topology, a test) ends
  // with it: its parent's death is a SIGTERM here, waited for below.
  if (exit_with_parent) {
    auto parent = ::getppid();
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (::getppid() != parent)  // it died before the line above
      return 0;
  }
  std::unique_ptr<runtime> rt;
  try {
    rt = runtime::start(config);
  } catch (const start_error& e) {
    err << "dspex node: could not start: " << e.details().message << "\n";
    return e.details().category == error_category::configuration_error ? call_usage
                                                                        : call_start_failed;
  }
  std::string names;
  for (const auto& name : rt->pools())
    names += (names.empty() ? "" : ",") + name;
  out << "dspex node: serving " << names << " on " << config.node.bind << ":" << rt->node_port()
      << std::endl;
  int sig = 0;
  sigwait(&stop_signals, &sig);
  err << "dspex node: signal " << sig << ", stopping\n";
  rt->stop();
  return 0;
}

} // namespace dspex
