// Bounds on the JSON that crosses the runtime, and the validation of a
// caller's request before it goes anywhere.
//
// Why depth matters: nlohmann::json parses iteratively, but dump(), copies
// and comparisons recurse, one stack frame per level. A reply nested 100k
// deep is a valid frame well under max_frame_bytes and would crash the host
// the first time it is copied or printed; arguments nested a few thousand
// deep kill the bundled Python worker (RecursionError), and a retried
// idempotent call would kill the next worker too. So depth is bounded on
// both edges: replies are measured on their text before they are parsed,
// and a caller's arguments are measured (without recursion) before they are
// sent.
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "dspex/error.hpp"

namespace dspex {

/// Default bound on the nesting depth of a JSON value (`pool.max_json_depth`).
/// A scalar has depth 0, `[]` and `{}` depth 1, `[[1]]` depth 2.
inline constexpr std::size_t default_max_json_depth = 128;
/// The largest `pool.max_json_depth` accepted: dump() recurses once per
/// level, and runtime threads have ordinary stacks.
inline constexpr std::size_t max_json_depth_limit = 1000;

/// Nesting depth of JSON text, counting `[` and `{` outside strings (escapes
/// honoured). Linear and allocation-free; it stops reading as soon as the
/// depth exceeds `limit` and then returns `limit + 1`. Text that is not JSON
/// still gets a number (the parser rejects it afterwards).
/// @param text the JSON text, e.g. one frame's payload
/// @param limit the depth beyond which counting stops
/// @returns the depth, at most `limit + 1`
std::size_t json_text_depth(std::string_view text, std::size_t limit) noexcept;

/// Nesting depth of a JSON value, computed with an explicit stack (no
/// recursion, so it is safe on values of any depth); stops beyond `limit`.
/// @returns the depth, at most `limit + 1`
std::size_t json_value_depth(const nlohmann::json& value, std::size_t limit);

/// True when `text` is well-formed UTF-8 (no overlongs, no surrogates, no
/// code point above U+10FFFF).
bool valid_utf8(std::string_view text) noexcept;

/// `text` with every ill-formed UTF-8 sequence replaced by U+FFFD, so it can
/// be put into JSON and dumped (nlohmann throws type_error.316 otherwise).
std::string sanitize_utf8(std::string_view text);

/// What a caller's request may be.
struct request_limits {
  std::size_t max_json_depth = default_max_json_depth;  ///< of `args`
  std::size_t max_command_bytes = 256;                  ///< of the command name
};

/// Checks one caller request before it is queued anywhere: the command is a
/// non-empty, valid UTF-8 name of at most `max_command_bytes`; `args` is a
/// JSON object (or null), nested at most `max_json_depth` deep, with every
/// string and key valid UTF-8, and a `session_id`, when present, that is a
/// string. Walks `args` without recursion.
/// @returns nullopt, or system_error/invalid_request whose context names the
///          command and the `reason`: empty_command, command_too_long,
///          invalid_utf8, not_an_object, too_deep, session_id_not_string or
///          not_json (a binary value, NaN or infinity: nothing JSON text can carry)
std::optional<error> validate_request(std::string_view command, const nlohmann::json& args,
                                      const request_limits& limits = {});

} // namespace dspex
