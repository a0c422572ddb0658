// node_wire (issue 13): what runtimes say to each other, encoded and read
// back, and every malformed message a peer could send refused with a
// structured error.
#include <string>
#include <variant>

#include <doctest/doctest.h>

#include "dspex/node_wire.hpp"

using namespace dspex;

namespace {

node_request sample() {
  node_request r;
  r.op = node_op::execute;
  r.pool = "qa";
  r.session_id = "s1";
  r.command = "execute_program";
  r.args = {{"program_id", "p1"}, {"inputs", {{"question", "why?"}}}};
  r.timeout_ms = 1234;
  r.idempotent = false;
  r.max_attempts = 2;
  r.affinity = "strict_queue";
  return r;
}

std::string refused(const std::string& text) {
  auto d = decode_node_request(text, request_limits{});
  REQUIRE_MESSAGE(std::holds_alternative<error>(d), "accepted: " << text);
  auto& e = std::get<error>(d);
  CHECK(e.category == error_category::system_error);
  CHECK(e.type == "invalid_request");
  CHECK(e.context["reason"] == "malformed_node_request");
  return e.message;
}

} // namespace

TEST_CASE("a request is read back as it was sent") {
  auto d = decode_node_request(encode_node_request(sample()), request_limits{});
  REQUIRE(std::holds_alternative<node_request>(d));
  auto& r = std::get<node_request>(d);
  CHECK(r.op == node_op::execute);
  CHECK(r.pool == "qa");
  CHECK(r.session_id == "s1");
  CHECK(r.command == "execute_program");
  CHECK(r.args == sample().args);
  CHECK(r.timeout_ms == 1234);
  CHECK(r.idempotent == false);
  CHECK(r.max_attempts == 2u);
  CHECK(r.affinity == std::optional<std::string>{"strict_queue"});
  for (auto op : {node_op::end_session, node_op::session_info, node_op::list_sessions}) {
    auto x = sample();
    x.op = op;
    auto y = decode_node_request(encode_node_request(x), request_limits{});
    REQUIRE(std::holds_alternative<node_request>(y));
    CHECK(std::get<node_request>(y).op == op);
  }
}

TEST_CASE("a malformed request is refused, naming what is wrong") {
  CHECK(refused("not json").find("not a JSON object") != std::string::npos);
  CHECK(refused("[1,2]").find("not a JSON object") != std::string::npos);
  CHECK(refused(std::string{"{\"op\":\"execute\",\"x\":\"\xff\"}"}).find("UTF-8") != std::string::npos);
  CHECK(refused("{\"op\":\"drop_tables\",\"timeout_ms\":1}").find("unknown op") != std::string::npos);
  CHECK(refused("{\"pool\":3,\"timeout_ms\":1}").find("must be strings") != std::string::npos);
  CHECK(refused("{\"command\":\"ping\"}").find("timeout_ms") != std::string::npos);
  CHECK(refused("{\"command\":\"ping\",\"timeout_ms\":0}").find("timeout_ms") != std::string::npos);
  CHECK(refused("{\"command\":\"ping\",\"timeout_ms\":-5}").find("timeout_ms") != std::string::npos);
  CHECK(refused("{\"command\":\"ping\",\"timeout_ms\":1,\"args\":[1]}").find("args") != std::string::npos);
  CHECK(refused("{\"command\":\"ping\",\"timeout_ms\":1,\"idempotent\":\"yes\"}").find("idempotent")
        != std::string::npos);
  CHECK(refused("{\"command\":\"ping\",\"timeout_ms\":1,\"max_attempts\":1000}").find("max_attempts")
        != std::string::npos);
  // Nesting beyond the bound is refused before it is parsed.
  std::string deep = "{\"command\":\"ping\",\"timeout_ms\":1,\"args\":{\"a\":"
                     + std::string(5000, '[') + std::string(5000, ']') + "}}";
  CHECK(refused(deep).find("bounded depth") != std::string::npos);
  // A timeout longer than a day is a day.
  auto d = decode_node_request("{\"command\":\"ping\",\"timeout_ms\":99999999999}", request_limits{});
  REQUIRE(std::holds_alternative<node_request>(d));
  CHECK(std::get<node_request>(d).timeout_ms == 86'400'000u);
}

TEST_CASE("a reply is read back with its worker and node, and a malformed one is a protocol violation") {
  auto ok = outcome::success({{"status", "ok"}});
  ok.set_served_by("qa.w2");
  auto back = decode_node_reply(encode_node_reply(ok, "127.0.0.1:4000"), "127.0.0.1:4000");
  REQUIRE(back.ok());
  CHECK(back.value()["status"] == "ok");
  CHECK(back.served_by() == "127.0.0.1:4000/qa.w2");
  auto failed = outcome::failure(make_error(error_category::python_error, "ValueError", "bad",
                                            {{"command", "x"}}));
  auto back2 = decode_node_reply(encode_node_reply(failed, "n"), "n");
  REQUIRE_FALSE(back2.ok());
  CHECK(back2.error().category == error_category::python_error);
  CHECK(back2.error().type == "ValueError");
  CHECK(back2.error().context["command"] == "x");
  for (std::string bad : {"", "nope", "[]", "{}", "{\"ok\":1}", "{\"ok\":false}",
                          "{\"ok\":false,\"error\":{\"category\":\"no_such\",\"type\":\"t\",\"message\":\"m\"}}",
                          "{\"ok\":false,\"error\":\"text\"}",
                          "{\"ok\":false,\"error\":{\"category\":\"python_error\",\"type\":\"T\",\"message\":\"\"}}",
                          "{\"ok\":false,\"error\":{\"category\":\"python_error\",\"type\":\"\",\"message\":\"m\"}}"}) {
    auto o = decode_node_reply(bad, "127.0.0.1:4000");
    REQUIRE_FALSE(o.ok());
    CHECK(o.error().category == error_category::communication_error);
    CHECK(o.error().type == "protocol_violation");
    CHECK(o.error().context["node"] == "127.0.0.1:4000");
  }
}

TEST_CASE("a load is read back, and one with a bad pool name or count is refused") {
  node_load l;
  l.pools["qa"] = node_pool_load{4, 1, 3, 2, "degraded"};
  auto back = decode_node_load(encode_node_load(l));
  REQUIRE(back);
  CHECK(back->pools.at("qa").busy == 3);
  CHECK(back->pools.at("qa").health == "degraded");
  CHECK(back->pools.at("qa").serving());
  CHECK(back->pools.at("qa").load() == doctest::Approx(5.0 / 4));
  CHECK_FALSE(node_pool_load{1, 0, 0, 0, "broken"}.serving());
  CHECK_FALSE(decode_node_load("{\"pools\":{\"a b\":{\"size\":1,\"idle\":1,\"busy\":0,\"queued\":0,\"health\":\"healthy\"}}}"));
  CHECK_FALSE(decode_node_load("{\"pools\":{\"qa\":{\"size\":-1,\"idle\":1,\"busy\":0,\"queued\":0,\"health\":\"healthy\"}}}"));
  CHECK_FALSE(decode_node_load("{\"pools\":[]}"));
  CHECK_FALSE(decode_node_load("garbage"));
}
