// node_wire: see node_wire.hpp.
#include "dspex/node_wire.hpp"

#include "dspex/settings.hpp"  // valid_pool_name

#include <algorithm>
#include <limits>

namespace dspex {

namespace {

using json = nlohmann::json;

// A peer's JSON is parsed only when its nesting is bounded: dump() and
// copies of a deeply nested value recurse (json_limits.hpp).
std::optional<json> parse_bounded(const std::string& text, std::size_t max_depth) {
  if (!valid_utf8(text) || json_text_depth(text, max_depth + 4) > max_depth + 4)
    return std::nullopt;
  auto j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object())
    return std::nullopt;
  return j;
}

error bad_request(const std::string& why) {
  return make_error(error_category::system_error, "invalid_request",
                    "a caller runtime sent a malformed request: " + why,
                    {{"reason", "malformed_node_request"}});
}

template <class T>
bool read_string(const json& j, const char* key, T& out) {
  auto it = j.find(key);
  if (it == j.end())
    return true;  // optional, the default stays
  if (!it->is_string())
    return false;
  out = it->get<std::string>();
  return true;
}

std::optional<error> error_from_json(const json& j) {
  if (!j.is_object())
    return std::nullopt;
  auto cat = j.find("category");
  auto type = j.find("type");
  auto message = j.find("message");
  if (cat == j.end() || !cat->is_string() || type == j.end() || !type->is_string()
      || message == j.end() || !message->is_string())
    return std::nullopt;
  auto category = category_from_string(cat->get<std::string>());
  // A structured error names its type and says what happened (found by
  // fuzz_node_wire: an empty message went through as a failure).
  if (!category || type->get_ref<const std::string&>().empty()
      || message->get_ref<const std::string&>().empty())
    return std::nullopt;
  error e;
  e.category = *category;
  e.type = type->get<std::string>();
  e.message = message->get<std::string>();
  if (auto ctx = j.find("context"); ctx != j.end() && ctx->is_object())
    e.context = *ctx;
  return e;
}

} // namespace

const char* to_string(node_op op) noexcept {
  switch (op) {
    case node_op::execute: return "execute";
    case node_op::end_session: return "end_session";
    case node_op::session_info: return "session_info";
    case node_op::list_sessions: return "list_sessions";
  }
  return "execute";
}

std::string encode_node_request(const node_request& r) {
  json j{{"op", to_string(r.op)},
         {"pool", r.pool},
         {"session_id", r.session_id},
         {"command", r.command},
         {"args", r.args},
         {"timeout_ms", r.timeout_ms}};
  if (r.idempotent)
    j["idempotent"] = *r.idempotent;
  if (r.max_attempts)
    j["max_attempts"] = *r.max_attempts;
  if (r.affinity)
    j["affinity"] = *r.affinity;
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

std::variant<node_request, error> decode_node_request(const std::string& text,
                                                      const request_limits& limits) {
  auto parsed = parse_bounded(text, limits.max_json_depth);
  if (!parsed)
    return bad_request("not a JSON object of bounded depth in UTF-8");
  const auto& j = *parsed;
  node_request r;
  std::string op = "execute";
  if (!read_string(j, "op", op) || !read_string(j, "pool", r.pool)
      || !read_string(j, "session_id", r.session_id) || !read_string(j, "command", r.command))
    return bad_request("op, pool, session_id and command must be strings");
  static const node_op ops[] = {node_op::execute, node_op::end_session, node_op::session_info,
                                node_op::list_sessions};
  auto known = std::find_if(std::begin(ops), std::end(ops),
                            [&](node_op o) { return op == to_string(o); });
  if (known == std::end(ops))
    return bad_request("unknown op '" + sanitize_utf8(op.substr(0, 64)) + "'");
  r.op = *known;
  if (auto args = j.find("args"); args != j.end()) {
    if (!args->is_object() && !args->is_null())
      return bad_request("args must be an object");
    r.args = args->is_null() ? json::object() : *args;
  }
  auto timeout = j.find("timeout_ms");
  if (timeout == j.end() || !timeout->is_number_unsigned() || timeout->get<std::uint64_t>() == 0)
    return bad_request("timeout_ms must be a positive integer");
  // At most a day: what is left of a caller's deadline, never forever.
  r.timeout_ms = std::min<std::uint64_t>(timeout->get<std::uint64_t>(), 86'400'000);
  if (auto it = j.find("idempotent"); it != j.end()) {
    if (!it->is_boolean())
      return bad_request("idempotent must be a boolean");
    r.idempotent = it->get<bool>();
  }
  if (auto it = j.find("max_attempts"); it != j.end()) {
    if (!it->is_number_unsigned() || it->get<std::uint64_t>() == 0
        || it->get<std::uint64_t>() > 100)
      return bad_request("max_attempts must be an integer from 1 to 100");
    r.max_attempts = it->get<std::uint64_t>();
  }
  if (auto it = j.find("affinity"); it != j.end()) {
    if (!it->is_string())
      return bad_request("affinity must be a string");
    r.affinity = it->get<std::string>();
  }
  return r;
}

std::string encode_node_reply(const outcome& o, const std::string& node) {
  json j = o.to_json();
  if (!o.served_by().empty())
    j["served_by"] = o.served_by();
  j["node"] = node;
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

outcome decode_node_reply(const std::string& text, const std::string& node) {
  auto violation = [&](const std::string& why) {
    return outcome::failure(make_error(error_category::communication_error, "protocol_violation",
                                       "node " + node + " sent a malformed reply: " + why,
                                       {{"node", node}}));
  };
  auto parsed = parse_bounded(text, max_json_depth_limit);
  if (!parsed)
    return violation("not a JSON object of bounded depth in UTF-8");
  const auto& j = *parsed;
  auto ok = j.find("ok");
  if (ok == j.end() || !ok->is_boolean())
    return violation("no boolean \"ok\"");
  outcome o;
  if (ok->get<bool>()) {
    auto result = j.find("result");
    o = outcome::success(result == j.end() ? json{} : *result);
  } else {
    auto e = j.find("error");
    auto err = e == j.end() ? std::nullopt : error_from_json(*e);
    if (!err)
      return violation("\"error\" is not a structured error");
    o = outcome::failure(std::move(*err));
  }
  std::string served_by;
  if (auto it = j.find("served_by"); it != j.end() && it->is_string())
    served_by = it->get<std::string>();
  if (!served_by.empty())
    o.set_served_by(node + "/" + served_by);
  return o;
}

double node_pool_load::load() const noexcept {
  auto workers = static_cast<double>(std::max<std::size_t>(size, 1));
  return (static_cast<double>(busy) + static_cast<double>(queued)) / workers;
}

bool node_pool_load::serving() const noexcept {
  return health == "healthy" || health == "degraded";
}

std::string encode_node_load(const node_load& l) {
  json pools = json::object();
  for (const auto& [name, p] : l.pools)
    pools[name] = {{"size", p.size}, {"idle", p.idle}, {"busy", p.busy}, {"queued", p.queued},
                   {"health", p.health}};
  return json{{"pools", pools}}.dump(-1, ' ', false, json::error_handler_t::replace);
}

std::optional<node_load> decode_node_load(const std::string& text) {
  auto parsed = parse_bounded(text, 8);
  if (!parsed)
    return std::nullopt;
  auto pools = parsed->find("pools");
  if (pools == parsed->end() || !pools->is_object())
    return std::nullopt;
  node_load l;
  // Not a structured binding: the lambda below uses the pool (C++17 lambdas
  // may not capture bindings; clang refuses).
  for (auto entry = pools->begin(); entry != pools->end(); ++entry) {
    const std::string& name = entry.key();
    const json& p = entry.value();
    if (!valid_pool_name(name) || !p.is_object())
      return std::nullopt;
    node_pool_load pl;
    auto count = [&](const char* key, std::size_t& out) {
      auto it = p.find(key);
      if (it == p.end() || !it->is_number_unsigned())
        return false;
      out = static_cast<std::size_t>(
        std::min<std::uint64_t>(it->get<std::uint64_t>(), std::numeric_limits<std::uint32_t>::max()));
      return true;
    };
    if (!count("size", pl.size) || !count("idle", pl.idle) || !count("busy", pl.busy)
        || !count("queued", pl.queued))
      return std::nullopt;
    auto health = p.find("health");
    if (health == p.end() || !health->is_string())
      return std::nullopt;
    pl.health = health->get<std::string>();
    l.pools.emplace(name, std::move(pl));
  }
  return l;
}

} // namespace dspex
