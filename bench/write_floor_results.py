#!/usr/bin/python3
"""Writes the "Per-call floor" section of bench/RESULTS.md from bench/floor.sh's two runs: a tiny
step's p50 and p99 on the streamed Step and on StepSmall, as ratios to a unary GetServerInfo
measured in the same run on the same channel."""
import argparse
import json

from results_section import (add_common_arguments, close_section, cpu_count, cpu_model,
                             generated_by, open_section)

BEGIN = "<!-- floor:begin -->"
END = "<!-- floor:end -->"


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cpp", required=True)
    parser.add_argument("--python", required=True)
    add_common_arguments(parser, "bench/floor.sh")
    args = parser.parse_args()
    runs = {"C++": json.load(open(args.cpp)), "Python": json.load(open(args.python))}
    lines, add = open_section(BEGIN, "Per-call floor: a tiny step against a unary call (issue 18)")
    add(f"{generated_by(args.command)}, {cpu_model()}, {cpu_count()} CPUs, load average before "
        f"the run {args.load}. One optd (CPU backend, all cores) and the client on the same "
        "machine over loopback; a step is one 64-element AdamW tensor, world_size 1, results "
        f"returned as parameters; {runs['C++']['calls']} timed calls of each after a tenth as "
        "many untimed. The baseline is a unary `GetServerInfo` on the same channel in the same "
        "run (targets: C++ StepSmall ≤ 2×, Python StepSmall ≤ 1.5×). **shared memory** = "
        "StepSmall with the gradient and result in the worker's shared-memory region (README, "
        "\"Clients\"): no tensor bytes in either message.")
    add("")
    add("| client | GetServerInfo p50 | Step p50 (× baseline) | StepSmall p50 (× baseline) | "
        "StepSmall p99 | shared memory p50 (× baseline) |")
    add("|---|---|---|---|---|---|")
    for name, r in runs.items():
        base = r["server_info"]["p50_ms"]
        add(f"| {name} | {base:.3f} ms | {r['step']['p50_ms']:.3f} ms "
            f"({r['step']['p50_ms'] / base:.2f}×) | {r['step_small']['p50_ms']:.3f} ms "
            f"({r['step_small']['p50_ms'] / base:.2f}×) | {r['step_small']['p99_ms']:.3f} ms | "
            f"{r['step_shared']['p50_ms']:.3f} ms ({r['step_shared']['p50_ms'] / base:.2f}×) |")
    add("")
    large = runs["C++"]["large_elements"]
    add(f"A step of {large:,} elements ({4 * large / 1e6:.0f} MB of fp32 each way, one message's "
        f"worth; {runs['C++']['large_calls']} timed calls of each), over gRPC in one message each "
        "way against through shared memory:")
    add("")
    add("| client | StepSmall p50 | StepSmall p99 | shared memory p50 | shared memory p99 | "
        "shared / StepSmall |")
    add("|---|---|---|---|---|---|")
    for name, r in runs.items():
        small, shared = r["large_small"], r["large_shared"]
        add(f"| {name} | {small['p50_ms']:.3f} ms | {small['p99_ms']:.3f} ms | "
            f"{shared['p50_ms']:.3f} ms | {shared['p99_ms']:.3f} ms | "
            f"{shared['p50_ms'] / small['p50_ms']:.2f}× |")
    add("")
    close_section(args.results, BEGIN, END, lines)


if __name__ == "__main__":
    main()
