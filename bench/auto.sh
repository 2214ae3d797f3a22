#!/usr/bin/env bash
# The auto modes (issue 20 §2, §3) on this machine: what one decision costs (kernels_bench's
# BM_AutoDecision on GPT-2 small's shapes and a wider one, against the standard Newton–Schulz run
# of the same shape and a full GPT-2-small keller step, same run), then the main job's
# transformer trained with Muon's standard Newton–Schulz, Gram, ns.steps=auto and direction=auto
# (scripts/main_job.py --only-auto), into the "Auto modes" section of bench/RESULTS.md and
# bench/auto/auto_modes.png. About five minutes on 2 cores.
#
# Usage: bench/auto.sh [--repetitions=N]   (default 3)
#   OPTD_BENCH_BUILD_DIR  build tree (default: build)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
bench_init auto.sh
bench_repetitions 3 "$@"

log "[1/3] building kernels_bench, optd and the Python stubs in $build_dir"
bench_build kernels_bench optd optd_python

log "[2/3] kernels_bench: decisions and Newton–Schulz runs, $repetitions repetitions in random order"
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
"$build_dir/bench/kernels_bench" \
  --benchmark_filter='BM_AutoDecision|BM_NewtonSchulzMethod/standard/rows:(768/cols:(768|2304|3072)|3072/cols:768|1024/cols:4096)/|BM_Gpt2SmallStep/keller_fp32_auto' \
  --benchmark_repetitions="$repetitions" --benchmark_min_time=0.2 \
  --benchmark_enable_random_interleaving=true --benchmark_display_aggregates_only=true \
  --benchmark_out="$out/auto_bench.json" --benchmark_out_format=json

log "[3/3] the transformer, four ways (scripts/main_job.py --only-auto), and bench/RESULTS.md"
mkdir -p bench/auto
PYTHONPATH="$build_dir/python" /usr/bin/python3 scripts/main_job.py --only-auto \
  --passes=3 --optd "$build_dir/server/optd" --out "$out/auto" >"$out/auto.log"
cp "$out/auto/auto_modes.png" bench/auto/auto_modes.png
/usr/bin/python3 bench/write_auto_results.py --bench "$out/auto_bench.json" \
  --runs "$out/auto/auto_modes.json" --load "$load_before" \
  --command "bench/auto.sh --repetitions=$repetitions"
