#!/usr/bin/env bash
# The analyzer benchmark on this machine: builds and runs analysis_bench (one analysis in
# optimizer steps of the same matrix, exact and estimated; a step's latency beside a running
# analyzer against the same steps with it idle), then writes the "Analyzer" section of
# bench/RESULTS.md. Raw output goes to bench/out/ (ignored by git). About two minutes on 2 cores.
#
# Usage: bench/analysis.sh [--repetitions=N]   (default 5)
#   OPTD_BENCH_BUILD_DIR  build tree (default: build)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
bench_init analysis.sh
bench_repetitions 5 "$@"

log "[1/3] building analysis_bench in $build_dir"
bench_build analysis_bench

log "[2/3] analysis_bench --repetitions=$repetitions"
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
"$build_dir/bench/analysis_bench" --repetitions="$repetitions" >"$out/analysis_bench.json"

log "[3/3] writing bench/RESULTS.md (Analyzer section)"
/usr/bin/python3 bench/write_analysis_results.py --bench "$out/analysis_bench.json" \
  --load "$load_before" --command "bench/analysis.sh${*:+ $*}" --results bench/RESULTS.md
