#!/usr/bin/env bash
# Quick start, command 2: install what is missing, build, and run every test
# (doctest suites and the Python worker's unittest, under ctest).
# Extra arguments go to ctest, e.g. -L layer1.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build_dir=${DSPEX_BUILD_DIR:-$here/build}
"$here/scripts/bootstrap.sh"
cd "$build_dir"
ctest --output-on-failure -j"$(nproc)" "$@"
