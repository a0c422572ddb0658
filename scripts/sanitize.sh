#!/usr/bin/env bash
# The suites under sanitizers, each in a build directory of its own:
#   bash scripts/sanitize.sh asan   # every test under AddressSanitizer + UndefinedBehaviorSanitizer
#                                   # (leaks checked, ODR violations detected), build-asan/
#   bash scripts/sanitize.sh tsan   # the suites without CAF under ThreadSanitizer, build-tsan/
# Extra arguments go to ctest. Installs what is missing first (bootstrap.sh).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mode=${1:-asan}
shift || true

# Packages and the normal build's configuration come from bootstrap.sh; the
# sanitizer runtimes (libasan8, libubsan1, libtsan2) come with g++.
DSPEX_BUILD_DIR="$here/build" "$here/scripts/bootstrap.sh" >/dev/null

case "$mode" in
  asan)
    build="$here/build-asan"
    cmake -S "$here" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
      -DDSPEX_SANITIZE=address,undefined >/dev/null
    cmake --build "$build" -j"$(nproc)"
    export ASAN_OPTIONS="detect_odr_violation=2:detect_leaks=1:abort_on_error=1:detect_stack_use_after_return=0:strict_string_checks=1:check_initialization_order=1"
    export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:suppressions=$here/tests/sanitizers/ubsan.supp"
    # CAF 0.17 keeps some process-wide singletons (type registry, logger
    # statics) until exit; they are CAF's, not ours.
    export LSAN_OPTIONS="suppressions=$here/tests/sanitizers/lsan.supp:print_suppressions=0"
    cd "$build"
    # -LE package: the package test builds the libraries again, uninstrumented.
    ctest --output-on-failure -j"$(nproc)" -LE package "$@"
    ;;
  tsan)
    build="$here/build-tsan"
    cmake -S "$here" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDSPEX_SANITIZE=thread >/dev/null
    # Only what needs no actor system: runtime/ and its suites.
    targets=(test_framing test_limits test_policies test_child_process)
    cmake --build "$build" -j"$(nproc)" --target "${targets[@]}"
    export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1"
    # The binaries themselves (ctest knows them only by test case name).
    for t in "${targets[@]}"; do
      echo "== $t (ThreadSanitizer)"
      "$build/tests/$t" "$@"
    done
    ;;
  *)
    echo "usage: $0 asan|tsan [ctest args]" >&2
    exit 2
    ;;
esac
