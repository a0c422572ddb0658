// Bounds on untrusted JSON, caller request validation, secret redaction and
// the bounded store of anonymous programs (issue 10). No actors, no Python.

#include <doctest/doctest.h>

#include <string>

#include <nlohmann/json.hpp>

#include "dspex/envelope.hpp"
#include "dspex/json_limits.hpp"
#include "dspex/program_store.hpp"
#include "dspex/secrets.hpp"

using namespace dspex;
using json = nlohmann::json;

namespace {

std::string deep_text(std::size_t depth, char open = '[', char close = ']') {
  return std::string(depth, open) + "1" + std::string(depth, close);
}

json nested_array(std::size_t depth) {
  json v = 1;
  for (std::size_t i = 0; i < depth; ++i)
    v = json::array({std::move(v)});
  return v;
}

} // namespace

TEST_CASE("json_text_depth counts brackets outside strings and stops past the limit") {
  CHECK(json_text_depth("1", 10) == 0);
  CHECK(json_text_depth("[]", 10) == 1);
  CHECK(json_text_depth(R"({"a":[{"b":[1]}]})", 10) == 4);
  CHECK(json_text_depth(R"({"a":"[[[[[[\"[[["})", 2) == 1);  // brackets inside a string
  CHECK(json_text_depth(R"(["\\",[[]]])", 10) == 3);         // an escaped backslash ends before the quote
  CHECK(json_text_depth(deep_text(100'000), 128) == 129);
  CHECK(json_text_depth(deep_text(128), 128) == 128);
}

TEST_CASE("a reply nested 100k deep is too_deep, checked before anything is built") {
  // Before the bound, such a reply (in `error`, `id` or `result`) crashed the
  // host: dump() and copies recurse once per level.
  for (const auto& payload :
       {std::string(R"({"id":1,"success":false,"error":)") + deep_text(100'000) + "}",
        std::string(R"({"id":)") + deep_text(100'000) + R"(,"success":true})",
        std::string(R"({"id":1,"success":true,"result":)") + deep_text(100'000, '{', '}') + "}"}) {
    auto parsed = parse_reply(payload, 1, 128);
    REQUIRE(std::holds_alternative<protocol_error>(parsed));
    CHECK(std::get<protocol_error>(parsed).code == protocol_errc::too_deep);
  }
  // At the bound it parses, and a non-string error is kept bounded in length.
  auto ok = parse_reply(std::string(R"({"id":1,"success":false,"error":)") + deep_text(127) + "}", 1, 128);
  REQUIRE(std::holds_alternative<reply>(ok));
  CHECK(std::get<reply>(ok).error.size() <= 4096 + 3);
  auto big_error = json{{"id", 1}, {"success", false}, {"error", json{{"x", std::string(100'000, 'a')}}}};
  auto kept = parse_reply(big_error.dump(), 1);
  REQUIRE(std::holds_alternative<reply>(kept));
  CHECK(std::get<reply>(kept).error.size() <= 4096 + 3);
}

TEST_CASE("json_value_depth needs no recursion") {
  CHECK(json_value_depth(json(1), 10) == 0);
  CHECK(json_value_depth(json::object(), 10) == 1);
  CHECK(json_value_depth(json{{"a", {{"b", json::array({1, 2})}}}}, 10) == 3);
  auto deep = nested_array(200'000);
  CHECK(json_value_depth(deep, 128) == 129);
  // Take the deep value apart without recursion (nlohmann's destructor is
  // iterative, but keep the test independent of that).
  CHECK(json_value_depth(nested_array(5), 5) == 5);
}

TEST_CASE("valid_utf8 and sanitize_utf8") {
  CHECK(valid_utf8("plain ascii"));
  CHECK(valid_utf8("caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80"));
  CHECK_FALSE(valid_utf8("\xff"));
  CHECK_FALSE(valid_utf8("\xc3"));              // truncated
  CHECK_FALSE(valid_utf8("\xc0\xaf"));          // overlong
  CHECK_FALSE(valid_utf8("\xed\xa0\x80"));      // surrogate
  CHECK_FALSE(valid_utf8("\xf4\x90\x80\x80"));  // above U+10FFFF
  auto clean = sanitize_utf8("a\xff" "b\xc3");
  CHECK(clean == "a\xEF\xBF\xBD" "b\xEF\xBF\xBD");
  CHECK_NOTHROW((void)json(clean).dump());
  CHECK_THROWS((void)json(std::string("a\xff")).dump());  // what the sanitising prevents
}

TEST_CASE("validate_request names what is wrong") {
  auto reason = [](std::string_view cmd, const json& args) -> std::string {
    auto err = validate_request(cmd, args);
    if (!err)
      return "ok";
    CHECK(err->category == error_category::system_error);
    CHECK(err->type == "invalid_request");
    CHECK_NOTHROW((void)err->to_json().dump());
    return err->context.value("reason", "?");
  };
  CHECK(reason("ping", nullptr) == "ok");
  CHECK(reason("ping", json::object()) == "ok");
  // args (1) + 127 arrays = 128 levels: the default bound, allowed; one more is not.
  CHECK(reason("ping", {{"session_id", "s"}, {"x", nested_array(127)}}) == "ok");
  CHECK(reason("ping", {{"x", nested_array(128)}}) == "too_deep");
  CHECK(reason("ping", {{"x", nested_array(100'000)}}) == "too_deep");
  CHECK(reason("", json::object()) == "empty_command");
  CHECK(reason(std::string(300, 'c'), json::object()) == "command_too_long");
  CHECK(reason("p\xff", json::object()) == "invalid_utf8");
  CHECK(reason("ping", json::array()) == "not_an_object");
  CHECK(reason("ping", 3) == "not_an_object");
  CHECK(reason("ping", {{"session_id", 7}}) == "session_id_not_string");
  CHECK(reason("ping", {{"k", std::string("\xfe")}}) == "invalid_utf8");
  CHECK(reason("ping", {{std::string("\xfe"), 1}}) == "invalid_utf8");
  request_limits shallow;
  shallow.max_json_depth = 2;
  CHECK(validate_request("ping", {{"a", {{"b", 1}}}}, shallow) == std::nullopt);
  CHECK(validate_request("ping", {{"a", {{"b", {{"c", 1}}}}}}, shallow)->context["reason"]
        == "too_deep");
}

TEST_CASE("redacted hides every secret key at any depth and nothing else") {
  json in = {{"provider", "openai"},
             {"api_key", "sk-1"},
             {"nested", {{"Authorization", "Bearer x"}, {"list", {{{"password", "p"}}, 3}}}},
             {"tokens_used", 5},  // a secret-looking key: redacted too (better safe)
             {"plain", {1, 2, 3}}};
  auto out = redacted(in);
  CHECK(out["provider"] == "openai");
  CHECK(out["api_key"] == "[redacted]");
  CHECK(out["nested"]["Authorization"] == "[redacted]");
  CHECK(out["nested"]["list"][0]["password"] == "[redacted]");
  CHECK(out["nested"]["list"][1] == 3);
  CHECK(out["plain"] == json({1, 2, 3}));
  CHECK(out.dump().find("sk-1") == std::string::npos);
  CHECK(in["api_key"] == "sk-1");  // a copy: the original still goes to the worker
  CHECK(redacted(json("x")) == json("x"));
  CHECK(is_secret_key("OPENAI_API_KEY"));
  CHECK(is_secret_key("client_secret"));
  CHECK_FALSE(is_secret_key("model"));
}

TEST_CASE("program_store drops the least recently used definition beyond its capacity") {
  program_store store{2};
  store.put({"s", "a"}, json{{"v", 1}});
  store.put({"s", "b"}, json{{"v", 2}});
  REQUIRE(store.find({"s", "a"}) != nullptr);  // a is now the most recently used
  store.put({"s", "c"}, json{{"v", 3}});      // b goes
  CHECK(store.size() == 2);
  CHECK(store.find({"s", "b"}) == nullptr);
  CHECK((*store.find({"s", "a"}))["v"] == 1);
  store.put({"s", "a"}, json{{"v", 4}});  // replace keeps the size
  CHECK(store.size() == 2);
  CHECK((*store.find({"s", "a"}))["v"] == 4);
  store.erase({"s", "a"});
  store.erase({"s", "zz"});
  CHECK(store.size() == 1);
  program_store many{1000};
  for (int i = 0; i < 100'000; ++i)
    many.put({"anonymous", std::to_string(i)}, json{{"i", i}});
  CHECK(many.size() == 1000);
  CHECK(many.find({"anonymous", "99999"}) != nullptr);
  CHECK(many.find({"anonymous", "0"}) == nullptr);
}
