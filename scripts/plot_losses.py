#!/usr/bin/python3
"""Plots the main job's loss curves: one line per optimizer from train_example's CSV.

Usage: scripts/plot_losses.py losses.csv loss_curves.png
"""
import csv
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    curves = defaultdict(lambda: ([], []))
    with open(sys.argv[1], newline="") as f:
        for row in csv.DictReader(f):
            steps, losses = curves[row["optimizer"]]
            steps.append(int(row["step"]))
            losses.append(float(row["train_loss"]))
    fig, ax = plt.subplots(figsize=(9, 5.5))
    colors = plt.cm.tab20.colors  # 20 distinct colours: one per preset, none repeated
    for index, (name, (steps, losses)) in enumerate(curves.items()):
        # A 20-step running mean: the batch losses are noisy enough to hide the ordering.
        window = 20
        smooth = [sum(losses[max(0, i - window + 1):i + 1]) / (i - max(0, i - window + 1) + 1)
                  for i in range(len(losses))]
        ax.plot(steps, smooth, label=name, linewidth=1.4, color=colors[(2 * index) % 20 + index // 10])
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (cross-entropy, 20-step mean)")
    ax.set_title("Two-layer ReLU classifier trained through optd's kernels, per optimizer")
    ax.grid(alpha=0.3)
    ax.legend(ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=120)
    print(f"wrote {sys.argv[2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
