#include "node_process.hpp"

#include <fcntl.h>
#include <poll.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <thread>


extern char** environ;

namespace dspex {

namespace {

std::string read_all(const std::string& path) {
  std::ifstream in{path};
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

} // namespace

pid_t spawn_dspex(const std::string& dspex_cli, const std::vector<std::string>& args, int stdout_fd,
                  const std::string& stderr_path) {
  std::vector<std::string> full{dspex_cli};
  full.insert(full.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : full)
    argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  if (stdout_fd >= 0)
    posix_spawn_file_actions_adddup2(&fa, stdout_fd, STDOUT_FILENO);
  else
    posix_spawn_file_actions_addopen(&fa, STDOUT_FILENO, "/dev/null", O_WRONLY, 0);
  posix_spawn_file_actions_addopen(&fa, STDERR_FILENO,
                                   stderr_path.empty() ? "/dev/null" : stderr_path.c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0644);
  pid_t pid = -1;
  int rc = ::posix_spawn(&pid, dspex_cli.c_str(), &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  return rc == 0 ? pid : -1;
}

node_process::node_process(const std::string& dspex_cli, std::vector<std::string> args,
                           std::chrono::milliseconds ready_within) {
  static int counter = 0;
  log_path_ = "/tmp/dspex-node-" + std::to_string(::getpid()) + "-" + std::to_string(++counter)
              + ".log";
  int out[2];
  if (::pipe2(out, O_CLOEXEC) != 0)
    throw std::runtime_error("pipe failed");
  // --exit-with-parent: if this process dies without stopping it, so does the node.
  std::vector<std::string> full{"node", "--exit-with-parent"};
  full.insert(full.end(), args.begin(), args.end());
  pid_ = spawn_dspex(dspex_cli, full, out[1], log_path_);
  ::close(out[1]);
  if (pid_ < 0) {
    ::close(out[0]);
    throw std::runtime_error("cannot spawn " + dspex_cli);
  }
  // The first line, within the bound: "dspex node: serving POOLS on HOST:PORT".
  std::string line;
  auto deadline = std::chrono::steady_clock::now() + ready_within;
  while (line.find('\n') == std::string::npos) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
      deadline - std::chrono::steady_clock::now());
    pollfd p{out[0], POLLIN, 0};
    if (left.count() <= 0 || ::poll(&p, 1, static_cast<int>(left.count())) <= 0)
      break;
    char buf[256];
    auto n = ::read(out[0], buf, sizeof buf);
    if (n <= 0)
      break;
    line.append(buf, static_cast<std::size_t>(n));
  }
  ::close(out[0]);  // later lines (none are written) would get EPIPE, not block
  auto colon = line.rfind(':');
  if (line.rfind("dspex node: serving ", 0) != 0 || colon == std::string::npos) {
    auto why = "dspex node did not start: '" + line + "'\n" + output();
    signal_and_reap(SIGKILL);
    throw std::runtime_error(why);
  }
  port_ = static_cast<std::uint16_t>(std::stoul(line.substr(colon + 1)));
}

node_process::~node_process() {
  if (!reaped_)
    ::kill(pid_, SIGCONT);  // a stopped node would keep its SIGTERM pending
  if (!reaped_ && signal_and_reap(SIGTERM) == -1)
    signal_and_reap(SIGKILL);
  std::remove(log_path_.c_str());
}

std::string node_process::address() const {
  return "127.0.0.1:" + std::to_string(port_);
}

int node_process::signal_and_reap(int sig, std::chrono::milliseconds within) {
  if (reaped_)
    return 0;
  ::kill(pid_, sig);
  auto deadline = std::chrono::steady_clock::now() + within;
  for (;;) {
    int status = 0;
    auto r = ::waitpid(pid_, &status, WNOHANG);
    if (r == pid_) {
      reaped_ = true;
      return status;
    }
    if (std::chrono::steady_clock::now() >= deadline)
      return -1;
    std::this_thread::sleep_for(std::chrono::milliseconds{5});
  }
}

void node_process::signal(int sig) {
  if (!reaped_)
    ::kill(pid_, sig);
}

std::string node_process::output() const {
  return read_all(log_path_);
}

} // namespace dspex
