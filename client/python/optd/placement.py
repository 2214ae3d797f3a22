"""Placement of a model's tensors on several optd instances: the same function as
client/placement.h, with the same result and fingerprint (a test runs both on the same
manifests).

Whole tensors, or whole batch slices of a [..., m, n] tensor, go to one instance each, never a
matrix split inside Newton-Schulz: greedy longest-processing-time-first, Newton-Schulz matrices on
their cost steps*m*n*min(m, n), then the rest (RMNP, AdamW) on their state bytes, within each
instance's memory."""

from optd.v1 import placement_pb2

NEWTON_SCHULZ_STATE_BYTES = 12
OTHER_STATE_BYTES = 16
_MASK = (1 << 64) - 1

Manifest = placement_pb2.PlacementManifest
Tensor = placement_pb2.PlacementManifest.Tensor


class PlacementError(ValueError):
    """An invalid manifest (code 'INVALID_ARGUMENT') or one that does not fit
    ('RESOURCE_EXHAUSTED')."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


def _fnv(hash_, data):
    for byte in data:
        hash_ ^= byte
        hash_ = (hash_ * 1099511628211) & _MASK
    return hash_


def _fnv_int(hash_, value):
    return _fnv(hash_, (value & _MASK).to_bytes(8, "little"))


def place(manifest):
    """The placement (placement_pb2.Placement) of a placement_pb2.PlacementManifest."""
    endpoints = len(manifest.endpoints)
    if endpoints == 0:
        raise PlacementError("INVALID_ARGUMENT", "placement: no endpoints")
    items, names = [], set()
    for t in manifest.tensors:
        if not t.name:
            raise PlacementError("INVALID_ARGUMENT", "placement: a tensor has no name")
        if t.name in names:
            raise PlacementError("INVALID_ARGUMENT", f"placement: tensor '{t.name}' is repeated")
        names.add(t.name)
        elements = 1
        for d in t.shape:
            if d <= 0:
                raise PlacementError("INVALID_ARGUMENT",
                                     f"placement: tensor '{t.name}' has an empty dimension")
            elements *= d
        rank = len(t.shape)
        newton_schulz = (t.kind == Tensor.NEWTON_SCHULZ or
                         (t.kind == Tensor.KIND_UNSPECIFIED and rank >= 2))
        if t.batch and rank < 3:
            raise PlacementError("INVALID_ARGUMENT",
                                 f"placement: tensor '{t.name}' is batched but has rank {rank} (< 3)")
        if not newton_schulz:
            b = elements * OTHER_STATE_BYTES
            items.append((t.name, 0, 1, False, b, b))
            continue
        steps = t.ns_steps if t.ns_steps > 0 else 5
        if t.batch:
            m, n = t.shape[-2], t.shape[-1]
            slices = elements // (m * n)
        else:
            m = t.shape[0] if rank >= 1 else 1
            n, slices = elements // m, 1
        cost = steps * m * n * min(m, n)
        for s in range(slices):
            items.append((t.name, s if t.batch else 0, 1, True, cost,
                          m * n * NEWTON_SCHULZ_STATE_BYTES))
    # Newton-Schulz work first, largest first; then the rest by bytes; ties by name and slice.
    items.sort(key=lambda i: (not i[3], -i[4], i[0].encode(), i[1]))
    placement = placement_pb2.Placement(epoch=manifest.epoch)
    cost, used = [0] * endpoints, [0] * endpoints
    fingerprint = _fnv_int(14695981039346656037, manifest.epoch)
    for name, first, count, newton_schulz, item_cost, item_bytes in items:
        best = -1
        for e in range(endpoints):
            limit = manifest.endpoints[e].memory_bytes
            if limit > 0 and used[e] + item_bytes > limit:
                continue
            if best < 0:
                best = e
                continue
            key = (lambda i: (cost[i], used[i]) if newton_schulz else (used[i], cost[i]))
            if key(e) < key(best):
                best = e
        if best < 0:
            where = f" slice {first}" if first > 0 else ""
            raise PlacementError("RESOURCE_EXHAUSTED",
                                 f"placement: no instance has {item_bytes} bytes left for tensor "
                                 f"'{name}'{where}")
        if newton_schulz:
            cost[best] += item_cost
        used[best] += item_bytes
        placement.items.add(tensor=name, first=first, count=count, endpoint=best, cost=item_cost,
                            bytes=item_bytes)
        fingerprint = _fnv(fingerprint, name.encode())
        for value in (first, count, best):
            fingerprint = _fnv_int(fingerprint, value)
    placement.newton_schulz_cost.extend(cost)
    placement.bytes.extend(used)
    placement.fingerprint = fingerprint
    return placement
