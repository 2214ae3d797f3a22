"""optd.torch.RemoteOptimizer across a torch.distributed process group (issue 19, part 1): one
session per job, rank 0 creating it and the others joining with its id and token. With
grad_reduce="optd" every rank sends its own gradients as its worker (also overlapped with its
backward) and the daemon steps their mean; with grad_reduce="ddp" DistributedDataParallel has
reduced them already, rank 0 steps and broadcasts. 2 and 4 gloo ranks on the CPU
(torch.multiprocessing): every rank's parameters must equal, bit for bit, one process stepping
the averaged gradients through its own session."""

import faulthandler
import os
import sys
import tempfile
import traceback

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import optd  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from optd.torch import RemoteOptimizer  # noqa: E402

STEPS = 3
RANK_TIMEOUT_S = 180


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 24),
                               torch.nn.ReLU(), torch.nn.Linear(24, 4))


def batch(rank, step):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)


def _worker(rank, size, mode, address, work):
    """One rank: trains STEPS steps on its own batches and saves the gradients it had after
    backward and its final parameters (names without DDP's "module." prefix)."""
    # A rank stuck for minutes prints every thread's stack and exits (mp.spawn then fails the
    # test) instead of holding the suite until CI's timeout.
    faulthandler.dump_traceback_later(RANK_TIMEOUT_S, exit=True)
    dist.init_process_group("gloo", init_method=f"file://{work}/rendezvous", rank=rank,
                            world_size=size)
    outcome, failed = {}, False
    try:
        net = model()
        with torch.no_grad():  # ranks start apart: the optimizer must make them equal
            for p in net.parameters():
                p.add_(0.01 * rank)
        if mode == "ddp":
            net = torch.nn.parallel.DistributedDataParallel(net)
        with optd.Client(address, timeout=60) as client:
            preset = "no-such-preset" if mode == "fail" and rank == 0 else "keller"
            try:
                optimizer = RemoteOptimizer(net.named_parameters(), client, preset=preset,
                                            lr=0.02, grad_reduce="ddp" if mode == "ddp"
                                            else "optd", overlap=mode == "overlap")
            except Exception as e:  # noqa: BLE001 -- the failure mode saves what each rank saw
                outcome["error"] = f"{type(e).__name__}: {e}"
                return
            outcome["initial"] = {name.removeprefix("module."): p.detach().clone()
                                  for name, p in net.named_parameters()}
            grads = []
            with optimizer:
                for step in range(1, STEPS + 1):
                    x, y = batch(rank, step)
                    optimizer.zero_grad()
                    torch.nn.functional.cross_entropy(net(x), y).backward()
                    grads.append({name.removeprefix("module."): p.grad.clone()
                                  for name, p in net.named_parameters()})
                    optimizer.step()
                outcome["session"] = optimizer.session.id
                outcome["steps"] = optimizer.steps
                outcome["overlapped"] = optimizer.overlapped_steps
            outcome["grads"] = grads
            outcome["params"] = {name.removeprefix("module."): p.detach().clone()
                                 for name, p in net.named_parameters()}
    except BaseException:  # noqa: BLE001 -- printed, and the exit code tells mp.spawn
        failed = True
        traceback.print_exc()
    finally:
        torch.save(outcome, f"{work}/rank{rank}.pt")
        dist.destroy_process_group()
        # Debian's torch 1.13 can deadlock in a DDP rank's teardown: the Reducer's last reference
        # destroys the gloo process group on the main thread, which holds the GIL and waits for
        # the group's lock, while a gloo worker holds that lock freeing a finished collective's
        # tensor and waits for the GIL (gdb, about once in 20 runs here). Everything this rank
        # had to do is saved above, so it leaves without tearing down.
        sys.stderr.flush()
        os._exit(1 if failed else 0)


def run_ranks(size, mode, daemon):
    with tempfile.TemporaryDirectory(prefix="optd_ddp_") as work:
        mp.spawn(_worker, args=(size, mode, daemon, work), nprocs=size, join=True)
        return [torch.load(f"{work}/rank{r}.pt") for r in range(size)]


def mean_as_the_daemon_takes_it(gradients):
    """The workers' mean in float32, summed in worker order, then divided (server/session.h)."""
    total = gradients[0].numpy().astype(np.float32).copy()
    for g in gradients[1:]:
        total = total + g.numpy()
    return torch.from_numpy(total / np.float32(len(gradients)))


@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("mode", ["optd", "ddp", "overlap"])
def test_every_rank_equals_one_process_stepping_the_averaged_gradients(daemon, mode, size):
    ranks = run_ranks(size, mode, daemon)
    errors = [r["error"] for r in ranks if "error" in r]
    assert not errors, errors
    assert len({r["session"] for r in ranks}) == 1, "the ranks must share one session"
    assert all(r["steps"] == STEPS for r in ranks)
    assert all(r["overlapped"] == (STEPS if mode == "overlap" else 0) for r in ranks)
    for r in ranks[1:]:
        for name, value in ranks[0]["params"].items():
            assert torch.equal(r["params"][name], value), f"{name} differs between ranks"

    net = model()
    for r in ranks:  # every rank starts from rank 0's parameters
        for name, p in net.named_parameters():
            assert torch.equal(r["initial"][name], p.detach()), name
    with optd.Client(daemon, timeout=60) as client, \
            RemoteOptimizer(net.named_parameters(), client, preset="keller",
                            lr=0.02) as optimizer:
        for step in range(STEPS):
            for name, p in net.named_parameters():
                if mode != "ddp":
                    p.grad = mean_as_the_daemon_takes_it([r["grads"][step][name] for r in ranks])
                else:  # DDP's all-reduce left every rank the same mean
                    for r in ranks[1:]:
                        assert torch.equal(r["grads"][step][name], ranks[0]["grads"][step][name])
                    p.grad = ranks[0]["grads"][step][name].clone()
            optimizer.step()
    for name, p in net.named_parameters():
        got = ranks[0]["params"][name]
        assert torch.equal(got, p.detach()), \
            f"{name}: max |difference| {(got - p.detach()).abs().max().item()}"
    with optd.Client(daemon, timeout=60) as client:  # the with-blocks deleted both sessions
        live = {s.session_id for s in client.list_sessions()}
    assert ranks[0]["session"] not in live


def test_a_failure_on_rank_0_is_raised_on_every_rank(daemon):
    ranks = run_ranks(2, "fail", daemon)
    assert "no-such-preset" in ranks[0]["error"], ranks[0]["error"]
    assert ranks[1]["error"].startswith("RuntimeError: optd: rank 0 of the process group failed"), \
        ranks[1]["error"]
    assert "no-such-preset" in ranks[1]["error"]
