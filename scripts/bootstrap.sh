#!/usr/bin/env bash
# Installs what is missing (Debian 12, as root), then configures and builds.
# Used by run.sh and test.sh; safe to run again: it installs nothing when all
# packages are present and rebuilds only what changed.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build_dir=${DSPEX_BUILD_DIR:-$here/build}

packages=(g++ cmake make python3 ccache libcaf-dev libboost-dev libboost-filesystem-dev
          libspdlog-dev libfmt-dev nlohmann-json3-dev doctest-dev)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if ((${#missing[@]})); then
  echo "bootstrap: installing ${missing[*]}" >&2
  if [[ $(id -u) -ne 0 ]]; then
    echo "bootstrap: missing packages and not root; install them with: apt-get install ${missing[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

cmake -S "$here" -B "$build_dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$build_dir" -j"$(nproc)"
