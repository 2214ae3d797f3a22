"""Builds the optd package with its optd.v1 stubs, generated from optd's .proto files by protoc
and Debian's grpc_python_plugin (not python3-grpc-tools: bookworm's is 1.14, older than the
grpcio it would run with). The metadata is pyproject.toml's.

The .proto files are found at $OPTD_PROTO_DIR, else at ../../proto beside this file (a checkout
of optd)."""

import os
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
PROTOS = ["optd/v1/optd.proto", "optd/v1/checkpoint.proto", "optd/v1/placement.proto"]


def _tool(name):
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"optd's Python stubs need {name} on PATH (Debian: "
                           f"{'protobuf-compiler' if name == 'protoc' else 'protobuf-compiler-grpc'})")
    return path


class BuildWithStubs(build_py):
    """build_py, then protoc writes optd/v1/*_pb2.py and *_pb2_grpc.py into the build."""

    def run(self):
        super().run()
        proto_dir = os.environ.get("OPTD_PROTO_DIR", os.path.join(HERE, "..", "..", "proto"))
        missing = [p for p in PROTOS if not os.path.exists(os.path.join(proto_dir, p))]
        if missing:
            raise RuntimeError(f"optd's .proto files are not in {proto_dir} (missing {missing}); "
                               "build from a checkout of optd or set OPTD_PROTO_DIR")
        out = os.path.join(self.build_lib)
        os.makedirs(os.path.join(out, "optd", "v1"), exist_ok=True)
        subprocess.check_call([_tool("protoc"), f"-I{proto_dir}", f"--python_out={out}",
                               f"--grpc_python_out={out}",
                               f"--plugin=protoc-gen-grpc_python={_tool('grpc_python_plugin')}",
                               *PROTOS])
        open(os.path.join(out, "optd", "v1", "__init__.py"), "a").close()


setup(cmdclass={"build_py": BuildWithStubs})
