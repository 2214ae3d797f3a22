"""The Python placement (optd.placement) against the C++ one (client/placement.h, through
tests/client/placement_tool.cc) on random manifests: the same items, loads and fingerprint, and
the same errors."""

import json
import os
import random
import subprocess

import pytest
from google.protobuf import json_format

from optd import placement
from optd.v1 import placement_pb2

TOOL = os.environ.get("OPTD_PLACEMENT_TOOL")


def cpp_place(manifest):
    run = subprocess.run([TOOL], input=json_format.MessageToJson(manifest), capture_output=True,
                         text=True, check=False)
    if run.returncode != 0:
        return None, run.stderr.split(" ", 1)[0]
    return json_format.Parse(run.stdout, placement_pb2.Placement()), None


def random_manifest(seed):
    rng = random.Random(seed)
    manifest = placement_pb2.PlacementManifest(epoch=rng.randrange(10))
    endpoints = rng.randrange(1, 6)
    for e in range(endpoints):
        manifest.endpoints.add(address=f"optd-{e}",
                               memory_bytes=rng.choice([0, 0, rng.randrange(1, 40) << 20]))
    for i in range(rng.randrange(1, 40)):
        kind = rng.choice(["matrix", "batch", "vector", "bytes"])
        t = manifest.tensors.add(name=f"t{rng.randrange(1000)}_{i}")
        if kind == "vector":
            t.shape.append(rng.randrange(1, 5000))
        elif kind == "batch":
            t.shape.extend([rng.randrange(1, 5), rng.choice([32, 64, 96]), rng.choice([32, 128])])
            t.batch = True
        else:
            t.shape.extend([rng.choice([16, 64, 128, 768]), rng.choice([16, 64, 512, 3072])])
            if kind == "bytes":
                t.kind = placement_pb2.PlacementManifest.Tensor.BYTES
        t.ns_steps = rng.choice([0, 5, 7])
    return manifest


@pytest.mark.skipif(not TOOL, reason="OPTD_PLACEMENT_TOOL (the C++ placement) is not set")
@pytest.mark.parametrize("seed", range(60))
def test_python_and_cpp_place_alike(seed):
    manifest = random_manifest(seed)
    want, code = cpp_place(manifest)
    if want is None:
        with pytest.raises(placement.PlacementError) as error:
            placement.place(manifest)
        assert error.value.code == code
        return
    got = placement.place(manifest)
    assert json_format.MessageToDict(got) == json_format.MessageToDict(want)
    assert got.fingerprint == want.fingerprint


def test_whole_matrices_balance_by_newton_schulz_cost():
    manifest = placement_pb2.PlacementManifest()
    for e in range(2):
        manifest.endpoints.add(address=f"optd-{e}")
    for name, shape in [("c", [64, 64]), ("a", [128, 128]), ("b", [64, 128]), ("d", [64, 64])]:
        manifest.tensors.add(name=name, shape=shape)
    got = placement.place(manifest)
    unit = 5 * 64 ** 3
    assert [i.tensor for i in got.items] == ["a", "b", "c", "d"]
    assert list(got.newton_schulz_cost) == [8 * unit, 4 * unit]
    assert {i.tensor: i.endpoint for i in got.items} == {"a": 0, "b": 1, "c": 1, "d": 1}


def test_errors_name_what_is_wrong():
    with pytest.raises(placement.PlacementError, match="no endpoints"):
        placement.place(placement_pb2.PlacementManifest())
    manifest = placement_pb2.PlacementManifest()
    manifest.endpoints.add(address="optd-0", memory_bytes=1000)
    manifest.tensors.add(name="big", shape=[100, 100])
    with pytest.raises(placement.PlacementError, match="tensor 'big'") as error:
        placement.place(manifest)
    assert error.value.code == "RESOURCE_EXHAUSTED"
