// Request and reply envelopes of the worker wire protocol (PROTOCOL.md,
// "Request" and "Reply").
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <variant>

#include <nlohmann/json.hpp>

#include "dspex/framing.hpp"
#include "dspex/json_limits.hpp"

namespace dspex {

/// Id reserved for the initialisation ping.
inline constexpr std::uint64_t init_request_id = 0;

/// Builds the JSON text of one request:
/// {"id":id,"command":command,"args":args,"timestamp":"<ISO-8601 UTC with microseconds>Z"}.
/// `args` must be an object or null (null becomes {}); anything else throws
/// std::invalid_argument. `args.session_id` is set to "anonymous" when absent.
std::string encode_request(std::uint64_t id, std::string_view command, nlohmann::json args);

/// The same text for `args` that are already an object with a session_id
/// (as encode_request makes them), without copying them: the direct lane
/// keeps the caller's args for a retry. Throws std::invalid_argument otherwise.
std::string encode_prepared_request(std::uint64_t id, std::string_view command,
                                    const nlohmann::json& args);

/// A reply that passed validation.
struct reply {
  std::uint64_t id = 0;
  bool success = false;
  nlohmann::json result;  ///< the `result` member when success (null when absent)
  std::string error;      ///< the `error` member when !success (a non-string error is dumped as JSON text; absent → "unknown error")
};

/// Validates one reply payload as PROTOCOL.md requires: a JSON object with an
/// unsigned integer `id` and a boolean `success`; when `expected_id` is given,
/// `id` must equal it (else `mismatched_id`).
/// @param max_json_depth payload nested deeper is `too_deep`, checked on the
///        text before parsing, so no deep value is ever built (see json_limits.hpp)
/// @note A non-string `error` is kept as its JSON text, bounded to 4 KiB.
std::variant<reply, protocol_error> parse_reply(std::string_view payload,
                                               std::optional<std::uint64_t> expected_id,
                                               std::size_t max_json_depth = default_max_json_depth);

} // namespace dspex
