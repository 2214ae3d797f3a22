#!/usr/bin/env python3
"""Writes the seed corpora of optd's libFuzzer targets into tests/fuzz/corpus/<target>/ (committed;
rerun after a format change). Checkpoints come from a real optd in a temporary state directory.

Usage: /usr/bin/python3 tests/fuzz/make_corpus.py BUILD_DIR   (a built tree: optd, build/python)
"""
import io
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "../../build"))
sys.path.insert(0, os.path.join(BUILD, "python"))
import optd  # noqa: E402
from optd.v1 import optd_pb2  # noqa: E402
from google.protobuf import text_format  # noqa: E402

CONFIGS = {
    "matrix_and_vector": """
        tensors { name: "w" shape: [4, 6] group: "m" }
        tensors { name: "b" shape: [6] group: "v" }
        groups { name: "m" preset: "keller" }
        groups { name: "v" preset: "adamw" }""",
    "overrides_batched": """
        tensors { name: "experts" shape: [2, 3, 5] group: "m" rank_policy: RANK_POLICY_BATCH
                  normal { std: 0.02 seed: 7 } }
        groups { name: "m" preset: "muoneq_rowcol"
                 overrides { key: "ns.dtype" value: "fp32" }
                 overrides { key: "pre_normalize.row_at_step" value: "3" } }
        world_size: 2 checkpoint_interval: 1 analysis_interval: 1""",
    "rmnp_normuon": """
        tensors { name: "a" shape: [8, 8] group: "r" }
        tensors { name: "c" shape: [3, 2, 2] group: "n" }
        groups { name: "r" preset: "rmnp" }
        groups { name: "n" preset: "normuon" }
        non_finite_policy: NON_FINITE_POLICY_SKIP_STEP step_result: STEP_RESULT_DELTA""",
}


def out_dir(target):
    path = os.path.join(HERE, "corpus", target)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def npy_seeds():
    path = out_dir("npy_fuzz")
    arrays = {
        "f4_matrix": np.arange(12, dtype=np.float32).reshape(3, 4),
        "f8_vector": np.linspace(-1, 1, 5),
        "f2_scalar": np.array(1.5, dtype=np.float16),
        "f4_fortran": np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
        "f4_empty": np.zeros((0, 3), dtype=np.float32),
    }
    for name, array in arrays.items():
        buffer = io.BytesIO()
        np.save(buffer, array)
        open(os.path.join(path, name), "wb").write(buffer.getvalue())
    # npy_fuzz's find: no elements, and other dimensions whose product overflows int64.
    header = ("{'descr': '<f8', 'fortran_order': True, "
              "'shape': (0, 66666, 66, 6666, 666, 363, 666, 363), }")
    header += " " * (-(10 + len(header) + 1) % 64) + "\n"
    open(os.path.join(path, "f8_fortran_zero_dimension_overflowing_strides"), "wb").write(
        b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode())


def config_seeds():
    path = out_dir("session_config_fuzz")
    for name, text in CONFIGS.items():
        open(os.path.join(path, name + ".txt"), "w").write(text.strip() + "\n")
        config = text_format.Parse(text, optd_pb2.SessionConfig())
        open(os.path.join(path, name + ".bin"), "wb").write(config.SerializeToString())


def framed(messages):
    return b"".join(struct.pack("<H", len(m)) + m for m in (x.SerializeToString() for x in messages))


def chunk(name, offset, values, dtype=optd_pb2.DTYPE_FP32):
    data = np.asarray(values, np.float32)
    if dtype == optd_pb2.DTYPE_BF16:
        data = (data.view(np.uint32) >> 16).astype(np.uint16)
    return optd_pb2.TensorChunk(tensor=name, offset=offset, dtype=dtype, data=data.tobytes())


def stream_seeds():
    path = out_dir("stream_fuzz")
    header = optd_pb2.StepRequest(header=optd_pb2.StepHeader(step=0))
    w = np.linspace(-1, 1, 24)
    seeds = {
        "whole_step": [header, optd_pb2.StepRequest(chunk=chunk("w", 0, w)),
                       optd_pb2.StepRequest(chunk=chunk("b", 0, np.ones(6)))],
        "split_bf16": [header, optd_pb2.StepRequest(chunk=chunk("w", 0, w[:10], optd_pb2.DTYPE_BF16)),
                       optd_pb2.StepRequest(chunk=chunk("w", 10, w[10:], optd_pb2.DTYPE_BF16))],
        "nan_gradient": [header, optd_pb2.StepRequest(chunk=chunk("b", 0, [0, np.nan, 1, 2, 3, 4]))],
        "outside": [header, optd_pb2.StepRequest(chunk=chunk("b", 4, np.ones(6)))],
        # A made-up name the refusal echoes: scripts/fuzz checks the daemon's log stays printable.
        "control_bytes_name": [header, optd_pb2.StepRequest(
            chunk=chunk("a\n2026-01-01T00:00:00Z optd: forged\x1b[2J\x00", 0, np.ones(6)))],
        "upload": [optd_pb2.UploadParamsRequest(header=optd_pb2.UploadParamsHeader()),
                   optd_pb2.UploadParamsRequest(chunk=chunk("b", 0, np.ones(6)))],
    }
    for name, messages in seeds.items():
        open(os.path.join(path, name), "wb").write(framed(messages))


def chunk_view_seeds():
    path = out_dir("chunk_view_fuzz")
    w = np.linspace(-1, 1, 24)
    seeds = {
        "step_chunk": optd_pb2.StepRequest(chunk=chunk("w", 3, w)),
        "upload_chunk_bf16": optd_pb2.UploadParamsRequest(chunk=chunk("b", 0, w[:6], optd_pb2.DTYPE_BF16)),
        "header": optd_pb2.StepRequest(header=optd_pb2.StepHeader(session_id="s", step=4)),
    }
    for name, message in seeds.items():
        # Two bytes choosing the cut points, then the message.
        open(os.path.join(path, name), "wb").write(b"\x07\x0d" + message.SerializeToString())


def checkpoint_seeds():
    path = out_dir("checkpoint_fuzz")
    work = tempfile.mkdtemp()
    daemon = subprocess.Popen(
        [os.path.join(BUILD, "server/optd"), "--listen=127.0.0.1:0", "--metrics_addr=",
         f"--state_dir={work}/state", f"--port_file={work}/port", "--threads=1"],
        stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if os.path.exists(f"{work}/port"):
                break
            time.sleep(0.05)
        client = optd.Client("127.0.0.1:" + open(f"{work}/port").read().strip())
        for name, text in CONFIGS.items():
            session = client.create_session(text, name.replace("_", "-"))
            config = text_format.Parse(text, optd_pb2.SessionConfig())
            gradients = {t.name: np.full(tuple(t.shape), 0.25, np.float32) for t in config.tensors}
            if config.world_size <= 1:  # a fresh multi-worker session's checkpoint is seed enough
                session.step(1, gradients)
            session.checkpoint()
            shutil.copy(f"{work}/state/{session.id}/checkpoint", os.path.join(path, name))
    finally:
        daemon.terminate()
        daemon.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    npy_seeds()
    config_seeds()
    stream_seeds()
    chunk_view_seeds()
    checkpoint_seeds()
    print("seed corpora written under", os.path.join(HERE, "corpus"))
