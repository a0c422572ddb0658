// Secrets in arguments (API keys, tokens, passwords): they travel to the
// worker that needs them and nowhere else. Everything the runtime shows
// (logs, status, session info, events, errors) goes through redacted().
#pragma once

#include <string_view>

#include <nlohmann/json.hpp>

namespace dspex {

/// What replaces a secret's value wherever it is shown.
inline constexpr std::string_view redacted_marker = "[redacted]";

/// True when an object key names a secret: it contains (case-insensitive)
/// "api_key", "apikey", "secret", "token", "password", "passwd",
/// "authorization", "credential" or "private_key".
bool is_secret_key(std::string_view key) noexcept;

/// A copy of `value` in which the value of every secret key, at any depth,
/// is "[redacted]". Iterative, so safe on values of any depth.
/// @param value any JSON; scalars and arrays without objects come back unchanged
nlohmann::json redacted(const nlohmann::json& value);

} // namespace dspex
