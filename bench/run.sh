#!/usr/bin/env bash
# The CPU kernel benchmark: builds kernels_bench, runs it and bench/numpy_ns.py one after the other on
# this machine, and writes bench/RESULTS.md from both (bench/write_results.py). Raw JSON goes to
# bench/out/ (ignored by git). Idempotent: every run rebuilds what changed and rewrites the outputs.
#
# Usage: bench/run.sh [extra cmake configure arguments...]
#   OPTD_BENCH_BUILD_DIR  build tree (default: build, the one scripts/build uses)
#   OPTD_BENCH_JOBS       parallel build jobs (default: nproc)
# Takes about three minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."

build_dir=${OPTD_BENCH_BUILD_DIR:-build}
jobs=${OPTD_BENCH_JOBS:-$(nproc)}
out=bench/out
command_line="bench/run.sh${*:+ $*}"
if [[ -n ${OPTD_BENCH_BUILD_DIR:-} ]]; then
  command_line="OPTD_BENCH_BUILD_DIR=$OPTD_BENCH_BUILD_DIR $command_line"
fi
log() { echo "bench/run.sh: $*" >&2; }
mkdir -p "$out"

# Configured as scripts/build configures (its dependencies, Release), but only kernels_bench is
# built: scripts/build builds every target, and the benchmark needs none of the others.
log "[1/4] building kernels_bench in $build_dir"
if [[ -x scripts/install-deps ]]; then scripts/install-deps; fi
if ! cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release -DOPTD_BUILD_BENCH=ON "$@" \
  >"$out/configure.log" 2>&1; then
  cat "$out/configure.log" >&2
  exit 1
fi
cmake --build "$build_dir" --target kernels_bench -j"$jobs"
bench_binary="$build_dir/bench/kernels_bench"

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
log "load average before the runs: $load_before"
# Seven repetitions in random order, each at least 0.2 s, so slow drift of a shared machine
# spreads over every benchmark instead of landing on one side of a ratio; medians are reported.
bench_args=(--benchmark_repetitions=7 --benchmark_min_time=0.2
  --benchmark_enable_random_interleaving=true --benchmark_display_aggregates_only=true)
bench_out_args=(--benchmark_out="$out/kernels_bench.json" --benchmark_out_format=json)
bench_command="$bench_binary ${bench_args[*]} ${bench_out_args[*]}"

log "[2/4] running kernels_bench (about 2.5 minutes)"
"$bench_binary" "${bench_args[@]}" "${bench_out_args[@]}"

log "[3/4] running bench/numpy_ns.py (about 25 s)"
# On the OpenBLAS kernels kernels_bench ran (optd's: kernels/cpu/openblas_core.h), so the ratios
# compare optd's use of the same products, not two kernel sets.
core=$(/usr/bin/python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["context"]["openblas_corename"])' "$out/kernels_bench.json")
OPENBLAS_CORETYPE=$core /usr/bin/python3 bench/numpy_ns.py >"$out/numpy_ns.json"

log "[4/4] writing bench/RESULTS.md"
/usr/bin/python3 bench/write_results.py --bench "$out/kernels_bench.json" \
--numpy "$out/numpy_ns.json" \
  --command "$command_line" --bench-command "$bench_command" --load-before "$load_before" \
  --out bench/RESULTS.md
log "done: bench/RESULTS.md"
