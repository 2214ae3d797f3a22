#!/usr/bin/env bash
# The main job as a benchmark: scripts/main_job.py (its own optd on the CPU backend, the digits MLP
# and the character transformer through optd.torch.RemoteOptimizer with every preset, the
# analyzer on), then the "Main job" section of bench/RESULTS.md from its tables: each preset's
# median and 99th-percentile optimizer.step() through optd, measured by the client, against the
# same rule stepped locally in torch in the same run. About a minute and a half on 2 cores.
#
# Usage: bench/main_job.sh
#   OPTD_BENCH_BUILD_DIR  build tree (default: build)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
[[ $# -eq 0 ]] || { echo "usage: bench/main_job.sh" >&2; exit 2; }
bench_init main_job.sh

log "[1/3] building optd and the Python stubs in $build_dir"
bench_build optd optd_python

log "[2/3] scripts/main_job.py"
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
/usr/bin/python3 scripts/main_job.py --optd "$build_dir/server/optd" --out "$out/main_job" \
  >"$out/main_job.log"

log "[3/3] writing bench/RESULTS.md (Main job section)"
/usr/bin/python3 bench/write_main_job_results.py --table "$out/main_job/table.txt" \
  --load "$load_before" --command "bench/main_job.sh" --results bench/RESULTS.md
