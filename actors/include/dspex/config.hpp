// Loading settings the CAF way: option groups on actor_system_config, an INI
// file, and command-line overrides (--pool.size=8). No CAF in this header.
#pragma once

#include <string>
#include <variant>
#include <vector>

#include "dspex/error.hpp"
#include "dspex/settings.hpp"

namespace dspex {

/// Reads `ini_file` (CAF's INI syntax; `--config-file=PATH` in `args`
/// replaces it), applies the `--group.key=value` overrides in `args` and
/// validates the result. An explicitly named config file that cannot be read,
/// an unknown option, a value of the wrong type or out of range, all give a
/// configuration_error naming the key. `args` excludes the program name.
/// Arguments CAF does not own (positional ones) are left in `remainder`.
std::variant<settings, error> load_settings(const std::vector<std::string>& args,
                                            const std::string& ini_file,
                                            std::vector<std::string>* remainder = nullptr);

/// The documentation of every key with its default, one line per key, as
/// `--help` prints it.
std::string describe_settings();

} // namespace dspex
