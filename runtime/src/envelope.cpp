// Request and reply envelopes of the worker wire protocol (see envelope.hpp
// and PROTOCOL.md).
#include "dspex/envelope.hpp"

#include <chrono>
#include <cstdio>
#include <ctime>
#include <stdexcept>
#include <utility>

#include <fmt/format.h>

namespace dspex {

namespace {

using json = nlohmann::json;

/// Current time as ISO-8601 UTC with microseconds, e.g. "2026-11-26T14:00:00.123456Z".
/// Every request carries one: the part up to the second changes once a
/// second, so each thread formats it (gmtime_r and snprintf, ~1-2 µs) only
/// when the second changed, and writes the microseconds itself.
std::string utc_timestamp() {
  const auto now = std::chrono::system_clock::now();
  const long long us = std::chrono::duration_cast<std::chrono::microseconds>(now.time_since_epoch()).count();
  long long secs = us / 1000000;
  long long frac = us % 1000000;
  if (frac < 0) { // before the epoch: floor, so the fraction stays non-negative
    frac += 1000000;
    secs -= 1;
  }
  thread_local long long cached_secs = -1;
  thread_local char cached[32];  // "YYYY-MM-DDTHH:MM:SS"
  thread_local int cached_len = 0;
  if (secs != cached_secs) {
    const auto t = static_cast<std::time_t>(secs);
    std::tm tm{};
    if (gmtime_r(&t, &tm) == nullptr)
      return "1970-01-01T00:00:00.000000Z";
    const int len = std::snprintf(cached, sizeof cached, "%04d-%02d-%02dT%02d:%02d:%02d",
                                  tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour,
                                  tm.tm_min, tm.tm_sec);
    if (len <= 0 || static_cast<std::size_t>(len) >= sizeof cached)
      return "1970-01-01T00:00:00.000000Z";
    cached_len = len;
    cached_secs = secs;
  }
  std::string out(cached, static_cast<std::size_t>(cached_len));
  char micros[9] = {'.', '0', '0', '0', '0', '0', '0', 'Z', '\0'};
  for (int i = 6; i >= 1; --i, frac /= 10)
    micros[i] = static_cast<char>('0' + frac % 10);
  out.append(micros, 8);
  return out;
}

/// A short, log-safe preview of a payload that failed to parse.
std::string preview(std::string_view payload) {
  constexpr std::size_t max_preview = 48;
  std::string out;
  out.reserve(max_preview + 8);
  for (std::size_t i = 0; i < payload.size() && i < max_preview; ++i) {
    const auto c = static_cast<unsigned char>(payload[i]);
    if (c >= 0x20 && c < 0x7F && c != '\\')
      out.push_back(static_cast<char>(c));
    else
      out += fmt::format("\\x{:02x}", c);
  }
  if (payload.size() > max_preview)
    out += "...";
  return out;
}

/// Bound on the text of a non-string `error` member kept in a reply.
constexpr std::size_t max_error_text = 4096;

/// A member's JSON text for an error message, bounded in length.
std::string short_dump(const json& value, std::size_t max_len = 64) {
  std::string text = value.dump();
  if (text.size() > max_len) {
    // Never inside a UTF-8 character (found by fuzz_reply_envelope): the
    // text goes into errors that are dumped as JSON later.
    while (max_len > 0 && (static_cast<unsigned char>(text[max_len]) & 0xC0) == 0x80)
      --max_len;
    text.resize(max_len);
    text += "...";
  }
  return text;
}

protocol_error make_error(protocol_errc code, std::string message) {
  return protocol_error{code, std::move(message)};
}

} // namespace

std::string encode_request(std::uint64_t id, std::string_view command, nlohmann::json args) {
  if (args.is_null())
    args = json::object();
  else if (!args.is_object())
    throw std::invalid_argument(
        fmt::format("encode_request: args must be an object or null, not {}", args.type_name()));
  if (args.find("session_id") == args.end())
    args["session_id"] = "anonymous";
  return encode_prepared_request(id, command, args);
}

std::string encode_prepared_request(std::uint64_t id, std::string_view command,
                                    const nlohmann::json& args) {
  if (!args.is_object() || args.find("session_id") == args.end())
    throw std::invalid_argument("encode_prepared_request: args must be an object with a session_id");

  // Assembled by hand (in the documented field order) so the hot path builds
  // no intermediate envelope object; strings and args are escaped by dump().
  const std::string command_text = json(std::string(command)).dump();
  const std::string args_text = args.dump();
  const std::string timestamp = utc_timestamp();

  std::string text;
  text.reserve(64 + command_text.size() + args_text.size() + timestamp.size());
  text += "{\"id\":";
  text += std::to_string(id);
  text += ",\"command\":";
  text += command_text;
  text += ",\"args\":";
  text += args_text;
  text += ",\"timestamp\":\"";
  text += timestamp;
  text += "\"}";
  return text;
}

std::variant<reply, protocol_error> parse_reply(std::string_view payload,
                                               std::optional<std::uint64_t> expected_id,
                                               std::size_t max_json_depth) {
  // nlohmann stops at a NUL outside a string, so "{...}\0junk" would pass;
  // valid JSON text never contains one.
  if (payload.find('\0') != std::string_view::npos)
    return make_error(protocol_errc::bad_json,
                      fmt::format("reply of {} bytes contains a NUL byte", payload.size()));
  if (json_text_depth(payload, max_json_depth) > max_json_depth)
    return make_error(protocol_errc::too_deep,
                      fmt::format("reply of {} bytes is nested more than {} levels deep",
                                  payload.size(), max_json_depth));
  json j = json::parse(payload.begin(), payload.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded())
    return make_error(protocol_errc::bad_json,
                      fmt::format("reply of {} bytes is not valid JSON: \"{}\"", payload.size(), preview(payload)));
  if (!j.is_object())
    return make_error(protocol_errc::not_an_object, fmt::format("reply is a JSON {}, not an object", j.type_name()));

  reply r;

  const auto id_it = j.find("id");
  if (id_it == j.end())
    return make_error(protocol_errc::missing_id, "reply has no \"id\"");
  if (id_it->is_number_unsigned()) {
    r.id = id_it->get<std::uint64_t>();
  } else if (id_it->is_number_integer() && id_it->get<std::int64_t>() >= 0) {
    r.id = static_cast<std::uint64_t>(id_it->get<std::int64_t>());
  } else {
    return make_error(protocol_errc::missing_id,
                      fmt::format("reply \"id\" is not an unsigned integer: {}", short_dump(*id_it)));
  }

  const auto success_it = j.find("success");
  if (success_it == j.end())
    return make_error(protocol_errc::missing_success, fmt::format("reply {} has no \"success\"", r.id));
  if (!success_it->is_boolean())
    return make_error(protocol_errc::missing_success,
                      fmt::format("reply {} \"success\" is not a boolean: {}", r.id, short_dump(*success_it)));
  r.success = success_it->get<bool>();

  if (expected_id && r.id != *expected_id)
    return make_error(protocol_errc::mismatched_id,
                      fmt::format("reply id {} does not match the request in flight (id {})", r.id, *expected_id));

  if (r.success) {
    if (const auto it = j.find("result"); it != j.end())
      r.result = std::move(*it);
  } else {
    const auto it = j.find("error");
    if (it == j.end())
      r.error = "unknown error";
    else if (it->is_string())
      r.error = std::move(it->get_ref<std::string&>());
    else
      r.error = short_dump(*it, max_error_text);
  }
  return r;
}

} // namespace dspex
