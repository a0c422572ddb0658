// dspex::system_config: CAF's actor_system_config with the runtime's option
// groups (pool, worker, lm, log). CAF's own keys (scheduler.policy,
// scheduler.max-threads) are read from the same INI file and command line.
#pragma once

#include <functional>
#include <list>
#include <vector>

#include <caf/actor_system_config.hpp>
#include <caf/timespan.hpp>

#include "dspex/settings.hpp"

namespace dspex {

class system_config : public caf::actor_system_config {
public:
  system_config();

  /// Builds a config for `s` (scheduler settings applied), without parsing.
  explicit system_config(const settings& s);

  /// The values bound to the option groups, after parse(): call to_settings()
  /// to also pick up durations and CAF's scheduler keys.
  settings to_settings() const;

  const caf::config_option_set& options() const noexcept { return custom_options_; }

private:
  void bind_options();

  /// Binds a duration key: CAF reads durations as timespans ("10s",
  /// "500ms"), settings keeps milliseconds; to_settings() converts back.
  template <class Field>
  void add_duration(caf::config_option_adder& group, Field field, const char* name,
                    const char* description);

  settings values_;
  std::list<caf::timespan> spans_;  // stable addresses: CAF keeps pointers to them
  std::vector<std::function<void(settings&)>> apply_spans_;
};

} // namespace dspex
