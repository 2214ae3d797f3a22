"""optd.sharded against one instance: a session sharded over three daemons (a batched tensor in
slices, several presets) gives every result and the final parameters bit for bit as one daemon
does, a stale placement epoch is refused, and a stopped instance is named in the step's error."""

import grpc
import numpy as np
import pytest

from conftest import start_daemon
from optd import Client, OptdError
from optd.sharded import ShardedSession

CONFIG = """
groups { name: "muon" preset: "keller" }
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

    # A stale epoch is refused by the instance holding the part.
    part = next(iter(sharded._shards.values()))[1]
    with pytest.raises(OptdError) as stale:
        part.step(5, {}, placement_epoch=2)
    assert stale.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "placed at epoch 1" in stale.value.message

    # A stopped instance is named.
    daemons[1][1]()
    with pytest.raises(OptdError) as down:
        sharded.step(5, grads, timeout=20)
    assert down.value.code == grpc.StatusCode.UNAVAILABLE
    assert addresses[1] in down.value.message
