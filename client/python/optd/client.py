"""The optd client for Python: sessions, parameter upload and download, and the optimizer step,
over the optd.v1 gRPC contract (proto/optd/v1/optd.proto).

Tensors go in as numpy arrays or torch tensors (any shape; the session knows each tensor's) and
come back as float32 numpy arrays in the tensor's shape. Chunking and the fp32/bf16/fp16 wire
conversion happen inside. Every failed call raises OptdError with the daemon's gRPC status code
and message.
"""

import ctypes
import dataclasses
import mmap
import os
import queue

import grpc
import numpy as np
from google.protobuf import text_format

from optd import wire
from optd.v1 import optd_pb2, optd_pb2_grpc

DEFAULT_CHUNK_BYTES = 1 << 20  # the daemon's default
MAX_CHUNK_BYTES = 4 << 20
_MAX_MESSAGE_BYTES = (4 << 20) + (64 << 10)


def _message_bytes(gradients, wire_dtype, chunk_bytes):
    """The gradients' wire bytes in one StepSmall request, with each chunk's framing."""
    chunk_bytes = min(chunk_bytes or DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES)
    total = 256
    for name, flat in gradients.items():
        data = flat.size * wire.element_bytes(wire_dtype)
        total += data + (1 + data // chunk_bytes) * (64 + len(name))
    return total


DEFAULT_MALLOC_KEEP_BYTES = 32 << 20
_M_TRIM_THRESHOLD = -1  # glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_MAX_MMAP_THRESHOLD = 32 << 20  # glibc refuses more (HEAP_MAX_SIZE / 2 on 64-bit hosts)


def keep_freed_heap(nbytes=DEFAULT_MALLOC_KEEP_BYTES):
    """Up to `nbytes` of freed memory per malloc arena stays in this process, and allocations
    below min(nbytes, 32 MiB) come from the heap rather than pages mapped for them alone (glibc's
    M_TRIM_THRESHOLD and M_MMAP_THRESHOLD; the daemon's --malloc_keep_bytes). A step allocates
    and frees its messages, hundreds of KiB each, on gRPC's threads: with glibc's dynamic
    defaults the heap is trimmed after them and every step faults in freshly zeroed pages again
    (bench/RESULTS.md, "Main job"). Process-wide: it holds for torch's tensors too. Returns
    whether it took effect (False where the C library is not glibc). 0 changes nothing."""
    if nbytes == 0:
        return False
    if not 0 < nbytes < 1 << 31:
        raise ValueError(f"malloc_keep_bytes must be in [0, 2 GiB), not {nbytes}")
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc's own symbol: its mallopt takes these parameters
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return (mallopt(_M_MMAP_THRESHOLD, min(nbytes, _MAX_MMAP_THRESHOLD)) == 1
            and mallopt(_M_TRIM_THRESHOLD, nbytes) == 1)


class OptdError(Exception):
    """A failed optd call: `code` is the grpc.StatusCode, `message` the daemon's explanation."""

    def __init__(self, code, message):
        super().__init__(code, message)  # both in args: the error pickles
        self.code = code
        self.message = message

    def __str__(self):
        return f"{self.code.name}: {self.message}"


def _raise(error):
    if isinstance(error, grpc.RpcError) and hasattr(error, "code"):
        raise OptdError(error.code(), error.details() or "") from None
    raise error


def as_float32(values):
    """A flat float32 numpy array from a numpy array, torch tensor or nested list."""
    if hasattr(values, "detach"):  # a torch tensor, on any device and in any dtype
        values = values.detach().cpu().float().numpy()
    return np.ascontiguousarray(values, dtype=np.float32).reshape(-1)


@dataclasses.dataclass
class StepResult:
    step: int
    skipped: bool
    replayed: bool
    tensors_updated: int
    nonfinite_values: int
    kind: int  # optd_pb2.STEP_RESULT_PARAMETERS, _DELTA or _NONE
    values: dict  # tensor name -> float32 array in the tensor's shape (empty for NONE)
    # The last step on disk once this one committed, and why this step's periodic checkpoint
    # failed ('' when it did not): such a step is not durable (optd.proto, StepSummary).
    checkpoint_step: int = 0
    checkpoint_error: str = ''


def _session_config(config):
    """A SessionConfig from a SessionConfig, or its protobuf text format."""
    if isinstance(config, optd_pb2.SessionConfig):
        return config
    if isinstance(config, str):
        return text_format.Parse(config, optd_pb2.SessionConfig())
    raise TypeError("config is an optd_pb2.SessionConfig or its text format")


def _step_header(session_id, step, worker_id, lr, result_dtype, chunk_bytes, placement_epoch):
    """The StepHeader of Session.step and StreamedStep."""
    header = optd_pb2.StepHeader(
        session_id=session_id, worker_id=worker_id, step=step, placement_epoch=placement_epoch,
        chunk_bytes=min(chunk_bytes or DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES),
        result_dtype=(wire.dtype_value(result_dtype) if result_dtype
                      else optd_pb2.DTYPE_UNSPECIFIED))
    if lr is not None:
        header.lr = lr
    return header


class StreamedStep:
    """One worker's Step whose gradients go out as they become ready (optd.torch overlaps it
    with backward): send(name, values) queues a tensor's gradient, which gRPC's sending thread
    converts and sends while the caller goes on; finish() half-closes and returns the
    StepResult, calling on_chunk(name, offset, values) for each result chunk as it arrives (its
    `values` then stay empty); cancel() ends the call, and the daemon withdraws whatever it had
    counted of it. Session.stream_step starts one."""

    def __init__(self, session, step, *, worker_id=0, lr=None, wire_dtype="fp32",
                 result_dtype=None, chunk_bytes=DEFAULT_CHUNK_BYTES, timeout=None,
                 placement_epoch=0):
        wire.dtype_value(wire_dtype)
        self._session = session
        self._queue = queue.SimpleQueue()
        self._open = True
        header = _step_header(session.id, step, worker_id, lr, result_dtype, chunk_bytes,
                              placement_epoch)

        def requests():
            yield optd_pb2.StepRequest(header=header)
            while True:
                item = self._queue.get()
                if item is None:
                    return
                name, values = item
                for chunk in session._chunks({name: as_float32(values)}, wire_dtype,
                                             chunk_bytes):
                    yield optd_pb2.StepRequest(chunk=chunk)
        self._responses = session._stub.Step(requests(), metadata=session._metadata(),
                                             timeout=timeout)

    def send(self, name, values):
        """Queues tensor `name`'s gradient (whole; a numpy array or torch tensor, read when it is
        sent: do not change it before finish())."""
        if not self._open:
            raise RuntimeError("this step's gradients were already all sent")
        self._queue.put((name, values))

    def finish(self, on_chunk=None):
        """Sends what is queued, half-closes, and returns the step's StepResult."""
        if self._open:
            self._open = False
            self._queue.put(None)
        values = {}
        try:
            first = next(self._responses)
            if on_chunk is None:
                values = self._session._assemble(r.chunk for r in self._responses)
            else:
                for response in self._responses:
                    chunk = response.chunk
                    on_chunk(chunk.tensor, chunk.offset, wire.decode(chunk.data, chunk.dtype))
        except grpc.RpcError as e:
            _raise(e)
        return self._session._result(first.summary, values)

    def cancel(self):
        """Ends the call without a step from it (its gradients are withdrawn)."""
        # Cancel first, then release the request generator: a generator that ends before the
        # call is cancelled half-closes it, and a daemon that reads the half-close before the
        # cancellation takes the stream for a whole step from these gradients (a zero_grad()
        # after backward would then commit the abandoned batch).
        self._responses.cancel()
        if self._open:
            self._open = False
            self._queue.put(None)


def _region_refused(error):
    """Whether the daemon refused a shared-memory step because the region it names is not the
    worker's current one (nothing counted: attach again and resend)."""
    return (error.code == grpc.StatusCode.FAILED_PRECONDITION and
            "call AttachSharedMemory" in error.message)


class SharedMemory:
    """A worker's shared-memory region of a session on this host (Session.attach_shared_memory):
    per tensor a gradient slot and a result slot, so a step's messages carry no tensor bytes.
    `gradient(name, dtype)` and `result(name, dtype)` are numpy views of the slots (float32, or
    uint16 bits for bf16 and fp16), `gradient_area` every fp32 gradient slot in the session's
    order as one float32 view; a result view holds the last step's values until the next step
    of this worker overwrites them."""

    def __init__(self, region, worker_id):
        self.worker_id = worker_id
        self.nonce = region.nonce
        fd = os.open(region.path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        try:
            if os.fstat(fd).st_size != region.bytes:
                raise OSError(f"{region.path} is not a region of {region.bytes} bytes")
            self._map = mmap.mmap(fd, region.bytes, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        if self._map[:len(region.nonce)] != region.nonce:
            self._map.close()
            raise OSError(f"{region.path} is not this session's region (another process's "
                          "namespace?)")
        self._bytes = np.frombuffer(self._map, dtype=np.uint8)
        self.slots = {slot.tensor: slot for slot in region.slots}
        # The gradient slots follow one another in the session's order: one copy fills them all.
        first = region.slots[0].gradient_offset if region.slots else 0
        self.gradient_area = self._view(first, sum(s.elements for s in region.slots), "fp32")
        self._fp32 = {name: (self.gradient(name), self.result(name)) for name in self.slots}

    def _view(self, offset, elements, dtype):
        kind = np.float32 if dtype == "fp32" else np.uint16
        size = np.dtype(kind).itemsize
        return self._bytes[offset:offset + elements * size].view(kind)

    def gradient(self, name, dtype="fp32"):
        slot = self.slots[name]
        return self._view(slot.gradient_offset, slot.elements, dtype)

    def result(self, name, dtype="fp32"):
        slot = self.slots[name]
        return self._view(slot.result_offset, slot.elements, dtype)

    def write_gradient(self, name, values, dtype="fp32"):
        """Writes one gradient (numpy array or torch tensor, any shape with the tensor's size)
        into its slot in `dtype`: fp32 one copy, bf16 and fp16 rounded as the wire rounds them."""
        slot = self.slots.get(name)
        if slot is None:
            raise OptdError(grpc.StatusCode.NOT_FOUND,
                            f"the shared-memory region has no tensor {name!r}")
        flat = as_float32(values)
        if flat.size != slot.elements:
            raise OptdError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"gradient of {name!r} has {flat.size} elements, the tensor "
                            f"{slot.elements}")
        if dtype == "fp32":
            self._fp32[name][0][:] = flat
            return
        self.gradient(name, dtype)[:] = wire.to_half_bits(flat, dtype)

    def write_gradients(self, gradients, dtype="fp32"):
        """write_gradient of every {name: values}; every tensor's fp32 gradients in the
        session's order take one copy."""
        if dtype == "fp32" and list(gradients) == list(self.slots):
            flats = [as_float32(values) for values in gradients.values()]
            if all(flat.size == slot.elements for flat, slot in zip(flats, self.slots.values())):
                np.concatenate(flats, out=self.gradient_area)
                return
        for name, values in gradients.items():
            self.write_gradient(name, values, dtype)

    def read_result(self, name, dtype="fp32"):
        """The last step's result of one tensor as float32 (a view for fp32, valid until the next
        step of this worker)."""
        if dtype == "fp32":
            return self._fp32[name][1]
        return wire.from_half_bits(self.result(name, dtype), dtype)

    def close(self):
        """Unmaps the region once no view of it is left (views handed out keep it mapped)."""
        self._bytes = self.gradient_area = self._fp32 = None
        try:
            self._map.close()
        except BufferError:  # a result view still in use: unmapped when the last one goes
            pass


class Session:
    """One session of a daemon, as its token opens it. Not tied to a thread: share it freely."""

    def __init__(self, stub, session_id, token, info=None, timeout=None):
        self._stub = stub
        self.id = session_id
        self.token = token
        self.timeout = timeout
        self._shapes = None
        self._results_too_large = False  # StepSmall refused this session's results
        self._shared = {}  # worker id -> SharedMemory (attach_shared_memory)
        if info is not None:
            self._learn(info)

    def _metadata(self):
        return (("authorization", f"Bearer {self.token}"),)

    def _learn(self, info):
        self._shapes = {t.config.name: tuple(t.config.shape) for t in info.tensors}

    def shapes(self):
        """Tensor name -> shape, in session order."""
        if self._shapes is None:
            self.info()
        return dict(self._shapes)

    def info(self):
        """The session's optd_pb2.SessionInfo (config, step, per-tensor details)."""
        try:
            info = self._stub.GetSession(optd_pb2.GetSessionRequest(session_id=self.id),
                                         metadata=self._metadata(), timeout=self.timeout)
        except grpc.RpcError as e:
            _raise(e)
        self._learn(info)
        return info

    @staticmethod
    def _prepare(tensors, wire_dtype):
        """{name: flat float32 array}, checked before a call starts: a bad dtype or value raises
        here rather than inside gRPC's request stream."""
        wire.dtype_value(wire_dtype)
        return {name: as_float32(values) for name, values in tensors.items()}

    def _chunks(self, tensors, wire_dtype, chunk_bytes):
        """TensorChunk messages for prepared {name: flat float32}, each at most chunk_bytes of
        payload."""
        dtype = wire.dtype_value(wire_dtype)
        chunk_bytes = min(chunk_bytes or DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES)
        per_chunk = max(1, chunk_bytes // wire.element_bytes(wire_dtype))
        for name, flat in tensors.items():
            for offset in range(0, max(flat.size, 1), per_chunk):
                part = flat[offset:offset + per_chunk]
                yield optd_pb2.TensorChunk(tensor=name, offset=offset, dtype=dtype,
                                           data=wire.encode(part, wire_dtype),
                                           tensor_elements=flat.size)

    def _assemble(self, chunks):
        """{name: float32 array in the tensor's shape} from a stream of TensorChunk."""
        flat = {}
        for chunk in chunks:
            values = wire.decode(chunk.data, chunk.dtype)
            out = flat.get(chunk.tensor)
            if out is None:
                out = flat[chunk.tensor] = np.empty(chunk.tensor_elements, dtype=np.float32)
            out[chunk.offset:chunk.offset + values.size] = values
        shapes = self.shapes()
        return {name: values.reshape(shapes.get(name, values.shape)) for name, values in
                flat.items()}

    def upload_parameters(self, tensors, wire_dtype="fp32", chunk_bytes=DEFAULT_CHUNK_BYTES):
        """Replaces the parameters of the given tensors ({name: values}, each whole), all or none.
        Returns how many tensors were updated."""
        tensors = self._prepare(tensors, wire_dtype)

        def requests():
            yield optd_pb2.UploadParamsRequest(
                header=optd_pb2.UploadParamsHeader(session_id=self.id))
            for chunk in self._chunks(tensors, wire_dtype, chunk_bytes):
                yield optd_pb2.UploadParamsRequest(chunk=chunk)
        try:
            response = self._stub.UploadParams(requests(), metadata=self._metadata(),
                                               timeout=self.timeout)
        except grpc.RpcError as e:
            _raise(e)
        return response.tensors_updated

    def get_parameters(self, names=(), wire_dtype=None, chunk_bytes=0):
        """{name: float32 array} of `names` (default all), sent in `wire_dtype` (default each
        tensor's own dtype)."""
        request = optd_pb2.GetParamsRequest(
            session_id=self.id, tensors=list(names), chunk_bytes=chunk_bytes,
            dtype=wire.dtype_value(wire_dtype) if wire_dtype else optd_pb2.DTYPE_UNSPECIFIED)
        try:
            return self._assemble(self._stub.GetParams(request, metadata=self._metadata(),
                                                       timeout=self.timeout))
        except grpc.RpcError as e:
            _raise(e)

    def step(self, step, gradients, *, worker_id=0, lr=None, wire_dtype="fp32",
             result_dtype=None, chunk_bytes=DEFAULT_CHUNK_BYTES, timeout=None,
             placement_epoch=0, path="auto", copy_results=True):
        """Sends this worker's gradients ({name: values}) for step `step` (1-based: the session's
        completed steps + 1) and returns the step's StepResult once every worker has sent
        theirs. Tensors left out get no update; `lr` overrides every group's rate for this step
        only. `timeout` (seconds) is this call's deadline; by default it has none, since a step
        waits for the session's slowest worker. chunk_bytes 0 is the default (1 MiB), at most
        4 MiB. `placement_epoch` is a sharded session's (optd.sharded); 0 is unchecked.

        `path` picks the RPC, with the same semantics and results: "stream" (Step), "small"
        (StepSmall: one message each way; RESOURCE_EXHAUSTED when the results would not fit one
        message, before anything counts), "shared" (StepSmall through the worker's
        shared-memory region, attach_shared_memory) or "auto" (shared memory where the worker
        attached it, else StepSmall while the gradients fit one message, streaming for this
        session from the first refusal on). With `copy_results` False a shared-memory step's
        fp32 values are views of the region, valid until this worker's next step."""
        if path not in ("stream", "small", "shared", "auto"):
            raise ValueError(f"path must be 'stream', 'small', 'shared' or 'auto', not {path!r}")
        header = _step_header(self.id, step, worker_id, lr, result_dtype, chunk_bytes,
                              placement_epoch)
        # A step without gradients goes over gRPC: a shared-memory step naming no tensor
        # names every tensor.
        shared = self._shared.get(worker_id) if path in ("shared", "auto") and gradients else None
        if path == "shared" and shared is None and worker_id not in self._shared:
            raise OptdError(grpc.StatusCode.FAILED_PRECONDITION,
                            f"worker {worker_id} has no shared memory: attach_shared_memory first")
        if shared is not None:
            wire.dtype_value(wire_dtype)
            try:
                return self._step_shared(shared, header, gradients, wire_dtype, result_dtype,
                                         timeout, copy_results)
            except OSError:
                # The daemon's new region cannot be mapped here (it came back in another
                # namespace): nothing counted, so this worker steps over gRPC from now on.
                if path == "shared":
                    raise
                self._drop_shared(worker_id)
        gradients = self._prepare(gradients, wire_dtype)
        small = path == "small" or (
            path == "auto" and not self._results_too_large and
            _message_bytes(gradients, wire_dtype, chunk_bytes) <= _MAX_MESSAGE_BYTES)
        if small:
            request = optd_pb2.StepSmallRequest(
                header=header, chunks=list(self._chunks(gradients, wire_dtype, chunk_bytes)))
            try:
                reply = self._stub.StepSmall(request, metadata=self._metadata(), timeout=timeout)
                return self._result(reply.summary, self._assemble(reply.chunks))
            except grpc.RpcError as e:
                # Refused before anything counted: the results do not fit one message.
                if (path == "small" or e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or
                        not (e.details() or "").startswith("StepSmall:")):
                    _raise(e)
                self._results_too_large = True

        def requests():
            yield optd_pb2.StepRequest(header=header)
            for chunk in self._chunks(gradients, wire_dtype, chunk_bytes):
                yield optd_pb2.StepRequest(chunk=chunk)
        try:
            responses = self._stub.Step(requests(), metadata=self._metadata(), timeout=timeout)
            first = next(responses)
            values = self._assemble(r.chunk for r in responses)
        except grpc.RpcError as e:
            _raise(e)
        return self._result(first.summary, values)

    def attach_shared_memory(self, worker_id=0):
        """Maps worker `worker_id`'s shared-memory region (the session created with
        shared_memory, the daemon on this host and this process allowed to open it: the same
        user, or root) and returns its SharedMemory; step() then uses it on path "auto". Raises
        OptdError for the daemon's refusals and OSError where the region cannot be opened here
        (another host, container or user): steps then go over gRPC."""
        try:
            region = self._stub.AttachSharedMemory(
                optd_pb2.AttachSharedMemoryRequest(session_id=self.id, worker_id=worker_id),
                metadata=self._metadata(), timeout=self.timeout)
        except grpc.RpcError as e:
            _raise(e)
        shared = SharedMemory(region, worker_id)
        old = self._shared.pop(worker_id, None)
        if old is not None:
            old.close()
        self._shared[worker_id] = shared
        return shared

    def _drop_shared(self, worker_id):
        shared = self._shared.pop(worker_id, None)
        if shared is not None:
            shared.close()

    def shared_memory(self, worker_id=0):
        """The worker's attached SharedMemory, or None."""
        return self._shared.get(worker_id)

    def _step_shared(self, shared, header, gradients, wire_dtype, result_dtype, timeout,
                     copy_results):
        if any(name not in shared.slots for name in gradients):
            # The session may have gained tensors since this region was mapped (another handle
            # added them): the daemon's region for them is a new one.
            shared = self.attach_shared_memory(shared.worker_id)
        names = None if len(gradients) == len(shared.slots) else list(gradients)
        shared.write_gradients(gradients, wire_dtype)
        try:
            return self._send_shared(shared, header, names, wire_dtype, result_dtype, timeout,
                                     copy_results)
        except OptdError as e:
            # The daemon's session has no region for this worker, or another one (it restarted,
            # reloaded the session, or the session gained tensors): refused before anything
            # counted, so attach again, write the gradients there and send the step once more.
            if not _region_refused(e):
                raise
        shared = self.attach_shared_memory(shared.worker_id)
        shared.write_gradients(gradients, wire_dtype)
        return self._send_shared(shared, header, names, wire_dtype, result_dtype, timeout,
                                 copy_results)

    def step_written(self, step, tensors=None, *, worker_id=0, lr=None, wire_dtype="fp32",
                     result_dtype=None, timeout=None, placement_epoch=0, copy_results=True,
                     values=True):
        """step() for gradients the caller has already written into worker `worker_id`'s
        region (SharedMemory.gradient(name, wire_dtype), or SharedMemory.gradient_area for every
        fp32 gradient in the session's order); `tensors` names those it wrote (default every
        tensor). FAILED_PRECONDITION (OptdError) before anything counts when the region is not
        the worker's current one (the session gained tensors, was reloaded, or the daemon
        restarted): attach again and write them there. With `values` False the StepResult's
        values stay empty: read the results from the region (SharedMemory.result)."""
        shared = self._shared.get(worker_id)
        if shared is None:
            raise OptdError(grpc.StatusCode.FAILED_PRECONDITION,
                            f"worker {worker_id} has no shared memory: attach_shared_memory first")
        header = _step_header(self.id, step, worker_id, lr, result_dtype, 0, placement_epoch)
        return self._send_shared(shared, header, None if tensors is None else list(tensors),
                                 wire_dtype, result_dtype, timeout, copy_results, values)

    def _send_shared(self, shared, header, names, wire_dtype, result_dtype, timeout,
                     copy_results, with_values=True):
        request = optd_pb2.StepSmallRequest(
            header=header, shared_memory=optd_pb2.SharedMemoryStep(
                dtype=wire.dtype_value(wire_dtype), tensors=names or (), nonce=shared.nonce))
        try:
            reply = self._stub.StepSmall(request, metadata=self._metadata(), timeout=timeout)
        except grpc.RpcError as e:
            _raise(e)
        values = {}
        if with_values and reply.summary.result != optd_pb2.STEP_RESULT_NONE:
            shapes = self.shapes()
            for name in shared.slots:
                dtype = result_dtype or wire.NAMES.get(shared.slots[name].dtype, "fp32")
                flat = shared.read_result(name, dtype)
                if copy_results and dtype == "fp32":
                    flat = flat.copy()
                values[name] = flat.reshape(shapes.get(name, flat.shape))
        return self._result(reply.summary, values)

    def stream_step(self, step, **options):
        """A StreamedStep: this worker's Step for `step`, its gradients sent one tensor at a
        time as the caller has them (the keyword options of step(), but `path`)."""
        return StreamedStep(self, step, **options)

    @staticmethod
    def _result(s, values):
        return StepResult(step=s.step, skipped=s.skipped, replayed=s.replayed,
                          tensors_updated=s.tensors_updated, nonfinite_values=s.nonfinite_values,
                          kind=s.result, values=values, checkpoint_step=s.checkpoint_step,
                          checkpoint_error=s.checkpoint_error)

    def update_hyperparams(self, updates):
        """Changes groups' hyperparameters, all or none: updates is a list of dicts with "group"
        and any of "lr", "momentum", "weight_decay"."""
        request = optd_pb2.UpdateHyperparamsRequest(session_id=self.id)
        for u in updates:
            request.updates.add(**u)
        try:
            self._stub.UpdateHyperparams(request, metadata=self._metadata(), timeout=self.timeout)
        except grpc.RpcError as e:
            _raise(e)

    def checkpoint(self, shared=False):
        """Writes the session's checkpoint; returns the optd_pb2.CheckpointResponse. `shared`:
        also where other instances restore a resharded session from (the daemon's
        --shared_state_root; FAILED_PRECONDITION without one), its path in `shared_path`."""
        try:
            return self._stub.Checkpoint(optd_pb2.CheckpointRequest(session_id=self.id,
                                                                    shared=shared),
                                         metadata=self._metadata(), timeout=self.timeout)
        except grpc.RpcError as e:
            _raise(e)

    def restore(self):
        """Puts the session back to its last checkpoint; returns that step."""
        try:
            return self._stub.Restore(optd_pb2.RestoreRequest(session_id=self.id),
                                      metadata=self._metadata(), timeout=self.timeout).step
        except grpc.RpcError as e:
            _raise(e)

    def analysis(self):
        """The latest analysis figures per tensor (a list of optd_pb2.TensorAnalysis)."""
        try:
            return list(self._stub.GetAnalysis(optd_pb2.GetAnalysisRequest(session_id=self.id),
                                               metadata=self._metadata(),
                                               timeout=self.timeout).tensors)
        except grpc.RpcError as e:
            _raise(e)

    def choices(self):
        """The current ns.steps=auto / direction=auto choices of every tensor with an auto mode:
        {tensor name: optd_pb2.AutoChoices} (one entry per matrix, and the deciding figures)."""
        try:
            response = self._stub.GetAnalysis(optd_pb2.GetAnalysisRequest(session_id=self.id),
                                              metadata=self._metadata(), timeout=self.timeout)
        except grpc.RpcError as e:
            _raise(e)
        return {c.tensor: c.choices for c in response.choices}

    def add_tensors(self, tensors, groups=()):
        """Adds tensors (optd_pb2.TensorConfig) and new groups for them (optd_pb2.GroupConfig)
        to the live session, all or nothing; returns its optd_pb2.SessionInfo. They start from
        their `init`: upload their parameters before stepping them."""
        request = optd_pb2.AddTensorsRequest(session_id=self.id, tensors=list(tensors),
                                             groups=list(groups))
        try:
            info = self._stub.AddTensors(request, metadata=self._metadata(), timeout=self.timeout)
        except grpc.RpcError as e:
            _raise(e)
        self._learn(info)
        # The session's tensors changed, and with them its regions' layout: map the new ones (a
        # worker whose region cannot be mapped now steps over gRPC; the tensors were added).
        for worker_id in list(self._shared):
            try:
                self.attach_shared_memory(worker_id)
            except (OSError, OptdError):
                self._drop_shared(worker_id)
        return info

    def export_state(self, parameters=True, chunk_bytes=0):
        """The session's whole optimizer state, of one step: (header, records), the header an
        optd_pb2.StateHeader (config, step, every group's hyperparameters, per tensor its applied
        steps and state buffers), records {(tensor, buffer): float32 array}, buffer "" the
        parameters (left out unless `parameters`). ABORTED (OptdError) when the session changed
        while it was read: read again."""
        request = optd_pb2.ExportStateRequest(session_id=self.id, chunk_bytes=chunk_bytes,
                                              skip_parameters=not parameters)
        header, records = None, {}
        try:
            for response in self._stub.ExportState(request, metadata=self._metadata(),
                                                    timeout=self.timeout):
                if response.HasField("header"):
                    header = response.header
                    for t in header.tensors:
                        sizes = dict(zip(t.state_buffers, t.state_elements))
                        if header.parameters:
                            sizes[""] = t.elements
                        for buffer, count in sizes.items():
                            records[(t.name, buffer)] = np.empty(count, dtype=np.float32)
                    continue
                chunk = response.chunk
                values = np.frombuffer(chunk.data, dtype="<f4")
                records[(chunk.tensor, chunk.buffer)][
                    chunk.offset:chunk.offset + values.size] = values
        except grpc.RpcError as e:
            _raise(e)
        return header, records

    def import_state(self, header, records, chunk_bytes=DEFAULT_CHUNK_BYTES):
        """Replaces the session's parameters, optimizer state, step and hyperparameters with an
        exported state (export_state's header and records, the parameters among them), all or
        nothing; returns the optd_pb2.ImportStateResponse (step, checkpoint_step)."""
        per_chunk = max(1, min(chunk_bytes or DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES) // 4)
        prepared = {key: as_float32(values) for key, values in records.items()}

        def requests():
            yield optd_pb2.ImportStateRequest(header=optd_pb2.ImportStateHeader(
                session_id=self.id, state=header))
            for (tensor, buffer), flat in prepared.items():
                for offset in range(0, flat.size, per_chunk):
                    yield optd_pb2.ImportStateRequest(chunk=optd_pb2.StateChunk(
                        tensor=tensor, buffer=buffer, offset=offset,
                        data=flat[offset:offset + per_chunk].astype("<f4").tobytes()))
        try:
            return self._stub.ImportState(requests(), metadata=self._metadata(),
                                          timeout=self.timeout)
        except grpc.RpcError as e:
            _raise(e)

    def delete(self):
        """Deletes the session and its checkpoint, and unmaps its shared memory here."""
        try:
            self._stub.DeleteSession(optd_pb2.DeleteSessionRequest(session_id=self.id),
                                     metadata=self._metadata(), timeout=self.timeout)
        except grpc.RpcError as e:
            _raise(e)
        for worker_id in list(self._shared):
            self._drop_shared(worker_id)


class Client:
    """A connection to one optd daemon.

    target: "host:port". With `root_certificates` (PEM bytes) the channel uses TLS, and with
    `private_key` and `certificate_chain` as well, mutual TLS. `admin_token` is sent on the calls
    that need it when the daemon has one (create, list, delete). `timeout` (seconds) is the
    deadline of every call but Step, whose own `timeout` argument defaults to none.
    `malloc_keep_bytes` is passed to keep_freed_heap (process-wide; 0 leaves malloc alone).
    """

    def __init__(self, target, admin_token=None, *, root_certificates=None, private_key=None,
                 certificate_chain=None, timeout=None,
                 malloc_keep_bytes=DEFAULT_MALLOC_KEEP_BYTES):
        keep_freed_heap(malloc_keep_bytes)
        options = [("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES)]
        if root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates, private_key,
                                                       certificate_chain)
            self._channel = grpc.secure_channel(target, credentials, options)
        else:
            self._channel = grpc.insecure_channel(target, options)
        self._stub = optd_pb2_grpc.OptimizerStub(self._channel)
        self.target = target
        self.admin_token = admin_token
        self.timeout = timeout

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self._channel.close()

    def _admin_metadata(self):
        return (("authorization", f"Bearer {self.admin_token}"),) if self.admin_token else ()

    def server_info(self):
        """The daemon's optd_pb2.ServerInfo: its backend, and for resharding its instance_name
        and whether it has a shared state root (shared_state)."""
        try:
            return self._stub.GetServerInfo(optd_pb2.GetServerInfoRequest(),
                                            timeout=self.timeout)
        except grpc.RpcError as e:
            _raise(e)

    def wait_ready(self, timeout=30):
        """Blocks until the channel connects; OptdError UNAVAILABLE after `timeout` seconds."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise OptdError(grpc.StatusCode.UNAVAILABLE,
                            f"optd did not answer within {timeout} s") from None

    def create_session(self, config, session_id="", *, restore_from=(), replace=False,
                       token=None):
        """A new session from `config` (an optd_pb2.SessionConfig or its text format), named
        `session_id` or by the daemon. The returned Session holds its token (shown only once).

        restore_from: (instance, session_id) pairs or (instance, session_id, token) triples,
        checkpoints in the daemon's --shared_state_root that the session starts from instead
        (resharding; the rules are CreateSessionRequest.restore_from's: each source needs its
        session's token unless the client holds the admin token). replace: replace a session of the same id once the
        new one is built. `token` authorizes the call instead of the admin token: replacing a
        session on a daemon without an admin token takes that session's token."""
        request = optd_pb2.CreateSessionRequest(
            session_id=session_id, config=_session_config(config), replace=replace,
            restore_from=[optd_pb2.CheckpointSource(instance=source[0], session_id=source[1],
                                                    token=source[2] if len(source) > 2 else "")
                          for source in restore_from])
        metadata = (("authorization", f"Bearer {token}"),) if token else self._admin_metadata()
        try:
            response = self._stub.CreateSession(request, metadata=metadata, timeout=self.timeout)
        except grpc.RpcError as e:
            _raise(e)
        session = Session(self._stub, response.session_id, response.token, timeout=self.timeout)
        session._shapes = {t.name: tuple(t.shape) for t in request.config.tensors}
        return session

    def open_session(self, session_id, token):
        """The session `session_id`, as `token` (its own, or the admin token) opens it."""
        return Session(self._stub, session_id, token, timeout=self.timeout)

    def list_sessions(self):
        """Every session's optd_pb2.SessionInfo (without per-tensor details)."""
        try:
            return list(self._stub.ListSessions(optd_pb2.ListSessionsRequest(),
                                                metadata=self._admin_metadata(),
                                                timeout=self.timeout).sessions)
        except grpc.RpcError as e:
            _raise(e)
