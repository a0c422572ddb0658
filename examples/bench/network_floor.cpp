// network_floor: see network_floor.hpp.
#include "network_floor.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <stdexcept>
#include <thread>

#include <caf/all.hpp>
#include <caf/io/all.hpp>

#include "dspex/latency.hpp"
#include "blocking_io.hpp"

namespace dspex::bench {

namespace {

using clock_type = std::chrono::steady_clock;

constexpr std::size_t message_bytes = 100;  // about a ping's request on the node wire

struct fd_guard {
  int fd = -1;
  ~fd_guard() {
    if (fd >= 0)
      ::close(fd);
  }
};

void no_delay(int fd) {
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

// Both ends block in read(): what the middleman's round trip is read
// against (two threads, one TCP connection, no framework).
double tcp_round_trip_p50(std::size_t n) {
  fd_guard listener{::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0)};
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  if (listener.fd < 0 || ::bind(listener.fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0
      || ::listen(listener.fd, 1) != 0
      || ::getsockname(listener.fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0)
    throw std::runtime_error("network floor: no loopback listener");
  std::thread echo{[&] {
    fd_guard peer{::accept4(listener.fd, nullptr, nullptr, SOCK_CLOEXEC)};
    if (peer.fd < 0)
      return;
    no_delay(peer.fd);
    char buf[message_bytes];
    while (read_exact(peer.fd, buf, sizeof buf) && write_all(peer.fd, buf, sizeof buf)) {
    }
  }};
  dspex::latency_recorder lat;
  bool ok = false;
  {
    fd_guard conn{::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0)};
    if (conn.fd >= 0 && ::connect(conn.fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) {
      no_delay(conn.fd);
      char buf[message_bytes] = {};
      ok = true;
      for (std::size_t i = 0; i < n && ok; ++i) {
        auto t = clock_type::now();
        ok = write_all(conn.fd, buf, sizeof buf) && read_exact(conn.fd, buf, sizeof buf);
        lat.record(clock_type::now() - t);
      }
    }
  }  // closing the connection ends the echo thread
  ::shutdown(listener.fd, SHUT_RDWR);  // and wakes its accept() when the connect failed
  echo.join();
  if (!ok)
    throw std::runtime_error("network floor: the loopback TCP round trip failed");
  return lat.percentile_us(50);
}

caf::behavior echo_actor(caf::event_based_actor*) {
  return {[](std::string& s) { return std::move(s); }};
}

// The same configuration as a runtime's: the middleman loaded, the
// benchmark's scheduler policy and thread count (0: the runtime's default
// of system_config.cpp, half the cores and at least one).
struct floor_config : caf::actor_system_config {
  floor_config(const std::string& policy, std::size_t max_threads) {
    load<caf::io::middleman>();
    set("scheduler.policy", caf::atom_from_string(policy));
    if (max_threads == 0)
      max_threads = std::max<std::size_t>(1, std::thread::hardware_concurrency() / 2);
    set("scheduler.max-threads", max_threads);
    set("logger.verbosity", caf::atom("quiet"));
  }
};

double middleman_round_trip_p50(std::size_t n, const std::string& policy, std::size_t max_threads) {
  floor_config node_cfg{policy, max_threads};
  floor_config caller_cfg{policy, max_threads};
  caf::actor_system node{node_cfg};
  caf::actor_system caller{caller_cfg};
  auto echo = node.spawn(echo_actor);
  auto port = node.middleman().publish(echo, 0, "127.0.0.1");
  if (!port) {
    caf::anon_send_exit(echo, caf::exit_reason::user_shutdown);
    throw std::runtime_error("network floor: publish failed: " + node.render(port.error()));
  }
  dspex::latency_recorder lat;
  std::string failure;
  {
    auto remote = caller.middleman().remote_actor("127.0.0.1", *port);
    if (!remote) {
      failure = "remote_actor failed: " + caller.render(remote.error());
    } else {
      caf::scoped_actor self{caller};
      std::string text(message_bytes, 'x');
      for (std::size_t i = 0; i < n && failure.empty(); ++i) {
        auto t = clock_type::now();
        self->request(*remote, std::chrono::seconds{5}, text)
          .receive([&](std::string& back) { text = std::move(back); },
                   [&](caf::error& e) { failure = "request failed: " + caller.render(e); });
        lat.record(clock_type::now() - t);
      }
    }
  }
  node.middleman().close(*port);
  caf::anon_send_exit(echo, caf::exit_reason::user_shutdown);
  if (!failure.empty())
    throw std::runtime_error("network floor: " + failure);
  return lat.percentile_us(50);
}

} // namespace

network_floor measure_network_floor(std::size_t n, const std::string& scheduler_policy,
                                    std::size_t max_threads) {
  network_floor f;
  f.tcp_p50_us = tcp_round_trip_p50(n);
  f.middleman_p50_us = middleman_round_trip_p50(n, scheduler_policy, max_threads);
  return f;
}

} // namespace dspex::bench
