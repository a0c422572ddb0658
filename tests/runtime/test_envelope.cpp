// Layer 1: request and reply envelopes of the worker wire protocol.
#include <doctest/doctest.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <ctime>
#include <limits>
#include <stdexcept>
#include <string>
#include <variant>

#include <nlohmann/json.hpp>

#include "dspex/envelope.hpp"
#include "dspex/error.hpp"

using dspex::encode_request;
using dspex::parse_reply;
using dspex::protocol_errc;
using dspex::protocol_error;
using dspex::reply;
using json = nlohmann::json;

namespace {

/// Parses a reply that must be valid.
reply ok_reply(std::string_view payload, std::optional<std::uint64_t> expected = std::nullopt) {
  auto r = parse_reply(payload, expected);
  if (auto* err = std::get_if<protocol_error>(&r))
    FAIL("unexpected protocol error ", dspex::to_string(err->code), ": ", err->message);
  return std::get<reply>(std::move(r));
}

/// Parses a reply that must be rejected.
protocol_error bad_reply(std::string_view payload, std::optional<std::uint64_t> expected = std::nullopt) {
  auto r = parse_reply(payload, expected);
  if (std::holds_alternative<reply>(r))
    FAIL("reply unexpectedly accepted: ", std::string(payload));
  return std::get<protocol_error>(std::move(r));
}

/// True when `text` matches `pattern` character by character, where 'd' in
/// the pattern stands for one ASCII digit and any other character for itself
/// (a fixed-shape regex; std::regex draws spurious GCC 12 warnings).
bool matches_shape(const std::string& text, const std::string& pattern) {
  if (text.size() != pattern.size())
    return false;
  for (std::size_t i = 0; i < text.size(); ++i) {
    if (pattern[i] == 'd' ? !(text[i] >= '0' && text[i] <= '9') : text[i] != pattern[i])
      return false;
  }
  return true;
}

/// Seconds since the epoch of an ISO-8601 UTC timestamp "YYYY-MM-DDTHH:MM:SS.ffffffZ".
double timestamp_seconds(const std::string& ts) {
  std::tm tm{};
  tm.tm_year = std::stoi(ts.substr(0, 4)) - 1900;
  tm.tm_mon = std::stoi(ts.substr(5, 2)) - 1;
  tm.tm_mday = std::stoi(ts.substr(8, 2));
  tm.tm_hour = std::stoi(ts.substr(11, 2));
  tm.tm_min = std::stoi(ts.substr(14, 2));
  tm.tm_sec = std::stoi(ts.substr(17, 2));
  const double frac = std::stoi(ts.substr(20, 6)) / 1e6;
  return static_cast<double>(timegm(&tm)) + frac;
}

/// Sets TZ for the scope (so a local-time timestamp cannot pass as UTC on a
/// machine that happens to run in UTC), restoring the previous value after.
class scoped_tz {
public:
  explicit scoped_tz(const char* tz) {
    if (const char* old = std::getenv("TZ"))
      old_ = old;
    ::setenv("TZ", tz, 1);
    ::tzset();
  }
  ~scoped_tz() {
    if (old_)
      ::setenv("TZ", old_->c_str(), 1);
    else
      ::unsetenv("TZ");
    ::tzset();
  }
  scoped_tz(const scoped_tz&) = delete;
  scoped_tz& operator=(const scoped_tz&) = delete;

private:
  std::optional<std::string> old_;
};

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

} // namespace

// ---------------------------------------------------------------- requests

TEST_CASE("encode_request produces the documented envelope") {
  const scoped_tz tz("XST-5:30"); // UTC+5:30, a zone where local time != UTC
  const double before = now_seconds();
  const std::string text =
      encode_request(42, "execute_program", json{{"program_id", "p1"}, {"inputs", {{"question", "2+2?"}}}});
  const double after = now_seconds();

  CHECK(text.find('\n') == std::string::npos); // compact
  const json j = json::parse(text);
  REQUIRE(j.is_object());
  CHECK(j.size() == 4);

  REQUIRE(j.contains("id"));
  CHECK(j.at("id").is_number_unsigned());
  CHECK(j.at("id").get<std::uint64_t>() == 42);

  CHECK(j.at("command") == "execute_program");

  REQUIRE(j.at("args").is_object());
  CHECK(j.at("args").at("program_id") == "p1");
  CHECK(j.at("args").at("inputs") == json{{"question", "2+2?"}});
  CHECK(j.at("args").at("session_id") == "anonymous");

  REQUIRE(j.at("timestamp").is_string());
  const std::string ts = j.at("timestamp").get<std::string>();
  CAPTURE(ts);
  CHECK(matches_shape(ts, "dddd-dd-ddTdd:dd:dd.ddddddZ"));

  // The timestamp is the current UTC time (not local time, not garbage).
  const double t = timestamp_seconds(ts);
  CHECK(t >= before - 1.0);
  CHECK(t <= after + 1.0);
}

TEST_CASE("encode_request: each timestamp is the time of its own request, across second boundaries") {
  // The part up to the second is formatted once per second and reused: a
  // stale one would be a whole second off. Each timestamp must lie between
  // the clock read just before and just after its request, to the
  // microsecond, over two second boundaries.
  using namespace std::chrono;
  auto micros = [](system_clock::time_point t) {
    return duration_cast<microseconds>(t.time_since_epoch()).count();
  };
  int boundaries = 0;
  long long last_second = -1;
  const auto bound = steady_clock::now() + seconds{5};  // a hang guard; ~2 s are needed
  while (boundaries < 2 && steady_clock::now() < bound) {
    const auto before = micros(system_clock::now());
    const json j = json::parse(encode_request(1, "ping", nullptr));
    const auto after = micros(system_clock::now());
    const std::string ts = j.at("timestamp").get<std::string>();
    CAPTURE(ts);
    REQUIRE(matches_shape(ts, "dddd-dd-ddTdd:dd:dd.ddddddZ"));
    const auto t = static_cast<long long>(std::llround(timestamp_seconds(ts) * 1e6));
    REQUIRE(t >= before - 1);  // (the double's rounding)
    REQUIRE(t <= after + 1);
    const long long second = t / 1000000;
    if (last_second >= 0 && second != last_second)
      ++boundaries;
    last_second = second;
  }
  CHECK(boundaries == 2);
}

TEST_CASE("the timestamp shape check itself rejects near misses") {
  CHECK(matches_shape("2026-11-26T14:00:00.123456Z", "dddd-dd-ddTdd:dd:dd.ddddddZ"));
  CHECK_FALSE(matches_shape("2026-11-26T14:00:00.123456", "dddd-dd-ddTdd:dd:dd.ddddddZ"));
  CHECK_FALSE(matches_shape("2026-11-26T14:00:00.123Z", "dddd-dd-ddTdd:dd:dd.ddddddZ"));
  CHECK_FALSE(matches_shape("2026-11-26 14:00:00.123456Z", "dddd-dd-ddTdd:dd:dd.ddddddZ"));
  CHECK_FALSE(matches_shape("2026-11-26T14:00:00.12345xZ", "dddd-dd-ddTdd:dd:dd.ddddddZ"));
  CHECK_FALSE(matches_shape("2026-11-26T14:00:00+123456Z", "dddd-dd-ddTdd:dd:dd.ddddddZ"));
}

TEST_CASE("encode_request: session_id defaulting") {
  SUBCASE("absent becomes anonymous") {
    const json j = json::parse(encode_request(1, "ping", json{{"x", 1}}));
    CHECK(j.at("args") == json{{"x", 1}, {"session_id", "anonymous"}});
  }
  SUBCASE("an existing session_id is preserved") {
    const json j = json::parse(encode_request(1, "ping", json{{"session_id", "s1"}, {"x", 1}}));
    CHECK(j.at("args") == json{{"x", 1}, {"session_id", "s1"}});
  }
  SUBCASE("an empty object gets only the session_id") {
    const json j = json::parse(encode_request(1, "list_programs", json::object()));
    CHECK(j.at("args") == json{{"session_id", "anonymous"}});
  }
}

TEST_CASE("encode_request: args null becomes {} (plus session_id)") {
  const json j = json::parse(encode_request(7, "get_stats", nullptr));
  REQUIRE(j.at("args").is_object());
  CHECK(j.at("args") == json{{"session_id", "anonymous"}});
  const json j2 = json::parse(encode_request(7, "get_stats", json()));
  CHECK(j2.at("args") == json{{"session_id", "anonymous"}});
}

TEST_CASE("encode_request: args that are not an object or null throw") {
  CHECK_THROWS_AS(encode_request(1, "ping", json::array({1, 2})), std::invalid_argument);
  CHECK_THROWS_AS(encode_request(1, "ping", json::array()), std::invalid_argument);
  CHECK_THROWS_AS(encode_request(1, "ping", json("text")), std::invalid_argument);
  CHECK_THROWS_AS(encode_request(1, "ping", json(3)), std::invalid_argument);
  CHECK_THROWS_AS(encode_request(1, "ping", json(true)), std::invalid_argument);
}

TEST_CASE("encode_request: the init ping and extreme ids") {
  const json init = json::parse(encode_request(dspex::init_request_id, "ping",
                                               json{{"initialization", true}, {"worker_id", "w1"}}));
  CHECK(init.at("id").get<std::uint64_t>() == 0);
  CHECK(init.at("args").at("initialization") == true);
  CHECK(init.at("args").at("worker_id") == "w1");

  const auto max_id = std::numeric_limits<std::uint64_t>::max();
  const json big = json::parse(encode_request(max_id, "ping", nullptr));
  REQUIRE(big.at("id").is_number_unsigned());
  CHECK(big.at("id").get<std::uint64_t>() == max_id);
}

TEST_CASE("encode_request escapes the command and string args") {
  const std::string cmd = "we\"ird\\cmd\n";
  const json j = json::parse(encode_request(3, cmd, json{{"text", "line1\nline2 \"quoted\" \xc3\xa9"}}));
  CHECK(j.at("command") == cmd);
  CHECK(j.at("args").at("text") == "line1\nline2 \"quoted\" \xc3\xa9");
}

// ------------------------------------------------------------------ replies

TEST_CASE("parse_reply: a valid success reply") {
  const reply r = ok_reply(
      R"({"id":42,"success":true,"result":{"program_id":"p1","outputs":{"answer":"4"}},"timestamp":1764165600.2})",
      42);
  CHECK(r.id == 42);
  CHECK(r.success);
  CHECK(r.result == json{{"program_id", "p1"}, {"outputs", {{"answer", "4"}}}});
  CHECK(r.error.empty());
}

TEST_CASE("parse_reply: a valid error reply") {
  const reply r = ok_reply(R"({"id":42,"success":false,"error":"Program not found: p1","timestamp":1.5})", 42);
  CHECK(r.id == 42);
  CHECK_FALSE(r.success);
  CHECK(r.error == "Program not found: p1");
  CHECK(r.result.is_null());
}

TEST_CASE("parse_reply: id 0 and the largest id are accepted") {
  CHECK(ok_reply(R"({"id":0,"success":true})", 0).id == 0);
  const auto max_id = std::numeric_limits<std::uint64_t>::max();
  CHECK(ok_reply(R"({"id":18446744073709551615,"success":true})", max_id).id == max_id);
}

TEST_CASE("parse_reply: JSON that is not an object") {
  for (const char* payload : {"[1,2,3]", "[]", "42", "-1.5", "\"a string\"", "null", "true"}) {
    CAPTURE(payload);
    const auto err = bad_reply(payload);
    CHECK(err.code == protocol_errc::not_an_object);
    CHECK_FALSE(err.message.empty());
  }
}

TEST_CASE("parse_reply: bad JSON") {
  for (const std::string& payload :
       {std::string(""), std::string("{"), std::string("{\"id\":1,\"success\":true"),
        std::string("{\"id\":1,\"success\":true} trailing"), std::string("not json at all"),
        std::string("{'id':1,'success':true}"), std::string("\xff\xfe\x00\x01", 4),
        std::string("{\"id\":1,\"success\":true,\"error\":\"\xff\"}")}) {
    CAPTURE(payload);
    const auto err = bad_reply(payload);
    CHECK(err.code == protocol_errc::bad_json);
    CHECK_FALSE(err.message.empty());
  }
}

TEST_CASE("parse_reply: id must be an unsigned integer") {
  SUBCASE("missing") {
    CHECK(bad_reply(R"({"success":true,"result":1})").code == protocol_errc::missing_id);
  }
  SUBCASE("negative") {
    CHECK(bad_reply(R"({"id":-1,"success":true})").code == protocol_errc::missing_id);
  }
  SUBCASE("string") {
    CHECK(bad_reply(R"({"id":"42","success":true})", 42).code == protocol_errc::missing_id);
  }
  SUBCASE("float") {
    CHECK(bad_reply(R"({"id":42.0,"success":true})", 42).code == protocol_errc::missing_id);
    CHECK(bad_reply(R"({"id":1.5,"success":true})").code == protocol_errc::missing_id);
  }
  SUBCASE("null, boolean, object") {
    CHECK(bad_reply(R"({"id":null,"success":true})").code == protocol_errc::missing_id);
    CHECK(bad_reply(R"({"id":true,"success":true})").code == protocol_errc::missing_id);
    CHECK(bad_reply(R"({"id":{"n":1},"success":true})").code == protocol_errc::missing_id);
  }
}

TEST_CASE("parse_reply: success must be a boolean") {
  SUBCASE("missing") {
    CHECK(bad_reply(R"({"id":1,"result":{}})", 1).code == protocol_errc::missing_success);
  }
  SUBCASE("not a boolean") {
    CHECK(bad_reply(R"({"id":1,"success":"true"})", 1).code == protocol_errc::missing_success);
    CHECK(bad_reply(R"({"id":1,"success":1})", 1).code == protocol_errc::missing_success);
    CHECK(bad_reply(R"({"id":1,"success":null})", 1).code == protocol_errc::missing_success);
  }
}

TEST_CASE("parse_reply: a mismatched id is a violation naming both ids") {
  const auto err = bad_reply(R"({"id":7,"success":true,"result":null})", 1234);
  CHECK(err.code == protocol_errc::mismatched_id);
  CHECK(err.message.find('7') != std::string::npos);
  CHECK(err.message.find("1234") != std::string::npos);

  // Also for an error reply: a late reply of another request is never an
  // ordinary error.
  CHECK(bad_reply(R"({"id":8,"success":false,"error":"x"})", 9).code == protocol_errc::mismatched_id);
}

TEST_CASE("parse_reply: without an expected id any id is accepted") {
  CHECK(ok_reply(R"({"id":7,"success":true})").id == 7);
  CHECK(ok_reply(R"({"id":123456789,"success":false,"error":"e"})").id == 123456789);
}

TEST_CASE("parse_reply: result handling") {
  SUBCASE("result missing becomes null") {
    const reply r = ok_reply(R"({"id":3,"success":true})", 3);
    CHECK(r.success);
    CHECK(r.result.is_null());
  }
  SUBCASE("result of any JSON type is kept") {
    CHECK(ok_reply(R"({"id":3,"success":true,"result":5})").result == json(5));
    CHECK(ok_reply(R"({"id":3,"success":true,"result":[1,"a"]})").result == json::array({1, "a"}));
    CHECK(ok_reply(R"({"id":3,"success":true,"result":"s"})").result == json("s"));
  }
  SUBCASE("a failure reply ignores result") {
    const reply r = ok_reply(R"({"id":3,"success":false,"error":"boom","result":{"x":1}})");
    CHECK(r.result.is_null());
    CHECK(r.error == "boom");
  }
}

TEST_CASE("parse_reply: error handling") {
  SUBCASE("a non-string error is dumped as JSON text") {
    const reply r = ok_reply(R"({"id":4,"success":false,"error":{"code":3,"msg":"bad"}})", 4);
    CHECK_FALSE(r.success);
    CHECK(json::parse(r.error) == json{{"code", 3}, {"msg", "bad"}});
    CHECK(r.error.find('\n') == std::string::npos);
    CHECK(ok_reply(R"({"id":4,"success":false,"error":17})").error == "17");
  }
  SUBCASE("an absent error is \"unknown error\"") {
    CHECK(ok_reply(R"({"id":4,"success":false})", 4).error == "unknown error");
  }
  SUBCASE("an error string is taken verbatim, including unicode") {
    CHECK(ok_reply(R"({"id":4,"success":false,"error":"No LM is loaded. \u00e9"})").error ==
          "No LM is loaded. \xc3\xa9");
  }
}

TEST_CASE("parse_reply: a request is not a valid reply") {
  // A request is a JSON object with an unsigned id but no success: it is not
  // a valid reply.
  const std::string req = encode_request(5, "ping", nullptr);
  CHECK(bad_reply(req, 5).code == protocol_errc::missing_success);
}

TEST_CASE("every error has a severity, in its JSON too") {
  using dspex::error_category;
  using dspex::error_severity;
  auto sev = [](error_category c, const char* type) { return dspex::make_error(c, type, "m").severity(); };
  CHECK(sev(error_category::python_error, "command_failed") == error_severity::info);
  CHECK(sev(error_category::timeout_error, "request_timeout") == error_severity::warning);
  CHECK(sev(error_category::communication_error, "worker_exited") == error_severity::warning);
  CHECK(sev(error_category::resource_error, "pool_saturated") == error_severity::warning);
  CHECK(sev(error_category::resource_error, "pool_unavailable") == error_severity::critical);
  CHECK(sev(error_category::resource_error, "supervisor_gave_up") == error_severity::critical);
  CHECK(sev(error_category::initialization_error, "spawn_failed") == error_severity::error);
  CHECK(sev(error_category::system_error, "actor_error") == error_severity::error);
  CHECK(sev(error_category::configuration_error, "invalid_setting") == error_severity::critical);
  CHECK(sev(error_category::health_check_error, "ping_failed") == error_severity::warning);
  auto j = dspex::make_error(error_category::resource_error, "pool_unavailable", "m").to_json();
  CHECK(j["severity"] == "critical");
  CHECK(j["category"] == "resource_error");
}
