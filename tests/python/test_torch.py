"""optd.torch.RemoteOptimizer against a plain local torch implementation of the same rules: Keller's
Muon (optd.local.LocalMuon; torch 1.13 has no torch.optim.Muon) for the hidden weights and
torch.optim.AdamW for the rest, over several steps with an LR scheduler, and state_dict /
load_state_dict through the daemon's checkpoints. Sharded over three daemons it trains bit for bit
as over one, through a scheduler, a checkpoint and restore, and a reshard onto two."""

import copy
import io
import pickle
import shutil
import tempfile

import grpc

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import optd  # noqa: E402
from conftest import start_shared_daemons  # noqa: E402
from optd.local import LocalMuon  # noqa: E402
from optd.torch import RemoteOptimizer, default_assignment  # noqa: E402


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
            optimizer.load_state_dict({"optd": {"session_id": "other", "step": 2},
                                       "param_groups": []})
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


def test_the_model_stays_in_charge_of_its_parameters(daemon):
    # A parameter changed in place after the optimizer was built (model.load_state_dict, a
    # re-initialization) is what the next step starts from; frozen parameters stay out.
    net = model()
    net[0].bias.requires_grad_(False)
    with optd.Client(daemon, timeout=30) as client:
        optimizer = RemoteOptimizer(net.named_parameters(), client, lr=0.0, adamw_lr=0.0)
        assert "0.bias" not in optimizer.session.shapes()
        with torch.no_grad():
            net[0].weight.fill_(1.0)
        train_step(net, optimizer, 1)
        assert torch.equal(net[0].weight, torch.ones_like(net[0].weight))
        # No gradient at all: nothing is sent, nothing changes.
        optimizer.zero_grad(set_to_none=True)
        optimizer.step()
        assert optimizer.steps == 1
        with pytest.raises(NotImplementedError):
            optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
        optimizer.close()


def test_resume_in_a_new_optimizer_from_a_saved_state_dict(daemon):
    net = model()
    with optd.Client(daemon, timeout=30) as client:
        first = RemoteOptimizer(net.named_parameters(), client, lr=0.02, session_id="resumed")
        for step in range(1, 3):
            train_step(net, first, step)
        buffer = io.BytesIO()
        torch.save({"model": net.state_dict(), "optimizer": first.state_dict()}, buffer)
        train_step(net, first, 3)  # lost work: the run "crashes" after steps 3 and 4
        after_three = copy.deepcopy(net.state_dict())
        train_step(net, first, 4)
        checkpoint = torch.load(io.BytesIO(buffer.getvalue()))
        # A new process: a fresh model and an optimizer attached to the same session.
        fresh = model()
        fresh.load_state_dict(checkpoint["model"])
        second = RemoteOptimizer(fresh.named_parameters(),
                                 session=client.open_session("resumed", first.session.token))
        second.load_state_dict(checkpoint["optimizer"])
        assert second.steps == 2
        for name, value in fresh.state_dict().items():
            assert torch.equal(value, checkpoint["model"][name]), name
        # It steps on exactly as the first run did from step 2: the same step 3, bit for bit.
        train_step(fresh, second, 3)
        assert second.steps == 3
        for name, value in fresh.state_dict().items():
            assert torch.equal(value, after_three[name]), name
        second.close()


def test_a_refused_load_changes_nothing(daemon):
    net = model()
    with optd.Client(daemon, timeout=30) as client:
        optimizer = RemoteOptimizer(net.named_parameters(), client)
        train_step(net, optimizer, 1)
        older = optimizer.state_dict()
        train_step(net, optimizer, 2)
        optimizer.state_dict()  # a newer checkpoint replaces the older one
        train_step(net, optimizer, 3)
        kept = copy.deepcopy(net.state_dict())
        with pytest.raises(ValueError, match="last checkpoint is of step 2"):
            optimizer.load_state_dict(older)
        for name, value in net.state_dict().items():
            assert torch.equal(value, kept[name]), name
        train_step(net, optimizer, 4)  # the optimizer still works
        assert optimizer.steps == 4
        optimizer.close()


def test_momentum_schedules_reach_the_daemon(daemon):
    net = model()
    with optd.Client(daemon, timeout=30) as client:
        optimizer = RemoteOptimizer(net.named_parameters(), client)
        assert optimizer.param_groups[0]["momentum"] == pytest.approx(0.95)
        assert optimizer.param_groups[1]["momentum"] == pytest.approx(0.9)  # AdamW's β1
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=10)
        for step in range(1, 4):
            train_step(net, optimizer, step)
            scheduler.step()
        train_step(net, optimizer, 4)
        tensors = {t.config.name: t for t in optimizer.session.info().tensors}
        assert tensors["0.weight"].momentum == pytest.approx(optimizer.param_groups[0]["momentum"])
        assert tensors["0.weight"].lr == pytest.approx(optimizer.param_groups[0]["lr"])
        assert tensors["0.bias"].momentum == pytest.approx(optimizer.param_groups[1]["momentum"])
        assert optimizer.param_groups[0]["momentum"] != pytest.approx(0.95)  # it did cycle
        optimizer.close()


class Tagger(torch.nn.Module):
    """Token embedding, two hidden layers and a head: three AdamW tensors and biases beside the
    hidden matrices, so a sharded session puts work on three instances."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(20, 16)
        self.hidden1 = torch.nn.Linear(16, 32)
        self.hidden2 = torch.nn.Linear(32, 24)
        self.head = torch.nn.Linear(24, 4)

    def forward(self, tokens):
        h = self.embed(tokens).mean(dim=1)
        h = torch.relu(self.hidden1(h))
        return self.head(torch.relu(self.hidden2(h)))


def tagger_step(net, optimizer, step):
    g = torch.Generator().manual_seed(step)
    tokens, labels = torch.randint(0, 20, (32, 6), generator=g), torch.randint(0, 4, (32,),
                                                                                 generator=g)
    optimizer.zero_grad()
    loss = torch.nn.functional.cross_entropy(net(tokens), labels)
    loss.backward()
    optimizer.step()
    return loss.item()


@pytest.fixture(scope="module")
def shared_daemons():
    """Three daemons sharing a state root, for sharded optimizers."""
    root = tempfile.mkdtemp(prefix="optd_torch_shared_")
    started = start_shared_daemons(root, 3)
    yield [address for address, _ in started]
    for _, stop in started:
        assert stop() == 0
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("preset", ["keller", "muoneq_rowcol"])
def test_sharded_trains_as_one_instance_bit_for_bit(daemon, shared_daemons, preset):
    nets = {"sharded": Tagger(), "single": Tagger()}
    clients = [optd.Client(a, timeout=30) for a in shared_daemons]
    with optd.Client(daemon, timeout=30) as client:
        optimizers = {
            "sharded": RemoteOptimizer(nets["sharded"].named_parameters(), clients,
                                       preset=preset, lr=0.02, adamw_lr=3e-3,
                                       session_id=f"torch-sharded-{preset}"),
            "single": RemoteOptimizer(nets["single"].named_parameters(), client, preset=preset,
                                      lr=0.02, adamw_lr=3e-3,
                                      session_id=f"torch-sharded-{preset}")}
        sharded = optimizers["sharded"]
        assert [a for a, _ in sharded.session.parts()] == shared_daemons
        schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)
                      for o in optimizers.values()]

        def train(first, last):
            for step in range(first, last + 1):
                losses = {k: tagger_step(nets[k], optimizers[k], step) for k in nets}
                assert losses["sharded"] == losses["single"], step
                for (name, a), b in zip(nets["sharded"].named_parameters(),
                                        nets["single"].parameters()):
                    assert torch.equal(a, b), f"{name} after step {step}"
                for s in schedulers:
                    s.step()

        train(1, 5)
        saved = {k: o.state_dict() for k, o in optimizers.items()}
        assert saved["sharded"]["optd"]["step"] == saved["single"]["optd"]["step"]
        train(6, 6)
        for k, o in optimizers.items():
            o.load_state_dict(saved[k])
        assert sharded.steps == optimizers["single"].steps
        train(6, 7)  # from the checkpoint again, still equal

        sharded.reshard(clients[:2])
        assert sharded.session.epoch == 2
        assert [a for a, _ in sharded.session.parts()] == shared_daemons[:2]
        train(8, 9)
        # A new optimizer attaches to the sharded session as to one on a single instance.
        attached = RemoteOptimizer(nets["sharded"].named_parameters(), session=sharded.session)
        assert attached.steps == optimizers["single"].steps
        assert ([g["momentum"] for g in attached.param_groups] ==
                [g["momentum"] for g in optimizers["single"].param_groups])
        for o in (attached, optimizers["single"]):
            o.close()


def test_sharding_options_that_do_not_fit_are_refused(daemon):
    net = model()
    with optd.Client(daemon, timeout=30) as client:
        with pytest.raises(ValueError, match="list of clients"):
            RemoteOptimizer(net.named_parameters(), [client],
                            session=client.open_session("any", "token"))
        with pytest.raises(ValueError, match="addresses"):
            RemoteOptimizer(net.named_parameters(), client, addresses=[daemon])
        single = RemoteOptimizer(net.named_parameters(), client)
        with pytest.raises(ValueError, match="sharded"):
            single.reshard([client])
        single.close()


def test_grouping_by_name_parts():
    def names(*pairs):
        return [(name, torch.zeros(shape)) for name, shape in pairs]
    # Tied embeddings (no head parameter): the hidden matrices stay on the matrix preset.
    tied = default_assignment(names(("wte.weight", (50, 8)), ("h.0.weight", (8, 8)),
                                    ("h.1.weight", (8, 8))))
    assert tied == {"wte.weight": "adamw", "h.0.weight": "matrix", "h.1.weight": "matrix"}
    # Whole name parts: multihead_attn is no head; tok_emb is an embedding.
    parts = default_assignment(names(("tok_emb.weight", (50, 8)),
                                     ("multihead_attn.in_proj_weight", (24, 8)),
                                     ("lm_head.weight", (50, 8))))
    assert parts == {"tok_emb.weight": "adamw", "multihead_attn.in_proj_weight": "matrix",
                     "lm_head.weight": "adamw"}


def test_errors_pickle():
    error = optd.OptdError(grpc.StatusCode.NOT_FOUND, "session 'x' does not exist")
    again = pickle.loads(pickle.dumps(error))
    assert (again.code, again.message, str(again)) == (
        error.code, error.message, "NOT_FOUND: session 'x' does not exist")
