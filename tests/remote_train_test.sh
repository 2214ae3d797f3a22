#!/usr/bin/env bash
# The main job's remote half in a few steps: optd on a free port, train_example through it, and
# the losses equal the in-process run's bit for bit.
# Usage: remote_train_test.sh OPTD TRAIN_EXAMPLE WORK_DIR
set -euo pipefail
optd=$1 train=$2 work=$3
rm -rf "$work" && mkdir -p "$work"
"$optd" --listen=127.0.0.1:0 --metrics_addr= --port_file="$work/port" --threads=1 2>"$work/optd.log" &
pid=$!
trap 'kill -KILL $pid 2>/dev/null || true' EXIT
for _ in $(seq 200); do [[ -s $work/port ]] && break; sleep 0.05; done
"$train" 5 "$work/local.csv" >/dev/null
"$train" 5 "$work/remote.csv" --server="127.0.0.1:$(cat "$work/port")"
cmp "$work/local.csv" "$work/remote.csv"
kill -TERM $pid
wait $pid
echo "remote losses equal in-process losses"
