# The installable package: `cmake --install BUILD [--component ...]` puts under
# the prefix the headers, the two libraries, the bundled worker script and
# configuration, and a CMake package a consumer finds with
# find_package(dspex CONFIG REQUIRED), then links dspex::actors (the runtime
# and its embedding API) or dspex::runtime (what needs no actor system).
# examples/consumer/ is such a consumer; tests/package/ builds it against a
# fresh install.
include(CMakePackageConfigHelpers)

set(DSPEX_CMAKE_INSTALL_DIR "${CMAKE_INSTALL_LIBDIR}/cmake/dspex")

install(TARGETS dspex_runtime dspex_actors dspex_resources_installed
  EXPORT dspexTargets
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR})
install(DIRECTORY runtime/include/dspex actors/include/dspex
  DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(FILES runtime/python/dspex_worker.py
  DESTINATION ${CMAKE_INSTALL_DATADIR}/dspex/python)
install(FILES config/dspex.ini
  DESTINATION ${CMAKE_INSTALL_DATADIR}/dspex)

install(EXPORT dspexTargets
  NAMESPACE dspex::
  DESTINATION ${DSPEX_CMAKE_INSTALL_DIR})
configure_package_config_file(cmake/dspexConfig.cmake.in
  "${PROJECT_BINARY_DIR}/dspexConfig.cmake"
  INSTALL_DESTINATION ${DSPEX_CMAKE_INSTALL_DIR})
# 0.x: a minor version may change the API.
write_basic_package_version_file("${PROJECT_BINARY_DIR}/dspexConfigVersion.cmake"
  VERSION ${PROJECT_VERSION}
  COMPATIBILITY SameMinorVersion)
install(FILES
  "${PROJECT_BINARY_DIR}/dspexConfig.cmake"
  "${PROJECT_BINARY_DIR}/dspexConfigVersion.cmake"
  cmake/FindCAF.cmake
  DESTINATION ${DSPEX_CMAKE_INSTALL_DIR})
