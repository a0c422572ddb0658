// Layer 1: framing of the worker wire protocol (no Python needed).
#include <doctest/doctest.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "dspex/framing.hpp"

using dspex::encode_frame;
using dspex::frame_decoder;
using dspex::protocol_errc;

namespace {

/// A raw 4-byte big-endian header announcing `n` bytes.
std::string header(std::uint32_t n) {
  std::string h(4, '\0');
  h[0] = static_cast<char>((n >> 24) & 0xFF);
  h[1] = static_cast<char>((n >> 16) & 0xFF);
  h[2] = static_cast<char>((n >> 8) & 0xFF);
  h[3] = static_cast<char>(n & 0xFF);
  return h;
}

std::string concat_frames(const std::vector<std::string>& payloads) {
  std::string stream;
  for (const auto& p : payloads)
    stream += encode_frame(p);
  return stream;
}

/// Payloads of assorted sizes, including one whose header has a non-zero
/// second-lowest byte (300 > 255) and one with every byte value.
std::vector<std::string> sample_payloads() {
  std::string all_bytes;
  for (int i = 0; i < 256; ++i)
    all_bytes.push_back(static_cast<char>(i));
  return {"a", R"({"id":1,"success":true})", std::string(300, 'x'), all_bytes, "xyz"};
}

} // namespace

TEST_CASE("encode_frame writes a 4-byte big-endian length then the payload") {
  CHECK(encode_frame("hello") == std::string("\x00\x00\x00\x05hello", 9));

  const std::string p258(258, 'q');
  const std::string f258 = encode_frame(p258);
  REQUIRE(f258.size() == 262);
  CHECK(f258.substr(0, 4) == std::string("\x00\x00\x01\x02", 4));
  CHECK(f258.substr(4) == p258);

  const std::string p70000(70000, 'z'); // 0x00011170
  CHECK(encode_frame(p70000).substr(0, 4) == std::string("\x00\x01\x11\x70", 4));

  // A payload byte >= 0x80 is not sign-mangled and binary bytes pass through.
  const std::string binary("\x00\xff\x80\x7f", 4);
  CHECK(encode_frame(binary) == std::string("\x00\x00\x00\x04\x00\xff\x80\x7f", 8));
}

TEST_CASE("encode_frame rejects an empty payload") {
  CHECK_THROWS_AS(encode_frame(""), std::invalid_argument);
  CHECK_THROWS_AS(encode_frame(std::string_view{}), std::invalid_argument);
}

TEST_CASE("round trip of a single frame") {
  frame_decoder dec;
  std::vector<std::string> out;
  const std::string payload = R"({"id":42,"command":"ping","args":{}})";
  CHECK_FALSE(dec.feed(encode_frame(payload), out).has_value());
  REQUIRE(out.size() == 1);
  CHECK(out[0] == payload);
  CHECK(dec.buffered() == 0);
  CHECK_FALSE(dec.failed());
  CHECK_FALSE(dec.finish().has_value());
}

TEST_CASE("a stream of frames split at every byte boundary yields exactly the frames in order") {
  const auto payloads = sample_payloads();
  const std::string stream = concat_frames(payloads);
  const std::size_t n = stream.size();

  for (std::size_t k = 0; k <= n; ++k) {
    CAPTURE(k);
    frame_decoder dec;
    std::vector<std::string> out;
    REQUIRE_FALSE(dec.feed(std::string_view(stream).substr(0, k), out).has_value());
    REQUIRE_FALSE(dec.feed(std::string_view(stream).substr(k), out).has_value());
    REQUIRE(out == payloads);
    REQUIRE(dec.buffered() == 0);
    REQUIRE_FALSE(dec.finish().has_value());
  }
}

TEST_CASE("a stream of small frames split at every pair of boundaries (three reads)") {
  const std::vector<std::string> payloads = {"a", "bc", "{}", "def", "g"};
  const std::string stream = concat_frames(payloads);
  const std::size_t n = stream.size();

  for (std::size_t i = 0; i <= n; ++i) {
    for (std::size_t k = i; k <= n; ++k) {
      CAPTURE(i);
      CAPTURE(k);
      frame_decoder dec;
      std::vector<std::string> out;
      const std::string_view s(stream);
      REQUIRE_FALSE(dec.feed(s.substr(0, i), out).has_value());
      REQUIRE_FALSE(dec.feed(s.substr(i, k - i), out).has_value());
      REQUIRE_FALSE(dec.feed(s.substr(k), out).has_value());
      REQUIRE(out == payloads);
      REQUIRE(dec.buffered() == 0);
    }
  }
}

TEST_CASE("a stream fed one byte at a time yields each frame exactly when its last byte arrives") {
  const auto payloads = sample_payloads();
  const std::string stream = concat_frames(payloads);

  // Offsets at which each frame ends.
  std::vector<std::size_t> ends;
  std::size_t pos = 0;
  for (const auto& p : payloads) {
    pos += 4 + p.size();
    ends.push_back(pos);
  }

  frame_decoder dec;
  std::vector<std::string> out;
  std::size_t expected_count = 0;
  for (std::size_t i = 0; i < stream.size(); ++i) {
    CAPTURE(i);
    REQUIRE_FALSE(dec.feed(std::string_view(stream).substr(i, 1), out).has_value());
    if (expected_count < ends.size() && i + 1 == ends[expected_count])
      ++expected_count;
    REQUIRE(out.size() == expected_count);
    const std::size_t frame_start = expected_count == 0 ? 0 : ends[expected_count - 1];
    REQUIRE(dec.buffered() == i + 1 - frame_start);
  }
  CHECK(out == payloads);
  CHECK(dec.buffered() == 0);
  CHECK_FALSE(dec.finish().has_value());
}

TEST_CASE("several frames in one read, with a partial frame left over") {
  frame_decoder dec;
  std::vector<std::string> out;
  const std::string stream = encode_frame("one") + encode_frame("two") + encode_frame("three");
  const std::string next = encode_frame("four");

  CHECK_FALSE(dec.feed(stream + next.substr(0, 6), out).has_value());
  CHECK(out == std::vector<std::string>{"one", "two", "three"});
  CHECK(dec.buffered() == 6);
  // EOF now would cut "four" in half.
  REQUIRE(dec.finish().has_value());
  CHECK(dec.finish()->code == protocol_errc::truncated);

  CHECK_FALSE(dec.feed(next.substr(6), out).has_value());
  CHECK(out == std::vector<std::string>{"one", "two", "three", "four"});
  CHECK(dec.buffered() == 0);
  CHECK_FALSE(dec.finish().has_value());
}

TEST_CASE("many small frames in one feed") {
  std::string stream;
  std::vector<std::string> payloads;
  for (int i = 0; i < 20000; ++i) {
    payloads.push_back(std::to_string(i));
    stream += encode_frame(payloads.back());
  }
  frame_decoder dec;
  std::vector<std::string> out;
  CHECK_FALSE(dec.feed(stream, out).has_value());
  CHECK(out == payloads);
  CHECK(dec.buffered() == 0);
}

TEST_CASE("an oversize header is reported as soon as its 4 bytes arrive") {
  SUBCASE("default maximum, header alone") {
    frame_decoder dec;
    std::vector<std::string> out;
    const std::string h = header(0xFFFFFFF0u);
    CHECK_FALSE(dec.feed(h.substr(0, 3), out).has_value());
    CHECK_FALSE(dec.failed());
    const auto err = dec.feed(h.substr(3), out);
    REQUIRE(err.has_value());
    CHECK(err->code == protocol_errc::oversize);
    CHECK(err->message.find("4294967280") != std::string::npos);
    CHECK(err->message.find("16777216") != std::string::npos);
    CHECK(dec.failed());
    CHECK(out.empty());
  }
  SUBCASE("the body that follows is not buffered") {
    frame_decoder dec(100);
    std::vector<std::string> out;
    const auto err = dec.feed(header(1000) + std::string(500, 'b'), out);
    REQUIRE(err.has_value());
    CHECK(err->code == protocol_errc::oversize);
    CHECK(err->message.find("1000") != std::string::npos);
    CHECK(err->message.find("100") != std::string::npos);
    CHECK(dec.buffered() == 0);
    CHECK(out.empty());
  }
  SUBCASE("header completed in a later read, after a buffered partial header") {
    frame_decoder dec(100);
    std::vector<std::string> out;
    const std::string h = header(101);
    CHECK_FALSE(dec.feed(h.substr(0, 1), out).has_value());
    CHECK_FALSE(dec.feed(h.substr(1, 2), out).has_value());
    CHECK(dec.buffered() == 3);
    const auto err = dec.feed(h.substr(3) + "body", out);
    REQUIRE(err.has_value());
    CHECK(err->code == protocol_errc::oversize);
    CHECK(dec.buffered() == 0);
  }
}

TEST_CASE("a zero-length header is a violation") {
  SUBCASE("alone") {
    frame_decoder dec;
    std::vector<std::string> out;
    const auto err = dec.feed(header(0), out);
    REQUIRE(err.has_value());
    CHECK(err->code == protocol_errc::zero_length);
    CHECK_FALSE(err->message.empty());
    CHECK(dec.failed());
    CHECK(out.empty());
  }
  SUBCASE("split across reads") {
    frame_decoder dec;
    std::vector<std::string> out;
    CHECK_FALSE(dec.feed(std::string(2, '\0'), out).has_value());
    const auto err = dec.feed(std::string(2, '\0'), out);
    REQUIRE(err.has_value());
    CHECK(err->code == protocol_errc::zero_length);
  }
}

TEST_CASE("EOF inside a frame is truncated") {
  SUBCASE("after a partial header") {
    frame_decoder dec;
    std::vector<std::string> out;
    CHECK_FALSE(dec.feed(encode_frame("abcdef").substr(0, 2), out).has_value());
    const auto err = dec.finish();
    REQUIRE(err.has_value());
    CHECK(err->code == protocol_errc::truncated);
    CHECK(err->message.find('2') != std::string::npos);
    CHECK(out.empty());
  }
  SUBCASE("after a full header and no body") {
    frame_decoder dec;
    std::vector<std::string> out;
    CHECK_FALSE(dec.feed(header(10), out).has_value());
    const auto err = dec.finish();
    REQUIRE(err.has_value());
    CHECK(err->code == protocol_errc::truncated);
  }
  SUBCASE("after a header and a partial body") {
    frame_decoder dec;
    std::vector<std::string> out;
    CHECK_FALSE(dec.feed(header(100) + std::string(37, 'p'), out).has_value());
    CHECK(dec.buffered() == 41);
    const auto err = dec.finish();
    REQUIRE(err.has_value());
    CHECK(err->code == protocol_errc::truncated);
    CHECK(err->message.find("37") != std::string::npos);
    CHECK(err->message.find("100") != std::string::npos);
    CHECK(out.empty());
  }
}

TEST_CASE("finish() on an empty buffer is fine") {
  frame_decoder dec;
  CHECK_FALSE(dec.finish().has_value());
  std::vector<std::string> out;
  CHECK_FALSE(dec.feed("", out).has_value());
  CHECK_FALSE(dec.finish().has_value());
  CHECK(out.empty());
  CHECK(dec.buffered() == 0);
}

TEST_CASE("the decoder stays failed after a violation") {
  frame_decoder dec(16);
  std::vector<std::string> out;
  const auto first = dec.feed(header(17), out);
  REQUIRE(first.has_value());
  REQUIRE(dec.failed());

  const std::size_t buffered_before = dec.buffered();
  const auto second = dec.feed(encode_frame("valid"), out);
  REQUIRE(second.has_value());
  CHECK(second->code == first->code);
  CHECK(second->message == first->message);
  CHECK(out.empty());
  CHECK(dec.buffered() == buffered_before);
  CHECK(dec.failed());

  const auto third = dec.feed("", out);
  REQUIRE(third.has_value());
  CHECK(third->code == protocol_errc::oversize);

  const auto at_eof = dec.finish();
  REQUIRE(at_eof.has_value());
  CHECK(at_eof->code == protocol_errc::oversize);
}

TEST_CASE("frames completed before a violation in the same read are still output") {
  SUBCASE("all in one read") {
    frame_decoder dec;
    std::vector<std::string> out;
    const auto err = dec.feed(encode_frame("first") + encode_frame("second") + header(0) + "junk", out);
    REQUIRE(err.has_value());
    CHECK(err->code == protocol_errc::zero_length);
    CHECK(out == std::vector<std::string>{"first", "second"});
  }
  SUBCASE("a pending frame completed by the read that carries the violation") {
    frame_decoder dec(64);
    std::vector<std::string> out;
    const std::string f = encode_frame("pending");
    CHECK_FALSE(dec.feed(f.substr(0, 5), out).has_value());
    const auto err = dec.feed(f.substr(5) + encode_frame("next") + header(65), out);
    REQUIRE(err.has_value());
    CHECK(err->code == protocol_errc::oversize);
    CHECK(out == std::vector<std::string>{"pending", "next"});
  }
}

TEST_CASE("max_frame_bytes boundary: exactly max is accepted, max + 1 is oversize") {
  SUBCASE("small maximum") {
    frame_decoder dec(16);
    CHECK(dec.max_frame_bytes() == 16);
    std::vector<std::string> out;
    const std::string exact(16, 'e');
    CHECK_FALSE(dec.feed(encode_frame(exact), out).has_value());
    REQUIRE(out.size() == 1);
    CHECK(out[0] == exact);

    const auto err = dec.feed(encode_frame(std::string(17, 'o')), out);
    REQUIRE(err.has_value());
    CHECK(err->code == protocol_errc::oversize);
    CHECK(err->message.find("17") != std::string::npos);
    CHECK(err->message.find("16") != std::string::npos);
    CHECK(out.size() == 1);
  }
  SUBCASE("default maximum (16 MiB), headers only") {
    CHECK(dspex::default_max_frame_bytes == 16u * 1024u * 1024u);
    frame_decoder ok;
    CHECK(ok.max_frame_bytes() == dspex::default_max_frame_bytes);
    std::vector<std::string> out;
    CHECK_FALSE(ok.feed(header(16u << 20), out).has_value());
    CHECK(ok.buffered() == 4);

    frame_decoder bad;
    const auto err = bad.feed(header((16u << 20) + 1), out);
    REQUIRE(err.has_value());
    CHECK(err->code == protocol_errc::oversize);
    CHECK(err->message.find("16777217") != std::string::npos);
    CHECK(out.empty());
  }
}

TEST_CASE("a 1 MiB payload round trips, fed whole and in odd-sized chunks") {
  std::string payload(std::size_t{1} << 20, '\0');
  for (std::size_t i = 0; i < payload.size(); ++i)
    payload[i] = static_cast<char>((i * 131 + 7) & 0xFF);
  const std::string frame = encode_frame(payload);
  REQUIRE(frame.size() == payload.size() + 4);
  CHECK(frame.substr(0, 4) == std::string("\x00\x10\x00\x00", 4));

  SUBCASE("whole") {
    frame_decoder dec;
    std::vector<std::string> out;
    CHECK_FALSE(dec.feed(frame, out).has_value());
    REQUIRE(out.size() == 1);
    CHECK(out[0] == payload);
  }
  SUBCASE("chunks of 4093 bytes") {
    frame_decoder dec;
    std::vector<std::string> out;
    for (std::size_t pos = 0; pos < frame.size(); pos += 4093) {
      REQUIRE_FALSE(dec.feed(std::string_view(frame).substr(pos, 4093), out).has_value());
      if (pos + 4093 < frame.size())
        REQUIRE(out.empty());
    }
    REQUIRE(out.size() == 1);
    CHECK(out[0] == payload);
    CHECK(dec.buffered() == 0);
  }
}

TEST_CASE("to_string(protocol_errc) gives the snake_case enumerator names") {
  CHECK(std::string(dspex::to_string(protocol_errc::zero_length)) == "zero_length");
  CHECK(std::string(dspex::to_string(protocol_errc::oversize)) == "oversize");
  CHECK(std::string(dspex::to_string(protocol_errc::truncated)) == "truncated");
  CHECK(std::string(dspex::to_string(protocol_errc::bad_json)) == "bad_json");
  CHECK(std::string(dspex::to_string(protocol_errc::not_an_object)) == "not_an_object");
  CHECK(std::string(dspex::to_string(protocol_errc::missing_id)) == "missing_id");
  CHECK(std::string(dspex::to_string(protocol_errc::missing_success)) == "missing_success");
  CHECK(std::string(dspex::to_string(protocol_errc::mismatched_id)) == "mismatched_id");
}
