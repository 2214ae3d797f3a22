"""The Python client against a real optd: results against fp64 numpy references of the presets'
rules, the wire dtypes and chunking, and every error as an OptdError with its gRPC code that
leaves the session unchanged."""

import os
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest

import optd
from numpy_reference import newton_schulz
from optd import wire
from optd.v1 import optd_pb2

CONFIG = """
tensors { name: "w" shape: [6, 10] group: "matrices" normal { seed: 3 std: 0.5 } }
tensors { name: "b" shape: [10] group: "vectors" normal { seed: 4 std: 0.1 } }
groups { name: "matrices" preset: "keller"
         overrides { key: "precision" value: "fp32" }
         overrides { key: "weight_decay" value: "0.1" } }
groups { name: "vectors" preset: "adamw" }
"""


def gradients(step):
    rng = np.random.default_rng(100 + step)
    return {"w": rng.standard_normal((6, 10)).astype(np.float32),
            "b": rng.standard_normal(10).astype(np.float32)}


class Fp64Reference:
    """Keller's Muon (EMA momentum 0.95, Nesterov, 5 NS steps, scale √max(1, rows/cols), decoupled
    decay) and torch's AdamW (β 0.9/0.999, ε 1e-8 outside the root, bias corrections), in fp64."""

    def __init__(self, w, b):
        self.w, self.b = w.astype(np.float64), b.astype(np.float64)
        self.m_w = np.zeros_like(self.w)
        self.m_b, self.v_b = np.zeros_like(self.b), np.zeros_like(self.b)
        self.t = 0

    def step(self, g, lr_w=0.02, wd_w=0.1, lr_b=1e-3, wd_b=0.01):
        self.t += 1
        gw, gb = g["w"].astype(np.float64), g["b"].astype(np.float64)
        self.m_w = self.m_w + 0.05 * (gw - self.m_w)
        u = gw + 0.95 * (self.m_w - gw)
        scale = np.sqrt(max(1.0, self.w.shape[0] / self.w.shape[1]))
        self.w = self.w * (1 - lr_w * wd_w) - lr_w * scale * newton_schulz(u)
        self.m_b = 0.9 * self.m_b + 0.1 * gb
        self.v_b = 0.999 * self.v_b + 0.001 * gb * gb
        m_hat = self.m_b / (1 - 0.9 ** self.t)
        v_hat = self.v_b / (1 - 0.999 ** self.t)
        self.b = self.b * (1 - lr_b * wd_b) - lr_b * m_hat / (np.sqrt(v_hat) + 1e-8)


@pytest.fixture
def client(daemon):
    with optd.Client(daemon, timeout=30) as c:
        c.wait_ready()
        yield c


def test_steps_match_the_fp64_rules_of_the_presets(client):
    session = client.create_session(CONFIG)
    assert session.shapes() == {"w": (6, 10), "b": (10,)}
    start = session.get_parameters()
    assert start["w"].shape == (6, 10) and start["w"].dtype == np.float32
    reference = Fp64Reference(start["w"], start["b"])
    for step in range(1, 6):
        result = session.step(step, gradients(step))
        reference.step(gradients(step))
        assert (result.step, result.skipped, result.replayed, result.tensors_updated) == (
            step, False, False, 2)
        assert result.kind == optd_pb2.STEP_RESULT_PARAMETERS
        np.testing.assert_allclose(result.values["w"], reference.w, rtol=0, atol=2e-5)
        np.testing.assert_allclose(result.values["b"], reference.b, rtol=0, atol=2e-6)
    # The parameters the daemon holds are the ones the last step returned.
    held = session.get_parameters()
    np.testing.assert_array_equal(held["w"], result.values["w"])
    session.delete()


def test_wire_dtypes_and_chunks(client):
    # bf16/fp16 gradients act exactly as fp32 gradients rounded to them beforehand; any chunk
    # size gives the same bits.
    for name in ("bf16", "fp16"):
        wide = client.create_session(CONFIG)
        narrow = client.create_session(CONFIG)
        g = gradients(1)
        rounded = {k: wire.round_to(v, name) for k, v in g.items()}
        a = wide.step(1, rounded)
        b = narrow.step(1, g, wire_dtype=name, chunk_bytes=6)
        for k in g:
            np.testing.assert_array_equal(a.values[k], b.values[k])
        # Results in the narrow dtype are the fp32 results rounded.
        c = narrow.get_parameters(wire_dtype=name, chunk_bytes=8)
        np.testing.assert_array_equal(c["w"], wire.round_to(b.values["w"], name).reshape(6, 10))
    # bf16 rounding is to nearest even, and NaN stays NaN.
    values = np.array([1.0, 1.00390625, 1.01171875, -2.5, np.inf, np.nan], dtype=np.float32)
    expected = np.array([1.0, 1.0, 1.015625, -2.5, np.inf], dtype=np.float32)
    got = wire.round_to(values, "bf16")
    np.testing.assert_array_equal(got[:5], expected)
    assert np.isnan(got[5])


def test_upload_and_torch_tensors(client):
    torch = pytest.importorskip("torch")
    session = client.create_session(CONFIG)
    w = torch.arange(60, dtype=torch.float32).reshape(6, 10) / 7
    assert session.upload_parameters({"w": w}, chunk_bytes=12) == 1
    np.testing.assert_array_equal(session.get_parameters(["w"])["w"], w.numpy())
    # A bf16 torch gradient goes in as its float32 value.
    g = {k: torch.from_numpy(v).bfloat16() for k, v in gradients(1).items()}
    twin = client.create_session(CONFIG)
    twin.upload_parameters({"w": w})
    a = session.step(1, g)
    b = twin.step(1, {k: v.float().numpy() for k, v in g.items()})
    np.testing.assert_array_equal(a.values["w"], b.values["w"])


def test_errors_carry_their_codes_and_change_nothing(client, daemon):
    session = client.create_session(CONFIG, session_id="errors")
    before = session.get_parameters()

    def fails(code, fragment, call):
        with pytest.raises(optd.OptdError) as raised:
            call()
        assert raised.value.code == code, raised.value
        assert fragment in raised.value.message, raised.value.message
        after = session.get_parameters()
        for k in before:
            np.testing.assert_array_equal(after[k], before[k])

    g = gradients(1)
    fails(grpc.StatusCode.FAILED_PRECONDITION, "expects step 1", lambda: session.step(3, g))
    fails(grpc.StatusCode.NOT_FOUND, "no tensor 'nope'",
          lambda: session.step(1, {"nope": np.zeros(3)}))
    bad = dict(g, w=g["w"].copy())
    bad["w"][2, 3] = np.nan
    fails(grpc.StatusCode.INVALID_ARGUMENT, "tensor 'w' element 23", lambda: session.step(1, bad))
    fails(grpc.StatusCode.INVALID_ARGUMENT, "elements",
          lambda: session.step(1, {"w": np.zeros(59)}))
    fails(grpc.StatusCode.INVALID_ARGUMENT, "worker_id 1",
          lambda: session.step(1, g, worker_id=1))
    stranger = client.open_session("errors", "optd_0000")
    fails(grpc.StatusCode.UNAUTHENTICATED, "not valid", stranger.info)
    fails(grpc.StatusCode.ALREADY_EXISTS, "errors",
          lambda: client.create_session(CONFIG, session_id="errors"))
    with pytest.raises(ValueError):
        session.step(1, g, wire_dtype="fp8")
    with pytest.raises(optd.OptdError) as raised:
        client.create_session("tensors { name: \"x\" shape: [2] group: \"missing\" }")
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    # A retry of the step that then runs gets the same result, marked replayed.
    first = session.step(1, g)
    again = session.step(1, g)
    assert again.replayed and not first.replayed
    np.testing.assert_array_equal(again.values["w"], first.values["w"])


def test_stream_messages_mean_what_protobuf_says_they_mean(client, daemon):
    """The daemon reads plain chunk messages where gRPC received them and leaves every other
    message to protobuf's parser: fields in another order, a chunk sent as two partial chunk
    fields (protobuf merges them) and an unknown field step exactly as the client's own messages
    do; bytes that are no StepRequest or UploadParamsRequest are INVALID_ARGUMENT and change
    nothing."""
    g = gradients(1)
    twin = client.create_session(CONFIG)
    raw = client.create_session(CONFIG)
    raw.upload_parameters(twin.get_parameters())
    expected = twin.step(1, g).values

    def field(number, wire_type, payload):
        def varint(v):
            out = b""
            while v >= 0x80:
                out += bytes([(v & 0x7F) | 0x80])
                v >>= 7
            return out + bytes([v])
        key = varint(number << 3 | wire_type)
        return key + (varint(len(payload)) + payload if wire_type == 2 else varint(payload))

    def chunk_fields(name, values, offset=0):
        data = np.ascontiguousarray(values, np.float32).tobytes()
        # data first, then the name, offset and dtype: not protobuf's order.
        return (field(4, 2, data) + field(1, 2, name.encode()) +
                (field(2, 0, offset) if offset else b"") + field(3, 0, optd_pb2.DTYPE_FP32))

    w, b = g["w"].ravel(), g["b"]
    messages = [
        optd_pb2.StepRequest(header=optd_pb2.StepHeader(session_id=raw.id, step=1))
        .SerializeToString(),
        field(2, 2, chunk_fields("w", w[:25])),
        # One message, two chunk fields: protobuf merges them (the second's data and offset win).
        field(2, 2, field(1, 2, b"w")) + field(2, 2, chunk_fields("w", w[25:], offset=25)),
        # An unknown field (number 9) inside the chunk.
        field(2, 2, chunk_fields("b", b) + field(9, 0, 7)),
    ]
    channel = grpc.insecure_channel(daemon)
    metadata = (("authorization", f"Bearer {raw.token}"),)
    step = channel.stream_stream("/optd.v1.Optimizer/Step", request_serializer=lambda m: m,
                                 response_deserializer=optd_pb2.StepResponse.FromString)
    responses = list(step(iter(messages), metadata=metadata, timeout=30))
    assert responses[0].summary.step == 1
    got = {}
    for r in responses[1:]:
        got.setdefault(r.chunk.tensor, b"")
        got[r.chunk.tensor] += r.chunk.data
    for name, values in expected.items():
        np.testing.assert_array_equal(np.frombuffer(got[name], np.float32),
                                      np.asarray(values, np.float32).ravel())
    before = raw.get_parameters()
    for method, header in [
            ("Step", optd_pb2.StepRequest(header=optd_pb2.StepHeader(session_id=raw.id, step=2))),
            ("UploadParams", optd_pb2.UploadParamsRequest(
                header=optd_pb2.UploadParamsHeader(session_id=raw.id)))]:
        call = channel.stream_stream(f"/optd.v1.Optimizer/{method}",
                                     request_serializer=lambda m: m,
                                     response_deserializer=lambda m: m)
        garbage = [header.SerializeToString(), field(2, 2, chunk_fields("b", b)), b"\xff\xff\xff"]
        with pytest.raises(grpc.RpcError) as raised:
            list(call(iter(garbage), metadata=metadata, timeout=30))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value
        assert f"{method}: a message of the stream is not a optd.v1." in raised.value.details()
        after = raw.get_parameters()
        for k in before:
            np.testing.assert_array_equal(after[k], before[k])
    assert raw.info().step == 1
    channel.close()
    twin.delete()
    raw.delete()


def test_hyperparams_checkpoint_restore_and_analysis(client):
    config = CONFIG + "analysis_interval: 1\n"
    session = client.create_session(config)
    session.step(1, gradients(1))
    saved = session.checkpoint()
    assert saved.step == 1
    session.update_hyperparams([{"group": "matrices", "lr": 0.0, "weight_decay": 0.0}])
    info = session.info()
    assert [t.lr for t in info.tensors] == [0.0, 1e-3]
    frozen = session.step(2, gradients(2)).values["w"]
    np.testing.assert_array_equal(frozen, session.get_parameters(["w"])["w"])
    assert session.restore() == 1
    assert session.info().step == 1
    session.step(2, gradients(2))
    deadline = time.time() + 30
    figures = []
    while not figures and time.time() < deadline:
        figures = session.analysis()
        time.sleep(0.05)
    assert [f.tensor for f in figures] == ["w"]
    assert figures[0].step == 2 and figures[0].grad_norm == pytest.approx(
        np.linalg.norm(gradients(2)["w"].astype(np.float64)), rel=1e-6)
    assert any(s.session_id == session.id for s in client.list_sessions())


def test_one_message_steps_equal_streamed_ones(client):
    # StepSmall (issue 18) has Step's results bit for bit, whichever path each step takes; a retry
    # of a finished step replays on either path; errors keep their codes.
    streamed = client.create_session(CONFIG)
    one_message = client.create_session(CONFIG)
    for step in range(1, 4):
        a = streamed.step(step, gradients(step))
        b = one_message.step(step, gradients(step), path="small" if step % 2 else "auto",
                             chunk_bytes=16)
        for k in ("w", "b"):
            np.testing.assert_array_equal(a.values[k], b.values[k])
        assert (b.step, b.replayed, b.tensors_updated) == (step, False, 2)
    again = one_message.step(3, gradients(99), path="small")
    assert again.replayed
    np.testing.assert_array_equal(again.values["w"], a.values["w"])
    with pytest.raises(optd.OptdError) as wrong:
        one_message.step(7, gradients(7), path="small")
    assert wrong.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "expects step 4" in wrong.value.message
    with pytest.raises(ValueError):
        one_message.step(4, gradients(4), path="carrier pigeon")


def test_results_too_large_for_one_message_stream_on_auto(client):
    # 1.5M parameters: 6 MiB of fp32 results. bf16 gradients (3 MiB) fit one message, the
    # results do not: "small" is refused before anything counts, "auto" falls back to Step.
    session = client.create_session(
        'tensors { name: "big" shape: [1572864] group: "v" } groups { name: "v" preset: "adamw" }')
    g = {"big": np.full(1572864, 0.5, dtype=np.float32)}
    with pytest.raises(optd.OptdError) as refused:
        session.step(1, g, wire_dtype="bf16", path="small")
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "more than one message holds" in refused.value.message
    assert session.info().step == 0
    result = session.step(1, g, wire_dtype="bf16", path="auto")
    assert result.step == 1 and not result.replayed
    assert session.info().step == 1


# One round of what a step does to the heap: a thread builds four 440 KiB messages by appending
# 4 KiB pieces, another frees them; prints the minor page faults of 20 rounds after 5 untimed.
_HEAP_ROUNDS = """
import resource, sys, threading
import optd
optd.Client("127.0.0.1:1", malloc_keep_bytes=int(sys.argv[1]))  # the channel connects lazily
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def one_round():
    made = []
    def build():
        for _ in range(4):
            message = bytearray()
            for _ in range(110):
                message += bytes(4096)
            made.append(message)
    for work in (build, made.clear):
        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
for _ in range(5):
    one_round()
before = faults()
for _ in range(20):
    one_round()
print(faults() - before)
"""


def test_a_client_keeps_freed_heap_for_the_next_step():
    def faults(keep):
        out = subprocess.run([sys.executable, "-c", _HEAP_ROUNDS, str(keep)], check=True,
                             capture_output=True, text=True, env=dict(os.environ)).stdout
        return int(out)

    # glibc's dynamic defaults trim the heap after each round, and the next faults 1.7 MiB of
    # pages in again (measured: about 8,300 faults in 20 rounds); a Client keeps them (about 500,
    # most of them the threads' own).
    kept, default = faults(optd.client.DEFAULT_MALLOC_KEEP_BYTES), faults(0)
    assert kept < 2500 < default, (kept, default)
    with pytest.raises(ValueError, match="malloc_keep_bytes"):
        optd.keep_freed_heap(-1)


def test_shared_memory_steps_equal_one_message_steps(client):
    # A session created with shared_memory: its worker maps a region of the daemon's, writes
    # the gradients there and reads the results there (optd.v1 AttachSharedMemory); every wire
    # dtype, a step of some tensors, a retry and the refusals give what StepSmall gives.
    config = CONFIG + "shared_memory: true\n"
    shared = client.create_session(config)
    wired = client.create_session(config)
    with pytest.raises(optd.OptdError) as unattached:
        shared.step(1, gradients(1), path="shared")
    assert unattached.value.code == grpc.StatusCode.FAILED_PRECONDITION
    region = shared.attach_shared_memory()
    assert shared.shared_memory(0) is region and set(region.slots) == {"w", "b"}
    for step, dtype in ((1, "fp32"), (2, "bf16"), (3, "fp16")):
        a = shared.step(step, gradients(step), wire_dtype=dtype)  # "auto": the region
        b = wired.step(step, gradients(step), wire_dtype=dtype, path="small")
        for k in ("w", "b"):
            np.testing.assert_array_equal(a.values[k], b.values[k])
            assert a.values[k].shape == b.values[k].shape
        assert (a.step, a.tensors_updated) == (step, 2)
    only_b = {"b": gradients(4)["b"]}
    a = shared.step(4, only_b, result_dtype="bf16")
    b = wired.step(4, only_b, result_dtype="bf16", path="small")
    assert a.tensors_updated == b.tensors_updated == 1
    for k in ("w", "b"):
        np.testing.assert_array_equal(a.values[k], b.values[k])
    again = shared.step(4, only_b, path="shared", result_dtype="bf16")
    assert again.replayed
    np.testing.assert_array_equal(again.values["w"], a.values["w"])
    bad = gradients(5)
    bad["w"][2, 3] = np.inf
    with pytest.raises(optd.OptdError) as refused:
        shared.step(5, bad)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "tensor 'w' element 23" in refused.value.message
    np.testing.assert_array_equal(shared.get_parameters(wire_dtype="bf16")["w"], a.values["w"])
    # A step without gradients (which a shared-memory request could not tell from one of every
    # tensor) goes over gRPC: it changes nothing, as StepSmall's.
    a, b = shared.step(5, {}), wired.step(5, {}, path="small")
    assert (a.step, a.tensors_updated) == (b.step, b.tensors_updated) == (5, 0)
    for k in ("w", "b"):
        np.testing.assert_array_equal(a.values[k], b.values[k])
    plain = client.create_session(CONFIG)
    with pytest.raises(optd.OptdError) as refused:
        plain.attach_shared_memory()
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    for session in (shared, wired, plain):  # the daemon's other tests need its session slots
        session.delete()
    assert shared.shared_memory(0) is None  # unmapped with the session


def test_a_shared_memory_session_that_gained_tensors_is_attached_again(client):
    # The region's layout follows the session's tensors: the Session that added them maps the
    # new region at once; another handle of the same session attaches again by itself, when
    # its gradients name a tensor its region lacks or the daemon refuses a region it no longer
    # has (nothing counted).
    config = CONFIG + "shared_memory: true\n"
    shared = client.create_session(config)
    wired = client.create_session(config)
    other = client.open_session(shared.id, shared.token)
    other.attach_shared_memory()
    shared.attach_shared_memory()
    extra = [optd_pb2.TensorConfig(name="c", shape=[3], group="vectors")]
    shared.add_tensors(extra)
    wired.add_tensors(extra)
    assert set(shared.shared_memory(0).slots) == {"w", "b", "c"}
    grads = {**gradients(1), "c": np.ones(3, np.float32)}
    a = other.step(1, grads)
    b = wired.step(1, grads, path="small")
    assert set(other.shared_memory(0).slots) == {"w", "b", "c"}
    for k in ("w", "b", "c"):
        np.testing.assert_array_equal(a.values[k], b.values[k])
    stale = client.open_session(shared.id, shared.token)
    stale.attach_shared_memory()
    shared.add_tensors([optd_pb2.TensorConfig(name="d", shape=[2], group="vectors")])
    wired.add_tensors([optd_pb2.TensorConfig(name="d", shape=[2], group="vectors")])
    only_w = {"w": gradients(2)["w"]}
    a = stale.step(2, only_w)  # its region has "w": the daemon's refusal says to attach again
    b = wired.step(2, only_w, path="small")
    assert set(stale.shared_memory(0).slots) == {"w", "b", "c", "d"}
    for k in ("w", "b", "c", "d"):
        np.testing.assert_array_equal(a.values[k], b.values[k])
    shared.delete()
    wired.delete()


def test_a_region_that_cannot_be_mapped_again_falls_back_to_grpc(client, monkeypatch):
    # The daemon no longer has the worker's region (as after a restart) and its new one cannot
    # be opened here (as from another namespace): the step, refused before it counted, goes over
    # gRPC, with StepSmall's results, and so do the worker's next steps; path="shared" raises.
    config = CONFIG + "shared_memory: true\n"
    shared = client.create_session(config)
    wired = client.create_session(config)
    shared.attach_shared_memory().nonce = bytes(16)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(optd.client.os, "open", refuse)
    with pytest.raises(PermissionError):
        shared.step(1, gradients(1), path="shared")
    for step in (1, 2):
        a = shared.step(step, gradients(step))
        b = wired.step(step, gradients(step), path="small")
        for k in ("w", "b"):
            np.testing.assert_array_equal(a.values[k], b.values[k])
        assert shared.shared_memory(0) is None
    shared.delete()
    wired.delete()
