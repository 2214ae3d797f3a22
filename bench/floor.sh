#!/usr/bin/env bash
# The per-call floor of a step, on this machine: one optd (CPU backend), then floor_bench (the C++
# client) and bench/floor_bench.py (the Python client), each timing a tiny Step, a tiny StepSmall
# and a unary GetServerInfo on the same channel, then the "Per-call floor" section of
# bench/RESULTS.md. About a minute on 2 cores.
#
# Usage: bench/floor.sh [--calls=N]   (default 2000)
#   OPTD_BENCH_BUILD_DIR  build tree (default: build)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
calls=2000
for arg in "$@"; do
  case $arg in
    --calls=*) calls=${arg#--calls=} ;;
    *) echo "usage: bench/floor.sh [--calls=N]" >&2; exit 2 ;;
  esac
done
bench_init floor.sh

log "[1/3] building optd, floor_bench and the Python stubs in $build_dir"
bench_build optd floor_bench optd_python

log "[2/3] $calls calls of each, C++ then Python, against one optd"
rm -f "$out/optd.port"
"$build_dir/server/optd" --listen=127.0.0.1:0 --port_file="$out/optd.port" 2>"$out/optd.log" &
optd=$!
trap 'kill $optd 2>/dev/null || true' EXIT
for _ in $(seq 200); do [[ -s $out/optd.port ]] && break; sleep 0.05; done
address="127.0.0.1:$(cat "$out/optd.port")"
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
"$build_dir/bench/floor_bench" --server="$address" --calls="$calls" >"$out/floor_cpp.json"
PYTHONPATH="$build_dir/python" /usr/bin/python3 bench/floor_bench.py --server="$address" \
  --calls="$calls" >"$out/floor_python.json"
kill -TERM $optd
wait $optd || true

log "[3/3] bench/RESULTS.md"
/usr/bin/python3 bench/write_floor_results.py --cpp "$out/floor_cpp.json" \
  --python "$out/floor_python.json" --load "$load_before" --command "bench/floor.sh --calls=$calls"
