#!/usr/bin/env bash
# Installs what is missing (Debian 12, as root), then configures and builds.
# Used by run.sh and test.sh; safe to run again: it installs nothing when all
# packages are present and rebuilds only what changed.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build_dir=${DSPEX_BUILD_DIR:-$here/build}

# shellcheck source=scripts/packages.sh
source "$here/scripts/packages.sh"
ensure_packages bootstrap "${dspex_packages[@]}"

cmake -S "$here" -B "$build_dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$build_dir" -j"$(nproc)"
