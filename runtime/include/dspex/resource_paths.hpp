// Where the runtime's bundled files are: the Python worker script (the
// default of worker.script) and the example configuration.
//
// Two builds of one small library answer this (runtime/CMakeLists.txt): the
// build tree's programs and tests link the one that names the source tree;
// an installed runtime (find_package(dspex)) links the one that names the
// install prefix, so it needs no source tree. The installed paths are those
// of the prefix the build was configured with (CMAKE_INSTALL_PREFIX).
#pragma once

#include <string>

namespace dspex {

/// The bundled Python worker, dspex_worker.py: under the install prefix
/// (share/dspex/python/) for an installed runtime, in the source tree
/// (runtime/python/) for the build tree's own programs.
/// @returns an absolute path
std::string bundled_worker_script();

/// The bundled example configuration, dspex.ini: share/dspex/ under the
/// install prefix, config/ in the source tree.
/// @returns an absolute path
std::string bundled_config_file();

} // namespace dspex
