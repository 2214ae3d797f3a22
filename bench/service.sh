#!/usr/bin/env bash
# The service benchmark, in one go on this machine: iperf3 over loopback (the raw TCP
# ceiling), then service_bench (the remote step against the in-process step on GPT-2 small, and
# gradient/result streaming per chunk size), then the "Service" section of bench/RESULTS.md.
# Raw output goes to bench/out/ (ignored by git). Takes about five minutes on 2 cores.
#
# Usage: bench/service.sh [--repetitions=N]   (default 3)
#   OPTD_BENCH_BUILD_DIR  build tree (default: build)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
source bench/iperf3.sh
bench_init service.sh
bench_repetitions 3 "$@"

log "[1/4] building optd and service_bench in $build_dir"
bench_build optd service_bench

log "[2/4] iperf3 over loopback, 3 runs of 3 s"
iperf3_loopback "$out"

log "[3/4] service_bench --repetitions=$repetitions"
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
"$build_dir/bench/service_bench" "$build_dir/server/optd" --repetitions="$repetitions" \
  >"$out/service_bench.json"

log "[4/4] writing bench/RESULTS.md (Service section)"
/usr/bin/python3 bench/write_service_results.py --bench "$out/service_bench.json" \
  --iperf "$out"/iperf3.*.json --load "$load_before" \
  --command "bench/service.sh${*:+ $*}" --results bench/RESULTS.md
