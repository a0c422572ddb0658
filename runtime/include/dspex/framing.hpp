// Framing of the worker wire protocol: a 4-byte unsigned big-endian length N,
// then N bytes of UTF-8 JSON (see PROTOCOL.md, "Framing").
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace dspex {

/// Default bound on one frame's payload (`max_frame_bytes`).
inline constexpr std::size_t default_max_frame_bytes = std::size_t{16} << 20;

/// Every way a peer can break the wire contract. After any of them the stream
/// cannot be trusted and the worker is removed, never reused.
enum class protocol_errc {
  zero_length,     ///< a header announced N = 0
  oversize,        ///< a header announced N > max_frame_bytes
  truncated,       ///< EOF after a header or inside a body
  bad_json,        ///< payload is not valid JSON
  not_an_object,   ///< payload is JSON but not an object
  missing_id,      ///< reply without an unsigned integer `id`
  missing_success, ///< reply without a boolean `success`
  mismatched_id,   ///< reply `id` is not the id of the request in flight
  too_deep,        ///< payload JSON nested deeper than max_json_depth
};

/// Stable snake_case name of a protocol error code, e.g. "zero_length".
const char* to_string(protocol_errc code) noexcept;

struct protocol_error {
  protocol_errc code;
  std::string message; ///< human-readable detail, e.g. "frame of 20000000 bytes exceeds max_frame_bytes 16777216"
};

/// Encodes one frame: header + payload.
/// Throws std::invalid_argument for an empty payload or one above 4 GiB - 1.
std::string encode_frame(std::string_view payload);

/// Incremental decoder: bytes in any split in, whole frames out.
class frame_decoder {
public:
  /// @param max_frame_bytes a larger frame is a protocol error (oversize).
  explicit frame_decoder(std::size_t max_frame_bytes = default_max_frame_bytes);

  /// Consumes `bytes`. Every frame they complete is appended to `out`, in
  /// order, including frames that precede a violation in the same call. On a
  /// violation returns the error; the decoder then stays failed and every
  /// later call returns the same error without consuming anything. An oversize
  /// or zero-length header is reported as soon as its 4 bytes are in, without
  /// buffering the body.
  std::optional<protocol_error> feed(std::string_view bytes, std::vector<std::string>& out);

  /// To be called at EOF: a partially received frame (header or body) is a
  /// `truncated` error; an empty buffer is fine.
  std::optional<protocol_error> finish() const;

  bool failed() const noexcept { return failed_.has_value(); }

  /// Bytes held for a frame not yet complete.
  std::size_t buffered() const noexcept { return buffer_.size(); }

  std::size_t max_frame_bytes() const noexcept { return max_frame_bytes_; }

private:
  std::size_t max_frame_bytes_;
  std::string buffer_;
  std::optional<protocol_error> failed_;
};

} // namespace dspex
