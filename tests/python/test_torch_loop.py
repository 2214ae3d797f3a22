"""optd.torch.RemoteOptimizer as a torch training script uses it (issue 19): sessions that clean
up (with-block, close() on a daemon with an admin token, the finalizer, keep_session), attaching
without clobbering the trained weights, param groups as dicts against the default layout and
local torch, the session's settings as keyword arguments, and the package installed by pip."""

import copy
import gc
import os
import subprocess
import tempfile
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import optd  # noqa: E402
from conftest import REPO, start_daemon  # noqa: E402
from optd.torch import RemoteOptimizer  # noqa: E402

ADMIN = "admin-token-for-the-lifetime-tests"


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 24),
                               torch.nn.ReLU(), torch.nn.Linear(24, 4))


def train_step(net, optimizer, step):
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g)
    optimizer.zero_grad()
    loss = torch.nn.functional.cross_entropy(net(x), y)
    loss.backward()
    optimizer.step()
    return loss.item()


def exists(session_id, daemon, admin_token=None):
    """Whether the daemon lists the session (its token no longer opens a deleted one)."""
    with optd.Client(daemon, admin_token, timeout=30) as client:
        return session_id in {s.session_id for s in client.list_sessions()}


@pytest.fixture(scope="module")
def admin_daemon():
    """A daemon that requires an admin token to create sessions, as the shipped deployments do."""
    address, stop = start_daemon(f"--admin_token={ADMIN}")
    try:
        yield address
    finally:
        assert stop() == 0


def test_a_with_block_deletes_the_session_on_a_daemon_with_an_admin_token(admin_daemon):
    net = model()
    with optd.Client(admin_daemon, ADMIN, timeout=30) as client:
        with RemoteOptimizer(net.named_parameters(), client) as optimizer:
            train_step(net, optimizer, 1)
            session_id, token = optimizer.session.id, optimizer.session.token
            assert exists(session_id, admin_daemon, ADMIN)
        assert not exists(session_id, admin_daemon, ADMIN)
        # An exception inside the block deletes it too, and still propagates.
        with pytest.raises(RuntimeError, match="the training script failed"):
            with RemoteOptimizer(net.named_parameters(), client) as optimizer:
                session_id, token = optimizer.session.id, optimizer.session.token
                raise RuntimeError("the training script failed")
        assert not exists(session_id, admin_daemon, ADMIN)
        optimizer.close()  # a second close does nothing


def test_close_needs_only_the_sessions_token(admin_daemon):
    net = model()
    with optd.Client(admin_daemon, ADMIN, timeout=30) as admin:
        optimizer = RemoteOptimizer(net.named_parameters(), admin)
        session_id, token = optimizer.session.id, optimizer.session.token
    # Another process holding only the session's id and token (no admin token) closes it.
    with optd.Client(admin_daemon, timeout=30) as client:
        attached = RemoteOptimizer(net.named_parameters(),
                                   session=client.open_session(session_id, token))
        attached.close()
        assert exists(session_id, admin_daemon, ADMIN), "closing an attached optimizer deleted it"
        attached.close(delete=True)
        assert not exists(session_id, admin_daemon, ADMIN)


def test_a_collected_optimizer_deletes_its_session_unless_kept(daemon):
    net = model()
    with optd.Client(daemon, timeout=30) as client:
        optimizer = RemoteOptimizer(net.named_parameters(), client)
        train_step(net, optimizer, 1)
        session_id, token = optimizer.session.id, optimizer.session.token
        del optimizer
        gc.collect()
        assert not exists(session_id, daemon)

        kept = RemoteOptimizer(net.named_parameters(), client, keep_session=True)
        session_id, token = kept.session.id, kept.session.token
        del kept
        gc.collect()
        assert exists(session_id, daemon)
        client.open_session(session_id, token).delete()


def test_attaching_downloads_the_trained_weights_by_default(daemon):
    trained = model()
    with optd.Client(daemon, timeout=30) as client:
        with RemoteOptimizer(trained.named_parameters(), client, lr=0.02) as first:
            for step in range(1, 4):
                train_step(trained, first, step)
            first.param_groups[0]["lr"] = 0.005  # a schedule's rate, sent with the next step
            train_step(trained, first, 4)
            session = client.open_session(first.session.id, first.session.token)
            fresh = model()
            attached = RemoteOptimizer(fresh.named_parameters(), session=session, lr=0.02)
            assert attached.steps == 4
            for (name, a), b in zip(fresh.named_parameters(), trained.parameters()):
                assert torch.equal(a, b), f"{name}: attaching did not download the weights"
            assert attached.param_groups[0]["lr"] == pytest.approx(0.005)  # the daemon's
            # It steps on exactly as the first optimizer would have.
            train_step(fresh, attached, 5)
            train_step(trained, first, 5)
            for (name, a), b in zip(fresh.named_parameters(), trained.parameters()):
                assert torch.equal(a, b), f"{name} after step 5"
            # Uploading is a choice: the fresh initialization replaces the trained weights.
            init = model()
            RemoteOptimizer(init.named_parameters(), session=session, sync="upload")
            values = session.get_parameters()
            for name, p in init.named_parameters():
                assert np.array_equal(values[name], p.detach().numpy()), name
            with pytest.raises(ValueError, match="sync is 'download' or 'upload'"):
                RemoteOptimizer(init.named_parameters(), session=session, sync="merge")


def test_param_group_dicts_step_as_the_default_layout(daemon):
    """Groups given as dicts with the default layout's settings train bit for bit as it."""
    nets = {"dicts": model(), "default": model()}
    with optd.Client(daemon, timeout=30) as client:
        hidden = ["0.weight", "2.weight"]
        named = dict(nets["dicts"].named_parameters())
        with RemoteOptimizer(
                [{"params": [(n, named[n]) for n in hidden], "lr": 0.02, "name": "matrices",
                  "overrides": {"precision": "fp32"}},
                 {"params": [(n, p) for n, p in named.items() if n not in hidden], "lr": 3e-3,
                  "momentum": 0.8, "weight_decay": 0.05}],
                client) as dicts, RemoteOptimizer(
                    nets["default"].named_parameters(), client, lr=0.02, adamw_lr=3e-3,
                    adamw_weight_decay=0.05, overrides={"precision": "fp32"}) as default:
            # The default layout's AdamW β1 (momentum) cycled to the dict's value before step 1.
            default.param_groups[1]["momentum"] = 0.8
            assert [g["optd_group"] for g in dicts.param_groups] == ["matrices", "group1"]
            assert dicts.param_groups[1]["momentum"] == pytest.approx(0.8)
            assert dicts.param_groups[1]["weight_decay"] == pytest.approx(0.05)
            schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)
                          for o in (dicts, default)]
            for step in range(1, 6):
                train_step(nets["dicts"], dicts, step)
                train_step(nets["default"], default, step)
                for (name, a), b in zip(nets["dicts"].named_parameters(),
                                        nets["default"].parameters()):
                    assert torch.equal(a, b), f"{name} after step {step}"
                for s in schedulers:
                    s.step()


def test_an_adamw_param_group_matches_torch_adamw(daemon):
    remote_net, local_net = model(), model()
    with optd.Client(daemon, timeout=30) as client:
        with RemoteOptimizer([{"params": remote_net.parameters(), "preset": "adamw",
                               "lr": 1e-2, "momentum": 0.8, "weight_decay": 0.1}],
                             client) as remote:
            local = torch.optim.AdamW(local_net.parameters(), lr=1e-2, betas=(0.8, 0.999),
                                      weight_decay=0.1)
            for step in range(1, 6):
                train_step(remote_net, remote, step)
                train_step(local_net, local, step)
                for (name, r), l in zip(remote_net.named_parameters(), local_net.parameters()):
                    np.testing.assert_allclose(r.detach().numpy(), l.detach().numpy(), rtol=0,
                                               atol=2e-5, err_msg=f"{name} after step {step}")


def test_param_groups_are_checked_before_any_session_exists(daemon):
    net = model()
    with optd.Client(daemon, timeout=30) as client:
        before = len(client.list_sessions())
        with pytest.raises(ValueError, match="holds matrices and vectors"):
            RemoteOptimizer([{"params": net.parameters(), "lr": 0.02}], client)
        with pytest.raises(ValueError, match=r"keys optd does not know: \['betas'\]"):
            RemoteOptimizer([{"params": net.parameters(), "preset": "adamw",
                              "betas": (0.9, 0.99)}], client)
        with pytest.raises(ValueError, match="a parameter twice"):
            RemoteOptimizer([{"params": [net[0].weight], "preset": "adamw"},
                             {"params": [net[0].weight], "preset": "adamw"}], client)
        with pytest.raises(ValueError, match="non_finite_policy is one of"):
            RemoteOptimizer(net.parameters(), client, non_finite_policy="ignore")
        assert len(client.list_sessions()) == before


def test_session_settings_as_keyword_arguments(daemon):
    nets = {"skip": model(), "delta": model(), "params": model()}
    with optd.Client(daemon, timeout=30) as client:
        with RemoteOptimizer(nets["skip"].parameters(), client, non_finite_policy="skip_step",
                             checkpoint_interval=2, analysis_interval=3,
                             straggler_timeout=12.5) as skip:
            config = skip.session.info().config
            assert (config.non_finite_policy, config.checkpoint_interval,
                    config.analysis_interval, config.straggler_timeout_seconds) == (2, 2, 3, 12.5)
            train_step(nets["skip"], skip, 1)
            before = [p.detach().clone() for p in nets["skip"].parameters()]
            # An infinite gradient (a GradScaler's overflow): the step is skipped, nothing changes.
            skip.zero_grad()
            for p in nets["skip"].parameters():
                p.grad = torch.zeros_like(p)
            next(nets["skip"].parameters()).grad[0, 0] = float("inf")
            skip.step()
            for a, b in zip(nets["skip"].parameters(), before):
                assert torch.equal(a, b)
            assert skip.session.info().checkpoint_step == 2  # checkpoint_interval=2
        # Deltas come back and are added: the same parameters up to that addition's rounding.
        with RemoteOptimizer(nets["delta"].parameters(), client, step_result="delta") as delta, \
                RemoteOptimizer(nets["params"].parameters(), client) as params:
            for step in range(1, 4):
                train_step(nets["delta"], delta, step)
                train_step(nets["params"], params, step)
                for a, b in zip(nets["delta"].parameters(), nets["params"].parameters()):
                    np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=0,
                                               atol=1e-6)


def test_pip_installs_the_client_offline_with_its_stubs():
    """pip install --no-build-isolation --no-index ./client/python into a venv that sees
    Debian's packages; optd, optd.v1 and optd.torch then import from any directory."""
    with tempfile.TemporaryDirectory() as work:
        venv = os.path.join(work, "venv")
        subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages",
                        "--without-pip", venv], check=True)
        python = os.path.join(venv, "bin", "python")
        source = os.path.join(work, "source")  # a copy: the build writes beside setup.py
        subprocess.run(["cp", "-r", os.path.join(REPO, "client", "python"), source], check=True)
        installed = subprocess.run(
            [python, "-m", "pip", "install", "--no-build-isolation", "--no-index", source],
            env={**os.environ, "OPTD_PROTO_DIR": os.path.join(REPO, "proto"),
                 "PYTHONPATH": ""}, capture_output=True, text=True)
        assert installed.returncode == 0, installed.stdout + installed.stderr
        imported = subprocess.run(
            [python, "-c", "import optd, optd.torch, optd.v1.optd_pb2_grpc as g; "
                           "print(optd.__file__); print(g.OptimizerStub.__name__)"],
            cwd=work, env={**os.environ, "PYTHONPATH": ""}, capture_output=True, text=True)
        assert imported.returncode == 0, imported.stderr
        path, stub = imported.stdout.split()
        assert path.startswith(venv), path
        assert stub == "OptimizerStub"


def test_the_container_client_stage_builds_the_package_as_its_commands_say():
    """deploy/container/Containerfile's client stages, run here: `setup.py build --build-lib`
    in a copy holding client/python and proto/ as the stage does, and the package copied to a
    directory of its own imports from any other."""
    containerfile = open(os.path.join(REPO, "deploy", "container", "Containerfile")).read()
    assert "python3 setup.py -q build --build-lib /client" in containerfile
    assert "COPY --from=client-build /client/optd /usr/lib/python3/dist-packages/optd" in \
        containerfile
    with tempfile.TemporaryDirectory() as work:
        src = os.path.join(work, "src")
        os.makedirs(os.path.join(src, "client"))
        subprocess.run(["cp", "-r", os.path.join(REPO, "client", "python"),
                        os.path.join(src, "client", "python")], check=True)
        subprocess.run(["cp", "-r", os.path.join(REPO, "proto"), src], check=True)
        built = subprocess.run(["/usr/bin/python3", "setup.py", "-q", "build", "--build-lib",
                                os.path.join(work, "client")],
                               cwd=os.path.join(src, "client", "python"), capture_output=True,
                               text=True, env={**os.environ, "PYTHONPATH": ""})
        assert built.returncode == 0, built.stdout + built.stderr
        site = os.path.join(work, "site")
        os.makedirs(site)
        subprocess.run(["cp", "-r", os.path.join(work, "client", "optd"), site], check=True)
        imported = subprocess.run(
            ["/usr/bin/python3", "-c", "import optd.torch, optd.v1.optd_pb2_grpc as g; "
                                       "print(optd.__file__, g.OptimizerStub.__name__)"],
            cwd="/", env={**os.environ, "PYTHONPATH": site}, capture_output=True, text=True)
        assert imported.returncode == 0, imported.stderr
        assert imported.stdout.split() == [os.path.join(site, "optd", "__init__.py"),
                                           "OptimizerStub"]


def test_a_created_session_carries_a_lease_the_daemon_enforces(daemon):
    net = model()
    with optd.Client(daemon, timeout=30) as client:
        default = RemoteOptimizer(net.named_parameters(), client)
        assert default.session.info().config.delete_after_idle_seconds == 86400
        default.close()
        # A process that dies without closing: only the lease is left to delete the session.
        short = RemoteOptimizer(net.named_parameters(), client, keep_session=True,
                                delete_after_idle=1)
        train_step(net, short, 1)
        session_id = short.session.id
        assert exists(session_id, daemon)
        deadline = time.time() + 10
        while exists(session_id, daemon) and time.time() < deadline:
            time.sleep(0.2)
        assert not exists(session_id, daemon)
        never = RemoteOptimizer(net.named_parameters(), client, delete_after_idle=None)
        assert never.session.info().config.delete_after_idle_seconds == 0
        never.close()


def twin_optimizers(client, **options):
    """Two copies of model() with optimizers alike but for overlap (on, off)."""
    nets = [model(), model()]
    return nets, [RemoteOptimizer(net.named_parameters(), client, lr=0.02, overlap=overlap,
                                  **options)
                  for net, overlap in zip(nets, (True, False))]


def assert_same(nets, what):
    for (name, a), b in zip(nets[0].named_parameters(), nets[1].parameters()):
        assert torch.equal(a, b), f"{name} {what}"


def test_overlap_sends_during_backward_and_steps_as_the_serial_path(daemon):
    with optd.Client(daemon, timeout=30) as client:
        nets, optimizers = twin_optimizers(client)
        overlapped, serial = optimizers
        assert overlapped._overlap and not serial._overlap
        schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.7)
                      for o in optimizers]
        for step in range(1, 5):
            for net, optimizer in zip(nets, optimizers):
                g = torch.Generator().manual_seed(step)
                x, y = torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g)
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(net(x), y).backward()
                if optimizer is overlapped:  # every gradient already on its way
                    assert overlapped._stream is not None
                    assert set(overlapped._streamed) == set(overlapped._parameters)
                optimizer.step()
            assert_same(nets, f"after step {step}")
            for s in schedulers:
                s.step()
        assert overlapped.steps == serial.steps == 4
        assert (overlapped.overlapped_steps, serial.overlapped_steps) == (4, 0)
        for o in optimizers:
            o.close()
        # "auto" overlaps where the gradients would not fit one message anyway.
        wide = torch.nn.Sequential(torch.nn.Linear(1200, 1200), torch.nn.Linear(1200, 2))
        with RemoteOptimizer(wide.named_parameters(), client) as auto:
            assert auto._overlap
        with RemoteOptimizer(model().named_parameters(), client) as auto:
            assert not auto._overlap


def test_overlap_with_accumulation_clipping_and_abandoned_backward(daemon):
    with optd.Client(daemon, timeout=30) as client:
        nets, optimizers = twin_optimizers(client)

        def loss(net, seed):
            g = torch.Generator().manual_seed(seed)
            x, y = torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
            return torch.nn.functional.cross_entropy(net(x), y)
        for net, optimizer in zip(nets, optimizers):
            # Accumulation: the first micro-batch under no_sync, the last one sends the sum.
            optimizer.zero_grad()
            with optimizer.no_sync():
                loss(net, 1).backward()
            assert optimizer._stream is None
            loss(net, 2).backward()
            optimizer.step()
            # Clipping after backward: the gradients sent changed, so the step resends them.
            optimizer.zero_grad()
            loss(net, 3).backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 0.1)
            optimizer.step()
            # A backward without a step (a skipped batch): zero_grad withdraws what it sent.
            optimizer.zero_grad()
            loss(net, 4).backward()
            optimizer.zero_grad()
            loss(net, 5).backward()
            optimizer.step()
        assert_same(nets, "after accumulation, clipping and an abandoned backward")
        assert [o.steps for o in optimizers] == [3, 3]
        assert optimizers[0].overlapped_steps == 2  # the clipped step went serially
        for o in optimizers:
            o.close()


def test_a_disabled_grad_scaler_and_an_infinite_gradient_under_skip_step(daemon):
    with optd.Client(daemon, timeout=30) as client:
        nets, optimizers = twin_optimizers(client, non_finite_policy="skip_step")
        scaler = torch.cuda.amp.GradScaler(enabled=False)  # what the CPU allows
        for step in range(1, 3):
            for net, optimizer in zip(nets, optimizers):
                g = torch.Generator().manual_seed(step)
                x, y = torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
                optimizer.zero_grad()
                scaler.scale(torch.nn.functional.cross_entropy(net(x), y)).backward()
                scaler.step(optimizer)
                scaler.update()
        assert_same(nets, "through a disabled GradScaler")
        for net, optimizer in zip(nets, optimizers):
            before = copy.deepcopy(net.state_dict())
            optimizer.zero_grad()
            net(torch.randn(4, 8)).sum().backward()
            with torch.no_grad():
                net[0].weight.grad[0, 0] = float("inf")
            optimizer.step()  # the daemon skips it: nothing changes
            for name, value in net.state_dict().items():
                assert torch.equal(value, before[name]), name
        assert_same(nets, "after the skipped step")
        for o in optimizers:
            o.close()


def test_add_param_group_on_a_live_optimizer(daemon):
    """Unfreezing a layer mid-run: its parameters join the session in a group of their own. Given
    the same gradients, the other parameters go on exactly as an optimizer that never had the new
    group, and the new ones step exactly as a fresh optimizer holding only them, from the
    model's values."""
    with optd.Client(daemon, timeout=30) as client:
        nets = [model(), model()]
        for net in nets:
            net[4].requires_grad_(False)  # the head starts frozen
        main, twin = (RemoteOptimizer(net.named_parameters(), client, lr=0.02) for net in nets)
        alone_net = model()
        alone = None

        def batch_loss(net, step):
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
            return torch.nn.functional.cross_entropy(net(x), y)
        for step in range(1, 5):
            if step == 3:  # unfreeze the head of nets[0], as a group of its own
                nets[0][4].requires_grad_(True)
                with pytest.raises(ValueError, match="has a param group 'matrices' already"):
                    main.add_param_group({"params": [nets[0][4].weight], "name": "matrices"})
                main.add_param_group({"params": list(nets[0][4].named_parameters(prefix="4")),
                                      "lr": 5e-3, "preset": "adamw", "name": "head"})
                assert main.param_groups[-1]["lr"] == 5e-3
                assert {t.config.name for t in main.session.info().tensors} >= {"4.weight",
                                                                                 "4.bias"}
                alone_net.load_state_dict(nets[0].state_dict())
                alone = RemoteOptimizer(list(alone_net[4].named_parameters(prefix="4")), client,
                                        assign={"4.weight": "adamw"}, adamw_lr=5e-3)
                with pytest.raises(ValueError, match="holds parameters the optimizer has"):
                    main.add_param_group({"params": [nets[0][0].weight]})
            # The gradients main's model has go to the twin's and the alone's parameters too.
            main.zero_grad()
            batch_loss(nets[0], step).backward()
            grads = {name: p.grad.clone() for name, p in nets[0].named_parameters()
                     if p.grad is not None}
            for net in (nets[1], alone_net):
                for name, p in net.named_parameters():
                    p.grad = grads[name].clone() if name in grads else None
            main.step()
            twin.step()
            if alone is not None:
                alone.step()
        for name, p in nets[0].named_parameters():
            if name.startswith("4."):
                assert torch.equal(p, dict(alone_net.named_parameters())[name]), name
                assert not torch.equal(p, dict(nets[1].named_parameters())[name]), name
            else:
                assert torch.equal(p, dict(nets[1].named_parameters())[name]), name
        assert main.steps == 4
        for o in (main, twin, alone):
            o.close()
