#!/usr/bin/python3
"""numpy baselines for issue 3's benchmark, in fp32 at the shapes kernels_bench uses.

- NS5: Newton-Schulz with Keller's coefficients, written as KellerJordan/Muon's
  zeropower_via_newtonschulz5 writes it (X/(‖X‖F + 1e-7), transpose when tall, A = X@X.T,
  B = b*A + c*A@A, X = a*X + B@X), in fp32 where Keller computes in bf16.
- RMNP: one step as Dominator-Index/RMNP's rmnp.py computes it (m = μm + g; u = g + μm;
  u / max(‖u_row‖₂, 1e-12); w -= lr·scale·u), without its bf16 rounding of the update.

Prints one JSON object on stdout (median milliseconds per shape, and which BLAS numpy runs on);
progress goes to stderr. Run with /usr/bin/python3 (Debian's numpy).
"""

import json
import math
import os
import statistics
import sys
import time

import numpy as np

SHAPES = [(768, 768), (768, 3072), (1024, 4096)]
KELLER = (3.4445, -4.7750, 2.0315)
# Repeat each measurement until this much time has passed (and at least MIN_RUNS times).
MIN_SECONDS = 3.0
MIN_RUNS = 7
MAX_RUNS = 200


def log(message):
    print(f"numpy_ns: {message}", file=sys.stderr, flush=True)


def blas_info():
    """Which BLAS numpy's matmul runs on: threadpoolctl when present, else the mapped libraries."""
    info = {"numpy": np.__version__, "source": None, "libraries": []}
    try:
        import threadpoolctl

        pools = [p for p in threadpoolctl.threadpool_info() if p.get("user_api") == "blas"]
        info["source"] = "threadpoolctl"
        info["libraries"] = [
            {k: p.get(k) for k in ("internal_api", "filepath", "version", "architecture",
                                   "threading_layer", "num_threads")}
            for p in pools
        ]
    except ImportError:
        # numpy's extension module is loaded by now, and with it the BLAS it links.
        info["source"] = "/proc/self/maps"
        paths = set()
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1] if len(line.split()) >= 6 else ""
                name = os.path.basename(path)
                if "blas" in name or "mkl" in name or "lapack" in name:
                    paths.add(os.path.realpath(path))
        info["libraries"] = [
            {"internal_api": "openblas" if "openblas" in p else "unknown", "filepath": p}
            for p in sorted(paths)
        ]
    info["openblas"] = any(lib.get("internal_api") == "openblas" for lib in info["libraries"])
    return info


def median_ms(fn):
    """Median, min and max wall time of fn() in ms, after one untimed warm-up."""
    fn()
    times = []
    started = time.perf_counter()
    while len(times) < MAX_RUNS and (len(times) < MIN_RUNS or
                                      time.perf_counter() - started < MIN_SECONDS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
            "max_ms": 1e3 * max(times), "runs": len(times)}


def newton_schulz5(G, steps=5, eps=1e-7):
    """KellerJordan/Muon zeropower_via_newtonschulz5, in G's dtype."""
    a, b, c = KELLER
    X = G
    if G.shape[0] > G.shape[1]:
        X = X.T
    X = X / (np.linalg.norm(X) + eps)
    for _ in range(steps):
        A = X @ X.T
        B = b * A + c * A @ A
        X = a * X + B @ X
    if G.shape[0] > G.shape[1]:
        X = X.T
    return X


def rmnp_step(w, m, g, momentum=0.95, lr=0.02, eps=1e-12, scale=1.0):
    """One RMNP step in place on w and m: sum momentum, Nesterov, row ℓ2 normalization."""
    m *= momentum
    m += g
    u = g + momentum * m
    u /= np.maximum(np.linalg.norm(u, axis=1, keepdims=True), eps)
    w -= (lr * scale) * u


def main():
    blas = blas_info()
    if not blas["openblas"]:
        banner = "!" * 78
        log(banner)
        log("WARNING: numpy is NOT running on OpenBLAS; its figures are not a fair baseline.")
        log(f"WARNING: BLAS found: {blas['libraries']}")
        log("WARNING: install libopenblas0-pthread and select it with update-alternatives.")
        log(banner)
    else:
        log(f"BLAS: {blas['libraries']}")

    rng = np.random.default_rng(3)
    results = {"blas": blas, "ns5": {}, "rmnp": {}}
    for rows, cols in SHAPES:
        key = f"{rows}x{cols}"
        G = rng.standard_normal((rows, cols), dtype=np.float32)
        out = newton_schulz5(G)
        if out.dtype != np.float32 or not np.isfinite(out).all():
            raise SystemExit(f"numpy_ns: NS5 at {key} gave dtype {out.dtype} or non-finite values")
        results["ns5"][key] = median_ms(lambda: newton_schulz5(G))
        log(f"NS5 {key}: {results['ns5'][key]['median_ms']:.2f} ms")

        w = np.zeros((rows, cols), dtype=np.float32)
        m = np.zeros((rows, cols), dtype=np.float32)
        scale = math.sqrt(max(1.0, rows / cols))  # Keller's rule, RMNP's default
        results["rmnp"][key] = median_ms(lambda: rmnp_step(w, m, G, scale=scale))
        results["rmnp"][key]["bytes"] = 5 * 4 * rows * cols
        log(f"RMNP {key}: {results['rmnp'][key]['median_ms']:.3f} ms")
    json.dump(results, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
