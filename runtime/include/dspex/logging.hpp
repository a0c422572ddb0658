// The runtime's one logger ("dspex"), through spdlog: one line per event.
// Text lines carry their fields as "key=value" pairs, so they can be grepped
// by worker id; with log.format=json each line is one JSON object.
#pragma once

#include <optional>
#include <string>
#include <string_view>

#include <spdlog/logger.h>

#include "dspex/error.hpp"

namespace dspex {

struct settings;

/// The process-wide "dspex" logger (created on first use, stderr, colour off).
spdlog::logger& log();

/// Sets the level by name: trace, debug, info, warn, error, critical, off.
/// Returns false (and changes nothing) for an unknown name.
bool set_log_level(std::string_view level);

/// Applies the log.* settings to the process-wide logger: the level, the
/// format (text or json) and the optional rotating file (log.file,
/// log.file_max_bytes, log.file_count), which replaces the file of an earlier
/// call. Sinks added by others (e.g. a test's capture) are kept.
/// @returns configuration_error/invalid_setting naming log.file when the
///          file cannot be opened; nothing is changed then
/// @note The logger is one per process: with several runtimes, the last
///       one started decides.
std::optional<error> configure_logging(const settings& s);

/// The level of a name as spdlog knows it; nullopt for an unknown name.
std::optional<spdlog::level::level_enum> log_level_of(std::string_view name);

} // namespace dspex
