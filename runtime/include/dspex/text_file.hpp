// Reading a whole small file without exceptions.
#pragma once

#include <cstddef>
#include <optional>
#include <string>

namespace dspex {

/// The whole content of the file at `path`.
/// @param max_bytes the most it may hold; a longer file is refused.
/// @returns nothing when the file cannot be opened or read (missing, a
///          directory, unreadable, a /proc entry whose process was reaped
///          meanwhile) or holds more than `max_bytes`.
/// @note Never throws: std::ifstream read through std::istreambuf_iterator
///       throws std::ios_base::failure out of a failed read(2) (EISDIR on a
///       directory, ESRCH on a reaped process's /proc file).
std::optional<std::string> read_text_file(const std::string& path, std::size_t max_bytes);

} // namespace dspex
