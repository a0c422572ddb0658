// libFuzzer target: request validation (json_limits.hpp) and encode_request
// (envelope.hpp), the checks a caller's command + args pass before they are
// queued anywhere.
//
// Input layout: the command (raw bytes, any encoding), a '\n', then the args.
// Without a '\n' the whole input is the args and the command is
// "execute_program". The args are JSON text; when their first byte is 0x00
// the rest is CBOR instead (at most 512 bytes), which unlike JSON text can
// carry ill-formed UTF-8 in strings and keys, so validate_request's UTF-8
// walk is reached.
//
// Checked:
//   - json_text_depth and json_value_depth agree with each other and with
//     their contract: min(real depth, limit + 1) for any limit; text deeper
//     than the bound is refused before it is parsed;
//   - valid_utf8 agrees with nlohmann's own UTF-8 check (dump() throws on
//     ill-formed text); sanitize_utf8 gives valid text and leaves valid text
//     alone;
//   - validate_request's verdict is exact at the bounds: args of depth d pass
//     with max_json_depth d and are too_deep with d - 1, a command of n bytes
//     passes with max_command_bytes n and is command_too_long with n - 1; a
//     refusal is system_error/invalid_request with a known reason and a
//     dumpable context;
//   - what validates encodes: encode_request throws nothing and gives text
//     that parses cleanly as JSON with the id, command, args (session_id
//     added when absent) and a timestamp; framed, it decodes back intact.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "dspex/envelope.hpp"
#include "dspex/framing.hpp"
#include "dspex/json_limits.hpp"

#include "fuzz_check.hpp"

namespace {

using json = nlohmann::json;

constexpr std::size_t kBound = dspex::default_max_json_depth;
constexpr std::size_t kHuge = std::size_t{1} << 20;  // above any depth an input can reach
constexpr std::size_t kMaxCbor = 512;                // nlohmann's CBOR reader recurses per level

/// nlohmann's own verdict on UTF-8: dump() throws type_error.316 on ill-formed text.
bool nlohmann_accepts(std::string_view text) {
  try {
    (void)json(std::string(text)).dump();
    return true;
  } catch (const json::type_error&) {
    return false;
  }
}

void check_utf8_helpers(std::string_view text) {
  const bool valid = dspex::valid_utf8(text);
  CHECK(valid == nlohmann_accepts(text));
  const std::string clean = dspex::sanitize_utf8(text);
  CHECK(dspex::valid_utf8(clean));
  if (valid)
    CHECK(clean == text);
  else
    CHECK(clean != text);
}

void check_depth_functions(std::string_view text, const json* value) {
  const std::size_t real = dspex::json_text_depth(text, kHuge);
  CHECK(real <= kHuge);
  for (std::size_t limit : {std::size_t{0}, std::size_t{1}, std::size_t{2}, real > 0 ? real - 1 : 0, real, kBound})
    CHECK(dspex::json_text_depth(text, limit) == std::min(real, limit + 1));
  if (value) {
    // On text that parsed, the text's depth is the value's depth. nlohmann
    // takes a NUL byte outside a string for the end of the input, so bytes
    // after one are not parsed but still counted: the text bound can only be
    // the stricter one.
    const std::size_t vdepth = dspex::json_value_depth(*value, kHuge);
    if (text.find('\0') == std::string_view::npos)
      CHECK(vdepth == real);
    else
      CHECK(vdepth <= real);
    for (std::size_t limit : {std::size_t{0}, std::size_t{1}, vdepth > 0 ? vdepth - 1 : 0, vdepth})
      CHECK(dspex::json_value_depth(*value, limit) == std::min(vdepth, limit + 1));
  }
}

bool known_reason(const std::string& r) {
  return r == "empty_command" || r == "command_too_long" || r == "invalid_utf8" || r == "not_an_object" ||
         r == "too_deep" || r == "session_id_not_string" || r == "not_json";
}

std::string check_refusal(const std::optional<dspex::error>& err) {
  CHECK(err.has_value());
  CHECK(err->category == dspex::error_category::system_error);
  CHECK(err->type == "invalid_request");
  CHECK(!err->message.empty());
  CHECK(err->context.is_object());
  const auto reason = err->context.find("reason");
  CHECK(reason != err->context.end() && reason->is_string());
  CHECK(known_reason(reason->get<std::string>()));
  CHECK(err->context.contains("command"));
  (void)err->to_json().dump();  // the error itself must be printable
  return reason->get<std::string>();
}

void check_encoding(std::uint64_t id, std::string_view command, const json& args, std::size_t max_frame) {
  const std::string text = dspex::encode_request(id, command, args);
  json env = json::parse(text);  // throws (a failure here) on anything but clean JSON
  CHECK(env.is_object() && env.size() == 4);
  CHECK(env.at("id").is_number_unsigned() && env.at("id").get<std::uint64_t>() == id);
  CHECK(env.at("command").is_string() && env.at("command").get<std::string>() == command);
  CHECK(env.at("timestamp").is_string());
  const json& sent = env.at("args");
  CHECK(sent.is_object());
  json expected = args.is_null() ? json::object() : args;
  if (!expected.contains("session_id"))
    expected["session_id"] = "anonymous";
  // What JSON text can carry of it: a binary value (CBOR byte string) goes
  // out as {"bytes":[...],"subtype":...}, a NaN or infinity as null.
  const json wire = json::parse(expected.dump());
  CHECK(sent == wire);
  CHECK(dspex::json_text_depth(text, kHuge) == dspex::json_value_depth(wire, kHuge) + 1);

  // Framed and decoded back, byte for byte.
  const std::string frame = dspex::encode_frame(text);
  dspex::frame_decoder dec(std::max(max_frame, text.size()));
  std::vector<std::string> out;
  CHECK(!dec.feed(frame, out));
  CHECK(out.size() == 1 && out[0] == text && dec.buffered() == 0);
}

void run(std::string_view input) {
  std::string_view command = "execute_program";
  std::string_view args_text = input;
  if (const auto nl = input.find('\n'); nl != std::string_view::npos) {
    command = input.substr(0, nl);
    args_text = input.substr(nl + 1);
  }
  check_utf8_helpers(command);

  json args;
  if (!args_text.empty() && args_text[0] == '\0') {
    const std::string_view cbor = args_text.substr(1, kMaxCbor);
    try {
      // nlohmann throws out_of_range.408 for an excessive announced size even
      // with allow_exceptions = false.
      args = json::from_cbor(cbor.begin(), cbor.end(), /*strict=*/true, /*allow_exceptions=*/false);
    } catch (const json::exception&) {
      return;
    }
    if (args.is_discarded())
      return;
  } else {
    // The depth check first: text deeper than the bound is never parsed.
    if (dspex::json_text_depth(args_text, kBound) > kBound) {
      check_depth_functions(args_text, nullptr);
      return;
    }
    json parsed = json::parse(args_text.begin(), args_text.end(), nullptr, /*allow_exceptions=*/false);
    check_depth_functions(args_text, parsed.is_discarded() ? nullptr : &parsed);
    if (parsed.is_discarded())
      return;
    args = std::move(parsed);
  }

  const dspex::request_limits limits;
  const auto verdict = dspex::validate_request(command, args, limits);
  std::uint64_t id = input.size();
  for (unsigned char c : input.substr(0, 8))
    id = id * 131 + c;

  if (verdict) {
    const std::string reason = check_refusal(verdict);
    if (reason == "empty_command")
      CHECK(command.empty());
    if (reason == "command_too_long")
      CHECK(command.size() > limits.max_command_bytes);
    if (reason == "not_an_object")
      CHECK(!args.is_object() && !args.is_null());
    if (reason == "too_deep")
      CHECK(dspex::json_value_depth(args, limits.max_json_depth) > limits.max_json_depth);
    if (reason == "session_id_not_string")
      CHECK(args.is_object() && !args.at("session_id").is_string());
    if (reason == "invalid_utf8" && dspex::valid_utf8(command)) {
      // Then it is in args: dumping them must be what fails.
      bool threw = false;
      try {
        (void)args.dump();
      } catch (const json::type_error&) {
        threw = true;
      }
      CHECK(threw);
    }
    return;
  }

  // Accepted: the verdict is exact at both bounds.
  CHECK(!command.empty() && command.size() <= limits.max_command_bytes && dspex::valid_utf8(command));
  CHECK(args.is_null() || args.is_object());
  const std::size_t depth = dspex::json_value_depth(args, kHuge);
  CHECK(depth <= limits.max_json_depth);
  if (args.is_object()) {
    dspex::request_limits tight = limits;
    tight.max_json_depth = depth;
    CHECK(!dspex::validate_request(command, args, tight));
    tight.max_json_depth = depth - 1;
    CHECK(check_refusal(dspex::validate_request(command, args, tight)) == "too_deep");
  }
  dspex::request_limits short_cmd = limits;
  short_cmd.max_command_bytes = command.size();
  CHECK(!dspex::validate_request(command, args, short_cmd));
  short_cmd.max_command_bytes = command.size() - 1;
  CHECK(check_refusal(dspex::validate_request(command, args, short_cmd)) == "command_too_long");

  check_encoding(id, command, args, dspex::default_max_frame_bytes);
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  return dspex::fuzz::run_input([&] { run(std::string_view(reinterpret_cast<const char*>(data), size)); });
}
