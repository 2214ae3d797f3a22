#!/usr/bin/python3
"""The per-call floor of a step through the Python client (issue 18): p50 and p99 of a tiny step
(one 64-element AdamW tensor) as the streamed Step, as StepSmall and through the worker's shared
memory, against a unary GetServerInfo on the same daemon and channel, in the same run; and a
step of one million elements (4 MB each way) as StepSmall and through shared memory. Prints one
JSON object.

Usage: PYTHONPATH=build/python bench/floor_bench.py --server=HOST:PORT [--calls=N]"""
import argparse
import json
import time

import numpy as np

import optd

LARGE = 1000000  # the large step's tensor: 4 MB of fp32 each way, one message's worth

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
        sessions, steps = {}, {}
        for elements in (64, LARGE):
            sessions[elements] = client.create_session(
                f'tensors {{ name: "b" shape: [{elements}] group: "v" }} '
                'groups { name: "v" preset: "adamw" } shared_memory: true')
            sessions[elements].attach_shared_memory()
            steps[elements] = 0

        def step_on(elements, path):
            steps[elements] += 1
            sessions[elements].step(steps[elements],
                                    {"b": np.full(elements, 0.01, dtype=np.float32)}, path=path)

        large_calls = max(10, args.calls // 10)
        out = {"calls": args.calls,
               "server_info": timed(args.calls, client.server_info),
               "step": timed(args.calls, lambda: step_on(64, "stream")),
               "step_small": timed(args.calls, lambda: step_on(64, "small")),
               "step_shared": timed(args.calls, lambda: step_on(64, "shared")),
               "large_elements": LARGE, "large_calls": large_calls,
               "large_small": timed(large_calls, lambda: step_on(LARGE, "small")),
               "large_shared": timed(large_calls, lambda: step_on(LARGE, "shared"))}
        for session in sessions.values():
            session.delete()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
