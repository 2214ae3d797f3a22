"""optd's Python client: see optd.client (Client, Session, OptdError, StepResult) and optd.wire.

The optd.v1 stubs (optd_pb2, optd_pb2_grpc) are generated at build time by protoc with Debian's
grpc_python_plugin into build/python/optd/v1/, beside a copy of this package; put build/python
on PYTHONPATH and run with /usr/bin/python3 (Debian's python3-grpcio and python3-numpy).
"""

from optd.client import Client, OptdError, Session, StepResult, as_float32, keep_freed_heap

__all__ = ["Client", "OptdError", "Session", "StepResult", "as_float32", "keep_freed_heap"]
