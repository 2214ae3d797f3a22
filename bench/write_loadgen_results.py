#!/usr/bin/python3
"""Writes the "Load generator" section of bench/RESULTS.md from optd-loadgen's JSON report and
iperf3's JSON (bench/loadgen.sh runs both): optd's gradient throughput under 1, 4 and 16
concurrent sessions as a share of raw loopback TCP measured in the same run, with latency and the
daemon's own split of a step into phases."""

import argparse
import json
import statistics

from results_section import (add_common_arguments, close_section, cpu_model, generated_by,
                             iperf_gbps, open_section)

BEGIN = "<!-- loadgen:begin -->"
END = "<!-- loadgen:end -->"
FAIRNESS_TARGET = 0.20  # every session's steps/s within ±20% of the sessions' mean (issue 18)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--report", required=True)
    parser.add_argument("--iperf", nargs="+", required=True)
    parser.add_argument("--fairness", help="a 16-session run over a fixed number of steps")
    add_common_arguments(parser, "bench/loadgen.sh")
    args = parser.parse_args()

    report = json.load(open(args.report))
    tcp = iperf_gbps(args.iperf)
    ceiling = statistics.median(tcp)
    lines, add = open_section(BEGIN, "Load generator: the update path under load (issues 8 and 18)")
    add(f"{generated_by(args.command)}, "
        f"{cpu_model()}, load average before the run {args.load}. optd on the CPU backend, "
        f"`optd-loadgen` in another process on the same machine: model "
        f"`{report['model']}` ({int(report['model_elements']):,} parameters, two GPT-2-small "
        f"blocks), preset `{report['preset']}`, wire {report['wire_dtype']}, results returned "
        "as parameters, closed loop, each level measured in 2 s windows until three agree "
        "within 10% (at most 10, or the duration bound). Raw TCP: iperf3 over the same "
        f"loopback, median of {len(tcp)} runs of 3 s: {ceiling:.2f} GB/s "
        f"({min(tcp):.2f}–{max(tcp):.2f}).")
    add("")
    add("A step moves the gradient in and the new parameters out, so the stream carries twice "
        "the model per step; \"share of TCP\" is (gradient + result GB/s) / iperf3's GB/s. "
        "The server columns are optd's own mean time per step in each phase "
        "(`optd_step_phase_seconds`), scraped from its /metrics before and after the level.")
    add("")
    add("| sessions | steps/s | gradient GB/s | share of TCP | p50 ms | p99 ms | max ms | "
        "receive ms | compute ms | send ms | stable |")
    add("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for level in report["levels"]:
        phases = level.get("server_phase_seconds", {})
        moved = level["gradient_gbps"] + level["result_gbps"]
        add(f"| {level['concurrency']} | {level['steps_per_second']:.2f} | "
            f"{level['gradient_gbps']:.3f} | {100 * moved / ceiling:.0f}% | "
            f"{1e3 * level['latency_p50_s']:.0f} | {1e3 * level['latency_p99_s']:.0f} | "
            f"{1e3 * level['latency_max_s']:.0f} | {1e3 * phases.get('receive', 0):.0f} | "
            f"{1e3 * phases.get('compute', 0):.0f} | {1e3 * phases.get('send', 0):.0f} | "
            f"{'yes' if level['stable'] else 'no'} |")
    add("")
    first, last = report["levels"][0], report["levels"][-1]
    add(f"From {first['concurrency']} to {last['concurrency']} sessions, steps/s went from "
        f"{first['steps_per_second']:.2f} to {last['steps_per_second']:.2f} "
        f"({last['steps_per_second'] / first['steps_per_second']:.2f}×) and p99 from "
        f"{1e3 * first['latency_p99_s']:.0f} to {1e3 * last['latency_p99_s']:.0f} ms. The "
        "load generator and the daemon share the machine's cores with the daemon's decoding, "
        "update and result encoding, so once one session keeps them busy, more sessions queue "
        "(the receive and send phases grow with them) rather than add throughput; on a machine "
        "with cores to spare, or a GPU backend, the same run shows where the transport "
        "saturates.")
    add("")
    busiest = (json.load(open(args.fairness))["levels"][0] if args.fairness
               else max(report["levels"], key=lambda level: level["concurrency"]))
    sessions = busiest.get("sessions", [])
    if sessions:
        rates = [s.get("steps_per_second", 0.0) for s in sessions]
        mean = statistics.mean(rates)
        spread = busiest.get("fairness_spread", 0.0)
        add(f"**Fairness** at {busiest['concurrency']} sessions (closed loop, each session "
            "stepping as fast as the daemon answers it, measured over "
            f"{int(busiest['steps'])} steps in {busiest['seconds']:.0f} s, "
            "`optd-loadgen --concurrency=16 --steps=480`): every session's own steps/s and "
            f"latency. Mean {mean:.3f} steps/s per session; the farthest session is "
            f"{100 * spread:.0f}% from it (target ±{100 * FAIRNESS_TARGET:.0f}%: "
            f"{'met' if spread <= FAIRNESS_TARGET else '**not met**'}).")
        add("")
        add("| session | steps | steps/s | / mean | p50 ms | p99 ms |")
        add("|---:|---:|---:|---:|---:|---:|")
        for s in sessions:
            add(f"| {s.get('index', 0)} | {int(s.get('steps', 0))} | "
                f"{s.get('steps_per_second', 0.0):.3f} | "
                f"{s.get('steps_per_second', 0.0) / mean:.2f} | "
                f"{1e3 * s.get('latency_p50_s', 0.0):.0f} | "
                f"{1e3 * s.get('latency_p99_s', 0.0):.0f} |")
        add("")
    close_section(args.results, BEGIN, END, lines)


if __name__ == "__main__":
    main()
