#!/usr/bin/env bash
# The installable package, end to end (issue 12): configure this project with
# a fresh temporary prefix, build what it installs, install it, then configure,
# build and run examples/consumer (its own project: find_package(dspex CONFIG
# REQUIRED)) against that prefix. The consumer must find the bundled worker
# under the prefix, not in the source tree, and a call must succeed. Leaves
# nothing behind (the prefix and both builds are removed).
#   bash tests/package/install_and_consume.sh SOURCE_DIR
set -euo pipefail
src=$(cd "${1:?usage: $0 SOURCE_DIR}" && pwd)
jobs=$(nproc)
work=$(mktemp -d "${TMPDIR:-/tmp}/dspex-package.XXXXXX")
trap 'rm -rf "$work"' EXIT
prefix="$work/prefix"

echo "== configure with CMAKE_INSTALL_PREFIX=$prefix"
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX="$prefix" >/dev/null
echo "== build what is installed"
cmake --build "$work/build" -j"$jobs" --target dspex_actors dspex_resources_installed >/dev/null
echo "== install"
cmake --install "$work/build" >/dev/null
for f in include/dspex/runtime.hpp include/dspex/settings.hpp lib/libdspex_actors.a lib/libdspex_runtime.a \
         share/dspex/python/dspex_worker.py share/dspex/dspex.ini \
         lib/cmake/dspex/dspexConfig.cmake lib/cmake/dspex/dspexConfigVersion.cmake \
         lib/cmake/dspex/dspexTargets.cmake lib/cmake/dspex/FindCAF.cmake; do
  [[ -e "$prefix/$f" ]] || { echo "FAIL: not installed: $f" >&2; exit 1; }
done
# The installed package names nothing of the source or build tree.
if grep -rlF -e "$src" -e "$work/build" "$prefix/lib/cmake" "$prefix/include"; then
  echo "FAIL: the installed package refers to the source or build tree (files above)" >&2
  exit 1
fi

echo "== consumer: configure, build (find_package(dspex CONFIG REQUIRED))"
cmake -S "$src/examples/consumer" -B "$work/consumer" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$prefix" >/dev/null
cmake --build "$work/consumer" -j"$jobs" >/dev/null
echo "== consumer: run"
out=$("$work/consumer/dspex_consumer")
echo "$out"
python3 - "$out" "$prefix" <<'PY'
import json, sys
out, prefix = json.loads(sys.argv[1]), sys.argv[2]
script = out["worker_script"]
assert script == prefix + "/share/dspex/python/dspex_worker.py", "worker script not under the prefix: " + script
assert out.get("reply", {}).get("status") == "ok", "the call did not succeed: %r" % out
print("ok: the installed runtime served a call with its bundled worker,", script)
PY
