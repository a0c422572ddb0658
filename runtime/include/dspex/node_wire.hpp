// What runtimes say to each other over CAF's middleman (issue 13): a caller
// runtime asks a node to run a call on one of its pools, the node answers
// with the outcome, and publishes its load for routing. Every message is one
// JSON text in a CAF string, so nothing but strings and atoms crosses the
// network, and each side parses what the other sent as untrusted input:
// a malformed message is a structured error, never a crash.
//
// No CAF here: the codec is tested and fuzzed on its own.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <variant>

#include <nlohmann/json.hpp>

#include "dspex/error.hpp"
#include "dspex/json_limits.hpp"

namespace dspex {

/// What a caller runtime asks of a node's pool.
enum class node_op {
  execute,        ///< one call (anonymous, or in `session_id`)
  end_session,    ///< runtime::end_session on the node
  session_info,   ///< runtime::get_session_info on the node
  list_sessions,  ///< runtime::list_sessions on the node
};

/// @returns the op's name on the wire ("execute", "end_session", ...)
const char* to_string(node_op op) noexcept;

/// One request to a node. The deadline travels as what is left of it, so
/// clocks need not agree; the node's call ends by then too.
struct node_request {
  node_op op = node_op::execute;
  std::string pool = "default";  ///< the node's pool
  std::string session_id;        ///< empty: an anonymous call
  std::string command;           ///< execute: the command
  nlohmann::json args = nlohmann::json::object();
  std::uint64_t timeout_ms = 0;  ///< what is left of the caller's deadline (at least 1)
  std::optional<bool> idempotent;
  std::optional<std::uint64_t> max_attempts;
  std::optional<std::string> affinity;  ///< a session call's affinity_mode, by name
};

/// @returns `r` as the JSON text sent to the node
std::string encode_node_request(const node_request& r);

/// Reads a request a caller runtime sent.
/// @param text the JSON text received
/// @param limits the node's bounds on nesting (args are checked again by the runtime)
/// @returns the request, or system_error/invalid_request naming what is wrong
std::variant<node_request, error> decode_node_request(const std::string& text,
                                                      const request_limits& limits);

/// @returns the outcome as the JSON text the node answers with (its
///          served_by and the node's name included)
std::string encode_node_reply(const outcome& o, const std::string& node);

/// Reads a node's answer.
/// @param text the JSON text received
/// @param node the node's "host:port", named in a protocol error
/// @returns the outcome (served_by: "NODE/WORKER"), or
///          communication_error/protocol_violation when the text is not an
///          answer
outcome decode_node_reply(const std::string& text, const std::string& node);

/// One pool of a node as the node publishes it.
struct node_pool_load {
  std::size_t size = 0;
  std::size_t idle = 0;
  std::size_t busy = 0;
  std::size_t queued = 0;
  std::string health = "healthy";  ///< healthy, degraded, broken, restarting or unavailable

  /// @returns the routing's measure: callers waiting or served per worker
  double load() const noexcept;
  /// @returns true when calls may be sent to it (healthy or degraded)
  bool serving() const noexcept;
};

/// What a node publishes of itself for routing.
struct node_load {
  std::map<std::string, node_pool_load> pools;  ///< by pool name
};

/// @returns `l` as JSON text
std::string encode_node_load(const node_load& l);

/// @returns the load a node published, or std::nullopt when the text is not one
std::optional<node_load> decode_node_load(const std::string& text);

} // namespace dspex
