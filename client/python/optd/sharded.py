"""A sharded session: one logical session over several optd instances, each holding the tensors
(or batch slices) optd.placement gave it; the same as client/sharded.h in C++, and equal to one
instance's results bit for bit on the same backend. Unlike the C++ session, it steps the owners in
turn, not at once: concurrent Step streams from Python threads hung now and then with Debian's
grpcio 1.51 (a stream never answered), and that is not yet understood."""

import grpc
import numpy as np

from optd import placement
from optd.client import OptdError, StepResult, _session_config
from optd.v1 import optd_pb2, placement_pb2

Tensor = placement_pb2.PlacementManifest.Tensor


def _named(error, address):
    return OptdError(error.code, f"instance {address}: {error.message}")


class ShardedSession:
    """Places `config` over `clients` (optd.Client, one per instance; `addresses` name them in
    errors) at placement `epoch` and creates the session `session_id` on every owner. A batched
    tensor's slices become tensors "name[i]" of shape [1, m, n]. `memory_bytes`: each instance's
    state budget (None: no limit)."""

    def __init__(self, clients, addresses, config, session_id, epoch, memory_bytes=None):
        if epoch <= 0:
            raise ValueError("a sharded session's epoch must be >= 1")
        config = _session_config(config)
        manifest = placement_pb2.PlacementManifest(epoch=epoch)
        for i, address in enumerate(addresses):
            manifest.endpoints.add(address=address,
                                   memory_bytes=(memory_bytes[i] if memory_bytes else 0))
        presets = {g.name: g.preset for g in config.groups}
        self._shapes = {}
        batched = set()
        for t in config.tensors:
            preset = presets.get(t.group, "")
            kind = (Tensor.BYTES if preset.startswith(("adamw", "rmnp"))
                    else Tensor.NEWTON_SCHULZ)
            batch = t.rank_policy == optd_pb2.RANK_POLICY_BATCH and len(t.shape) >= 3
            manifest.tensors.add(name=t.name, shape=list(t.shape), kind=kind, batch=batch)
            self._shapes[t.name] = tuple(t.shape)
            if batch:
                batched.add(t.name)
        self.placement = placement.place(manifest)
        self.epoch = epoch
        parts = []
        for _ in clients:
            part = optd_pb2.SessionConfig()
            part.CopyFrom(config)
            del part.tensors[:]
            part.placement_epoch = epoch
            parts.append(part)
        tensors = {t.name: t for t in config.tensors}
        self._pieces = {}  # name -> [(endpoint, name there, offset, count)]
        for item in self.placement.items:
            t = tensors[item.tensor]
            out = parts[item.endpoint].tensors.add()
            out.CopyFrom(t)
            size = int(np.prod(t.shape))
            if item.tensor in batched:
                m, n = t.shape[-2], t.shape[-1]
                out.name = f"{t.name}[{item.first}]"
                del out.shape[:]
                out.shape.extend([1, m, n])
                piece = (item.endpoint, out.name, item.first * m * n, m * n)
            else:
                piece = (item.endpoint, t.name, 0, size)
            self._pieces.setdefault(item.tensor, []).append(piece)
        self._shards = {}  # endpoint -> (address, Session)
        try:
            for e, (client, address) in enumerate(zip(clients, addresses)):
                if not parts[e].tensors:
                    continue
                try:
                    self._shards[e] = (address, client.create_session(parts[e], session_id))
                except OptdError as error:
                    raise _named(error, address) from None
        except OptdError:
            self.delete()
            raise

    def _split(self, tensors):
        per_shard = {e: {} for e in self._shards}
        for name, values in tensors.items():
            if name not in self._pieces:
                raise OptdError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown tensor '{name}'")
            flat = np.asarray(values, dtype=np.float32).reshape(-1)
            for endpoint, there, offset, count in self._pieces[name]:
                per_shard[endpoint][there] = flat[offset:offset + count]
        return per_shard

    def _join(self, per_shard):
        whole = {}
        for name, pieces in self._pieces.items():
            parts = [(offset, per_shard[e].get(there)) for e, there, offset, _ in pieces]
            if any(p is None for _, p in parts):
                continue
            flat = np.empty(int(np.prod(self._shapes[name])), dtype=np.float32)
            for offset, values in parts:
                values = np.asarray(values).reshape(-1)
                flat[offset:offset + values.size] = values
            whole[name] = flat.reshape(self._shapes[name])
        return whole

    def _each(self, call):
        """call(session, endpoint) on every shard in turn; the results by endpoint."""
        results = {}
        for e, (address, session) in self._shards.items():
            try:
                results[e] = call(session, e)
            except OptdError as error:
                raise _named(error, address) from None
        return results

    def upload_parameters(self, tensors):
        """Replaces the given tensors' parameters ({name: values}, each whole) on their owners."""
        per_shard = self._split(tensors)
        self._each(lambda s, e: s.upload_parameters(per_shard[e]) if per_shard[e] else 0)

    def get_parameters(self):
        """{name: float32 array} of every tensor, whole."""
        return self._join(self._each(lambda s, e: s.get_parameters()))

    def step(self, step, gradients, **options):
        """One step of this worker on every owner (the keyword options of
        Session.step); the StepResult holds every tensor whole. An instance's failure is raised
        naming it; steps its peers finished are replayed to a retry."""
        per_shard = self._split(gradients)
        results = self._each(lambda s, e: s.step(step, per_shard[e],
                                                 placement_epoch=self.epoch, **options))
        first = next(iter(results.values()))
        return StepResult(step=step,
                          skipped=any(r.skipped for r in results.values()),
                          replayed=any(r.replayed for r in results.values()),
                          tensors_updated=sum(r.tensors_updated for r in results.values()),
                          nonfinite_values=sum(r.nonfinite_values for r in results.values()),
                          kind=first.kind,
                          values=self._join({e: r.values for e, r in results.items()}))

    def delete(self):
        """Deletes the session on every instance that holds a part."""
        for address, session in self._shards.values():
            try:
                session.delete()
            except OptdError:
                pass
        self._shards = {}
