"""optd.torch.RemoteOptimizer against a plain local torch implementation of the same rules: Keller's
Muon (written out here; torch 1.13 has no torch.optim.Muon) for the hidden weights and
torch.optim.AdamW for the rest, over several steps with an LR scheduler, and state_dict /
load_state_dict through the daemon's checkpoints."""

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import optd  # noqa: E402
from optd.torch import RemoteOptimizer, default_assignment  # noqa: E402


class LocalMuon(torch.optim.Optimizer):
    """KellerJordan/Muon's update in fp32: EMA momentum, Nesterov, 5 Newton–Schulz steps with
    (3.4445, −4.7750, 2.0315) on X/(‖X‖+1e-7) (transposed when tall), scale √max(1, rows/cols)."""

    def __init__(self, params, lr, momentum=0.95):
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - group["momentum"])
                u = p.grad.lerp(buf, group["momentum"])
                x = u.T if u.size(0) > u.size(1) else u
                x = x / (x.norm() + 1e-7)
                for _ in range(5):
                    a = x @ x.T
                    x = 3.4445 * x + (-4.7750 * a + 2.0315 * a @ a) @ x
                o = x.T if u.size(0) > u.size(1) else x
                p.add_(o * max(1, p.size(0) / p.size(1)) ** 0.5, alpha=-group["lr"])


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 24),
                               torch.nn.ReLU(), torch.nn.Linear(24, 4))


def batch(step):
    g = torch.Generator().manual_seed(step)
    return torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g)


def train_step(net, optimizer, step):
    x, y = batch(step)
    optimizer.zero_grad()
    loss = torch.nn.functional.cross_entropy(net(x), y)
    loss.backward()
    optimizer.step()
    return loss.item()


def test_matches_local_torch_over_steps_with_a_scheduler(daemon):
    remote_net, local_net = model(), model()
    with optd.Client(daemon, timeout=30) as client:
        # Hidden weights on Muon; biases and the output head (the last 2-D parameter) on AdamW.
        remote = RemoteOptimizer(remote_net.named_parameters(), client, preset="keller",
                                 lr=0.02, adamw_lr=3e-3, overrides={"precision": "fp32"})
        assert [len(g["params"]) for g in remote.param_groups] == [2, 4]
        hidden = [local_net[0].weight, local_net[2].weight]
        rest = [p for p in local_net.parameters() if all(p is not h for h in hidden)]
        local_muon = LocalMuon(hidden, lr=0.02)
        local_adamw = torch.optim.AdamW(rest, lr=3e-3)

        class Both:
            def zero_grad(self):
                local_muon.zero_grad()
                local_adamw.zero_grad()

            def step(self):
                local_muon.step()
                local_adamw.step()

        schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)
                      for o in (remote, local_muon, local_adamw)]
        for step in range(1, 7):
            remote_loss = train_step(remote_net, remote, step)
            local_loss = train_step(local_net, Both(), step)
            assert remote_loss == pytest.approx(local_loss, abs=1e-5)
            for (name, r), l in zip(remote_net.named_parameters(), local_net.parameters()):
                np.testing.assert_allclose(r.detach().numpy(), l.detach().numpy(), rtol=0,
                                           atol=2e-5, err_msg=f"{name} after step {step}")
            for s in schedulers:
                s.step()
        assert remote.steps == 6
        # The daemon holds the rate step 6 used (0.02 halved twice); the scheduler's latest
        # halving reaches it with the next step.
        info = remote.session.info()
        assert {t.config.name: t.lr for t in info.tensors}["0.weight"] == pytest.approx(0.02 / 4)
        assert remote.param_groups[0]["lr"] == pytest.approx(0.02 / 8)
        remote.session.delete()


def test_state_dict_maps_onto_checkpoints(daemon):
    net = model()
    with optd.Client(daemon, timeout=30) as client:
        optimizer = RemoteOptimizer(net.named_parameters(), client, lr=0.02,
                                    session_id="torch_state")
        for step in range(1, 3):
            train_step(net, optimizer, step)
        saved = optimizer.state_dict()
        assert saved["optd"]["step"] == 2
        kept = copy.deepcopy(net.state_dict())
        for step in range(3, 5):
            train_step(net, optimizer, step)
        assert not torch.equal(net[0].weight, kept["0.weight"])
        optimizer.load_state_dict(saved)
        for name, value in net.state_dict().items():
            assert torch.equal(value, kept[name]), name
        assert optimizer.steps == 2
        train_step(net, optimizer, 3)  # and it steps on from there
        assert optimizer.steps == 3
        with pytest.raises(ValueError, match="session"):
            optimizer.load_state_dict({"optd": {"session_id": "other", "step": 2}})
        with pytest.raises(ValueError, match="assign"):
            RemoteOptimizer(net.named_parameters(), client, assign={"nope": "adamw"})
        optimizer.session.delete()


def test_default_grouping_and_its_override(daemon):
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(30, 8)
            self.hidden = torch.nn.Linear(8, 8)
            self.norm = torch.nn.LayerNorm(8)
            self.out = torch.nn.Linear(8, 30, bias=False)

    net = Tiny()
    assert default_assignment(net.named_parameters()) == {
        "embed.weight": "adamw", "hidden.weight": "matrix", "hidden.bias": "adamw",
        "norm.weight": "adamw", "norm.bias": "adamw", "out.weight": "adamw"}
    with optd.Client(daemon, timeout=30) as client:
        optimizer = RemoteOptimizer(net.named_parameters(), client,
                                    assign={"out.weight": "matrix"})
        groups = {t.config.name: t.config.group for t in optimizer.session.info().tensors}
        assert groups["out.weight"] == groups["hidden.weight"] == "matrices"
        assert groups["embed.weight"] == "vectors"
        optimizer.session.delete()
