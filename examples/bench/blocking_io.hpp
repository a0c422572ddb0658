// blocking_io: whole writes and reads on a blocking descriptor, retried on
// EINTR, for the benchmark's baselines that use no runtime (the raw pipe
// loop of bench.cpp, the TCP ping-pong of network_floor.cpp).
#pragma once

#include <unistd.h>

#include <cerrno>
#include <cstddef>

namespace dspex::bench {

/// Writes all `n` bytes of `data` to `fd`.
/// @returns false on an error other than EINTR
inline bool write_all(int fd, const char* data, std::size_t n) {
  while (n > 0) {
    auto w = ::write(fd, data, n);
    if (w < 0) {
      if (errno == EINTR)
        continue;
      return false;
    }
    data += w;
    n -= static_cast<std::size_t>(w);
  }
  return true;
}

/// Reads exactly `n` bytes from `fd` into `data`.
/// @returns false on an error other than EINTR, or at end of file
inline bool read_exact(int fd, char* data, std::size_t n) {
  while (n > 0) {
    auto r = ::read(fd, data, n);
    if (r < 0) {
      if (errno == EINTR)
        continue;
      return false;
    }
    if (r == 0)
      return false;
    data += r;
    n -= static_cast<std::size_t>(r);
  }
  return true;
}

} // namespace dspex::bench
