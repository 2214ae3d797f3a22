#!/usr/bin/python3
"""Shows a running optd's Prometheus metrics: the service figures, a table of each session's
optimizer figures (the session aggregates of DESIGN.md's "Metrics"), and a bar chart of them.

Usage: scripts/show_metrics.py http://127.0.0.1:9464/metrics [figures.png]
"""
import re
import sys
import urllib.request
from collections import defaultdict

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

# (column, metric, the figure's own label)
FIGURES = [
    ("r_min", "optd_dominance_ratio", ("stat", "min")),
    ("r_avg", "optd_dominance_ratio", ("stat", "avg")),
    ("rmnp_cos", "optd_rmnp_muon_cosine", None),
    ("srank_V", "optd_stable_rank", ("of", "momentum")),
    ("cond_V", "optd_condition_number", ("of", "momentum")),
    ("ns_err", "optd_newton_schulz_polar_error", None),
    ("ns_<0.6", "optd_newton_schulz_small_sv_fraction", None),
    ("cv_rows", "optd_neuron_norm_cv", ("of", "update")),
    ("upd_rms", "optd_update_rms", None),
]


def parse(text):
    samples = []
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match:
            labels = dict(LABEL.findall(match.group(2) or ""))
            samples.append((match.group(1), labels, float(match.group(3))))
    return samples


def quantile(buckets, q):
    """histogram_quantile over cumulative (le, count) pairs, as Prometheus interpolates."""
    buckets = sorted(buckets)
    total = buckets[-1][1]
    if total == 0:
        return float("nan")
    rank, previous_le, previous_count = q * total, 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return previous_le
            return previous_le + (le - previous_le) * (rank - previous_count) / (
                count - previous_count)
        previous_le, previous_count = le, count
    return previous_le


def main() -> int:
    if len(sys.argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    with urllib.request.urlopen(sys.argv[1], timeout=10) as response:
        samples = parse(response.read().decode())

    def total(name, **want):
        return sum(v for n, labels, v in samples
                   if n == name and all(labels.get(k) == x for k, x in want.items()))

    print(f"sessions {total('optd_sessions'):.0f}, Step RPCs "
          f"{total('optd_rpc_total', method='Step', code='OK'):.0f} ok / "
          f"{total('optd_rejected_total'):.0f} rejected, received "
          f"{total('optd_bytes_received_total') / 2**20:.1f} MiB, sent "
          f"{total('optd_bytes_sent_total') / 2**20:.1f} MiB, analyses "
          f"{total('optd_analysis_duration_seconds_count'):.0f} "
          f"({total('optd_analysis_skipped_total'):.0f} skipped while busy)")
    by_optimizer = defaultdict(list)
    for name, labels, value in samples:
        if name == "optd_step_duration_seconds_bucket":
            by_optimizer[labels["optimizer"]].append((float(labels["le"]), value))
    # The daemon's histogram is per optimizer label, over every session that label names (here
    # both models of a preset, whose steps differ several-fold), interpolated inside buckets: a
    # spread of the label's steps, not one session's tail (the tables' p99 is each session's).
    for optimizer, buckets in sorted(by_optimizer.items()):
        print(f"  step latency {optimizer:<14} p50 {1e3 * quantile(buckets, 0.5):7.2f} ms"
              f"  p99 {1e3 * quantile(buckets, 0.99):7.2f} ms  (every session of the label)")

    table = defaultdict(dict)
    steps = {}
    for name, labels, value in samples:
        if "session" not in labels:
            continue
        if name == "optd_analysis_step":
            steps[labels["session"]] = int(value)
        if "tensor" in labels:
            continue  # the session aggregate has no tensor label
        for column, metric, own in FIGURES:
            if name == metric and (own is None or labels.get(own[0]) == own[1]):
                table[labels["session"]][column] = value
    if not table:
        print("no optimizer figures yet (sessions analyze every analysis_interval steps)")
        return 0
    print("\nper session (mean over its matrix tensors):")
    print(f"{'session':<22} {'step':>5} " + " ".join(f"{c:>9}" for c, _, _ in FIGURES))
    for session in sorted(table):
        row = table[session]
        print(f"{session:<22} {steps.get(session, 0):>5} " +
              " ".join(f"{row.get(c, float('nan')):>9.4g}" for c, _, _ in FIGURES))
    if len(sys.argv) == 3:
        plot(table, sys.argv[2])
        print(f"\nplot: {sys.argv[2]}")
    return 0


def plot(table, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sessions = sorted(table)
    panels = [("r_min", "dominance r_min of VVᵀ (seed 000)"),
              ("rmnp_cos", "cos(RMNP, polar)"),
              ("ns_err", "‖NS(V) − polar(V)‖F / ‖polar(V)‖F"),
              ("cv_rows", "CV of update row norms (seed 002)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2))
    for ax, (column, title) in zip(axes, panels):
        ax.barh(sessions, [table[s].get(column, 0.0) for s in sessions], color="tab:blue")
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=8)
        if column == "r_min":
            ax.axvline(1.0, color="tab:red", linewidth=1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
