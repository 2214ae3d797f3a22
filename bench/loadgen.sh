#!/usr/bin/env bash
# The load-generator benchmark, in one go on this machine: iperf3 over loopback (the raw TCP ceiling), then
# optd-loadgen against an optd on the CPU backend at 1, 4 and 16 concurrent sessions (two
# GPT-2-small blocks, bench/loadgen_model.json, preset rmnp so the update's arithmetic stays small
# beside the transport), then the "Load generator" section of bench/RESULTS.md. Raw output goes to
# bench/out/ (ignored by git). About four minutes on 2 cores.
#
# Usage: bench/loadgen.sh [--duration_s=S]   (longest measurement per level; default 20)
#   OPTD_BENCH_BUILD_DIR  build tree (default: build)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
source bench/iperf3.sh
duration=20
for arg in "$@"; do
  case $arg in
    --duration_s=*) duration=${arg#--duration_s=} ;;
    *) echo "usage: bench/loadgen.sh [--duration_s=S]" >&2; exit 2 ;;
  esac
done
bench_init loadgen.sh

log "[1/4] building optd and optd-loadgen in $build_dir"
bench_build optd optd-loadgen

log "[2/4] iperf3 over loopback, 3 runs of 3 s"
iperf3_loopback "$out"

log "[3/4] optd-loadgen --concurrency=1:16:x4 against optd (CPU backend)"
rm -f "$out/optd.port" "$out/optd.metrics_port" "$out/loadgen.json" "$out/loadgen.csv"
"$build_dir/server/optd" --listen=127.0.0.1:0 --port_file="$out/optd.port" \
  --metrics_addr=127.0.0.1:0 --metrics_port_file="$out/optd.metrics_port" \
  --max_session_bytes=$((1 << 30)) 2>"$out/optd.log" &
optd=$!
trap 'kill $optd 2>/dev/null || true' EXIT
for _ in $(seq 200); do [[ -s $out/optd.port && -s $out/optd.metrics_port ]] && break; sleep 0.05; done
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
status=0
"$build_dir/client/optd-loadgen" --server="127.0.0.1:$(cat "$out/optd.port")" \
  --metrics="127.0.0.1:$(cat "$out/optd.metrics_port")" --model=bench/loadgen_model.json \
  --preset=rmnp --concurrency=1:16:x4 --duration_s="$duration" --window_s=2 \
  --json="$out/loadgen.json" --csv="$out/loadgen.csv" || status=$?
# Fairness: 16 sessions measured over a fixed number of steps (about 30 each), long enough that
# one step more or less is a few percent of a session's rate.
log "[3b/4] optd-loadgen --concurrency=16 --steps=480 (fairness)"
"$build_dir/client/optd-loadgen" --server="127.0.0.1:$(cat "$out/optd.port")" \
  --model=bench/loadgen_model.json --preset=rmnp --concurrency=16 --steps=480 \
  --stable_windows=150 --max_windows=150 --duration_s=300 --window_s=2 \
  --json="$out/loadgen_fairness.json" || status=$?
kill -TERM $optd
wait $optd || true

log "[4/4] writing bench/RESULTS.md (Load generator section)"
/usr/bin/python3 bench/write_loadgen_results.py --report "$out/loadgen.json" \
  --fairness "$out/loadgen_fairness.json" \
  --iperf "$out"/iperf3.*.json --load "$load_before" \
  --command "bench/loadgen.sh${*:+ $*}" --results bench/RESULTS.md
exit $status
