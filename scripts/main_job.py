#!/usr/bin/python3
"""Trains real small models through optd with each optimizer and shows what the seeds predict.

Starts optd (build/server/optd, its default backend) unless --server names a running one, then:
- trains an MLP on scikit-learn's handwritten digits, and a small character-level transformer on
  the GNU GPL v3 as Debian ships it (/usr/share/common-licenses/GPL-3, base-files), with each
  optimizer through optd.torch.RemoteOptimizer; a local torch optimizer of the same rule, where
  one exists (Keller's Muon, AdamW), times the step the daemon replaces;
- prints a table per model: final train and validation loss (and accuracy), steps per second,
  and the remote step's time against the local one;
- writes plots to --out: loss curves; the dominance ratios r_min/avg/max of the first hidden
  layer's momentum over steps (seed 000, Figure 3 in miniature); the singular values of its last
  update and its per-neuron update norms (seed 002, Figure 1 in miniature); and, for a 2-layer
  ReLU model, dominance and the RMNP–Muon cosine against hidden width;
- trains the transformer again with Muon's standard Newton–Schulz, Gram Newton–Schulz,
  ns.steps=auto and direction=auto: validation loss, the daemon's compute time per step and each
  tensor's choices over training (auto_modes.txt, auto_modes.png, auto_modes.json);
- when it started the daemon, prints the daemon's Prometheus metrics (scripts/show_metrics.py):
  the service's counters and latencies and each session's optimizer figures.

Usage: scripts/main_job.py [--quick] [--only-auto] [--text-steps N]
                           [--server HOST:PORT | --optd PATH] [--out DIR]
Run with /usr/bin/python3 and PYTHONPATH=build/python (scripts/build makes both).
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

if __name__ == "__main__":  # torch's local steps on optd's OpenBLAS kernels (blas_core.py)
    from blas_core import match_optd_kernels
    match_optd_kernels()

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(REPO, "build/python"))
import optd  # noqa: E402
from optd.local import LocalMuon  # noqa: E402
from optd.torch import RemoteOptimizer, default_assignment  # noqa: E402

# (label, preset of the hidden matrices; None: AdamW everywhere)
OPTIMIZERS = [("muon (keller)", "keller"), ("rmnp", "rmnp"), ("muoneq_row", "muoneq_row"),
              ("muoneq_col", "muoneq_col"), ("muoneq_rowcol", "muoneq_rowcol"),
              ("normuon", "normuon"), ("adamw", None)]
MATRIX_LR = {"keller": 0.02, "rmnp": 0.02, "muoneq_row": 0.01, "muoneq_col": 0.01,
             "muoneq_rowcol": 0.01, "normuon": 0.02}
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


def _die_with_parent():
    """In the daemon's child process: SIGTERM when this job dies, however it dies (Linux's
    PR_SET_PDEATHSIG), so no daemon outlives it."""
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def start_daemon(work, binary):
    log = open(f"{work}/optd.log", "w")
    process = subprocess.Popen(
        [binary, "--listen=127.0.0.1:0", f"--port_file={work}/port", "--metrics_addr=127.0.0.1:0",
         f"--metrics_port_file={work}/metrics_port"], stderr=log, preexec_fn=_die_with_parent)
    log.close()
    deadline = time.time() + 30
    while not (os.path.exists(f"{work}/port") and open(f"{work}/port").read().strip()):
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            raise RuntimeError("optd did not start: " + open(f"{work}/optd.log").read())
        time.sleep(0.05)
    return process, f"127.0.0.1:{open(f'{work}/port').read().strip()}"


def stop_daemon(process):
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


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


def assignment(net, preset):
    """Parameter name -> "matrix" or "adamw": RemoteOptimizer's default grouping, or everything
    on AdamW for the AdamW run."""
    kinds = default_assignment(net.named_parameters())
    return {name: "adamw" for name in kinds} if preset is None else kinds


def make_optimizer(net, client, preset, analysis_interval, session_id="", keep=False):
    # Newton–Schulz and the step in fp32: the presets' bf16 is a GPU's format, which a CPU only
    # emulates (slower, for nothing); with it, `keller` is the rule LocalMuon runs.
    kinds = assignment(net, preset)
    return RemoteOptimizer(net.named_parameters(), client, preset=preset or "keller",
                           lr=MATRIX_LR.get(preset, 0.02), adamw_lr=ADAMW_LR, assign=kinds,
                           overrides={"precision": "fp32"},
                           analysis_interval=analysis_interval if preset else 0,
                           session_id=session_id, keep_session=keep)


def evaluate(net, x, y):
    with torch.no_grad():
        logits = net(x)
        return (torch.nn.functional.cross_entropy(logits, y).item(),
                (logits.argmax(1) == y).float().mean().item())


def local_step_seconds(net, preset, steps=21):
    """The median optimizer step of the same model with the same rule stepped locally in torch,
    where torch has it: torch.optim.AdamW, and Keller's Muon as optd.local.LocalMuon writes it
    (the first step, which allocates the state, left out)."""
    if preset not in (None, "keller"):
        return None
    kinds = assignment(net, preset)
    named = list(net.named_parameters())
    hidden = [p for name, p in named if kinds[name] == "matrix"]
    rest = [p for name, p in named if kinds[name] == "adamw"]
    optimizers = [torch.optim.AdamW(rest, lr=ADAMW_LR)] + ([LocalMuon(hidden, 0.02)]
                                                           if hidden else [])
    for _, p in named:
        p.grad = torch.randn_like(p)
    seconds = []
    for _ in range(steps):
        start = time.time()
        for o in optimizers:
            o.step()
        seconds.append(time.time() - start)
    return float(np.median(seconds[1:]))


def path_step_seconds(optimizer, backward, path, steps=21):
    """The median optimizer.step() of the same session after its training with every step on
    `path`, each after backward() (the first left out): "small", one gRPC message each way
    (StepSmall, without shared memory), or "stream" (the streamed Step, as before StepSmall)."""
    optimizer.step_path = path
    seconds = []
    for _ in range(steps):
        optimizer.zero_grad()
        backward()
        start = time.time()
        optimizer.step()
        seconds.append(time.time() - start)
    optimizer.step_path = "auto"
    return float(np.median(seconds[1:]))


def step_quantiles(step_seconds):
    """The median and 99th percentile of optimizer.step() through optd, the first step (which
    allocates the daemon's result buffers) left out."""
    seconds = np.array(step_seconds[1:] or step_seconds)
    return {"remote_step_s": float(np.median(seconds)),
            "remote_p99_s": float(np.percentile(seconds, 99))}


def train_digits(client, label, preset, steps, batch=64, keep=False):
    (x, y), (vx, vy) = digits()
    net = mlp()
    optimizer = make_optimizer(net, client, preset, analysis_interval=max(1, steps // 20),
                               session_id=f"digits-{preset or 'adamw'}" if keep else "", keep=keep)
    generator = torch.Generator().manual_seed(1)
    losses, dominance, step_seconds = [], [], []
    progress = Progress(label, steps)
    first = "0.weight"
    last_update = None
    loop_start = time.time()
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
    loop_seconds = time.time() - loop_start
    train_loss, train_acc = evaluate(net, x, y)
    valid_loss, valid_acc = evaluate(net, vx, vy)
    local = local_step_seconds(mlp(), preset)
    def backward():
        torch.nn.functional.cross_entropy(net(x[:batch]), y[:batch]).backward()

    grpc_small = path_step_seconds(optimizer, backward, "small")
    streamed = path_step_seconds(optimizer, backward, "stream")
    optimizer.close(delete=not keep)
    return {"label": label, "preset": preset, "losses": losses, "dominance": dominance,
            "update": last_update, "train_loss": train_loss, "train_acc": train_acc,
            "valid_loss": valid_loss, "valid_acc": valid_acc,
            **step_quantiles(step_seconds), "local_step_s": local, "small_step_s": grpc_small,
            "streamed_step_s": streamed,
            "steps_per_s": steps / loop_seconds}


TEXT = "/usr/share/common-licenses/GPL-3"  # Debian's base-files: real English, always there


class Block(torch.nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.qkv = torch.nn.Linear(width, 3 * width, bias=False)
        self.proj = torch.nn.Linear(width, width, bias=False)
        self.fc = torch.nn.Linear(width, 4 * width, bias=False)
        self.out = torch.nn.Linear(4 * width, width, bias=False)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, c // self.heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) / (c // self.heads) ** 0.5
        causal = torch.ones(t, t, dtype=torch.bool).triu(1)
        attention = scores.masked_fill(causal, float("-inf")).softmax(-1)
        x = x + self.proj((attention @ v).transpose(1, 2).reshape(b, t, c))
        return x + self.out(torch.nn.functional.gelu(self.fc(self.norm2(x))))


class CharTransformer(torch.nn.Module):
    """A 2-layer, 4-head, 64-wide decoder over characters: embeddings and the head on AdamW by
    name, the attention and MLP matrices on the matrix preset."""

    def __init__(self, vocab, context, width=64, layers=2, heads=4, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, width)
        self.pos_embed = torch.nn.Embedding(context, width)
        self.blocks = torch.nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids) + self.pos_embed(torch.arange(ids.size(1)))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def text_data():
    text = open(TEXT, encoding="utf-8").read()
    vocab = sorted(set(text))
    ids = torch.tensor([vocab.index(c) for c in text], dtype=torch.long)
    split = int(0.9 * len(ids))
    return len(vocab), ids[:split], ids[split:]


def text_batch(ids, context, batch, generator):
    starts = torch.randint(0, len(ids) - context - 1, (batch,), generator=generator)
    x = torch.stack([ids[s:s + context] for s in starts])
    y = torch.stack([ids[s + 1:s + context + 1] for s in starts])
    return x, y


def train_text(client, label, preset, steps, context=64, batch=16, keep=False):
    vocab, train, valid = text_data()
    net = CharTransformer(vocab, context)
    optimizer = make_optimizer(net, client, preset, analysis_interval=max(1, steps // 10),
                               session_id=f"text-{preset or 'adamw'}" if keep else "", keep=keep)
    generator = torch.Generator().manual_seed(3)
    losses, step_seconds = [], []
    progress = Progress(label, steps)
    loop_start = time.time()
    for step in range(1, steps + 1):
        x, y = text_batch(train, context, batch, generator)
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x).flatten(0, 1), y.flatten())
        loss.backward()
        start = time.time()
        optimizer.step()
        step_seconds.append(time.time() - start)
        losses.append(loss.item())
        if step % 5 == 0 or step == steps:
            progress.update(step, f"loss {loss.item():.3f}")
    loop_seconds = time.time() - loop_start
    evaluation = torch.Generator().manual_seed(4)
    with torch.no_grad():
        valid_loss = np.mean([torch.nn.functional.cross_entropy(
            net(x).flatten(0, 1), y.flatten()).item()
            for x, y in (text_batch(valid, context, batch, evaluation) for _ in range(8))])
    local = local_step_seconds(CharTransformer(vocab, context), preset)
    sample = text_batch(train, context, batch, torch.Generator().manual_seed(5))
    def backward():
        torch.nn.functional.cross_entropy(net(sample[0]).flatten(0, 1),
                                          sample[1].flatten()).backward()

    grpc_small = path_step_seconds(optimizer, backward, "small")
    streamed = path_step_seconds(optimizer, backward, "stream")
    optimizer.close(delete=not keep)
    return {"label": label, "preset": preset, "losses": losses,
            "train_loss": float(np.mean(losses[-max(1, steps // 10):])),
            "valid_loss": float(valid_loss),
            **step_quantiles(step_seconds), "local_step_s": local, "small_step_s": grpc_small,
            "streamed_step_s": streamed,
            "steps_per_s": steps / loop_seconds}


# Issue 20's comparison on the transformer: Keller's Muon with the standard Newton–Schulz, with
# Gram Newton–Schulz, and with the seeds' closed loops choosing per matrix (fp32 throughout).
AUTO_VARIANTS = [("keller", {"ns.method": "standard"}),
                 ("keller + Gram", {"ns.method": "gram"}),
                 ("ns.steps=auto", {"ns.method": "standard", "ns.steps": "auto"}),
                 ("direction=auto", {"ns.method": "standard", "direction": "auto"}),
                 # The same rule with a lower cosine bar, to see what row normalization does
                 # where it fires.
                 ("direction=auto, cos ≥ 0.75", {"ns.method": "standard", "direction": "auto",
                                                 "auto.min_cosine": 0.75})]


def compute_phase(metrics_url):
    """optd_step_phase_seconds{phase="compute"}'s (sum, count) from the daemon's /metrics: the
    optimizer's own time per step, without the transfer."""
    import urllib.request
    from show_metrics import parse
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        samples = parse(response.read().decode())
    found = {name: value for name, labels, value in samples
             if labels.get("phase") == "compute" and name.startswith("optd_step_phase_seconds_")}
    return (found.get("optd_step_phase_seconds_sum", 0.0),
            found.get("optd_step_phase_seconds_count", 0.0))


def auto_comparison(client, steps, metrics_url, context=64, batch=16, passes=1):
    """Trains the character transformer once per AUTO_VARIANTS entry (same data, same start):
    validation loss, the daemon's compute time per step (from its metrics, where this job
    started the daemon), and the auto modes' per-tensor choices at every decision. With
    `passes` > 1 the variants train again, in reverse order and then alternating, and the compute
    time is the median over the passes (the losses and choices are the same bits each time)."""
    order = list(range(len(AUTO_VARIANTS)))
    runs = {}
    for p in range(passes):
        for i in (order if p % 2 == 0 else order[::-1]):
            run = train_variant(client, *AUTO_VARIANTS[i], steps, metrics_url, context, batch)
            if i in runs:
                runs[i]["compute_passes"].append(run["compute_s"])
            else:
                run["compute_passes"] = [run["compute_s"]]
                runs[i] = run
    for run in runs.values():
        if run["compute_s"] is not None:
            run["compute_s"] = float(np.median(run["compute_passes"]))
    return [runs[i] for i in order]


def train_variant(client, label, overrides, steps, metrics_url, context, batch):
    """One AUTO_VARIANTS entry trained on the transformer: its losses, validation loss, the
    daemon's compute time per step and the auto modes' choices at every decision."""
    vocab, train, valid = text_data()
    interval = max(1, steps // 30)
    net = CharTransformer(vocab, context)
    kinds = assignment(net, "keller")
    settings = {"precision": "fp32", **overrides}
    if "auto" in (overrides.get("ns.steps"), overrides.get("direction")):
        settings["auto.interval"] = interval
    optimizer = RemoteOptimizer(net.named_parameters(), client, preset="keller",
                                lr=MATRIX_LR["keller"], adamw_lr=ADAMW_LR, assign=kinds,
                                overrides=settings)
    generator = torch.Generator().manual_seed(3)
    before = compute_phase(metrics_url) if metrics_url else None
    losses, choices = [], []
    progress = Progress(label, steps)
    for step in range(1, steps + 1):
        x, y = text_batch(train, context, batch, generator)
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x).flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step == 1 or step % interval == 0:
            current = optimizer.session.choices()
            if current:
                choices.append((step, {name: (float(np.mean(c.newton_schulz_steps)),
                                              float(np.mean(c.row_normalize)),
                                              c.small_sv_share, c.dominance_ratio_min,
                                              c.rmnp_muon_cosine)
                                       for name, c in current.items()}))
        if step % 5 == 0 or step == steps:
            progress.update(step, f"loss {loss.item():.3f}")
    after = compute_phase(metrics_url) if metrics_url else None
    evaluation = torch.Generator().manual_seed(4)
    with torch.no_grad():
        valid_loss = np.mean([torch.nn.functional.cross_entropy(
            net(x).flatten(0, 1), y.flatten()).item()
            for x, y in (text_batch(valid, context, batch, evaluation) for _ in range(8))])
    optimizer.close()
    compute = ((after[0] - before[0]) / max(1.0, after[1] - before[1])
               if before is not None else None)
    return {"label": label, "losses": losses, "valid_loss": float(valid_loss),
            "train_loss": float(np.mean(losses[-max(1, steps // 10):])),
            "compute_s": compute, "choices": choices}


def print_auto_table(runs):
    lines = [f"{'variant':<27} {'train_loss':>10} {'valid_loss':>10} {'compute ms/step':>15} "
             f"{'final choices':<40}"]
    for r in runs:
        final = ""
        if r["choices"]:
            step, last = r["choices"][-1]
            steps = np.mean([v[0] for v in last.values()])
            rn = np.mean([v[1] for v in last.values()])
            final = f"step {step}: mean NS steps {steps:.2f}, row-normalized {100 * rn:.0f}%"
        compute = f"{1e3 * r['compute_s']:>15.2f}" if r["compute_s"] is not None else f"{'—':>15}"
        lines.append(f"{r['label']:<27} {r['train_loss']:>10.4f} {r['valid_loss']:>10.4f} "
                     f"{compute} {final:<40}")
    for line in lines:
        print(line)
    return lines


def plot_auto(runs, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(24, 4.8))
    for r in runs:
        window = min(10, len(r["losses"]))
        curve = np.convolve(r["losses"], np.ones(window) / window, mode="valid")
        axes[0].plot(np.arange(len(curve)) + window, curve,
                     label=f"{r['label']} (valid {r['valid_loss']:.3f})")
    axes[0].set(xlabel="step", ylabel=f"train loss ({window}-step mean)", yscale="log",
                title="Character transformer: Muon variants")
    axes[0].legend()
    # ns.steps=auto: each tensor's step count; direction=auto: the cosine it decides on, with the
    # threshold row normalization must clear (the dominance must clear its own too), and the
    # decisions that chose row normalization ringed.
    panels = ((axes[1], "ns.steps=auto", 0, "Newton–Schulz steps", None),
              (axes[2], "direction=auto", 4, "cos(rownormalize(V), polar(V))", 0.9),
              (axes[3], "direction=auto, cos ≥ 0.75", 4, "cos(rownormalize(V), polar(V))",
               0.75))
    for ax, label, column, what, min_cosine in panels:
        run = next((r for r in runs if r["label"] == label), None)
        if run is None:
            continue
        if run["choices"]:
            names = sorted(run["choices"][-1][1])
            for name in names:
                xs = [step for step, c in run["choices"] if name in c]
                ys = [c[name][column] for _, c in run["choices"] if name in c]
                line, = ax.plot(xs, ys, marker=".", label=name)
                if column == 4:
                    chosen = [(x, y) for x, y, (_, c) in zip(xs, ys, run["choices"])
                              if c[name][1] > 0]
                    if chosen:
                        ax.scatter(*zip(*chosen), s=60, facecolors="none",
                                   edgecolors=line.get_color())
        if min_cosine is not None:
            ax.axhline(min_cosine + 0.05 * (1 - min_cosine), color="gray", linestyle="--",
                       linewidth=0.8, label=f"row normalization from here (auto.min_cosine "
                                            f"{min_cosine} + hysteresis); ringed: chosen")
            ax.set_ylim(0, 1)
        ax.set(xlabel="step", ylabel=what, title=f"{label}: per tensor, at each decision")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "auto_modes.png"), dpi=110)


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
            optimizer.close()
            done += 1
            progress.update(done)
    return rows


def plot(results, text_results, sweep, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    for ax, runs, title in ((axes[0], results, "Digits MLP"),
                            (axes[1], text_results, "Character transformer, GPL-3 text")):
        for r in runs:
            window = min(10, len(r["losses"]))
            curve = np.convolve(r["losses"], np.ones(window) / window, mode="valid")
            ax.plot(np.arange(len(curve)) + window, curve, label=r["label"])
        ax.set(xlabel="step", ylabel=f"train loss ({window}-step mean)", yscale="log",
               title=f"{title}, trained through optd")
        ax.legend()
    fig.tight_layout()
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


def print_table(title, runs, accuracy):
    print(f"\n{title}")
    header = (f"{'optimizer':<15} {'train_loss':>10} " + (f"{'train_acc':>9} " if accuracy else "")
              + f"{'valid_loss':>10} " + (f"{'valid_acc':>9} " if accuracy else "")
              + f"{'steps/s':>8} {'remote ms':>9} {'p99 ms':>7} {'p99/p50':>7} {'local ms':>8} "
              + f"{'overhead':>8} {'grpc ms':>8} {'stream ms':>9}")
    print(header)
    lines = []
    for r in runs:
        local = r["local_step_s"]
        line = (f"{r['label']:<15} {r['train_loss']:>10.4f} "
                + (f"{100 * r['train_acc']:>8.1f}% " if accuracy else "")
                + f"{r['valid_loss']:>10.4f} "
                + (f"{100 * r['valid_acc']:>8.1f}% " if accuracy else "")
                + f"{r['steps_per_s']:>8.1f} {1e3 * r['remote_step_s']:>9.2f} "
                + f"{1e3 * r['remote_p99_s']:>7.2f} "
                + f"{r['remote_p99_s'] / r['remote_step_s']:>6.1f}x "
                + (f"{1e3 * local:8.2f} {r['remote_step_s'] / local:7.1f}x" if local
                   else f"{'—':>8} {'—':>8}")
                + f" {1e3 * r['small_step_s']:>8.2f} {1e3 * r['streamed_step_s']:>9.2f}")
        print(line)
        lines.append(line)
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few steps of each, for tests")
    parser.add_argument("--server", help="a running optd (default: start one here)")
    parser.add_argument("--optd", default=os.path.join(REPO, "build/server/optd"),
                        help="the optd binary to start when there is no --server")
    parser.add_argument("--out", default=os.path.join(REPO, "build/main_job"))
    parser.add_argument("--only-auto", action="store_true",
                        help="only the transformer's comparison of Gram Newton–Schulz and the "
                             "auto modes (bench/auto.sh)")
    parser.add_argument("--passes", type=int, default=1,
                        help="with --only-auto: train each variant this many times, for the "
                             "median compute time")
    parser.add_argument("--text-steps", type=int, help="transformer steps (default 300; 10 "
                        "with --quick)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    steps = 30 if args.quick else 600
    text_steps = args.text_steps or (10 if args.quick else 300)
    sweep_steps = 20 if args.quick else 150
    widths = [16, 64] if args.quick else [16, 32, 64, 128, 256, 512]
    daemon = None
    work = tempfile.mkdtemp(prefix="optd_main_job_")
    # SIGTERM unwinds like Ctrl-C, through the `finally` that stops the daemon.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        if args.server is None:
            daemon, server = start_daemon(work, args.optd)
        else:
            server = args.server
        keep = daemon is not None  # sessions stay in our own daemon, for its metrics to show
        with optd.Client(server, timeout=60) as client:
            client.wait_ready()
            print(f"optd at {server}")
            if args.only_auto:
                metrics_url = (f"http://127.0.0.1:{open(f'{work}/metrics_port').read().strip()}"
                               "/metrics" if daemon is not None else None)
                auto_runs = auto_comparison(client, text_steps, metrics_url, passes=args.passes)
                print_auto_table(auto_runs)
                with open(os.path.join(args.out, "auto_modes.json"), "w") as f:
                    json.dump(auto_runs, f)
                plot_auto(auto_runs, args.out)
                return
            print(f"digits MLP 64-128-128-10, {steps} steps per optimizer")
            results = [train_digits(client, label, preset, steps, keep=keep)
                       for label, preset in OPTIMIZERS]
            print(f"character transformer (2 layers, 64 wide) on {TEXT}, {text_steps} steps")
            text_results = [train_text(client, label, preset, text_steps, keep=keep)
                            for label, preset in OPTIMIZERS]
            sweep = width_sweep(client, widths, sweep_steps)
            metrics_url = (f"http://127.0.0.1:{open(f'{work}/metrics_port').read().strip()}"
                           "/metrics" if daemon is not None else None)
            print(f"character transformer: Muon with Gram Newton–Schulz and the auto modes, "
                  f"{text_steps} steps each")
            auto_runs = auto_comparison(client, text_steps, metrics_url)
            if daemon is not None:
                port = open(f"{work}/metrics_port").read().strip()
                print(f"\n== optd's metrics: http://127.0.0.1:{port}/metrics ==")
                subprocess.run([sys.executable, os.path.join(REPO, "scripts/show_metrics.py"),
                                f"http://127.0.0.1:{port}/metrics",
                                os.path.join(args.out, "optimizer_figures.png")], check=True)
    finally:
        if daemon is not None:
            stop_daemon(daemon)
        shutil.rmtree(work, ignore_errors=True)

    table = print_table("Digits MLP (train: 1400 images, validation: 397)", results, True)
    table += print_table("Character transformer (train: last 10% of steps' batches; validation: "
                         "8 held-out batches)", text_results, False)
    print("(steps/s: whole training steps; remote ms: the median optimizer.step() through optd, "
          "p99 ms its 99th percentile (analysis steps included), both measured by the client, "
          "through the daemon's shared memory where the optimizer attached it; local ms: the same "
          "rule stepped in torch on this machine, where torch has it; grpc ms and stream ms: the "
          "median step of the same session afterwards with every step sent over gRPC, in one "
          "message each way (StepSmall) or streamed (Step))")
    print(f"\n2-layer ReLU after {sweep_steps} steps: hidden width vs seed 000's dominance and the "
          "RMNP–Muon cosine (as measured)")
    print(f"{'optimizer':<8} {'width':>6} {'r_avg':>8} {'r_min':>8} {'cos':>7}")
    for preset, width, r_avg, r_min, cosine in sweep:
        print(f"{preset:<8} {width:>6} {r_avg:>8.3f} {r_min:>8.3g} {cosine:>7.3f}")
    print("\nCharacter transformer, Muon: standard Newton–Schulz, Gram, and the seeds' closed "
          "loops (compute: the daemon's optimizer time per step, from its metrics)")
    auto_table = print_auto_table(auto_runs)
    with open(os.path.join(args.out, "table.txt"), "w") as f:
        f.write("\n".join(table) + "\n")
    with open(os.path.join(args.out, "auto_modes.txt"), "w") as f:
        f.write("\n".join(auto_table) + "\n")
    with open(os.path.join(args.out, "auto_modes.json"), "w") as f:
        json.dump(auto_runs, f)
    plot(results, text_results, sweep, args.out)
    plot_auto(auto_runs, args.out)
    print(f"\nplots in {args.out}: loss_curves.png dominance.png update_spectra.png "
          "width_sweep.png auto_modes.png" + (" optimizer_figures.png" if keep else ""))


if __name__ == "__main__":
    main()
