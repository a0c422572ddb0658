// libFuzzer target: dspex/node_wire.hpp, what runtimes read from each other
// over the network (issue 13). A peer is untrusted input like a worker.
//
// The whole input is read as a request, as a reply and as a load. Checked:
//   - nothing throws and nothing crashes;
//   - a request that decodes is re-encoded and decodes to the same request
//     (op, pool, session, command, args, timeout, options), and its timeout
//     is at least 1 ms and at most a day;
//   - a reply always decodes to an outcome: a failure is structured (type and
//     message non-empty, context an object), and everything in it is dumpable;
//   - a load that decodes names only valid pool names, and re-encodes to a
//     load that decodes to the same counts.
#include <cstddef>
#include <cstdint>
#include <string>
#include <variant>

#include "dspex/node_wire.hpp"
#include "dspex/settings.hpp"

#include "fuzz_check.hpp"

using dspex::fuzz::fail;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  return dspex::fuzz::run_input([&] {
    std::string text(reinterpret_cast<const char*>(data), size);
    dspex::request_limits limits;
    auto decoded = dspex::decode_node_request(text, limits);
    if (auto* r = std::get_if<dspex::node_request>(&decoded)) {
      if (r->timeout_ms < 1 || r->timeout_ms > 86'400'000)
        fail("timeout out of bounds");
      auto again = dspex::decode_node_request(dspex::encode_node_request(*r), limits);
      auto* r2 = std::get_if<dspex::node_request>(&again);
      if (!r2)
        fail("a decoded request does not decode again");
      if (r2->op != r->op || r2->pool != r->pool || r2->session_id != r->session_id
          || r2->command != r->command || r2->args != r->args || r2->timeout_ms != r->timeout_ms
          || r2->idempotent != r->idempotent || r2->max_attempts != r->max_attempts
          || r2->affinity != r->affinity)
        fail("a request changed on its way round");
    } else {
      const auto& e = std::get<dspex::error>(decoded);
      if (e.type != "invalid_request" || e.message.empty())
        fail("a refused request is not invalid_request");
      (void)e.to_json().dump();
    }
    auto o = dspex::decode_node_reply(text, "127.0.0.1:1");
    if (o.ok()) {
      (void)o.value().dump();
    } else {
      const auto& e = o.error();
      if (e.type.empty() || e.message.empty() || !e.context.is_object())
        fail("an unstructured reply error");
      (void)e.to_json().dump();
    }
    (void)o.served_by();
    if (auto load = dspex::decode_node_load(text)) {
      for (auto& [name, pool] : load->pools) {
        if (!dspex::valid_pool_name(name))
          fail("a load names an invalid pool");
        (void)pool.load();
      }
      auto again = dspex::decode_node_load(dspex::encode_node_load(*load));
      if (!again || again->pools.size() != load->pools.size())
        fail("a load changed on its way round");
    }
  });
}
