// Bounds on JSON crossing the runtime (see json_limits.hpp).
#include "dspex/json_limits.hpp"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

namespace dspex {

namespace {

using json = nlohmann::json;

/// Length of the well-formed UTF-8 sequence at the start of `s`, 0 if it is
/// ill-formed (Unicode 15, table 3-7).
std::size_t utf8_sequence(std::string_view s) noexcept {
  auto byte = [&](std::size_t i) { return static_cast<unsigned char>(s[i]); };
  const unsigned char b0 = byte(0);
  if (b0 < 0x80)
    return 1;
  std::size_t len = 0;
  unsigned char lo = 0x80, hi = 0xBF;
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    len = 2;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    len = 3;
    if (b0 == 0xE0)
      lo = 0xA0;  // no overlongs
    else if (b0 == 0xED)
      hi = 0x9F;  // no surrogates
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    len = 4;
    if (b0 == 0xF0)
      lo = 0x90;  // no overlongs
    else if (b0 == 0xF4)
      hi = 0x8F;  // nothing above U+10FFFF
  } else {
    return 0;
  }
  if (s.size() < len)
    return 0;
  if (byte(1) < lo || byte(1) > hi)
    return 0;
  for (std::size_t i = 2; i < len; ++i)
    if (byte(i) < 0x80 || byte(i) > 0xBF)
      return 0;
  return len;
}

error invalid_request(std::string_view command, const char* reason, std::string message) {
  nlohmann::json ctx{{"reason", reason}};
  // The command goes into the context only when it can be dumped.
  ctx["command"] = valid_utf8(command) ? std::string(command) : sanitize_utf8(command);
  return make_error(error_category::system_error, "invalid_request", std::move(message),
                    std::move(ctx));
}

} // namespace

std::size_t json_text_depth(std::string_view text, std::size_t limit) noexcept {
  std::size_t depth = 0, deepest = 0;
  const char* p = text.data();
  const char* const end = p + text.size();
  while (p < end) {
    switch (*p++) {
      case '"': {
        // Skip the string with memchr: replies are mostly string bytes (a
        // 1 MiB echo is one string). Its closing quote is the first one
        // after an even run of backslashes (`\\` escapes a backslash,
        // `\"` a quote); an unterminated string runs to the end.
        const char* const start = p;
        for (;;) {
          auto* q = static_cast<const char*>(std::memchr(p, '"', static_cast<std::size_t>(end - p)));
          if (q == nullptr)
            return deepest;
          std::size_t backslashes = 0;
          for (const char* b = q; b > start && b[-1] == '\\'; --b)
            ++backslashes;
          p = q + 1;
          if (backslashes % 2 == 0)
            break;
        }
        break;
      }
      case '[':
      case '{':
        if (++depth > deepest) {
          deepest = depth;
          if (deepest > limit)
            return limit + 1;
        }
        break;
      case ']':
      case '}':
        if (depth > 0)
          --depth;
        break;
      default:
        break;
    }
  }
  return deepest;
}

std::size_t json_value_depth(const json& value, std::size_t limit) {
  std::size_t deepest = 0;
  std::vector<std::pair<const json*, std::size_t>> todo{{&value, 0}};
  while (!todo.empty()) {
    auto [v, depth] = todo.back();
    todo.pop_back();
    if (!v->is_structured())
      continue;
    if (depth + 1 > deepest) {
      deepest = depth + 1;
      if (deepest > limit)
        return limit + 1;
    }
    for (const auto& child : *v)
      if (child.is_structured())
        todo.emplace_back(&child, depth + 1);
  }
  return deepest;
}

bool valid_utf8(std::string_view text) noexcept {
  const char* p = text.data();
  const char* const end = p + text.size();
  while (p < end) {
    // ASCII runs 8 bytes at a time: most text is ASCII, and a caller's
    // 1 MiB argument is checked on every call.
    while (end - p >= 8) {
      std::uint64_t word;
      std::memcpy(&word, p, sizeof word);
      if (word & 0x8080808080808080ULL)
        break;
      p += 8;
    }
    if (p == end)
      break;
    if (static_cast<unsigned char>(*p) < 0x80) {
      ++p;
      continue;
    }
    auto n = utf8_sequence(std::string_view(p, static_cast<std::size_t>(end - p)));
    if (n == 0)
      return false;
    p += n;
  }
  return true;
}

std::string sanitize_utf8(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  while (!text.empty()) {
    auto n = utf8_sequence(text);
    if (n == 0) {
      out += "\xEF\xBF\xBD";  // U+FFFD for one ill-formed byte
      text.remove_prefix(1);
      continue;
    }
    out.append(text.data(), n);
    text.remove_prefix(n);
  }
  return out;
}

std::optional<error> validate_request(std::string_view command, const json& args,
                                      const request_limits& limits) {
  if (command.empty())
    return invalid_request(command, "empty_command", "command must not be empty");
  if (command.size() > limits.max_command_bytes)
    return invalid_request(command.substr(0, 64), "command_too_long",
                           "command is " + std::to_string(command.size())
                             + " bytes long; at most "
                             + std::to_string(limits.max_command_bytes) + " are allowed");
  if (!valid_utf8(command))
    return invalid_request(command, "invalid_utf8", "command is not valid UTF-8");
  if (args.is_null())
    return std::nullopt;
  if (!args.is_object())
    return invalid_request(command, "not_an_object",
                           std::string("args must be a JSON object, not ") + args.type_name());
  if (auto sid = args.find("session_id"); sid != args.end() && !sid->is_string())
    return invalid_request(command, "session_id_not_string",
                           std::string("args.session_id must be a string, not ")
                             + sid->type_name());
  // One walk for depth and UTF-8, with an explicit stack.
  std::vector<std::pair<const json*, std::size_t>> todo{{&args, 1}};
  while (!todo.empty()) {
    auto [v, depth] = todo.back();
    todo.pop_back();
    if (v->is_structured() && depth > limits.max_json_depth)
      return invalid_request(command, "too_deep",
                             "args are nested more than " + std::to_string(limits.max_json_depth)
                               + " levels deep (pool.max_json_depth)");
    if (v->is_object()) {
      for (auto it = v->begin(); it != v->end(); ++it) {
        if (!valid_utf8(it.key()))
          return invalid_request(command, "invalid_utf8", "an object key in args is not valid UTF-8");
        todo.emplace_back(&it.value(), depth + 1);
      }
    } else if (v->is_array()) {
      for (const auto& child : *v)
        todo.emplace_back(&child, depth + 1);
    } else if (v->is_string()) {
      if (!valid_utf8(v->get_ref<const std::string&>()))
        return invalid_request(command, "invalid_utf8", "a string in args is not valid UTF-8");
    } else if (v->is_binary()) {
      // JSON text has no binary values: encode_request would silently send
      // {"bytes":[...],"subtype":null} (found by fuzz_request_validation).
      return invalid_request(command, "not_json", "args contain a binary value");
    } else if (v->is_number_float() && !std::isfinite(v->get<double>())) {
      // NaN and infinity have no JSON text: they would be sent as null.
      return invalid_request(command, "not_json", "args contain NaN or infinity");
    }
  }
  return std::nullopt;
}

} // namespace dspex
