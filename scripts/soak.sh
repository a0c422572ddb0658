#!/usr/bin/env bash
# The soak (not a ctest test): installs what is missing and builds (bootstrap.sh),
# then runs build/examples/dspex_soak with /usr/bin/python3 as the worker
# interpreter: 1,000,000 calls from 16 callers (half in sessions, half anonymous)
# while workers are recycled; exits non-zero when the runtime's RSS, fds or
# threads grew 5% or more after the warm-up, a failure was not a structured
# error, failures reached 0.1%, or a child process was left after stop.
# Extra arguments go to dspex_soak, e.g. --calls=50000 --pool.size=8.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$here/scripts/bootstrap.sh"
exec "${DSPEX_BUILD_DIR:-$here/build}/examples/dspex_soak" --worker.python=/usr/bin/python3 "$@"
