#!/usr/bin/env bash
# libFuzzer fuzzing of the frame decoder, the reply parser, request validation
# and configuration loading (tests/fuzz/). Installs what is missing (Debian 12,
# as root), builds with clang + ASan + UBSan into build-fuzz/, and runs each
# target on a scratch copy of its committed corpus (tests/fuzz/corpus/<target>/),
# after replaying the corpus and the inputs that once found a bug
# (tests/fuzz/crashes/<target>/, ctest -L fuzz).
#
#   bash scripts/fuzz.sh                     # every target for 30 s
#   bash scripts/fuzz.sh --seconds 120       # every target for 120 s
#   bash scripts/fuzz.sh --runs 1000000      # every target for 1e6 executions
#   bash scripts/fuzz.sh --runs 100000 fuzz_config   # named targets only
#   bash scripts/fuzz.sh --merge             # then minimise what was found into the committed corpus
#   bash scripts/fuzz.sh --build-only
#
# Exits non-zero when any target crashes, leaks, times out or runs out of
# memory; the input that did it is kept under build-fuzz/artifacts/. Prints
# the executions done per target. Environment: DSPEX_FUZZ_BUILD_DIR (default
# build-fuzz), DSPEX_FUZZ_JOBS (build jobs, default nproc), DSPEX_FUZZ_ARGS
# (extra libFuzzer flags, e.g. "-max_len=2048").
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build_dir=${DSPEX_FUZZ_BUILD_DIR:-$here/build-fuzz}
fuzz_src=$here/tests/fuzz
all_targets=(fuzz_frame_decoder fuzz_reply_envelope fuzz_request_validation fuzz_config fuzz_node_wire)

usage() { sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

seconds=30 runs= merge=0 build_only=0 targets=()
while (($#)); do
  case $1 in
    --seconds) seconds=${2:?--seconds needs a number}; runs=; shift 2 ;;
    --seconds=*) seconds=${1#*=}; runs=; shift ;;
    --runs) runs=${2:?--runs needs a number}; shift 2 ;;
    --runs=*) runs=${1#*=}; shift ;;
    --merge) merge=1; shift ;;
    --build-only) build_only=1; shift ;;
    -h|--help) usage; exit 0 ;;
    fuzz_*) targets+=("$1"); shift ;;
    *) echo "fuzz.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done
((${#targets[@]})) || targets=("${all_targets[@]}")
for n in "$seconds" ${runs:+"$runs"}; do
  [[ $n =~ ^[0-9]+$ ]] || { echo "fuzz.sh: '$n' is not a number" >&2; exit 2; }
done

# -- packages: the project's own plus clang and libFuzzer
# shellcheck source=scripts/packages.sh
source "$here/scripts/packages.sh"
ensure_packages fuzz.sh clang-14 libclang-rt-14-dev "${dspex_packages[@]}"

# -- build
CC=clang-14 CXX=clang++-14 cmake -S "$here" -B "$build_dir" -DDSPEX_FUZZ=ON \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$build_dir" --target "${targets[@]}" -j"${DSPEX_FUZZ_JOBS:-$(nproc)}"
((build_only)) && exit 0

# -- every committed seed and the inputs that once found a bug (tests/fuzz/crashes/) run clean
(cd "$build_dir" && ctest --output-on-failure -L fuzz -R "$(IFS='|'; echo "${targets[*]}")")

# -- run
run_root=$build_dir/runs
artifacts=$build_dir/artifacts
mkdir -p "$run_root" "$artifacts"
read -r -a extra <<<"${DSPEX_FUZZ_ARGS:-}"
declare -A executed status
failed=0
for t in "${targets[@]}"; do
  bin=$build_dir/tests/fuzz/$t
  corpus=$fuzz_src/corpus/$t
  scratch=$run_root/$t
  log=$run_root/$t.log
  rm -rf "$scratch"
  mkdir -p "$scratch"
  [[ -d $corpus ]] && cp -r "$corpus/." "$scratch/"
  flags=(-print_final_stats=1 -timeout=10 -rss_limit_mb=2048 "-artifact_prefix=$artifacts/$t-")
  [[ -f $fuzz_src/$t.dict ]] && flags+=("-dict=$fuzz_src/$t.dict")
  if [[ -n $runs ]]; then flags+=("-runs=$runs"); else flags+=("-max_total_time=$seconds"); fi
  echo "fuzz.sh: $t ${flags[*]: -1} (log: $log)" >&2
  rc=0
  nice -n 10 "$bin" "${flags[@]}" "${extra[@]}" "$scratch" >"$log" 2>&1 || rc=$?
  executed[$t]=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  if ((rc)); then
    status[$t]="FAILED (exit $rc)"
    failed=1
    echo "fuzz.sh: $t failed; the end of its log:" >&2
    grep -v '^INFO:' "$log" | tail -40 >&2
    grep -h "Test unit written to" "$log" >&2 || true
  else
    status[$t]=ok
    if ((merge)); then
      # Minimise committed + new into a fresh directory, then replace the committed corpus with it.
      # Edges only (-use_counters=0): hit counts would keep thousands of files.
      merged=$(mktemp -d)
      nice -n 10 "$bin" -merge=1 -use_counters=0 "$merged" "$corpus" "$scratch" >>"$log" 2>&1
      rm -rf "$corpus"
      mkdir -p "$corpus"
      cp "$merged"/* "$corpus"/ 2>/dev/null || true
      rm -rf "$merged"
      status[$t]="ok, corpus merged: $(find "$corpus" -type f | wc -l) files"
    fi
  fi
done

echo
printf '%-26s %14s  %s\n' target executions result
for t in "${targets[@]}"; do
  printf '%-26s %14s  %s\n' "$t" "${executed[$t]:-?}" "${status[$t]}"
done
exit "$failed"
