// The example service (issue 12, item 2): a small HTTP/JSON server that
// embeds the runtime. Boost.Beast stays in its .cpp.
//
//   POST   /v1/execute                 {"command", "args"?, "timeout_ms"?} → the outcome
//   POST   /v1/sessions/{id}/execute   the same, in session {id}
//   DELETE /v1/sessions/{id}           ends the session
//   GET    /v1/status                  the pool's status
//   GET    /metrics                    Prometheus' text format
//   GET    /healthz                    200 while the pool is healthy, else 503
//
// Every answer is JSON, {"ok":true,"result":...} or {"ok":false,"error":{...}},
// with the HTTP status of http_status_of (one table). One request per
// connection (Connection: close). On SIGTERM or SIGINT the service drains:
// it stops accepting, finishes the calls in flight, stops the runtime and
// returns, leaving no child process.
#pragma once

#include <cstddef>
#include <cstdint>
#include <iosfwd>
#include <string>

#include "dspex/error.hpp"
#include "dspex/settings.hpp"

namespace dspex {

struct service_options {
  std::string bind = "127.0.0.1";  ///< address to listen on (loopback by default)
  std::uint16_t port = 8080;       ///< 0: any free port (the one chosen is printed)
  std::size_t max_body_bytes = 1 << 20;  ///< larger request bodies get 413
  std::size_t max_connections = 64;      ///< beyond it a connection gets 503 at once
};

/// The HTTP status for an error: the one table of the service.
///   400 system_error/invalid_request, configuration_error   (the request is wrong)
///   404 session_error/session_not_found, and unknown paths   (nothing to act on)
///   409 session_error, other types (session_ended, too_many_sessions)
///   422 python_error                                         (the command ran and failed)
///   429 resource_error/pool_saturated, full                  (too many callers: retry later)
///   502 communication_error, connection_error, health_check_error (the worker died or broke)
///   503 resource_error (other), initialization_error         (no capacity, stopping, restarting)
///   504 timeout_error                                        (a deadline passed)
///   500 system_error (other)                                 (a defect of the runtime)
int http_status_of(const error& e) noexcept;

/// Runs the service until SIGTERM or SIGINT, then drains and stops.
/// Prints "listening on ADDRESS:PORT" to `out` once it accepts.
/// @returns 0 after a clean drain, 2 when it cannot listen, 3 when the
///          runtime cannot start
int run_service(const settings& config, const service_options& options, std::ostream& out,
                std::ostream& err);

} // namespace dspex
