// libFuzzer target: dspex::frame_decoder and encode_frame (framing.hpp).
//
// Input layout:
//   byte 0   selects max_frame_bytes from kMaxFrameBytes
//   byte 1   selects how the stream is split into feed() calls (see chunk_plan)
//   rest     the byte stream, as a worker would write it to its stdout
//
// The stream is decoded by a straightforward reference decoder in one piece,
// then fed to frame_decoder in pieces split at points derived from the input.
// Checked, whatever the split:
//   - the frames out are exactly the reference's, in order, each 1..max bytes;
//   - after each successful feed, buffered() == bytes fed - bytes framed, and
//     a partial frame never holds more than header + max_frame_bytes;
//   - a violation is reported by the feed that completes its 4 header bytes
//     (not earlier, not later), with the reference's code; the decoder then
//     stays failed: later feeds return the same error, append nothing and
//     buffer nothing;
//   - finish() is nullopt exactly when nothing is buffered, `truncated`
//     otherwise, and the failing error after a violation;
//   - encode_frame of the frames reproduces the consumed bytes exactly, and
//     decoding that again in one feed gives the same frames.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "dspex/framing.hpp"

#include "fuzz_check.hpp"

namespace {

constexpr std::size_t kMaxFrameBytes[8] = {0, 1, 2, 5, 16, 255, 4096, dspex::default_max_frame_bytes};

std::uint32_t be32(const char* p) {
  const auto* u = reinterpret_cast<const unsigned char*>(p);
  return (std::uint32_t{u[0]} << 24) | (std::uint32_t{u[1]} << 16) | (std::uint32_t{u[2]} << 8) | std::uint32_t{u[3]};
}

struct reference_result {
  std::vector<std::string> frames;
  std::size_t consumed = 0;                   ///< bytes of the whole frames
  std::optional<dspex::protocol_errc> error;  ///< zero_length or oversize
  std::size_t error_header_end = 0;           ///< offset just past the bad header
};

reference_result reference_decode(std::string_view s, std::size_t max) {
  reference_result r;
  std::size_t pos = 0;
  while (s.size() - pos >= 4) {
    const std::uint32_t n = be32(s.data() + pos);
    if (n == 0 || n > max) {
      r.error = n == 0 ? dspex::protocol_errc::zero_length : dspex::protocol_errc::oversize;
      r.error_header_end = pos + 4;
      break;
    }
    if (s.size() - pos - 4 < n)
      break;
    r.frames.emplace_back(s.substr(pos + 4, n));
    pos += 4 + n;
  }
  r.consumed = pos;
  return r;
}

/// Chunk sizes derived from the input: a small xorshift generator seeded with
/// the mode byte and a hash of the stream.
class chunk_plan {
public:
  chunk_plan(std::uint8_t mode, std::string_view stream) : mode_(mode & 3u) {
    std::uint32_t h = 2166136261u;
    for (unsigned char c : stream.substr(0, 64))
      h = (h ^ c) * 16777619u;
    state_ = (h ^ (std::uint32_t{mode} * 0x9E3779B9u) ^ static_cast<std::uint32_t>(stream.size())) | 1u;
  }

  /// Size of the next chunk (0 allowed: an empty feed must be harmless).
  std::size_t next(std::size_t remaining) {
    switch (mode_) {
      case 0: return remaining;                       // all at once
      case 1: return remaining ? 1 : 0;               // byte by byte
      case 2: return std::min<std::size_t>(remaining, rand() % 9);        // 0..8: splits headers
      default: return std::min<std::size_t>(remaining, rand() % 300);     // 0..299: splits bodies
    }
  }

private:
  std::uint32_t rand() {
    state_ ^= state_ << 13;
    state_ ^= state_ >> 17;
    state_ ^= state_ << 5;
    return state_;
  }

  unsigned mode_;
  std::uint32_t state_;
};

void check_error_code_name(dspex::protocol_errc code) {
  CHECK(std::strcmp(dspex::to_string(code), "unknown_protocol_error") != 0);
}

void run(const std::uint8_t* data, std::size_t size) {
  if (size < 2)
    return;
  const std::size_t max = kMaxFrameBytes[data[0] & 7u];
  const std::string_view stream(reinterpret_cast<const char*>(data) + 2, size - 2);
  const reference_result ref = reference_decode(stream, max);

  dspex::frame_decoder dec(max);
  CHECK(dec.max_frame_bytes() == max);
  CHECK(!dec.failed() && dec.buffered() == 0 && !dec.finish());

  chunk_plan plan(data[1], stream);
  std::vector<std::string> out;
  std::size_t fed = 0;
  std::size_t framed = 0;  // header + body bytes of the frames out so far
  std::optional<dspex::protocol_error> err;
  std::size_t zero_feeds = 0;

  // At least one feed (an empty stream is one empty feed), then until all is in.
  for (bool first = true; first || fed < stream.size(); first = false) {
    std::size_t n = plan.next(stream.size() - fed);
    if (n == 0 && ++zero_feeds > 64)
      n = std::min<std::size_t>(stream.size() - fed, 1);  // empty feeds are covered: make progress
    const std::size_t before = out.size();
    err = dec.feed(stream.substr(fed, n), out);
    fed += n;
    for (std::size_t i = before; i < out.size(); ++i) {
      CHECK(!out[i].empty());
      CHECK(out[i].size() <= max);
      framed += 4 + out[i].size();
    }
    if (err) {
      CHECK(ref.error.has_value());
      CHECK(err->code == *ref.error);
      CHECK(!err->message.empty());
      check_error_code_name(err->code);
      // Reported by the feed that completed the bad header, not before.
      CHECK(fed >= ref.error_header_end && fed - n < ref.error_header_end);
      break;
    }
    CHECK(!dec.failed());
    CHECK(dec.buffered() == fed - framed);
    CHECK(dec.buffered() <= 4 + max);
    if (ref.error)
      CHECK(fed < ref.error_header_end);
  }

  CHECK(out == ref.frames);
  CHECK(framed == ref.consumed);

  if (err) {
    // A failed decoder stays failed and consumes nothing.
    CHECK(dec.failed());
    CHECK(dec.buffered() == 0);
    const auto fin = dec.finish();
    CHECK(fin && fin->code == err->code && fin->message == err->message);
    const std::size_t frames_before = out.size();
    const std::string_view rest = stream.substr(fed);
    for (std::string_view more : {rest, std::string_view("\x00\x00\x00\x01x", 5), std::string_view()}) {
      const auto again = dec.feed(more, out);
      CHECK(again && again->code == err->code && again->message == err->message);
      CHECK(out.size() == frames_before);
      CHECK(dec.buffered() == 0);
      CHECK(dec.failed());
    }
  } else {
    CHECK(!ref.error);
    CHECK(dec.buffered() == stream.size() - ref.consumed);
    const auto fin = dec.finish();
    if (dec.buffered() == 0) {
      CHECK(!fin);
    } else {
      CHECK(fin && fin->code == dspex::protocol_errc::truncated && !fin->message.empty());
      // finish() is const and repeatable; it changes nothing.
      const auto fin2 = dec.finish();
      CHECK(fin2 && fin2->message == fin->message);
      CHECK(!dec.failed());
    }
  }

  // Round trip: encode_frame of the frames gives back the consumed bytes.
  std::string reencoded;
  for (const auto& f : out)
    reencoded += dspex::encode_frame(f);
  CHECK(reencoded == stream.substr(0, ref.consumed));
  if (!reencoded.empty() && max > 0) {
    dspex::frame_decoder again(max);
    std::vector<std::string> out2;
    CHECK(!again.feed(reencoded, out2));
    CHECK(out2 == out);
    CHECK(again.buffered() == 0 && !again.finish());
  }
}

} // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // encode_frame refuses an empty payload (zero-length frames are invalid).
  bool threw = false;
  try {
    (void)dspex::encode_frame(std::string_view());
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  CHECK(threw);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  return dspex::fuzz::run_input([&] { run(data, size); });
}
