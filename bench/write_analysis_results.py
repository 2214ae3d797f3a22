#!/usr/bin/python3
"""Writes the "Analyzer" section of bench/RESULTS.md from analysis_bench's JSON (bench/analysis.sh
runs it). Every ratio is between figures of the same run: one analysis against one optimizer step
of the same matrix, and a step beside a running analyzer against the same step with it idle."""

import argparse
import json

from results_section import (add_common_arguments, close_section, cpu_count, generated_by,
                             open_section)

BEGIN = "<!-- analysis:begin -->"
END = "<!-- analysis:end -->"


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bench", required=True)
    add_common_arguments(parser, "bench/analysis.sh")
    args = parser.parse_args()

    bench = json.load(open(args.bench))
    nproc = cpu_count()
    lines, add = open_section(BEGIN, "Analyzer: cost of one analysis, and a step beside it (issue 5)")
    add(f"{generated_by(args.command)}, "
        f"{bench['description']}, {nproc} CPUs, load average before the run {args.load}. "
        "As optd runs them: the step on the CPU backend with every core, the analysis on the "
        "analyzer's own backend (one loop thread, OpenBLAS shared). Medians of "
        f"{bench['repetitions']} repetitions.")
    add("")
    add("**Step** = one Muon step (`keller,precision=fp32`) of the matrix, the baseline. **Exact** "
        "= kernels/analysis.h's exact path (fp64 SVDs of V, of the update and of NS(V), the "
        "real Newton–Schulz run); **estimate** = its stochastic Lanczos path (8 probes, 40 "
        "steps), which optd takes past `--analysis_exact_max_dim` (1024). An analysis every K "
        "steps costs about (analysis / step) / K of the steps' compute, on the analyzer's own "
        "lowest-priority thread.")
    add("")
    add("| matrix | step (s) | exact (s) | exact / step | estimate (s) | estimate / step |")
    add("|---|---:|---:|---:|---:|---:|")
    for s in bench["shapes"]:
        exact = s["exact_s"]
        exact_cells = (f"{exact:.3f} | {exact / s['step_s']:.1f}" if exact is not None
                       else "— | — (past the exact limit)")
        add(f"| {s['rows']}×{s['cols']} | {s['step_s']:.3f} | {exact_cells} | "
            f"{s['estimate_s']:.3f} | {s['estimate_s'] / s['step_s']:.1f} |")
    add("")
    i = bench["interference"]
    add(f"**A step beside a running analyzer.** {i['steps']} Muon steps of {i['rows']}×{i['cols']} "
        "with the analyzer idle, then the same number while it is fed exact analyses of another "
        f"{i['rows']}×{i['cols']} matrix back to back ({i['analyses_during']} completed in the "
        f"{i['phase_s']:.1f} s the steps took: at the lowest priority it gets what the steps "
        "leave).")
    add("")
    add("| | idle analyzer | running analyzer | ratio |")
    add("|---|---:|---:|---:|")
    add(f"| step p50 (s) | {i['alone_p50_s']:.3f} | {i['beside_p50_s']:.3f} | "
        f"{i['beside_p50_s'] / i['alone_p50_s']:.2f}× |")
    add(f"| step max (s) | {i['alone_max_s']:.3f} | {i['beside_max_s']:.3f} | "
        f"{i['beside_max_s'] / i['alone_max_s']:.2f}× |")
    add("")
    add("The step never waits for the analysis (tests/server/metrics_test.cc); what remains is "
        "sharing the cores and OpenBLAS, which runs one multithreaded level-3 call at a time: "
        "the analysis keeps its own calls to blocks of at most 2²⁸ multiply-adds, but the exact "
        "path's LAPACK SVD is not split (bounded by the exact limit). With the CUDA backend the "
        "steps run on the GPU and the analyzer stays on the CPU, so the two no longer share "
        "cores.")
    add("")
    close_section(args.results, BEGIN, END, lines)


if __name__ == "__main__":
    main()
