// Framing of the worker wire protocol (see framing.hpp and PROTOCOL.md).
#include "dspex/framing.hpp"

#include <algorithm>
#include <cstring>
#include <limits>
#include <stdexcept>

#include <fmt/format.h>

namespace dspex {

namespace {

constexpr std::size_t header_bytes = 4;
constexpr std::uint64_t max_wire_length = std::numeric_limits<std::uint32_t>::max();

std::uint32_t read_be32(const char* p) noexcept {
  const auto* u = reinterpret_cast<const unsigned char*>(p);
  return (std::uint32_t{u[0]} << 24) | (std::uint32_t{u[1]} << 16) | (std::uint32_t{u[2]} << 8) |
         std::uint32_t{u[3]};
}

void write_be32(char* p, std::uint32_t n) noexcept {
  p[0] = static_cast<char>((n >> 24) & 0xFFu);
  p[1] = static_cast<char>((n >> 16) & 0xFFu);
  p[2] = static_cast<char>((n >> 8) & 0xFFu);
  p[3] = static_cast<char>(n & 0xFFu);
}

/// Validates a header's announced length against the contract.
std::optional<protocol_error> check_length(std::uint32_t n, std::size_t max_frame_bytes) {
  if (n == 0)
    return protocol_error{protocol_errc::zero_length,
                          "frame header announces 0 bytes (zero-length frames are invalid)"};
  if (n > max_frame_bytes)
    return protocol_error{protocol_errc::oversize,
                          fmt::format("frame of {} bytes exceeds max_frame_bytes {}", n, max_frame_bytes)};
  return std::nullopt;
}

} // namespace

const char* to_string(protocol_errc code) noexcept {
  switch (code) {
    case protocol_errc::zero_length: return "zero_length";
    case protocol_errc::oversize: return "oversize";
    case protocol_errc::truncated: return "truncated";
    case protocol_errc::bad_json: return "bad_json";
    case protocol_errc::not_an_object: return "not_an_object";
    case protocol_errc::missing_id: return "missing_id";
    case protocol_errc::missing_success: return "missing_success";
    case protocol_errc::mismatched_id: return "mismatched_id";
    case protocol_errc::too_deep: return "too_deep";
  }
  return "unknown_protocol_error";
}

std::string encode_frame(std::string_view payload) {
  if (payload.empty())
    throw std::invalid_argument("encode_frame: empty payload (zero-length frames are invalid)");
  if (static_cast<std::uint64_t>(payload.size()) > max_wire_length)
    throw std::invalid_argument(
        fmt::format("encode_frame: payload of {} bytes exceeds the 4-byte length limit {}", payload.size(),
                    max_wire_length));
  std::string frame(header_bytes + payload.size(), '\0');
  write_be32(frame.data(), static_cast<std::uint32_t>(payload.size()));
  std::memcpy(frame.data() + header_bytes, payload.data(), payload.size());
  return frame;
}

frame_decoder::frame_decoder(std::size_t max_frame_bytes) : max_frame_bytes_(max_frame_bytes) {}

std::optional<protocol_error> frame_decoder::feed(std::string_view bytes, std::vector<std::string>& out) {
  if (failed_)
    return failed_;

  auto fail = [this](protocol_error err) -> std::optional<protocol_error> {
    failed_ = std::move(err);
    buffer_.clear();
    buffer_.shrink_to_fit();
    return failed_;
  };

  // Phase 1: complete the frame left pending by earlier calls, if any. Only
  // the bytes that frame needs are copied into the buffer.
  if (!buffer_.empty()) {
    if (buffer_.size() < header_bytes) {
      const std::size_t take = std::min(header_bytes - buffer_.size(), bytes.size());
      buffer_.append(bytes.data(), take);
      bytes.remove_prefix(take);
      if (buffer_.size() < header_bytes)
        return std::nullopt;
      if (auto err = check_length(read_be32(buffer_.data()), max_frame_bytes_))
        return fail(std::move(*err));
    }
    const std::size_t n = read_be32(buffer_.data());
    const std::size_t have = buffer_.size() - header_bytes;
    const std::size_t take = std::min(n - have, bytes.size());
    buffer_.append(bytes.data(), take);
    bytes.remove_prefix(take);
    if (buffer_.size() - header_bytes < n)
      return std::nullopt;
    buffer_.erase(0, header_bytes);
    out.push_back(std::move(buffer_));
    buffer_.clear();
  }

  // Phase 2: whole frames straight from the input (no intermediate copy; the
  // view is advanced, so many small frames cost O(total bytes)).
  while (bytes.size() >= header_bytes) {
    const std::uint32_t n = read_be32(bytes.data());
    if (auto err = check_length(n, max_frame_bytes_))
      return fail(std::move(*err));
    if (bytes.size() - header_bytes < n)
      break;
    out.emplace_back(bytes.substr(header_bytes, n));
    bytes.remove_prefix(header_bytes + n);
  }

  // Phase 3: keep the incomplete tail (a partial header, or a validated
  // header and part of its body) for the next call.
  buffer_.assign(bytes.data(), bytes.size());
  return std::nullopt;
}

std::optional<protocol_error> frame_decoder::finish() const {
  if (failed_)
    return failed_;
  if (buffer_.empty())
    return std::nullopt;
  if (buffer_.size() < header_bytes)
    return protocol_error{protocol_errc::truncated,
                          fmt::format("stream ended inside a frame header ({} of {} header bytes received)",
                                      buffer_.size(), header_bytes)};
  return protocol_error{protocol_errc::truncated,
                        fmt::format("stream ended inside a frame body ({} of {} body bytes received)",
                                    buffer_.size() - header_bytes, read_be32(buffer_.data()))};
}

} // namespace dspex
