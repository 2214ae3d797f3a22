"""optd.sharded against one instance: a session sharded over three daemons (a batched tensor in
slices, several presets) gives every result and the final parameters bit for bit as one daemon
does, a stale placement epoch is refused, and a stopped instance is named in the step's error.
Through a shared state root it reshards 3 -> 2 -> 3 instances and checkpoints and restores still
bit for bit, and every refusal names the instance it came from."""

import shutil
import tempfile

import grpc
import numpy as np
import pytest
from google.protobuf import text_format

from conftest import start_daemon, start_shared_daemons
from optd import Client, OptdError
from optd.sharded import ShardedSession, ShardRestore
from optd.v1 import optd_pb2

CONFIG = """
groups { name: "muon" preset: "keller"
         overrides { key: "ns.steps" value: "auto" } overrides { key: "direction" value: "auto" }
         overrides { key: "auto.interval" value: "2" } }
groups { name: "eq" preset: "muoneq_rowcol" }
groups { name: "rmnp" preset: "rmnp" }
groups { name: "vectors" preset: "adamw" }
tensors { name: "w1" shape: [48, 64] group: "muon" }
tensors { name: "w2" shape: [64, 48] group: "muon" }
tensors { name: "w3" shape: [40, 40] group: "eq" }
tensors { name: "experts" shape: [5, 24, 16] group: "muon" rank_policy: RANK_POLICY_BATCH }
tensors { name: "r" shape: [32, 40] group: "rmnp" }
tensors { name: "b" shape: [64] group: "vectors" }
"""
SHAPES = {"w1": (48, 64), "w2": (64, 48), "w3": (40, 40), "experts": (5, 24, 16), "r": (32, 40),
          "b": (64,)}


@pytest.fixture(scope="module")
def daemons():
    started = [start_daemon() for _ in range(4)]
    yield started
    for _, stop in started:
        stop()


def test_sharded_equals_one_instance_bit_for_bit(daemons):
    addresses = [a for a, _ in daemons[:3]]
    clients = [Client(a) for a in addresses]
    sharded = ShardedSession(clients, addresses, CONFIG, "py-sharded", epoch=1)
    single = Client(daemons[3][0]).create_session(CONFIG, "py-sharded")
    assert len({item.endpoint for item in sharded.placement.items}) == 3
    rng = np.random.default_rng(0)
    start = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
    sharded.upload_parameters(start)
    single.upload_parameters(start)
    for step in range(1, 5):
        grads = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
        a, b = sharded.step(step, grads), single.step(step, grads)
        for name in SHAPES:
            assert a.values[name].shape == b.values[name].shape
            assert np.array_equal(a.values[name], b.values[name]), (name, step)
    got, want = sharded.get_parameters(), single.get_parameters()
    for name in SHAPES:
        assert np.array_equal(got[name], want[name]), name
    # The muon tensors' auto choices (one per matrix; the experts' five come from their slices on
    # several instances), joined in info and in the exported state, are the single instance's.
    def choices(tensors):
        named = {}
        for t in tensors:
            if t.HasField("auto_choices"):
                c = t.auto_choices
                named[t.config.name if hasattr(t, "config") else t.name] = (
                    list(c.newton_schulz_steps), list(c.row_normalize), c.decided_at_step,
                    round(c.small_sv_share, 9), round(c.rmnp_muon_cosine, 9))
        return named
    want_choices = choices(single.info().tensors)
    assert sorted(want_choices) == ["experts", "w1", "w2"]
    assert len(want_choices["experts"][0]) == 5 and want_choices["experts"][2] == 4
    assert choices(sharded.info().tensors) == want_choices
    assert choices(sharded.export_state()[0].tensors) == want_choices
    assert choices(single.export_state()[0].tensors) == want_choices
    # The single instance's state imported into another sharded session: each slice takes its
    # matrices' choices, and the next step (which a decision at step 4 steers) is the same.
    other = ShardedSession(clients, addresses, CONFIG, "py-sharded-import", epoch=1)
    assert other.import_state(*single.export_state()) == 4
    assert choices(other.info().tensors) == want_choices
    grads = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
    a, b = other.step(5, grads), single.step(5, grads)
    for name in SHAPES:
        assert np.array_equal(a.values[name], b.values[name]), name

    # A stale epoch is refused by the instance holding the part.
    part = sharded.parts()[0][1]
    with pytest.raises(OptdError) as stale:
        part.step(5, {}, placement_epoch=2)
    assert stale.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "placed at epoch 1" in stale.value.message

    # A stopped instance is named.
    daemons[1][1]()
    with pytest.raises(OptdError) as down:
        sharded.step(5, grads, timeout=20)  # the sharded session itself is at step 4
    assert down.value.code == grpc.StatusCode.UNAVAILABLE
    assert addresses[1] in down.value.message


@pytest.fixture(scope="module")
def shared():
    """The addresses of three daemons sharing a state root (instances i0, i1, i2), then of a
    plain one (no shared state root)."""
    root = tempfile.mkdtemp(prefix="optd_shared_")
    started = start_shared_daemons(root, 3) + [start_daemon()]
    yield [address for address, _ in started]
    for _, stop in started:
        assert stop() == 0
    shutil.rmtree(root, ignore_errors=True)


def start_both(sharded, single, seed):
    """The same random starting parameters on both; the generator for their gradients."""
    rng = np.random.default_rng(seed)
    start = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
    sharded.upload_parameters(start)
    single.upload_parameters(start)
    return rng


def step_both(sharded, single, rng, first, last):
    """Steps [first, last] on both with the same gradients; every result bit for bit equal."""
    for step in range(first, last + 1):
        grads = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
        a, b = sharded.step(step, grads), single.step(step, grads)
        for name in SHAPES:
            assert np.array_equal(a.values[name], b.values[name]), (name, step)


def assert_same_parameters(sharded, single):
    got, want = sharded.get_parameters(), single.get_parameters()
    assert set(got) == set(want)
    for name in want:
        assert np.array_equal(got[name], want[name]), name


def test_reshards_three_to_two_and_back_bit_for_bit(shared):
    clients = [Client(a) for a in shared]
    # Checkpoints every 2 steps as well: they land where the resharded parts restore from.
    config = text_format.Parse(CONFIG + "checkpoint_interval: 2", optd_pb2.SessionConfig())
    three = ShardedSession(clients[:3], shared[:3], config, "py-reshard", epoch=1)
    single = clients[3].create_session(config, "py-reshard")
    assert len(three.parts()) == 3
    for session in (three, single):
        session.update_hyperparams([{"group": "muon", "lr": 0.013}])
    rng = start_both(three, single, 1)
    step_both(three, single, rng, 1, 3)

    with pytest.raises(ValueError, match="epoch after 1"):
        three.reshard(clients[:2], shared[:2], 1)
    old_parts = three.parts()
    two = three.reshard(clients[:2], shared[:2], 2)
    assert two.epoch == 2
    assert [address for address, _ in two.parts()] == shared[:2]
    # The instance that owns nothing any more gave its part up; the replaced parts' tokens no
    # longer open anything.
    assert clients[2].list_sessions() == []
    for _, part in old_parts[:2]:
        with pytest.raises(OptdError) as replaced:
            part.info()
        assert replaced.value.code == grpc.StatusCode.UNAUTHENTICATED
    # The same step and hyperparameters as the session on one instance.
    info, want = two.info(), single.info()
    assert (info.step, info.config.placement_epoch) == (want.step, 2)
    for part in (p.info() for _, p in two.parts()):
        assert (part.step, part.config.placement_epoch) == (want.step, 2)
    assert ([(t.config.name, tuple(t.config.shape), t.lr, t.momentum, t.weight_decay)
             for t in info.tensors] ==
            [(t.config.name, tuple(t.config.shape), t.lr, t.momentum, t.weight_decay)
             for t in want.tensors])
    step_both(two, single, rng, 4, 6)

    again = two.reshard([clients[2], clients[0], clients[1]],
                        [shared[2], shared[0], shared[1]], 3)
    assert len(again.parts()) == 3
    step_both(again, single, rng, 7, 8)
    assert_same_parameters(again, single)
    again.delete()
    single.delete()


def test_checkpoint_and_restore_every_part_as_one_instance(shared):
    clients = [Client(a) for a in shared]
    sharded = ShardedSession(clients[:3], shared[:3], CONFIG, "py-restore", epoch=1)
    single = clients[3].create_session(CONFIG, "py-restore")
    rng = start_both(sharded, single, 2)
    step_both(sharded, single, rng, 1, 2)
    assert sharded.checkpoint() == single.checkpoint().step
    step_both(sharded, single, rng, 3, 4)
    assert sharded.restore() == single.restore()
    info, want = sharded.info(), single.info()
    assert (info.step, info.checkpoint_step) == (want.step, want.checkpoint_step)
    assert_same_parameters(sharded, single)
    step_both(sharded, single, rng, 3, 4)  # and it steps on from there, bit for bit
    assert_same_parameters(sharded, single)
    sharded.delete()
    single.delete()


def test_refusals_name_the_instance(shared):
    i0, i1, plain = shared[0], shared[1], shared[3]
    assert (Client(i0).server_info().instance_name, Client(i0).server_info().shared_state) == (
        "i0", True)
    assert not Client(plain).server_info().shared_state
    mixed = ShardedSession([Client(i0), Client(plain)], [i0, plain], CONFIG, "py-errors", epoch=1)
    assert [address for address, _ in mixed.parts()] == [i0, plain]

    # A shared checkpoint, and so resharding, need --shared_state_root on every instance.
    with pytest.raises(OptdError) as unshared:
        mixed.checkpoint(shared=True)
    assert unshared.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert plain in unshared.value.message
    with pytest.raises(OptdError) as unmovable:
        mixed.reshard([Client(i1)], [i1], 2)
    assert unmovable.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert plain in unmovable.value.message and "--shared_state_root" in unmovable.value.message

    # Parts checkpointed at different steps: restore and checkpoint name each instance's step.
    grads = {n: np.ones(s, dtype=np.float32) for n, s in SHAPES.items()}
    mixed.step(1, grads)
    assert mixed.checkpoint() == 1
    mixed.step(2, grads)
    on_i0 = mixed.parts()[0][1]
    assert on_i0.checkpoint().step == 2
    with pytest.raises(OptdError) as apart:
        mixed.restore()
    assert apart.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert f"{i0} at step 2, {plain} at step 1" in apart.value.message
    assert (mixed.info().step, mixed.info().checkpoint_step) == (1, -1)
    with pytest.raises(OptdError) as still_apart:
        mixed.checkpoint()
    assert still_apart.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "were checkpointed at different steps" in still_apart.value.message

    # A restore from an instance that wrote nothing: NOT_FOUND from the first part, which names
    # its instance and the missing source; nothing is created.
    with pytest.raises(OptdError) as missing:
        ShardedSession([Client(i0), Client(i1)], [i0, i1], CONFIG, "py-moved", epoch=2,
                       restore=ShardRestore(instances=["i7"], session_id="py-errors"))
    # without the admin token a missing source answers as one no token given opens
    assert missing.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert i0 in missing.value.message
    assert "instance 'i7' session 'py-errors'" in missing.value.message
    assert all(s.session_id != "py-moved" for a in (i0, i1) for s in Client(a).list_sessions())

    # One session by hand: restore_from needs a shared state root, and replacing a session on a
    # daemon without an admin token needs that session's token.
    part_config = on_i0.info().config
    part_config.placement_epoch = 2
    at_step_2 = on_i0.get_parameters()
    with pytest.raises(OptdError) as plain_restore:
        Client(plain).create_session(part_config, "py-errors", restore_from=[("i0", "py-errors")],
                                     replace=True)
    assert plain_restore.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "--shared_state_root" in plain_restore.value.message
    with pytest.raises(OptdError) as untokened:
        Client(i0).create_session(part_config, "py-errors", restore_from=[("i0", "py-errors")],
                                  replace=True)
    assert untokened.value.code == grpc.StatusCode.PERMISSION_DENIED
    # Each source needs its session's token (issue 16: restore_from copied any session), and
    # the refusal describes nothing of it.
    with pytest.raises(OptdError) as no_source_token:
        Client(i0).create_session(part_config, "py-errors", restore_from=[("i0", "py-errors")],
                                  replace=True, token=on_i0.token)
    assert no_source_token.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "step" not in no_source_token.value.message
    moved = Client(i0).create_session(part_config, "py-errors",
                                      restore_from=[("i0", "py-errors", on_i0.token)],
                                      replace=True, token=on_i0.token)
    assert moved.info().step == 2
    after = moved.get_parameters()
    assert set(after) == set(at_step_2)
    for name, values in at_step_2.items():
        assert np.array_equal(after[name], values), name
    with pytest.raises(OptdError) as replaced:
        on_i0.info()
    assert replaced.value.code == grpc.StatusCode.UNAUTHENTICATED
    moved.delete()
    mixed.delete()
