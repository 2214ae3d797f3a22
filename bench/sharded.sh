#!/usr/bin/env bash
# The sharding benchmark, in one go on this machine: a GPT-2-medium-shaped model (its first
# --layers blocks, embeddings and head; preset keller) stepped as one sharded session over 1, 2
# and 3 local optd instances on the CPU backend, one BLAS thread each, then the "Sharded
# instances" section of bench/RESULTS.md and bench/sharded/balance.png. The instances share this
# machine's cores, so the figures to read are the placement's balance of Newton–Schulz cost and
# each instance's time, beside the step time. Raw output goes to bench/out/ (ignored by git).
#
# Usage: bench/sharded.sh [--layers=N] [--steps=N]   (default 4 blocks, 3 measured steps)
#   OPTD_BENCH_BUILD_DIR  build tree (default: build)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
layers=4
steps=3
for arg in "$@"; do
  case $arg in
    --layers=*) layers=${arg#--layers=} ;;
    --steps=*) steps=${arg#--steps=} ;;
    *) echo "usage: bench/sharded.sh [--layers=N] [--steps=N]" >&2; exit 2 ;;
  esac
done
bench_init sharded.sh

log "[1/3] building optd and sharded_bench in $build_dir"
bench_build optd sharded_bench

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
addresses=()
for i in 0 1 2; do
  rm -f "$out/sharded_$i.port"
  "$build_dir/server/optd" --listen=127.0.0.1:0 --port_file="$out/sharded_$i.port" \
    --metrics_addr= --threads=1 2>"$out/sharded_optd_$i.log" &
  pids+=($!)
done
for i in 0 1 2; do
  for _ in $(seq 100); do [[ -s $out/sharded_$i.port ]] && break; sleep 0.1; done
  addresses+=("127.0.0.1:$(cat "$out/sharded_$i.port")")
done

log "[2/3] $layers GPT-2-medium blocks on 1, 2 and 3 instances, $steps measured steps each"
for n in 1 2 3; do
  servers=$(IFS=,; echo "${addresses[*]:0:$n}")
  "$build_dir/bench/sharded_bench" --server="$servers" --model=gpt2-medium --layers="$layers" \
    --steps="$steps" --warmup=1 --json="$out/sharded_$n.json" >/dev/null
done
# The full model's placement on 1, 2 and 3 instances, without stepping it.
for n in 1 2 3; do
  servers=$(IFS=,; echo "${addresses[*]:0:$n}")
  "$build_dir/bench/sharded_bench" --server="$servers" --model=gpt2-medium --placement_only \
    --json="$out/sharded_full_$n.json" >/dev/null
done

log "[3/3] bench/RESULTS.md and bench/sharded/balance.png"
/usr/bin/python3 bench/write_sharded_results.py --out "$out" \
  --command "bench/sharded.sh --layers=$layers --steps=$steps"
