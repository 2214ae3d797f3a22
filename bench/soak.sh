#!/usr/bin/env bash
# The soak of issue 16: tests/server/soak_test.cc against the optd binary, 16 workers (4 sessions ×
# world_size 4) with a checkpoint every step, for SECONDS (600) with KILLS (50) kill -9 restarts
# at random moments, then SECONDS/5 with no kill (the RSS over one long life); the figures go into
# bench/RESULTS.md ("Soak").
# Usage: bench/soak.sh [SECONDS] [KILLS]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-600} kills=${2:-50}
scripts/build >/dev/null
mkdir -p bench/out
OPTD_SOAK_SECONDS=$seconds OPTD_SOAK_KILLS=$kills build/tests/soak_test \
  >bench/out/soak.txt 2>bench/out/soak.log
# Then one daemon that lives through a fifth of that, for the RSS over a long life.
OPTD_SOAK_SECONDS=$((seconds / 5)) OPTD_SOAK_KILLS=0 build/tests/soak_test \
  >>bench/out/soak.txt 2>>bench/out/soak.log
grep "^soak:" bench/out/soak.txt
/usr/bin/python3 - "$seconds" "$kills" <<'PY'
import re, subprocess, sys, datetime
sys.path.insert(0, "bench")
from results_section import write_section
BEGIN, END = "<!-- soak:begin -->", "<!-- soak:end -->"
lines = [l[len("soak: "):].strip() for l in open("bench/out/soak.txt") if l.startswith("soak: ")]
cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
section = [
    BEGIN,
    "",
    "## Soak (issue 16)",
    "",
    f"`bench/soak.sh {sys.argv[1]} {sys.argv[2]}` on {cpu}, {subprocess.check_output(['nproc']).decode().strip()} cores, "
    f"{datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC: `tests/server/soak_test.cc` drives one optd "
    "(`--threads=1`) with 16 workers (4 sessions × world_size 4, a Keller-Muon 48×32 and 32×48 matrix "
    "and an AdamW vector each, a checkpoint every step) and kills it with SIGKILL at random moments, "
    "restarting it on the same port and state directory. A step counts as acknowledged durable when "
    "its reply's `checkpoint_step` reaches it; after every restart each session must be at or past "
    "its last such step, and at the end each session must equal, bit for bit, an in-process replay "
    "of the same gradients (kernels library, one thread).",
    "",
    *[f"- {l}" for l in lines],
    "",
    "UNAVAILABLE is what a worker sees while the daemon is down (each retries every 10 ms); "
    "ABORTED, CANCELLED or FAILED_PRECONDITION would be steps a restart cut off. The RSS slope is "
    "taken within each daemon's life (past its first 3 s) and averaged over the lives, weighted "
    "by their samples: a leak would show as growth within a life; the second run is one daemon "
    "that lives through the whole of it.",
    "",
    END,
]
# A section from before the markers ends at the next heading or marker (it once took the next
# section's begin marker with it).
results = open("bench/RESULTS.md").read()
if BEGIN not in results:
    results = re.sub(r"## Soak \(issue 16\)\n.*?(?=\n## |\n<!-- |\Z)", "", results, flags=re.S)
    open("bench/RESULTS.md", "w").write(results)
write_section("bench/RESULTS.md", BEGIN, END, section)
PY
