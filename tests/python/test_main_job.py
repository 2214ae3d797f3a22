"""The Python main job end to end in its quick mode, against the test daemon: its table has a
row per optimizer with the figures in range, and every plot file is written."""

import os
import subprocess
import sys

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def test_quick_main_job(daemon, tmp_path):
    run = subprocess.run([sys.executable, os.path.join(REPO, "scripts/main_job.py"), "--quick",
                          "--server", daemon, "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = (tmp_path / "table.txt").read_text().splitlines()
    assert [row.split("  ")[0].strip() for row in rows] == [
        "muon (keller)", "rmnp", "muoneq_row", "normuon", "adamw"]
    for row in rows:
        numbers = [float(word.rstrip("%x")) for word in row.split()[-8:]
                   if word not in ("—",) and word.rstrip("%x").replace(".", "").isdigit()]
        train_loss, train_acc, valid_loss, valid_acc = numbers[:4]
        # 30 steps on ten classes: well under chance's loss of ln 10 = 2.30, above chance's 10%.
        assert 0 < train_loss < 2.3 and 10 < train_acc <= 100, row
        assert 0 < valid_loss < 2.3 and 10 < valid_acc <= 100, row
    for plot in ("loss_curves.png", "dominance.png", "update_spectra.png", "width_sweep.png"):
        assert (tmp_path / plot).stat().st_size > 10_000, plot
    assert "hidden width vs seed 000's dominance" in run.stdout
