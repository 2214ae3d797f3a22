#!/usr/bin/python3
"""Writes the "Main job" section of bench/RESULTS.md from the main job's tables
(scripts/main_job.py writes them to table.txt; bench/main_job.sh runs both): each preset's median
and 99th-percentile optimizer.step() through optd, measured by the client, with the analyzer on,
against the same rule stepped locally in torch in the same run where torch has it."""

import argparse

from results_section import add_common_arguments, close_section, cpu_model, generated_by, open_section

BEGIN = "<!-- main_job:begin -->"
END = "<!-- main_job:end -->"
TAIL_TARGET = 3.0  # every preset's p99 at most 3× its median (issue 18)
PRESETS = 7  # rows per model in table.txt


def rows(lines, digits):
    """(label, steps/s, remote ms, p99 ms, local ms or None, gRPC one-message ms, streamed ms)
    per row; digits rows carry two more columns."""
    out = []
    for line in lines:
        label, words = line[:15].strip(), line[15:].split()
        skip = 5 if digits else 3  # losses (and accuracies), steps/s
        remote, p99 = float(words[skip]), float(words[skip + 1])
        local = None if words[skip + 3] == "—" else float(words[skip + 3])
        out.append((label, float(words[skip - 1]), remote, p99, local, float(words[-2]),
                    float(words[-1])))
    return out


TARGETS = {"muon (keller)": 1.3, "adamw": 3.0}  # remote / local (issue 19)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--table", required=True)
    add_common_arguments(parser, "bench/main_job.sh")
    args = parser.parse_args()

    lines = open(args.table).read().splitlines()
    models = [("digits MLP 64-128-128-10, 600 steps", rows(lines[:PRESETS], True)),
              ("character transformer, 2 layers 64 wide, 300 steps",
               rows(lines[PRESETS:2 * PRESETS], False))]
    out, add = open_section(BEGIN, "Main job: what a remote step costs a training loop "
                                   "(issues 18 and 19)")
    add(f"{generated_by(args.command)}, {cpu_model()}, load average before the run {args.load}. "
        "`scripts/main_job.py` with its own optd (CPU backend) on the same machine, PyTorch "
        "training through `optd.torch.RemoteOptimizer`, the analyzer on (every steps/20 on the "
        "MLP, steps/10 on the transformer). **remote** = `optimizer.step()` through optd, as the "
        "training loop sees it (the gradients written, the step, the new parameters copied in), "
        "measured by the client, the first step left out: through the daemon's shared memory, "
        "which `RemoteOptimizer` attaches by itself with its daemon on this host (README, "
        "\"Clients\"). **local** = the same rule stepped by torch in the same run "
        "(`torch.optim.AdamW`, and Keller's Muon as `optd.local.LocalMuon` writes it), where "
        "torch has it. **gRPC** and **streamed** = the same session's step afterwards with every "
        "step sent over gRPC, in one message each way (`StepSmall`) or on the streamed `Step` "
        "RPC, in the same run.")
    for title, model in models:
        add("")
        add(f"**{title}**")
        add("")
        add("| preset | steps/s | remote ms (p50) | p99 ms | p99 / p50 | local ms | "
            "remote / local | gRPC ms | gRPC / local | streamed ms | streamed / local |")
        add("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for label, steps_per_s, remote, p99, local, small, streamed in model:
            add(f"| {label} | {steps_per_s:.1f} | {remote:.2f} | {p99:.2f} | {p99 / remote:.1f}x | "
                + (f"{local:.2f} | {remote / local:.1f}x |" if local else "— | — |")
                + f" {small:.2f} | " + (f"{small / local:.1f}x |" if local else "— |")
                + f" {streamed:.2f} | " + (f"{streamed / local:.1f}x |" if local else "— |"))
    worst = max((p99 / remote, label, title) for title, model in models
                for label, _, remote, p99, _, _, _ in model)
    add("")
    add("| target | measured | verdict |")
    add("|---|---|---|")
    add(f"| every preset's step p99 ≤ {TAIL_TARGET:.0f}x its p50, analyzer on | worst "
        f"{worst[0]:.1f}x ({worst[1]}, {worst[2].split(',')[0]}) | "
        f"{'met' if worst[0] <= TAIL_TARGET else '**not met**'} |")
    for label, target in TARGETS.items():
        for title, model in models:
            for row in model:
                if row[0] == label and row[4]:
                    ratio = row[2] / row[4]
                    add(f"| {label}: remote step ≤ {target}x local, {title.split(',')[0]} | "
                        f"{ratio:.1f}x (gRPC {row[5] / row[4]:.1f}x, streamed "
                        f"{row[6] / row[4]:.1f}x) | "
                        f"{'met' if ratio <= target else '**not met**'} |")
    add("")
    add("The daemon's own `optd_step_duration_seconds` is one histogram per optimizer label over "
        "every session of that label: in the main job both models of a preset, whose steps differ "
        "several-fold, so its p99 is the transformer's median and its p50 the MLP's — the "
        "\"p99 at 24× p50\" that issue 18 read from it was, as measured here, that mixture (and "
        "the interpolation inside its then coarse buckets), not one session's tail.")
    add("")
    add("The sessions' own tails came from the analyzer: the steps just after an analysis step "
        "took 2-6 ms against a median under 1 ms (rmnp on the MLP, p99 at 3.6-4.1x its p50). The "
        "analyzer's publication of its figures held the metrics lock that every step takes to "
        "set its session's step and memory gauges, and at nice 19 the analysis kept a core while "
        "the reply, or the client waiting for it, waited. The series now sit under three locks "
        "(step state, analysis figures, auto-mode choices) and the analyzer thread runs "
        "SCHED_IDLE; either change alone left p99/p50 at 3.6-3.7x, both brought it to 1.4-1.7x "
        "(the MLP, 600 steps, `analysis_interval=30`, three runs each).")
    add("")
    add("Timings on this 2-vCPU VM are bimodal from one process start to the next: the same "
        "optd binary steps the transformer with Keller's Muon at a p50 of about 5 ms in some "
        "runs and about 7.5 ms in others (eight interleaved runs of two builds, the one before "
        "this section's changes and the one after, gave 4.7-8.3 ms for both), and torch's local "
        "step moves with it (3.2-4.9 ms between two runs), so a remote/local ratio here is one "
        "draw (Keller's Muon on the transformer: 1.2x in the run before these changes, 2.4x in "
        "this one).")
    add("")
    close_section(args.results, BEGIN, END, out)


if __name__ == "__main__":
    main()
