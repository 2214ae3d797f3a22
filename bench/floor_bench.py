#!/usr/bin/python3
"""The per-call floor of a step through the Python client (issue 18): p50 and p99 of a tiny step
(one 64-element AdamW tensor) as the streamed Step and as StepSmall, against a unary
GetServerInfo on the same daemon and channel, in the same run. Prints one JSON object.

Usage: PYTHONPATH=build/python bench/floor_bench.py --server=HOST:PORT [--calls=N]"""
import argparse
import json
import time

import numpy as np

import optd


def timed(calls, fn):
    for _ in range(calls // 10):
        fn()
    ms = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        ms.append(1e3 * (time.perf_counter() - start))
    ms.sort()
    return {"p50_ms": ms[len(ms) // 2], "p99_ms": ms[int(0.99 * (len(ms) - 1))]}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--server", default="127.0.0.1:50051")
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    with optd.Client(args.server, timeout=30) as client:
        client.wait_ready()
        session = client.create_session(
            'tensors { name: "b" shape: [64] group: "v" } groups { name: "v" preset: "adamw" }')
        gradient = {"b": np.full(64, 0.01, dtype=np.float32)}
        step = [0]

        def step_on(path):
            step[0] += 1
            session.step(step[0], gradient, path=path)

        out = {"calls": args.calls,
               "server_info": timed(args.calls, client.server_info),
               "step": timed(args.calls, lambda: step_on("stream")),
               "step_small": timed(args.calls, lambda: step_on("small"))}
        session.delete()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
