// libFuzzer target: dspex::parse_reply (envelope.hpp), the validation of one
// reply payload from a worker.
//
// The whole input is the payload. It is parsed without an expected id, then
// with the id it carries, another id, and an id derived from the input.
// Checked:
//   - a failure is one of the reply codes (never a framing code), with a
//     message; mismatched_id only when an id was expected; the same payload
//     fails the same way whatever id is expected (the id match comes last);
//   - a success has `result` null unless success, `error` empty unless
//     failure; expecting its own id gives the same reply, any other id gives
//     mismatched_id;
//   - everything a caller may print or forward is dumpable: the result, the
//     error text and the failure message go through nlohmann's dump() (which
//     throws on invalid UTF-8), and the result survives dump -> parse;
//   - the depth bound: a reply of text depth d parses with max_json_depth d
//     and is too_deep with d - 1; too_deep only when the text is that deep.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <variant>

#include <nlohmann/json.hpp>

#include "dspex/envelope.hpp"
#include "dspex/json_limits.hpp"

#include "fuzz_check.hpp"

namespace {

using json = nlohmann::json;

bool is(const dspex::protocol_error& e, const char* name) {
  return std::strcmp(dspex::to_string(e.code), name) == 0;
}

/// Text that a caller may put into a structured error or print as JSON.
void check_dumpable(const std::string& text) {
  CHECK(dspex::valid_utf8(text));
  (void)json(text).dump();  // throws type_error.316 on invalid UTF-8
}

bool same(const dspex::reply& a, const dspex::reply& b) {
  return a.id == b.id && a.success == b.success && a.result == b.result && a.error == b.error;
}

void check_failure(const dspex::protocol_error& e, bool id_expected) {
  CHECK(!e.message.empty());
  check_dumpable(e.message);
  const bool reply_code = is(e, "bad_json") || is(e, "not_an_object") || is(e, "missing_id") ||
                          is(e, "missing_success") || is(e, "too_deep") || (id_expected && is(e, "mismatched_id"));
  CHECK(reply_code);
}

void run(std::string_view payload) {
  constexpr std::size_t depth = dspex::default_max_json_depth;
  const auto first = dspex::parse_reply(payload, std::nullopt);

  // An id derived from the input, so both a match and a mismatch get explored.
  std::uint64_t derived = payload.size();
  for (unsigned char c : payload.substr(0, 16))
    derived = derived * 31 + c;
  derived %= 4;  // small ids are the ones replies carry in the seeds

  if (const auto* e = std::get_if<dspex::protocol_error>(&first)) {
    check_failure(*e, false);
    CHECK(!is(*e, "mismatched_id"));
    if (is(*e, "too_deep"))
      CHECK(dspex::json_text_depth(payload, depth) > depth);
    const auto again = dspex::parse_reply(payload, derived);
    const auto* e2 = std::get_if<dspex::protocol_error>(&again);
    CHECK(e2 && e2->code == e->code && e2->message == e->message);
    return;
  }

  const auto& r = std::get<dspex::reply>(first);
  if (r.success)
    CHECK(r.error.empty());
  else
    CHECK(r.result.is_null());
  check_dumpable(r.error);
  const std::string text = r.result.dump();
  CHECK(json::parse(text) == r.result);
  CHECK(dspex::json_value_depth(r.result, depth) <= depth);

  // With the id it carries: the same reply. With any other: mismatched_id.
  const auto own = dspex::parse_reply(payload, r.id);
  CHECK(std::holds_alternative<dspex::reply>(own) && same(std::get<dspex::reply>(own), r));
  const std::uint64_t other = derived != r.id ? derived : r.id + 1;
  const auto mismatch = dspex::parse_reply(payload, other);
  const auto* em = std::get_if<dspex::protocol_error>(&mismatch);
  CHECK(em && is(*em, "mismatched_id"));
  check_failure(*em, true);

  // The depth bound is exact: the text's own depth passes, one less does not.
  const std::size_t d = dspex::json_text_depth(payload, depth);
  CHECK(d >= 1 && d <= depth);  // a reply is an object
  const auto at = dspex::parse_reply(payload, std::nullopt, d);
  CHECK(std::holds_alternative<dspex::reply>(at) && same(std::get<dspex::reply>(at), r));
  const auto below = dspex::parse_reply(payload, std::nullopt, d - 1);
  const auto* e = std::get_if<dspex::protocol_error>(&below);
  CHECK(e && is(*e, "too_deep"));
  check_failure(*e, false);
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  return dspex::fuzz::run_input([&] { run(std::string_view(reinterpret_cast<const char*>(data), size)); });
}
