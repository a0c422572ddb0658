#!/usr/bin/env bash
# Quick start, command 1: install what is missing, build, and run the main job
# (dspex run) with the bundled configuration in config/dspex.ini.
# Extra arguments go to `dspex run`, e.g. --pool.size=8 --requests=2000.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$here/scripts/bootstrap.sh"
exec "${DSPEX_BUILD_DIR:-$here/build}/examples/dspex" run "$@"
