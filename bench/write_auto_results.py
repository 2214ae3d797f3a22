#!/usr/bin/python3
"""Writes the "Auto modes" section of bench/RESULTS.md from bench/auto.sh's runs: what one
ns.steps=auto / direction=auto decision costs against the standard Newton–Schulz run of the same
matrix and a full GPT-2-small keller step (one kernels_bench run), and the main job's transformer
trained with Muon's standard Newton–Schulz, Gram, ns.steps=auto and direction=auto (validation
loss, the daemon's compute time per step, the choices the rules made)."""
import argparse
import json
import re

import numpy as np

from results_section import (add_common_arguments, close_section, cpu_count, cpu_model,
                             generated_by, open_section)
from write_results import BenchRuns

BEGIN = "<!-- auto:begin -->"
END = "<!-- auto:end -->"
GPT2_BLOCK = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]
GPT2_LAYERS = 12


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bench", required=True)
    parser.add_argument("--runs", required=True, help="scripts/main_job.py's auto_modes.json")
    add_common_arguments(parser, "bench/auto.sh")
    args = parser.parse_args()
    bench = BenchRuns(args.bench)
    runs = json.load(open(args.runs))

    def decision(kind, rows, cols):
        return bench.ms(f"BM_AutoDecision/{kind}/rows:{rows}/cols:{cols}/real_time")

    def standard(rows, cols):
        return bench.ms(f"BM_NewtonSchulzMethod/standard/rows:{rows}/cols:{cols}/real_time")

    shapes = sorted({(int(m.group(1)), int(m.group(2))) for name in bench.runs
                     for m in [re.match(r"BM_AutoDecision/steps/rows:(\d+)/cols:(\d+)/", name)]
                     if m})
    lines, add = open_section(BEGIN, "Auto modes: ns.steps=auto and direction=auto (issue 20)")
    add(f"{generated_by(args.command)}, {cpu_model()}, {cpu_count()} CPUs, load average before "
        f"the run {args.load}. **Decision** = kernels/auto_choice.h's `DecideMatrix` on one "
        "matrix, on the step's thread (single-threaded fp64 BLAS/LAPACK): with ns.steps=auto the "
        "Gram matrix's eigenvalues; with direction=auto too its eigenvectors, V·Vᵀ's dominance "
        "and the cosine. **NS** = optd's standard Newton–Schulz run of the same matrix (keller, "
        "5 steps, fp32, the backend's threads). Medians of the repetitions, same run.")
    add("")
    add("| shape | NS ms | decision, steps ms | / NS | decision, steps + direction ms | / NS |")
    add("|---|---:|---:|---:|---:|---:|")
    for rows, cols in shapes:
        ns = standard(rows, cols)
        s, d = decision("steps", rows, cols), decision("steps_and_direction", rows, cols)
        add(f"| {rows}×{cols} | {ns:.1f} | {s:.1f} | {s / ns:.2f} | {d:.1f} | {d / ns:.2f} |")
    step_name = "BM_Gpt2SmallStep/keller_fp32_auto/iterations:1/repeats:3/real_time"
    if step_name in bench.runs and all(s in shapes for s in GPT2_BLOCK):
        step = bench.ms(step_name)
        total = {k: GPT2_LAYERS * sum(decision(k, r, c) for r, c in GPT2_BLOCK)
                 for k in ("steps", "steps_and_direction")}
        add("")
        add(f"GPT-2 small's 48 matrices: one decision of every matrix costs "
            f"{total['steps'] / 1e3:.2f} s (steps) or {total['steps_and_direction'] / 1e3:.2f} s "
            f"(steps and direction), against one keller step of {step / 1e3:.2f} s (fp32, "
            f"ns.method=auto) in the same run: {total['steps'] / step:.2f} and "
            f"{total['steps_and_direction'] / step:.2f} steps' worth, so at the default "
            f"auto.interval of 50 about {100 * total['steps'] / step / 50:.1f}% and "
            f"{100 * total['steps_and_direction'] / step / 50:.1f}% of the training's optimizer "
            "time (a decision step also runs the steps it chose).")
    add("")
    text_steps = len(runs[0]["losses"])
    add(f"**The main job's character transformer** (2 layers, 64 wide, {text_steps} steps of "
        "16×64 characters, the same data and start for each; Muon on the 64×64 attention and "
        "64×256 / 256×64 MLP matrices, AdamW on embeddings, head and vectors; fp32). "
        "**compute** = the daemon's `optd_step_phase_seconds{phase=\"compute\"}` per step over the "
        "run (the optimizer's own time, no transfer), the median over "
        f"{len(runs[0].get('compute_passes', [None]))} passes of the variants in "
        "alternating order (the losses and choices are the same bits every pass); validation "
        "over 8 held-out batches. "
        "Choices are those of the last decision (every "
        f"{max(1, text_steps // 30)} steps).")
    add("")
    add("| variant | train loss (last 10%) | validation loss | vs keller | compute ms / step "
        "(each pass) | choices at the end |")
    add("|---|---:|---:|---:|---:|---|")
    baseline = next(r["valid_loss"] for r in runs if r["label"] == "keller")
    for r in runs:
        final = "—"
        if r["choices"]:
            step, last = r["choices"][-1]
            steps = [v[0] for v in last.values()]
            rn = [v[1] for v in last.values()]
            final = (f"step {step}: NS steps {min(steps):.0f}–{max(steps):.0f} (mean "
                     f"{np.mean(steps):.2f}), row-normalized {100 * np.mean(rn):.0f}% of "
                     f"{len(last)} tensors")
        compute = "—"
        if r["compute_s"] is not None:
            each = ", ".join(f"{1e3 * c:.2f}" for c in r.get("compute_passes", []))
            compute = f"{1e3 * r['compute_s']:.2f} ({each})"
        add(f"| {r['label']} | {r['train_loss']:.4f} | {r['valid_loss']:.4f} | "
            f"{100 * (r['valid_loss'] / baseline - 1):+.1f}% | {compute} | {final} |")
    passes = [r.get("compute_passes") or [] for r in runs]
    if all(len(p) > 1 for p in passes):
        spread = max(max(p) / min(p) for p in passes)
        add("")
        add(f"The same variant's compute time varied up to {spread:.2f}× between passes on this "
            "shared machine: differences between variants smaller than that are noise.")
    for label, column, what in (("ns.steps=auto", 2, "share of singular values left below 0.6"),
                                ("direction=auto", 4, "cos(rownormalize(V), polar(V))")):
        run = next((r for r in runs if r["label"] == label), None)
        if run and run["choices"]:
            values = [v[column] for _, c in run["choices"] for v in c.values()]
            dominance = [v[3] for _, c in run["choices"] for v in c.values()]
            extra = (f"; r_min of V·Vᵀ {min(dominance):.2f}–{max(dominance):.2f}"
                     if label == "direction=auto" else "")
            add("")
            add(f"{label}: over its {len(run['choices'])} decisions the tensors' {what} ranged "
                f"{min(values):.3f}–{max(values):.3f}{extra}.")
    add("")
    add("![auto modes](auto/auto_modes.png)")
    add("")
    close_section(args.results, BEGIN, END, lines)


if __name__ == "__main__":
    main()
