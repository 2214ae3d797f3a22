"""optd.torch.RemoteOptimizer against a plain local torch implementation of the same rules: Keller's
Muon (optd.local.LocalMuon; torch 1.13 has no torch.optim.Muon) for the hidden weights and
torch.optim.AdamW for the rest, over several steps with an LR scheduler; state_dict as the
optimizer's state itself (against the local optimizers' buffers), loaded into a new optimizer on
another daemon. Sharded over three daemons it trains bit for bit as over one, through a
scheduler, a state_dict saved and loaded across the two layouts, and a reshard onto two."""

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
from conftest import start_daemon, start_shared_daemons  # noqa: E402
from optd.local import LocalMuon  # noqa: E402
from optd.torch import AUTO_CHOICES, RemoteOptimizer, default_assignment  # noqa: E402
from optd.v1 import optd_pb2  # noqa: E402


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


def test_state_dict_is_the_state_in_torchs_layout(daemon):
    remote_net, local_net = model(), model()
    with optd.Client(daemon, timeout=30) as client, \
            RemoteOptimizer(remote_net.named_parameters(), client, lr=0.02, adamw_lr=3e-3,
                            overrides={"precision": "fp32"}) as optimizer:
        hidden = [local_net[0].weight, local_net[2].weight]
        rest = [p for p in local_net.parameters() if all(p is not h for h in hidden)]
        local_muon, local_adamw = LocalMuon(hidden, lr=0.02), torch.optim.AdamW(rest, lr=3e-3)
        for step in range(1, 4):
            train_step(remote_net, optimizer, step)
            x, y = batch(step)
            local_muon.zero_grad()
            local_adamw.zero_grad()
            torch.nn.functional.cross_entropy(local_net(x), y).backward()
            local_muon.step()
            local_adamw.step()
        saved = optimizer.state_dict()
        # No daemon path in it: torch.save writes it anywhere, and it reads back the same.
        buffer = io.BytesIO()
        torch.save(saved, buffer)
        assert pickle.dumps(torch.load(io.BytesIO(buffer.getvalue()))["param_groups"]) == \
            pickle.dumps(saved["param_groups"])
        assert saved["optd"]["step"] == 3
        names = saved["optd"]["names"]
        assert names == ["0.weight", "2.weight", "0.bias", "2.bias", "4.weight", "4.bias"]
        assert [g["params"] for g in saved["param_groups"]] == [[0, 1], [2, 3, 4, 5]]
        assert [g["lr"] for g in saved["param_groups"]] == [0.02, 3e-3]
        local = {**{id(p): local_muon.state[p] for p in hidden},
                 **{id(p): local_adamw.state[p] for p in rest}}
        by_name = dict(local_net.named_parameters())
        for i, name in enumerate(names):
            state, reference = saved["state"][i], local[id(by_name[name])]
            assert float(state["step"]) == 3
            if i < 2:  # Muon: momentum, as LocalMuon's
                assert set(state) == {"step", "momentum"}
                pairs = [(state["momentum"], reference["momentum"])]
            else:  # AdamW: torch's exp_avg and exp_avg_sq
                assert set(state) == {"step", "adam_first_moment", "adam_second_moment"}
                pairs = [(state["adam_first_moment"], reference["exp_avg"]),
                         (state["adam_second_moment"], reference["exp_avg_sq"])]
            for got, want in pairs:
                assert got.shape == want.shape, name
                np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-7,
                                           err_msg=name)

        # Rewind: the model's and the optimizer's state of step 3 put back, step 4 again.
        kept = copy.deepcopy(remote_net.state_dict())
        train_step(remote_net, optimizer, 4)
        after_four = copy.deepcopy(remote_net.state_dict())
        train_step(remote_net, optimizer, 5)
        remote_net.load_state_dict(kept)
        optimizer.load_state_dict(saved)
        assert optimizer.steps == 3
        train_step(remote_net, optimizer, 4)
        for name, value in remote_net.state_dict().items():
            assert torch.equal(value, after_four[name]), name
        assert optimizer.steps == 4


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
        optimizer.close()


# Plain Muon, and Muon choosing its steps and direction every other step: the choices made at
# step 2 steer step 3, so the state_dict must carry them.
@pytest.mark.parametrize("overrides", [None, {"ns.steps": "auto", "direction": "auto",
                                              "auto.interval": 2}])
def test_resume_in_a_new_optimizer_on_another_daemon_from_a_saved_state_dict(daemon, overrides):
    net = model()
    other, stop_other = start_daemon()  # no state directory shared with the first
    try:
        with optd.Client(daemon, timeout=30) as client, \
                RemoteOptimizer(net.named_parameters(), client, lr=0.02,
                                overrides=overrides) as first:
            scheduler = torch.optim.lr_scheduler.StepLR(first, step_size=1, gamma=0.5)
            for step in range(1, 3):
                train_step(net, first, step)
                scheduler.step()
            saved = first.state_dict()
            if overrides:
                # Each matrix's choices, decided at step 2.
                choices = [optd_pb2.AutoChoices.FromString(e[AUTO_CHOICES])
                           for e in saved["state"].values() if AUTO_CHOICES in e]
                assert choices and all(c.decided_at_step == 2 for c in choices)
            buffer = io.BytesIO()
            torch.save({"model": net.state_dict(), "optimizer": saved}, buffer)
            train_step(net, first, 3)  # the run then "crashes" and its session goes
            after_three = copy.deepcopy(net.state_dict())
        checkpoint = torch.load(io.BytesIO(buffer.getvalue()))
        # A new process: a fresh model and a new optimizer with a session of its own, elsewhere.
        fresh = model()
        with optd.Client(other, timeout=30) as client, \
                RemoteOptimizer(fresh.named_parameters(), client, lr=0.5,
                                overrides=overrides) as second:
            fresh.load_state_dict(checkpoint["model"])
            second.load_state_dict(checkpoint["optimizer"])
            assert second.steps == 2
            assert second.param_groups[0]["lr"] == pytest.approx(0.02 / 4)  # the schedule's
            # It steps on exactly as the first run did from step 2: the same step 3, bit for bit.
            train_step(fresh, second, 3)
            assert second.steps == 3
            for name, value in fresh.state_dict().items():
                assert torch.equal(value, after_three[name]), name
    finally:
        assert stop_other() == 0


def test_a_refused_load_changes_nothing(daemon):
    net = model()
    with optd.Client(daemon, timeout=30) as client, \
            RemoteOptimizer(net.named_parameters(), client) as optimizer:
        train_step(net, optimizer, 1)
        before = optimizer.state_dict()
        header, records = optimizer.session.export_state()
        wide = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                                   torch.nn.Linear(16, 32), torch.nn.ReLU(),
                                   torch.nn.Linear(32, 4))
        with RemoteOptimizer(wide.named_parameters(), client) as other:
            train_step(wide, other, 1)
            wrong_shapes = other.state_dict()
        with RemoteOptimizer(model().named_parameters(), client, preset="normuon") as other:
            wrong_preset = other.state_dict()
        with pytest.raises(optd.OptdError, match="tensor '2.weight' has shape"):
            optimizer.load_state_dict(wrong_shapes)
        with pytest.raises(optd.OptdError, match="stepped with preset 'normuon'"):
            optimizer.load_state_dict(wrong_preset)
        renamed = copy.deepcopy(before)
        renamed["optd"]["names"][0] = "hidden.weight"
        with pytest.raises(ValueError, match="hidden.weight"):
            optimizer.load_state_dict(renamed)
        with pytest.raises(ValueError, match="format 1"):
            optimizer.load_state_dict({"optd": {"session_id": "s", "step": 1, "path": "/x"}})
        header_after, records_after = optimizer.session.export_state()
        assert header_after == header
        for key, values in records.items():
            assert np.array_equal(values, records_after[key]), key
        train_step(net, optimizer, 2)  # the optimizer still works
        assert optimizer.steps == 2


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
        weights = {k: copy.deepcopy(n.state_dict()) for k, n in nets.items()}
        # The sharded session's state, put together from its parts, is the single one's.
        assert saved["sharded"]["optd"]["step"] == saved["single"]["optd"]["step"] == 5
        assert saved["sharded"]["param_groups"] == saved["single"]["param_groups"]
        for i, state in saved["single"]["state"].items():
            for key, value in state.items():
                assert torch.equal(saved["sharded"]["state"][i][key], value), (i, key)
        train(6, 6)
        for k, o in optimizers.items():  # each loads the other's: split and joined by parts
            nets[k].load_state_dict(weights[k])
            o.load_state_dict(saved["single" if k == "sharded" else "sharded"])
        assert sharded.steps == optimizers["single"].steps == 5
        train(6, 7)  # from the saved state again, still equal

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


def test_shared_memory_trains_as_grpc_steps_bit_for_bit(daemon, monkeypatch):
    # With its daemon on this host (a loopback address), RemoteOptimizer steps through the
    # daemon's shared memory by default: no tensor bytes in the step's messages, the parameters
    # of gRPC steps bit for bit, also after add_param_group changes the session's tensors.
    # Where the region cannot be opened (another container or user), "auto" steps over gRPC and
    # says why; shared_memory=True refuses.
    nets = model(), model()
    extras = [torch.nn.Parameter(torch.full((4,), 0.5)) for _ in nets]
    with optd.Client(daemon, timeout=30) as client:
        shared = RemoteOptimizer(nets[0].named_parameters(), client,
                                 overrides={"precision": "fp32"})
        wired = RemoteOptimizer(nets[1].named_parameters(), client,
                                overrides={"precision": "fp32"}, shared_memory=False)
        assert shared.session.shared_memory(0) is not None and shared.shared_memory_error is None
        assert wired.session.shared_memory(0) is None
        for step in range(1, 6):
            if step == 3:
                for opt, extra in zip((shared, wired), extras):
                    opt.add_param_group({"params": [("extra", extra)], "lr": 1e-2})
                assert "extra" in shared.session.shared_memory(0).slots
            if step == 4:
                # A region the daemon no longer knows (as after a restart): the step is refused
                # before it counts, and the optimizer attaches again and sends it once more.
                stale = shared.session.shared_memory(0)
                stale.nonce = bytes(16)
            for net, opt, extra in zip(nets, (shared, wired), extras):
                x, y = batch(step)
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(net(x), y)
                if step >= 3:
                    loss = loss + (net(x).mean(0)[:4] * extra).sum()
                loss.backward()
                opt.step()
            for (name, a), b in zip(nets[0].named_parameters(), nets[1].parameters()):
                assert torch.equal(a, b), f"{name} after step {step}"
            assert torch.equal(extras[0], extras[1])
            if step == 4:
                assert shared.session.shared_memory(0) is not stale
            # Every step but the refused one took the one-copy path through the region.
            assert (shared._region_plan is not None) == (step != 4)
        assert shared.session.info().step == 5

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")
        monkeypatch.setattr(optd.client.os, "open", refuse)
        net = model()
        fallback = RemoteOptimizer(net.named_parameters(), client)
        assert fallback.session.shared_memory(0) is None
        assert "PermissionError" in fallback.shared_memory_error
        before = [p.detach().clone() for p in net.parameters()]
        train_step(net, fallback, 1)  # over gRPC
        assert fallback.steps == 1
        assert not any(torch.equal(a, b) for a, b in zip(before, net.parameters()))
        with pytest.raises(PermissionError):
            RemoteOptimizer(model().named_parameters(), client, shared_memory=True)
        region = shared.session.shared_memory(0)
        for opt in (shared, wired, fallback):
            opt.close()
        assert shared.session.shared_memory(0) is None and region._map.closed  # unmapped
