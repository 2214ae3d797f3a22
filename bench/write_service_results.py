#!/usr/bin/python3
"""Writes the "Service" section of bench/RESULTS.md from service_bench's and iperf3's JSON
(bench/service.sh runs it). Every ratio is between figures of the same run: the remote step
against the same step in-process, and optd's streaming against iperf3 on the same loopback.
The issue's targets are stated next to the figures and checked, met or not."""

import argparse
import json
import statistics

from results_section import (add_common_arguments, close_section, cpu_count, cpu_model,
                             generated_by, iperf_gbps, open_section)

BEGIN = "<!-- service:begin -->"
END = "<!-- service:end -->"
OVERHEAD_TARGET = 1.10  # remote step at most 10% slower than in-process (keller)
TRANSFER_TARGET = 1.15  # rmnp: remote step at most 15% slower than streaming its bytes alone
STREAMING_TARGET = 0.50  # gradient streaming at least half of raw loopback TCP
BARE_TARGET = 0.90  # optd's streaming at least 90% of a bare gRPC C++ stream of the same bytes


def spread(values, fmt="{:.3f}"):
    """median (min–max)"""
    return (f"{fmt.format(statistics.median(values))} "
            f"({fmt.format(min(values))}–{fmt.format(max(values))})")


def cpu_floor(step, nproc):
    """The least a remote step can take when its bytes and its computation share the CPUs:
    max(bytes alone, (their CPU seconds + the in-process step's CPU seconds) / CPUs)."""
    alone = statistics.median(step["transfer_fp32_s"])
    transfer_cpu = alone * statistics.median(step["transfer_cpu_busy"]) * nproc
    return max(alone, (transfer_cpu + statistics.median(step["in_process_cpu_s"])) / nproc)


def verdict(ok):
    return "met" if ok else "**not met**"



def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bench", required=True)
    parser.add_argument("--iperf", nargs="+", required=True)
    add_common_arguments(parser, "bench/service.sh")
    args = parser.parse_args()

    bench = json.load(open(args.bench))
    tcp = iperf_gbps(args.iperf)
    tcp_gbps = statistics.median(tcp)
    nproc = cpu_count()
    lines, add = open_section(BEGIN, "Service: remote step and streaming (issues 4 and 18)")
    add(f"{generated_by(args.command)}, "
        f"{cpu_model()}, {nproc} CPUs, load average before the run {args.load}. optd (CPU "
        "backend, all cores) runs as its own process; the client is service_bench, on the same "
        "machine over loopback TCP, so both share the two cores. Model: GPT-2 small, "
        f"{bench['tensors']} tensors, {bench['parameters'] / 1e6:.1f}M parameters (48 block "
        "matrices on the matrix preset; embeddings, biases and LayerNorm on AdamW). Medians of "
        f"{bench['repetitions']} repetitions after warm-up.")
    add("")
    add("**Remote step** = one Step call: fp32 (or bf16) gradients of every tensor streamed in, "
        "the step, the new parameters streamed back into the client's buffers; each tensor is "
        "stepped ahead as soon as its gradient is in (per-tensor pipelining, the daemon's "
        "default). **Serial daemon** = the same call on a second daemon started with "
        "`--pipeline_scratch_bytes=0` (receive everything, then step, then send). **Bytes "
        "alone** = the same bytes with no step: UploadParams of the gradients, then GetParams of "
        "the parameters into the same buffers. **In-process** = `Optimizer::Step` of the kernels "
        "library on the same tensors, gradients already staged. **Shared memory** = the remote "
        "step of a client on the daemon's host through its worker's shared-memory region "
        "(README, \"Clients\"): the client library writes the fp32 gradients into it and reads "
        "the parameters out of it, no tensor bytes on the wire.")
    add("")
    add("| preset | in-process s (min–max) | remote s, fp32 wire | / in-process | serial daemon s "
        "| / in-process | bytes alone s | remote / bytes alone | CPU floor s | remote / floor "
        "| remote s, bf16 wire | / in-process | shared memory s | / in-process |")
    add("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s in bench["steps"]:
        local = statistics.median(s["in_process_s"])
        fp32 = statistics.median(s["remote_fp32_s"])
        serial = statistics.median(s["remote_serial_fp32_s"])
        alone = statistics.median(s["transfer_fp32_s"])
        bf16 = statistics.median(s["remote_bf16_s"])
        floor = cpu_floor(s, nproc)
        add(f"| {s['preset']} | {spread(s['in_process_s'])} | {spread(s['remote_fp32_s'])} | "
            f"{fp32 / local:.2f}x | {spread(s['remote_serial_fp32_s'])} | {serial / local:.2f}x | "
            f"{spread(s['transfer_fp32_s'])} | {fp32 / alone:.2f}x | {floor:.3f} | "
            f"{fp32 / floor:.2f}x | {spread(s['remote_bf16_s'])} | {bf16 / local:.2f}x | "
            f"{spread(s['remote_shared_fp32_s'])} | "
            f"{statistics.median(s['remote_shared_fp32_s']) / local:.2f}x |")
    add("")
    gains = ", ".join(
        f"{s['preset']} {statistics.median(s['remote_serial_fp32_s']) - statistics.median(s['remote_fp32_s']):+.2f} s"
        for s in bench["steps"])
    add(f"What pipelining saves per step, serial minus pipelined medians: {gains}. A step's "
        "remote time is bounded below by its bytes on the wire (2 × "
        f"{4 * bench['parameters'] / 1e9:.2f} GB in fp32, half in bf16) and by its computation; "
        "pipelining overlaps the two, so a Muon step of seconds costs little more than the step, "
        "and RMNP's memory-bound step of about a tenth of a second little more than its bytes. "
        "Client and daemon share this machine's two cores, so the overlap is bounded by them "
        "too; on this shared machine the in-process Muon step itself varies by about 10% "
        "between runs, so the keller ratio moves by as much.")
    add("")
    busy = ", ".join(
        f"{s['preset']} {100 * statistics.median(s['transfer_cpu_busy']):.0f}% "
        f"(remote step {100 * statistics.median(s['remote_fp32_cpu_busy']):.0f}%)"
        for s in bench["steps"])
    add("**CPU floor**: here the wire is the CPUs. While the bytes streamed alone the machine's "
        f"CPUs were busy for this share of the time: {busy}; loopback TCP, gRPC and the "
        "client's and daemon's copies are all CPU work on the same cores the step needs. So "
        "no overlap can bring a remote step below (CPU time of the bytes alone + CPU time of "
        f"the in-process step) / {nproc} CPUs, nor below the bytes alone: that is the floor "
        "column, and remote / floor says how much of what overlap could save it leaves "
        "unsaved. On a machine whose transfer is not CPU-bound (a NIC, more cores than the "
        "client and the daemon keep busy) the floor is the larger of the step and its bytes.")
    add("")
    bare = bench["bare_grpc"]
    bare_up, bare_down = statistics.median(bare["up_gbps"]), statistics.median(bare["down_gbps"])
    add(f"**Streaming** against iperf3 over loopback: {tcp_gbps:.2f} GB/s (median of "
        f"{len(tcp)} runs: {', '.join(f'{x:.2f}' for x in tcp)}), and against a bare gRPC C++ "
        "server streaming the same messages with the same client code (service_bench "
        "`--bare_server`: its UploadParams only reads the messages, its GetParams only sends the "
        "model's tensors from its own model-sized buffer, so its bytes come from memory as a "
        "real server's parameters do; the two take turns, repetition by repetition, so both "
        "meet the same state of this shared machine). Up = UploadParams, which receives, checks and "
        "decodes every chunk into staging exactly as Step does with gradients; down = GetParams "
        "into the client's buffers (the daemon copies one step's parameters under the session's "
        "lock on a pipeline thread and sends each piece as soon as it is copied, from that copy: "
        "README, \"Tensor bytes on the wire\"). 1 GB/s = 10⁹ bytes of fp32 payload per second. "
        "Server CPU s/GB: the server process's CPU time (user + system) per GB moved, the "
        "steadier figure on a machine whose throughput swings with its neighbours.")
    add("")
    add("| chunk | up GB/s (min–max) | up / TCP | up / bare | server CPU s/GB up | "
        "down GB/s (min–max) | down / TCP | down / bare | server CPU s/GB down |")
    add("|---|---|---|---|---|---|---|---|---|")

    def cpu(c, way):
        values = c.get(f"{way}_cpu_s_per_gb")
        return f"{statistics.median(values):.2f}" if values else "–"

    best = None
    for c in bench["streaming"]:
        up, down = statistics.median(c["up_gbps"]), statistics.median(c["down_gbps"])
        add(f"| {c['chunk_bytes'] >> 10} KiB | {spread(c['up_gbps'], '{:.2f}')} | "
            f"{100 * up / tcp_gbps:.0f}% | {100 * up / bare_up:.0f}% | {cpu(c, 'up')} | "
            f"{spread(c['down_gbps'], '{:.2f}')} | {100 * down / tcp_gbps:.0f}% | "
            f"{100 * down / bare_down:.0f}% | {cpu(c, 'down')} |")
        if best is None or up + down > best[1]:
            best = (c["chunk_bytes"], up + down)
    add(f"| bare gRPC, {bare['chunk_bytes'] >> 10} KiB | {spread(bare['up_gbps'], '{:.2f}')} | "
        f"{100 * bare_up / tcp_gbps:.0f}% | | {cpu(bare, 'up')} | "
        f"{spread(bare['down_gbps'], '{:.2f}')} | {100 * bare_down / tcp_gbps:.0f}% | | "
        f"{cpu(bare, 'down')} |")
    add("")
    add(f"Fastest chunk size in this run (up + down): {best[0] >> 10} KiB; optd's default is "
        "1 MiB (`--chunk_bytes`).")
    add("")
    add("| target | measured | verdict |")
    add("|---|---|---|")
    for s in bench["steps"]:
        if s["preset"] == "rmnp":
            ratio = statistics.median(s["remote_fp32_s"]) / statistics.median(s["transfer_fp32_s"])
            add(f"| remote step ≤ {TRANSFER_TARGET:.2f}x its bytes streamed alone, rmnp, fp32 "
                f"wire (issue 18) | {ratio:.2f}x | {verdict(ratio <= TRANSFER_TARGET)} |")
        else:
            ratio = statistics.median(s["remote_fp32_s"]) / statistics.median(s["in_process_s"])
            add(f"| remote step ≤ {OVERHEAD_TARGET:.2f}x in-process, {s['preset']}, fp32 wire | "
                f"{ratio:.2f}x | {verdict(ratio <= OVERHEAD_TARGET)} |")
    default = next(c for c in bench["streaming"] if c["chunk_bytes"] == 1 << 20)
    for way, bare_gbps in (("up", bare_up), ("down", bare_down)):
        gbps = statistics.median(default[f"{way}_gbps"])
        add(f"| streaming {way} ≥ {100 * STREAMING_TARGET:.0f}% of raw loopback TCP (1 MiB chunks) "
            f"| {100 * gbps / tcp_gbps:.0f}% | {verdict(gbps / tcp_gbps >= STREAMING_TARGET)} |")
        add(f"| streaming {way} ≥ {100 * BARE_TARGET:.0f}% of a bare gRPC C++ stream (1 MiB "
            f"chunks, issue 18) | {100 * gbps / bare_gbps:.0f}% | "
            f"{verdict(gbps / bare_gbps >= BARE_TARGET)} |")
    add("")
    close_section(args.results, BEGIN, END, lines)


if __name__ == "__main__":
    main()
