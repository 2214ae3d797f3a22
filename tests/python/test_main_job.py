"""The Python main job end to end in its quick mode, against the test daemon: its tables have a
row per optimizer and model with the figures in range, and every plot file is written."""

import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def test_quick_main_job(tmp_path):
    # As the README's main command runs it: the job starts its own optd and shows its metrics.
    optd_binary = os.environ.get("OPTD", os.path.join(REPO, "build/server/optd"))
    run = subprocess.run([sys.executable, os.path.join(REPO, "scripts/main_job.py"), "--quick",
                          "--optd", optd_binary, "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = (tmp_path / "table.txt").read_text().splitlines()
    optimizers = ["muon (keller)", "rmnp", "muoneq_row", "muoneq_col", "muoneq_rowcol",
                  "normuon", "adamw"]
    assert [row.split("  ")[0].strip() for row in rows] == optimizers * 2
    for row in rows[:7]:  # digits: losses and accuracies
        words = row[15:].split()
        train_loss, train_acc, valid_loss, valid_acc = (float(w.rstrip("%")) for w in words[:4])
        # 30 steps on ten classes: well under chance's loss of ln 10 = 2.30, above chance's 10%.
        assert 0 < train_loss < 2.3 and 10 < train_acc <= 100, row
        assert 0 < valid_loss < 2.3 and 10 < valid_acc <= 100, row
        assert float(words[4]) > 0 and float(words[5]) > 0, row  # steps/s, remote ms
        assert float(words[6]) >= float(words[5]), row  # p99 ms, at least the median
    vocabulary = len(set(open("/usr/share/common-licenses/GPL-3", encoding="utf-8").read()))
    for row in rows[7:]:  # text: losses below a uniform guess over the characters
        train_loss, valid_loss = (float(w) for w in row[15:].split()[:2])
        assert 0 < train_loss < np.log(vocabulary) and 0 < valid_loss < np.log(vocabulary), row
    # Issue 20's comparison: a row per variant; the daemon's compute time per step; the auto
    # modes' choices recorded at their decisions (step 1 and every interval), within the bounds.
    auto_rows = (tmp_path / "auto_modes.txt").read_text().splitlines()[1:]
    assert [row[:27].strip() for row in auto_rows] == [
        "keller", "keller + Gram", "ns.steps=auto", "direction=auto", "direction=auto, cos ≥ 0.75"]
    for row in auto_rows:
        train_loss, valid_loss, compute_ms = (float(w) for w in row[27:].split()[:3])
        assert 0 < valid_loss < np.log(vocabulary) and compute_ms > 0, row
    runs = {r["label"]: r for r in json.loads((tmp_path / "auto_modes.json").read_text())}
    assert not runs["keller"]["choices"] and not runs["keller + Gram"]["choices"]
    for label in ("ns.steps=auto", "direction=auto", "direction=auto, cos ≥ 0.75"):
        decisions = runs[label]["choices"]
        assert decisions and decisions[0][0] == 1, label
        for _, tensors in decisions:
            assert tensors, label
            for steps, row_normalized, share, _, _ in tensors.values():
                assert 2 <= steps <= 10 and 0 <= row_normalized <= 1 and 0 <= share <= 1
    for plot in ("loss_curves.png", "dominance.png", "update_spectra.png", "width_sweep.png",
                 "optimizer_figures.png", "auto_modes.png"):
        assert (tmp_path / plot).stat().st_size > 10_000, plot
    assert "hidden width vs seed 000's dominance" in run.stdout
    # The daemon's metrics, with a row of optimizer figures per kept session.
    assert "optd's metrics" in run.stdout and "digits-keller" in run.stdout
    assert "text-normuon" in run.stdout
