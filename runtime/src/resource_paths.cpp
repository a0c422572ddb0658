// resource_paths: see resource_paths.hpp. Compiled twice (runtime/CMakeLists.txt),
// each time with the locations of one layout.
#include "dspex/resource_paths.hpp"

#ifndef DSPEX_RESOURCE_WORKER_SCRIPT
#error "DSPEX_RESOURCE_WORKER_SCRIPT must name the bundled worker script"
#endif
#ifndef DSPEX_RESOURCE_CONFIG_FILE
#error "DSPEX_RESOURCE_CONFIG_FILE must name the bundled configuration"
#endif

namespace dspex {

std::string bundled_worker_script() {
  return DSPEX_RESOURCE_WORKER_SCRIPT;
}

std::string bundled_config_file() {
  return DSPEX_RESOURCE_CONFIG_FILE;
}

} // namespace dspex
