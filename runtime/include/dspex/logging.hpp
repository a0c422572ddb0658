// The runtime's one logger ("dspex"), through spdlog. Structured fields go in
// as "key=value" pairs so log lines can be grepped by worker id.
#pragma once

#include <string_view>

#include <spdlog/logger.h>

namespace dspex {

/// The process-wide "dspex" logger (created on first use, stderr, colour off).
spdlog::logger& log();

/// Sets the level by name: trace, debug, info, warn, error, critical, off.
/// Returns false (and changes nothing) for an unknown name.
bool set_log_level(std::string_view level);

} // namespace dspex
