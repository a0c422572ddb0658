#include "http_service.hpp"

#include <sys/socket.h>
#include <sys/time.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <iostream>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <nlohmann/json.hpp>

#include "dspex/prometheus.hpp"
#include "dspex/runtime.hpp"

namespace dspex {

namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

using request_t = http::request<http::string_body>;
using response_t = http::response<http::string_body>;

/// How long a connection may take to send its request (a slow or idle
/// client must not hold a thread, nor the drain).
constexpr std::chrono::seconds read_limit{10};

error body_error(std::string type, std::string message) {
  return make_error(error_category::system_error, "invalid_request", std::move(message),
                    {{"reason", std::move(type)}});
}

response_t json_response(const request_t& req, int status, const nlohmann::json& body) {
  response_t res{static_cast<http::status>(status), req.version()};
  res.set(http::field::content_type, "application/json");
  res.set(http::field::connection, "close");
  res.body() = body.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
  res.prepare_payload();
  return res;
}

response_t outcome_response(const request_t& req, const outcome& o) {
  return json_response(req, o ? 200 : http_status_of(o.error()), o.to_json());
}

response_t error_response(const request_t& req, const error& e) {
  return outcome_response(req, outcome::failure(e));
}

/// {"command", "args"?, "timeout_ms"?}: the command, its args, its options.
struct execute_body {
  std::string command;
  nlohmann::json args = nlohmann::json::object();
  std::optional<std::chrono::milliseconds> timeout;
  std::string pool;  ///< "pool": a named pool ("" = the query's, else default)
};

std::variant<execute_body, error> parse_execute(const std::string& text) {
  auto j = nlohmann::json::parse(text, nullptr, false);
  if (j.is_discarded())
    return body_error("malformed_body", "the request body is not JSON");
  if (!j.is_object())
    return body_error("malformed_body", "the request body must be a JSON object");
  execute_body b;
  auto command = j.find("command");
  if (command == j.end() || !command->is_string())
    return body_error("malformed_body", "\"command\" must be a string");
  b.command = command->get<std::string>();
  if (auto args = j.find("args"); args != j.end() && !args->is_null())
    b.args = *args;  // the runtime checks it (an object, its depth, UTF-8)
  if (auto t = j.find("timeout_ms"); t != j.end()) {
    if (!t->is_number_unsigned() || t->get<std::uint64_t>() == 0
        || t->get<std::uint64_t>() > 3'600'000)
      return body_error("malformed_body", "\"timeout_ms\" must be an integer from 1 to 3600000");
    b.timeout = std::chrono::milliseconds{t->get<std::uint64_t>()};
  }
  if (auto pool = j.find("pool"); pool != j.end() && !pool->is_null()) {
    if (!pool->is_string())
      return body_error("malformed_body", "\"pool\" must be a string");
    b.pool = pool->get<std::string>();
  }
  return b;
}

/// The session id of "/v1/sessions/{id}" + `suffix`, if the target is one.
std::optional<std::string> session_of(const std::string& target, const std::string& suffix) {
  static const std::string prefix = "/v1/sessions/";
  if (target.rfind(prefix, 0) != 0 || target.size() < prefix.size() + suffix.size() + 1)
    return std::nullopt;
  if (target.compare(target.size() - suffix.size(), suffix.size(), suffix) != 0)
    return std::nullopt;
  auto id = target.substr(prefix.size(), target.size() - prefix.size() - suffix.size());
  if (id.empty() || id.find('/') != std::string::npos || id.find('?') != std::string::npos)
    return std::nullopt;
  return id;
}

/// The target's path, and its query's `pool` parameter ("" when absent).
std::pair<std::string, std::string> split_target(const std::string& full) {
  auto q = full.find('?');
  if (q == std::string::npos)
    return {full, {}};
  std::string pool;
  auto query = full.substr(q + 1);
  std::size_t pos = 0;
  while (pos <= query.size()) {
    auto end = query.find('&', pos);
    auto param = query.substr(pos, end == std::string::npos ? std::string::npos : end - pos);
    if (param.rfind("pool=", 0) == 0)
      pool = param.substr(5);  // pool names need no percent-decoding (valid_pool_name)
    if (end == std::string::npos)
      break;
    pos = end + 1;
  }
  return {full.substr(0, q), pool};
}

response_t handle(runtime& rt, const request_t& req) {
  // Named, not a structured binding: the lambdas below capture them.
  const auto split = split_target(std::string{req.target()});
  const std::string& target = split.first;
  const std::string& query_pool = split.second;
  const auto method = req.method();
  auto not_found = [&] {
    return json_response(req, 404,
                         outcome::failure(body_error("unknown_path", "no such path: " + target))
                           .to_json());
  };
  auto wrong_method = [&] {
    return json_response(req, 405, outcome::failure(body_error("method_not_allowed",
                                                               "method not allowed on " + target))
                                     .to_json());
  };
  if (target == "/healthz") {
    if (method != http::verb::get)
      return wrong_method();
    // Healthy only while every pool is.
    std::string health = "healthy";  // the first pool's that is not
    nlohmann::json pools = nlohmann::json::object();
    for (const auto& name : rt.pools()) {
      auto st = rt.status(name);
      if (health == "healthy")
        health = st.health;
      pools[name] = st.health;
    }
    bool healthy = health == "healthy";
    return json_response(req, healthy ? 200 : 503,
                         {{"ok", healthy}, {"health", health}, {"pools", std::move(pools)}});
  }
  if (target == "/metrics") {
    if (method != http::verb::get)
      return wrong_method();
    response_t res{http::status::ok, req.version()};
    res.set(http::field::content_type, "text/plain; version=0.0.4; charset=utf-8");
    res.set(http::field::connection, "close");
    std::vector<metrics_snapshot> pools;
    for (const auto& name : rt.pools())
      pools.push_back(rt.metrics(name));
    res.body() = render_prometheus(pools);
    res.prepare_payload();
    return res;
  }
  if (target == "/v1/status") {
    if (method != http::verb::get)
      return wrong_method();
    auto st = rt.status(query_pool);
    if (st.pool.empty())
      return not_found();
    return json_response(req, 200, {{"ok", true}, {"result", st.to_json()}});
  }
  if (target == "/v1/pools") {
    if (method != http::verb::get)
      return wrong_method();
    auto names = rt.pools();
    return json_response(req, 200, {{"ok", true}, {"result", {{"pools", names}}}});
  }
  auto run = [&](const std::optional<std::string>& session) {
    auto parsed = parse_execute(req.body());
    if (auto* e = std::get_if<error>(&parsed))
      return error_response(req, *e);
    auto& b = std::get<execute_body>(parsed);
    auto pool = b.pool.empty() ? query_pool : b.pool;
    if (session) {
      session_call_options o;
      o.timeout = b.timeout;
      o.pool = pool;
      return outcome_response(req, rt.execute_in_session(*session, b.command, std::move(b.args), o));
    }
    call_options o;
    o.timeout = b.timeout;
    o.pool = pool;
    return outcome_response(req, rt.execute_anonymous(b.command, std::move(b.args), o));
  };
  if (target == "/v1/execute")
    return method == http::verb::post ? run(std::nullopt) : wrong_method();
  if (auto id = session_of(target, "/execute"))
    return method == http::verb::post ? run(id) : wrong_method();
  if (auto id = session_of(target, "")) {
    if (method != http::verb::delete_)
      return wrong_method();
    return outcome_response(req, rt.end_session(*id, query_pool));
  }
  return not_found();
}

/// Counts the connections being served; the drain waits for them.
class in_flight {
public:
  bool enter(std::size_t max) {
    std::lock_guard<std::mutex> lk{mtx_};
    if (n_ >= max)
      return false;
    ++n_;
    return true;
  }
  void leave() {
    std::lock_guard<std::mutex> lk{mtx_};
    --n_;
    cv_.notify_all();
  }
  /// @returns true when none is left by `limit`.
  bool wait_empty(std::chrono::steady_clock::duration limit) {
    std::unique_lock<std::mutex> lk{mtx_};
    return cv_.wait_for(lk, limit, [&] { return n_ == 0; });
  }

private:
  std::mutex mtx_;
  std::condition_variable cv_;
  std::size_t n_ = 0;
};

void serve_connection(runtime& rt, tcp::socket socket, std::size_t max_body) {
  // A request must arrive within read_limit: a silent client is dropped.
  timeval tv{static_cast<time_t>(read_limit.count()), 0};
  ::setsockopt(socket.native_handle(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  beast::error_code ec;
  beast::flat_buffer buffer;
  http::request_parser<http::string_body> parser;
  parser.body_limit(max_body);
  parser.header_limit(16 * 1024);
  http::read(socket, buffer, parser, ec);
  response_t res;
  if (ec == http::error::body_limit) {
    request_t req;
    res = json_response(req, 413,
                        outcome::failure(body_error("too_large", "the request body is too large"))
                          .to_json());
  } else if (ec) {
    if (ec == http::error::end_of_stream || ec == asio::error::connection_reset)
      return;  // the client went away: nothing to answer
    request_t req;
    res = json_response(req, 400,
                        outcome::failure(body_error("malformed_request", "malformed HTTP request: " + ec.message()))
                          .to_json());
  } else {
    auto req = parser.release();
    try {
      res = handle(rt, req);
    } catch (const std::exception& e) {
      res = error_response(req, make_error(error_category::system_error, "internal_error",
                                           std::string{"the service failed: "} + e.what()));
    }
  }
  http::write(socket, res, ec);
  socket.shutdown(tcp::socket::shutdown_send, ec);
}

} // namespace

int http_status_of(const error& e) noexcept {
  switch (e.category) {
    case error_category::configuration_error: return 400;
    case error_category::python_error: return 422;
    case error_category::timeout_error: return 504;
    case error_category::communication_error:
    case error_category::connection_error:
    case error_category::health_check_error: return 502;
    case error_category::initialization_error: return 503;
    case error_category::session_error: return e.type == "session_not_found" ? 404 : 409;
    case error_category::resource_error:
      return e.type == "pool_saturated" || e.type == "full" ? 429 : 503;
    case error_category::system_error:
      return e.type == "invalid_request" ? 400 : 500;
  }
  return 500;
}

int run_service(const settings& config, const service_options& options, std::ostream& out,
                std::ostream& err) {
  asio::io_context io;
  tcp::acceptor acceptor{io};
  beast::error_code ec;
  auto address = asio::ip::make_address(options.bind, ec);
  if (ec) {
    err << "dspex serve: bad address '" << options.bind << "': " << ec.message() << "\n";
    return 2;
  }
  tcp::endpoint endpoint{address, options.port};
  acceptor.open(endpoint.protocol(), ec);
  if (!ec)
    acceptor.set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec)
    acceptor.bind(endpoint, ec);
  if (!ec)
    acceptor.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) {
    err << "dspex serve: cannot listen on " << options.bind << ":" << options.port << ": "
        << ec.message() << "\n";
    return 2;
  }
  // Shared with the connection threads: one that outlives the drain's limit
  // still has what it uses.
  std::shared_ptr<runtime> rt;
  try {
    rt = runtime::start(config);
  } catch (const start_error& e) {
    err << "dspex serve: could not start the pool: " << e.details().message << "\n";
    return 3;
  }
  auto active = std::make_shared<in_flight>();
  std::atomic<bool> draining{false};
  asio::signal_set signals{io, SIGTERM, SIGINT};
  signals.async_wait([&](const beast::error_code&, int sig) {
    err << "dspex serve: signal " << sig << ": draining (no new connections)\n";
    draining = true;
    beast::error_code ignored;
    acceptor.close(ignored);
  });
  std::function<void()> accept_next = [&] {
    acceptor.async_accept([&](const beast::error_code& aec, tcp::socket socket) {
      if (aec || draining)
        return;  // closed: the drain began
      if (!active->enter(options.max_connections)) {
        request_t req;
        beast::error_code wec;
        auto res = json_response(req, 503, outcome::failure(make_error(error_category::resource_error,
                                                                      "too_many_connections",
                                                                      "the service is at its connection limit"))
                                             .to_json());
        http::write(socket, res, wec);
      } else {
        std::thread([rt, active, max = options.max_body_bytes, s = std::move(socket)]() mutable {
          serve_connection(*rt, std::move(s), max);
          active->leave();
        }).detach();
      }
      accept_next();
    });
  };
  accept_next();
  out << "listening on " << acceptor.local_endpoint().address().to_string() << ":"
      << acceptor.local_endpoint().port() << std::endl;
  io.run();  // until the signal closed the acceptor
  // Every call in flight ends by its deadline (pool.request_timeout at most,
  // or its timeout_ms); the margin covers the reply's way out.
  auto limit = config.pool.request_timeout + read_limit + std::chrono::seconds{5};
  if (!active->wait_empty(std::chrono::duration_cast<std::chrono::steady_clock::duration>(limit)))
    err << "dspex serve: connections still open after the drain's limit; stopping anyway\n";
  rt->stop();  // bounded; calls still running end with pool_stopping
  err << "dspex serve: drained and stopped\n";
  return 0;
}

} // namespace dspex
