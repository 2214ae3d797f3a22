#!/usr/bin/python3
"""Trains real small models through optd with each optimizer and shows what the seeds predict.

Starts optd (build/server/optd, its default backend) unless --server names a running one, then:
- trains an MLP on scikit-learn's handwritten digits with each optimizer, through
  optd.torch.RemoteOptimizer, next to the same training with a local torch optimizer where one
  exists (Keller's Muon, AdamW), for the remote-step overhead;
- prints a table: final train and validation loss and accuracy, steps per second, and the
  remote step's time against the local one;
- writes plots to --out: loss curves; the dominance ratios r_min/avg/max of the first hidden
  layer's momentum over steps (seed 000, Figure 3 in miniature); the singular values of its last
  update and its per-neuron update norms (seed 002, Figure 1 in miniature); and, for a 2-layer
  ReLU model, dominance and the RMNP–Muon cosine against hidden width.

Usage: scripts/main_job.py [--quick] [--server HOST:PORT] [--out DIR]
Run with /usr/bin/python3 and PYTHONPATH=build/python (scripts/build makes both).
"""

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(REPO, "build/python"))
import optd  # noqa: E402
from optd.torch import RemoteOptimizer  # noqa: E402

# (label, preset of the hidden matrices; None: AdamW everywhere)
OPTIMIZERS = [("muon (keller)", "keller"), ("rmnp", "rmnp"), ("muoneq_row", "muoneq_row"),
              ("normuon", "normuon"), ("adamw", None)]
MATRIX_LR = {"keller": 0.02, "rmnp": 0.02, "muoneq_row": 0.01, "normuon": 0.02}
ADAMW_LR = 3e-3


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, label, total):
        self.label, self.total, self.start = label, total, time.time()

    def update(self, done, note=""):
        width = 30
        filled = int(width * done / self.total)
        rate = done / max(time.time() - self.start, 1e-9)
        sys.stderr.write(f"\r  {self.label:<16} [{'#' * filled}{'.' * (width - filled)}] "
                         f"{done}/{self.total} {rate:6.1f} it/s {note}")
        if done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def start_daemon(work):
    binary = os.path.join(REPO, "build/server/optd")
    process = subprocess.Popen(
        [binary, "--listen=127.0.0.1:0", f"--port_file={work}/port", "--metrics_addr=127.0.0.1:0",
         f"--metrics_port_file={work}/metrics_port"], stderr=open(f"{work}/optd.log", "w"))
    deadline = time.time() + 30
    while not (os.path.exists(f"{work}/port") and open(f"{work}/port").read().strip()):
        if process.poll() is not None or time.time() > deadline:
            raise RuntimeError("optd did not start: " + open(f"{work}/optd.log").read())
        time.sleep(0.05)
    return process, f"127.0.0.1:{open(f'{work}/port').read().strip()}"


def digits():
    from sklearn.datasets import load_digits
    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def mlp(width=128, depth=2, inputs=64, classes=10, seed=0):
    torch.manual_seed(seed)
    layers, size = [], inputs
    for _ in range(depth):
        layers += [torch.nn.Linear(size, width), torch.nn.ReLU()]
        size = width
    layers.append(torch.nn.Linear(size, classes))
    return torch.nn.Sequential(*layers)


def make_optimizer(net, client, preset, analysis_interval):
    named = list(net.named_parameters())
    head = named[-2][0]  # the output layer's weight: AdamW (DESIGN.md's default grouping)
    if preset is None:
        assign = {name: "adamw" for name, _ in named}
        return RemoteOptimizer(named, client, adamw_lr=ADAMW_LR, assign=assign)
    return RemoteOptimizer(named, client, preset=preset, lr=MATRIX_LR[preset], adamw_lr=ADAMW_LR,
                           assign={head: "adamw"}, analysis_interval=analysis_interval)


def evaluate(net, x, y):
    with torch.no_grad():
        logits = net(x)
        return (torch.nn.functional.cross_entropy(logits, y).item(),
                (logits.argmax(1) == y).float().mean().item())


def local_step_seconds(net, preset, steps=20):
    """The same model's optimizer step with a local torch optimizer of the same rule, where one
    exists: torch.optim.AdamW, or Keller's Muon as tests/python/test_torch.py writes it."""
    if preset not in (None, "keller"):
        return None
    sys.path.insert(0, os.path.join(REPO, "tests/python"))
    from test_torch import LocalMuon
    params = list(net.parameters())
    hidden = [p for p in params[:-2] if p.dim() == 2] if preset else []
    rest = [p for p in params if all(p is not h for h in hidden)]
    optimizers = [torch.optim.AdamW(rest, lr=ADAMW_LR)] + ([LocalMuon(hidden, 0.02)]
                                                           if hidden else [])
    for p in params:
        p.grad = torch.randn_like(p)
    start = time.time()
    for _ in range(steps):
        for o in optimizers:
            o.step()
    return (time.time() - start) / steps


def train_digits(client, label, preset, steps, batch=64):
    (x, y), (vx, vy) = digits()
    net = mlp()
    optimizer = make_optimizer(net, client, preset, analysis_interval=max(1, steps // 20))
    generator = torch.Generator().manual_seed(1)
    losses, dominance, step_seconds = [], [], []
    progress = Progress(label, steps)
    first = "0.weight"
    last_update = None
    for step in range(1, steps + 1):
        index = torch.randint(0, len(y), (batch,), generator=generator)
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x[index]), y[index])
        loss.backward()
        before = net[0].weight.detach().clone()
        start = time.time()
        optimizer.step()
        step_seconds.append(time.time() - start)
        last_update = (net[0].weight.detach() - before).numpy()
        losses.append(loss.item())
        if preset is not None and step % max(1, steps // 20) == 0:
            for figures in optimizer.session.analysis():
                if figures.tensor == first and (not dominance or dominance[-1][0] != figures.step):
                    dominance.append((figures.step, figures.dominance_ratio_min,
                                      figures.dominance_ratio_avg, figures.dominance_ratio_max))
        if step % 10 == 0 or step == steps:
            progress.update(step, f"loss {loss.item():.3f}")
    train_loss, train_acc = evaluate(net, x, y)
    valid_loss, valid_acc = evaluate(net, vx, vy)
    local = local_step_seconds(mlp(), preset)
    optimizer.session.delete()
    return {"label": label, "preset": preset, "losses": losses, "dominance": dominance,
            "update": last_update, "train_loss": train_loss, "train_acc": train_acc,
            "valid_loss": valid_loss, "valid_acc": valid_acc,
            "remote_step_s": float(np.median(step_seconds)), "local_step_s": local,
            "steps_per_s": steps / max(sum(step_seconds), 1e-9)}


def width_sweep(client, widths, steps):
    """Dominance r_avg and the RMNP–Muon cosine of the hidden layer of a 2-layer ReLU model
    (one hidden layer) after `steps` steps, per width and optimizer."""
    (x, y), _ = digits()
    rows = []
    progress = Progress("width sweep", len(widths) * 2)
    done = 0
    for preset in ("keller", "rmnp"):
        for width in widths:
            net = mlp(width=width, depth=1)
            optimizer = make_optimizer(net, client, preset, analysis_interval=steps)
            generator = torch.Generator().manual_seed(2)
            for _ in range(steps):
                index = torch.randint(0, len(y), (64,), generator=generator)
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(net(x[index]), y[index]).backward()
                optimizer.step()
            figures = []
            deadline = time.time() + 60
            while not figures and time.time() < deadline:
                figures = [f for f in optimizer.session.analysis() if f.tensor == "0.weight"]
                time.sleep(0.02)
            if figures:
                rows.append((preset, width, figures[0].dominance_ratio_avg,
                             figures[0].dominance_ratio_min, figures[0].rmnp_muon_cosine))
            optimizer.session.delete()
            done += 1
            progress.update(done)
    return rows


def plot(results, sweep, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in results:
        curve = np.convolve(r["losses"], np.ones(10) / 10, mode="valid")
        ax.plot(np.arange(len(curve)) + 10, curve, label=r["label"])
    ax.set(xlabel="step", ylabel="train loss (10-step mean)", yscale="log",
           title="Digits MLP trained through optd")
    ax.legend()
    fig.savefig(os.path.join(out, "loss_curves.png"), dpi=110)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=True)
    for ax, (column, name) in zip(axes, ((1, "r_min"), (2, "r_avg"), (3, "r_max"))):
        for r in results:
            if r["dominance"]:
                d = np.array(r["dominance"])
                ax.plot(d[:, 0], d[:, column], marker=".", label=r["label"])
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set(xlabel="step", title=f"dominance {name} of VVᵀ, layer 1 (seed 000)", yscale="log")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "dominance.png"), dpi=110)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        s = np.linalg.svd(r["update"], compute_uv=False)
        axes[0].plot(s / s[0], label=r["label"])
        norms = np.sort(np.linalg.norm(r["update"], axis=1))[::-1]
        axes[1].plot(norms / norms.mean(), label=r["label"])
    axes[0].set(xlabel="index", ylabel="σ / σ_max", yscale="log",
                title="singular values of the last update, layer 1")
    axes[1].set(xlabel="neuron (sorted)", ylabel="row norm / mean",
                title="per-neuron update norms, layer 1 (seed 002)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "update_spectra.png"), dpi=110)

    if sweep:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for preset in ("keller", "rmnp"):
            rows = [r for r in sweep if r[0] == preset]
            widths = [r[1] for r in rows]
            axes[0].plot(widths, [r[2] for r in rows], marker="o", label=f"{preset} r_avg")
            axes[0].plot(widths, [r[3] for r in rows], marker="x", linestyle="--",
                         label=f"{preset} r_min")
            axes[1].plot(widths, [r[4] for r in rows], marker="o", label=preset)
        axes[0].axhline(1.0, color="gray", linewidth=0.8)
        axes[0].set(xscale="log", xlabel="hidden width", title="dominance of VVᵀ vs width")
        axes[1].set(xscale="log", xlabel="hidden width", title="RMNP–Muon cosine vs width")
        axes[0].legend()
        axes[1].legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out, "width_sweep.png"), dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few steps of each, for tests")
    parser.add_argument("--server", help="a running optd (default: start one here)")
    parser.add_argument("--out", default=os.path.join(REPO, "build/main_job"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    steps = 30 if args.quick else 600
    widths = [16, 64] if args.quick else [16, 32, 64, 128, 256, 512]
    daemon = None
    work = tempfile.mkdtemp(prefix="optd_main_job_")
    if args.server is None:
        daemon, server = start_daemon(work)
    else:
        server = args.server
    try:
        with optd.Client(server, timeout=60) as client:
            client.wait_ready()
            print(f"optd at {server}; digits MLP 64-128-128-10, {steps} steps per optimizer")
            results = [train_digits(client, label, preset, steps) for label, preset in OPTIMIZERS]
            sweep = width_sweep(client, widths, 20 if args.quick else 150)
    finally:
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=60)

    print(f"\n{'optimizer':<15} {'train_loss':>10} {'train_acc':>9} {'valid_loss':>10} "
          f"{'valid_acc':>9} {'steps/s':>8} {'remote ms':>9} {'local ms':>8} {'overhead':>8}")
    table = []
    for r in results:
        local = r["local_step_s"]
        overhead = f"{r['remote_step_s'] / local:7.1f}x" if local else "       —"
        line = (f"{r['label']:<15} {r['train_loss']:>10.4f} {100 * r['train_acc']:>8.1f}% "
                f"{r['valid_loss']:>10.4f} {100 * r['valid_acc']:>8.1f}% {r['steps_per_s']:>8.1f} "
                f"{1e3 * r['remote_step_s']:>9.2f} "
                f"{(f'{1e3 * local:8.2f}' if local else '       —')} {overhead}")
        print(line)
        table.append(line)
    if sweep:
        print(f"\n2-layer ReLU after {20 if args.quick else 150} steps: hidden width vs seed 000's "
              "dominance and the RMNP–Muon cosine (as measured)")
        print(f"{'optimizer':<8} {'width':>6} {'r_avg':>8} {'r_min':>8} {'cos':>7}")
        for preset, width, r_avg, r_min, cosine in sweep:
            print(f"{preset:<8} {width:>6} {r_avg:>8.3f} {r_min:>8.3f} {cosine:>7.3f}")
    with open(os.path.join(args.out, "table.txt"), "w") as f:
        f.write("\n".join(table) + "\n")
    plot(results, sweep, args.out)
    print(f"\nplots in {args.out}: loss_curves.png dominance.png update_spectra.png width_sweep.png")


if __name__ == "__main__":
    main()
