#!/usr/bin/env python3
"""The torch baselines for bench/gpu_bench.cc, timed the same way on the same GPU: Keller Jordan's
reference Newton-Schulz (KellerJordan/Muon muon.py, zeropower_via_newtonschulz5, bf16) on the same
shapes, torch's bf16 matmul at 8192^3, and a single-device torch.optim.Muon + AdamW step on
GPT-2 small, whose tensors come from optd's model catalogue (`optd-loadgen --print_model`, passed
as --model_json). Writes one JSON object. Needs torch with CUDA; exits 77 without it."""
import argparse
import json
import sys

try:
    import torch
except ImportError:
    sys.exit(77)


def zeropower_via_newtonschulz5(G, steps):
    # KellerJordan/Muon muon.py, as published.
    assert G.ndim >= 2
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.bfloat16()
    if G.size(-2) > G.size(-1):
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if G.size(-2) > G.size(-1):
        X = X.mT
    return X


def median_ms(fn, warmup=3, repeats=20):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def gpt2_small_params(device, model_json):
    """The parameters (name, tensor) and the names of those on AdamW, as the catalogue says."""
    with open(model_json) as f:
        tensors = json.load(f)["tensors"]
    shapes = [(t["name"], tuple(int(d) for d in t["shape"])) for t in tensors]
    return _params(device, shapes), {t["name"] for t in tensors if t.get("adamw")}


def _params(device, shapes):
    params = []
    gen = torch.Generator(device=device).manual_seed(0)
    for name, shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, device=device, generator=gen) * 0.02)
        p.grad = torch.randn(shape, device=device, generator=gen) * 0.01
        params.append((name, p))
    return params


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", required=True)
    parser.add_argument("--model_json", required=True,
                        help="GPT-2 small's tensors: optd-loadgen --model=gpt2-small --print_model")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("torch_gpu_reference: torch sees no GPU", file=sys.stderr)
        sys.exit(77)
    device = torch.device("cuda")
    out = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0)}
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = median_ms(lambda: a @ b)
    out["matmul_bf16_tflops"] = 2 * n**3 / (ms * 1e-3) / 1e12
    del a, b
    size = 256 << 20
    pageable = torch.ones(size // 4)
    pinned = pageable.pin_memory()
    target = torch.empty(size // 4, device=device)
    for name, source in [("h2d_pageable_gbps", pageable), ("h2d_pinned_gbps", pinned)]:
        ms = median_ms(lambda: target.copy_(source, non_blocking=True), repeats=10)
        out[name] = size / (ms * 1e-3) / 1e9
        print(f"  torch {name} {out[name]:.1f} GB/s", file=sys.stderr)
    del pageable, pinned, target
    rows = []
    for name, batch, r, c in [("4096x4096", 1, 4096, 4096),
                              ("gpt2 c_attn 12x2304x768", 12, 2304, 768),
                              ("gpt2 c_proj 12x768x768", 12, 768, 768),
                              ("gpt2 c_fc 12x3072x768", 12, 3072, 768),
                              ("gpt2 mlp_proj 12x768x3072", 12, 768, 3072)]:
        g = torch.randn((batch, r, c) if batch > 1 else (r, c), device=device)
        ms = median_ms(lambda: zeropower_via_newtonschulz5(g, 5))
        print(f"  torch NS5 bf16 {name:26s} {ms:8.3f} ms", file=sys.stderr)
        rows.append({"name": name, "ms": ms})
    out["newton_schulz"] = rows

    params, on_adamw = gpt2_small_params(device, args.model_json)
    hidden = [p for name, p in params if name not in on_adamw]
    other = [p for name, p in params if name in on_adamw]
    steps = []
    if hasattr(torch.optim, "Muon"):
        muon = torch.optim.Muon(hidden, lr=0.02, momentum=0.95)
        adamw = torch.optim.AdamW(other, lr=3e-4)

        def step():
            muon.step()
            adamw.step()

        ms = median_ms(step)
        print(f"  torch.optim.Muon + AdamW GPT-2 small step {ms:8.3f} ms", file=sys.stderr)
        steps.append({"optimizer": "torch.optim.Muon+AdamW", "ms": ms})
    out["gpt2_small_step"] = steps
    with open(args.json, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
