"""The Python examples run as a user runs them (issue 19, part 8): examples/train_remote.py
against a running daemon and starting its own, examples/train_ddp.py under torchrun with 2 gloo
ranks in both modes."""

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("torch")

from conftest import OPTD, REPO  # noqa: E402


def run(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    done = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def losses(output):
    return {int(s): float(v) for s, v in re.findall(r"step (\d+): loss ([0-9.]+)", output)}


@pytest.mark.parametrize("reach", ["server", "start"])
def test_train_remote_trains_saves_and_resumes(daemon, reach):
    args = ["--server", daemon] if reach == "server" else ["--optd", OPTD]
    output = run("examples/train_remote.py", *args)
    assert "resumed at step 50 from" in output, output
    seen = losses(output)
    assert sorted(seen) == [25, 50, 75, 100], output
    assert seen[100] < seen[25], output


@pytest.mark.parametrize("mode", [[], ["--ddp"]])
def test_train_ddp_under_torchrun_with_two_ranks(daemon, mode):
    # --redirects/--tee 1: Debian's torch 1.13 on Python 3.11 parses their default "0" to None.
    output = run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                 "--redirects", "1", "--tee", "1", "examples/train_ddp.py", "--server", daemon,
                 *mode)
    assert "2 ranks, one session" in output and "every rank holds the same parameters" in output, \
        output
    seen = losses(output)
    assert seen[60] < seen[20], output
