#!/usr/bin/env bash
# Gram Newton–Schulz against the standard iteration on this machine (issue 20): kernels_bench's
# BM_NewtonSchulzMethod (standard, gram and auto on the same shapes, keller fp32, 5 steps) and a
# full GPT-2-small keller step with each method, then the fidelity figures of
# tests/kernels/newton_schulz_test, into the "Gram Newton–Schulz" section of bench/RESULTS.md.
# About six minutes on 2 cores.
#
# Usage: bench/gram.sh [--repetitions=N]   (default 5)
#   OPTD_BENCH_BUILD_DIR  build tree (default: build)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
bench_init gram.sh
bench_repetitions 5 "$@"

log "[1/3] building kernels_bench and newton_schulz_test in $build_dir"
bench_build kernels_bench newton_schulz_test

log "[2/3] kernels_bench: the three methods on 16 shapes, $repetitions repetitions in random order"
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
"$build_dir/bench/kernels_bench" --benchmark_filter='BM_NewtonSchulzMethod|BM_Gpt2SmallStep/keller' \
  --benchmark_repetitions="$repetitions" --benchmark_min_time=0.2 \
  --benchmark_enable_random_interleaving=true --benchmark_display_aggregates_only=true \
  --benchmark_out="$out/gram_bench.json" --benchmark_out_format=json

log "[3/3] fidelity (tests/kernels/newton_schulz_test) and bench/RESULTS.md"
"$build_dir/tests/newton_schulz_test" --gtest_filter='*Gram*' >"$out/gram_fidelity.txt"
/usr/bin/python3 bench/write_gram_results.py --bench "$out/gram_bench.json" \
  --fidelity "$out/gram_fidelity.txt" --load "$load_before" \
  --command "bench/gram.sh --repetitions=$repetitions"
