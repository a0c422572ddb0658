// network_floor: what a round trip over loopback costs before this project
// adds anything (issue 13's remote rows): a plain TCP ping-pong between two
// threads, and a request to an echo actor on another actor system through
// CAF's middleman. The remote pool's p50 is read against these, measured in
// the same run. Its own translation unit: it is the benchmark's only user
// of CAF.
#pragma once

#include <cstddef>
#include <string>

namespace dspex::bench {

/// The two round trips, p50 in microseconds.
struct network_floor {
  double tcp_p50_us = 0;        ///< write + read of 100 bytes on a loopback TCP socket (TCP_NODELAY)
  double middleman_p50_us = 0;  ///< blocking request to a remote echo actor, 100-byte string
};

/// Measures both, `n` round trips each.
/// @param n round trips per measure
/// @param scheduler_policy the runtime's (sharing or stealing), for both actor systems
/// @param max_threads scheduler.max-threads of both (0: CAF's default)
/// @returns the p50s
/// @note Throws std::runtime_error when a socket or the middleman fails.
network_floor measure_network_floor(std::size_t n, const std::string& scheduler_policy,
                                    std::size_t max_threads);

} // namespace dspex::bench
