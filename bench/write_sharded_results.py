#!/usr/bin/python3
"""Writes the "Sharded instances" section of bench/RESULTS.md and bench/sharded/balance.png from
sharded_bench's JSON (bench/sharded.sh runs it): a GPT-2-medium-shaped model as one sharded
session over 1, 2 and 3 local optd instances, with the placement's balance of Newton-Schulz cost
and state bytes, each instance's time and the step time; the baseline is the same model on one
instance in the same run."""

import argparse
import json
import os
import statistics

from results_section import (add_common_arguments, close_section, cpu_model, generated_by,
                             open_section)

BEGIN = "<!-- sharded:begin -->"
END = "<!-- sharded:end -->"


def imbalance(values):
    """max / mean: 1.00 is a perfect split."""
    return max(values) / statistics.mean(values)


def plot(runs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (cost, time) = plt.subplots(1, 2, figsize=(10, 3.8))
    for run in runs:
        n = run["instances"]
        total = sum(run["newton_schulz_cost"])
        shares = [100 * c / total for c in run["newton_schulz_cost"]]
        xs = [n + (i - (n - 1) / 2) * 0.25 for i in range(n)]
        cost.bar(xs, shares, width=0.22, color="tab:blue")
        times = [statistics.median(p["seconds"]) for p in run["parts"]]
        time.bar(xs, times, width=0.22, color="tab:orange")
        time.plot([n - 0.4, n + 0.4], [statistics.median(run["step_seconds"])] * 2, color="black")
    cost.set_title("Newton-Schulz cost per instance (% of the model)")
    time.set_title("time per instance (bars) and per step (line), s")
    for ax in (cost, time):
        ax.set_xticks([r["instances"] for r in runs])
        ax.set_xlabel("instances")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench/out")
    add_common_arguments(parser, "bench/sharded.sh", load=False)
    parser.add_argument("--plot", default="bench/sharded/balance.png")
    args = parser.parse_args()
    runs = [json.load(open(f"{args.out}/sharded_{n}.json")) for n in (1, 2, 3)]
    full = [json.load(open(f"{args.out}/sharded_full_{n}.json")) for n in (1, 2, 3)]
    base = statistics.median(runs[0]["step_seconds"])
    lines, add = open_section(BEGIN, "Sharded instances (issue 9)")
    add(f"{generated_by(args.command)}, "
        f"{cpu_model()}. The first {runs[0]['layers']} blocks of GPT-2-medium with its "
        f"embeddings and final norm ({runs[0]['elements']:,} parameters), preset "
        f"`{runs[0]['preset']}` for the matrices and AdamW for the rest, as one sharded session "
        "(`client/sharded.h`) over 1, 2 and 3 optd processes on loopback, CPU backend with one "
        "BLAS thread each, gradients and parameters over gRPC every step. Median of "
        f"{len(runs[0]['step_seconds'])} steps after one warm-up. The machine has 2 cores that "
        "the instances and the client share, so three instances cannot run three times as "
        "fast: read the balance and the per-instance times.")
    add("")
    add("| instances | step s | speed-up vs 1 | NS cost per instance (share) | NS imbalance "
        "(max/mean) | state GB per instance | time per instance, s |")
    add("|---:|---:|---:|---|---:|---|---|")
    for run in runs:
        step = statistics.median(run["step_seconds"])
        total = sum(run["newton_schulz_cost"])
        shares = ", ".join(f"{100 * c / total:.1f}%" for c in run["newton_schulz_cost"])
        gb = ", ".join(f"{b / 1e9:.2f}" for b in run["state_bytes"])
        times = ", ".join(f"{statistics.median(p['seconds']):.2f}" for p in run["parts"])
        add(f"| {run['instances']} | {step:.2f} | {base / step:.2f}× | {shares} | "
            f"{imbalance(run['newton_schulz_cost']):.3f} | {gb} | {times} |")
    add("")
    add("The whole GPT-2-medium (24 blocks, "
        f"{full[0]['elements']:,} parameters), placed but not stepped (`--placement_only`):")
    add("")
    add("| instances | NS imbalance (max/mean) | state GB per instance |")
    add("|---:|---:|---|")
    for run in full:
        gb = ", ".join(f"{b / 1e9:.2f}" for b in run["state_bytes"])
        add(f"| {run['instances']} | {imbalance(run['newton_schulz_cost']):.3f} | {gb} |")
    add("")
    add("Placement balances the Newton-Schulz matrices first and then the AdamW tensors by "
        "bytes, so the embedding (51.5M elements) lands on the instance with the least bytes, "
        "and that instance also moves its gradient every step: its time is the longest even "
        "where the Newton-Schulz split is even. `bench/sharded/balance.png` plots both columns.")
    add("")
    close_section(args.results, BEGIN, END, lines)
    plot(runs, args.plot)


if __name__ == "__main__":
    main()
