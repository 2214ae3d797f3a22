"""A sharded session: one logical session over several optd instances, each holding the tensors
(or batch slices) optd.placement gave it; the same as client/sharded.h in C++, and equal to one
instance's results bit for bit on the same backend. Unlike the C++ session, it steps the owners in
turn, not at once: concurrent Step streams from Python threads hung now and then with Debian's
grpcio 1.51 (a stream never answered), and that is not yet understood.

Resharding moves the session onto other instances at a later placement epoch through the daemons'
--shared_state_root: every part is checkpointed there, and the new parts start from those
checkpoints (CreateSessionRequest.restore_from), tensors found by name."""

import dataclasses

import grpc
import numpy as np

from optd import placement
from optd.client import OptdError, StepResult, _session_config, as_float32
from optd.v1 import optd_pb2, placement_pb2

Tensor = placement_pb2.PlacementManifest.Tensor


def _named(error, address):
    return OptdError(error.code, f"instance {address}: {error.message}")


@dataclasses.dataclass
class ShardRestore:
    """Where a resharded session's state comes from: the parts of session `session_id` (empty:
    the new session's id) that the instances `instances` (their --instance_name) checkpointed
    into the shared state root. `tokens`, by instance address: the tokens of the sessions the new
    parts replace, which authorize the replacement on a daemon without an admin token.
    `source_tokens`, by instance name: the tokens of the sessions checkpointed there, which
    authorize reading them without an admin token."""
    instances: list
    session_id: str = ""
    tokens: dict = dataclasses.field(default_factory=dict)
    source_tokens: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _Part:
    address: str
    client: object  # the optd.Client of its instance
    session: object  # the optd.Session there
    groups: frozenset  # the groups its tensors are in


def _join_auto_choices(out, pieces):
    """The auto choices of a tensor whose `pieces` (slices in batch order) each hold their
    matrices': one list over all the matrices, the latest piece's decision step, and the
    decision's figures as the mean over them (each piece's mean weighted by its matrices: one
    instance's, up to rounding, where every matrix was decided at that step; a zero matrix is
    not decided on and keeps its choice, and its piece its older figures)."""
    if not pieces[0].HasField("auto_choices"):
        return
    out.auto_choices.CopyFrom(pieces[0].auto_choices)
    out.auto_choices.decided_at_step = max(p.auto_choices.decided_at_step for p in pieces)
    for field in ("newton_schulz_steps", "row_normalize"):
        del getattr(out.auto_choices, field)[:]
        for p in pieces:
            getattr(out.auto_choices, field).extend(getattr(p.auto_choices, field))
    if len(pieces) > 1:
        counts = [len(p.auto_choices.newton_schulz_steps) for p in pieces]
        for field in ("small_sv_share", "dominance_ratio_min", "rmnp_muon_cosine"):
            setattr(out.auto_choices, field,
                    sum(getattr(p.auto_choices, field) * n for p, n in zip(pieces, counts))
                    / max(1, sum(counts)))


class ShardedSession:
    """Places `config` over `clients` (optd.Client, one per instance; `addresses` name them in
    errors) at placement `epoch` and creates the session `session_id` on every owner (resharding
    needs an id: the parts find their sources by it). A batched tensor's slices become tensors
    "name[i]" of shape [1, m, n]. `memory_bytes`: each instance's state budget (None: no limit).
    On an error, the parts already created are deleted.

    With `restore` (a ShardRestore), each part starts from the checkpoints named there instead
    (resharding: tensors are found by name, so N parts restore on M), replacing a session of that
    id on its instance; `epoch` must be later than theirs. Once every part exists, each is
    checkpointed (when its daemon has a state directory). On an error nothing is deleted: the
    sources must survive, and a retry replaces what was created."""

    def __init__(self, clients, addresses, config, session_id, epoch, memory_bytes=None, *,
                 restore=None):
        if epoch <= 0:
            raise ValueError("a sharded session's epoch must be >= 1")
        if len(clients) != len(addresses):
            raise ValueError(f"{len(clients)} clients but {len(addresses)} addresses")
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
        self.id = session_id
        self._config = config
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
        restore_from = ()
        if restore is not None:
            restore_from = [(instance, restore.session_id or session_id)
                            for instance in restore.instances]
        self._shards = {}  # endpoint -> _Part
        try:
            for e, (client, address) in enumerate(zip(clients, addresses)):
                if not parts[e].tensors:
                    continue
                token = None
                sources = restore_from
                if restore is not None and not client.admin_token:
                    token = restore.tokens.get(address)
                    sources = [(instance, source, restore.source_tokens.get(instance, ""))
                               for instance, source in restore_from]
                try:
                    session = client.create_session(parts[e], session_id,
                                                    restore_from=sources,
                                                    replace=restore is not None, token=token)
                except OptdError as error:
                    raise _named(error, address) from None
                self._shards[e] = _Part(address, client, session,
                                        frozenset(t.group for t in parts[e].tensors))
        except OptdError:
            if restore is None:
                self.delete()
            raise
        self._part_tensors = {e: list(parts[e].tensors) for e in self._shards}
        if restore is not None:
            # Every part has read its sources: now its own checkpoint may overwrite one of them.
            for part in self._shards.values():
                try:
                    part.session.checkpoint()
                except OptdError as error:
                    if error.code != grpc.StatusCode.FAILED_PRECONDITION:  # no state directory
                        raise _named(error, part.address) from None

    def parts(self):
        """The parts: (instance address, its optd.Session, token included), in endpoint order."""
        return [(part.address, part.session) for part in self._shards.values()]

    def _split(self, tensors):
        per_shard = {e: {} for e in self._shards}
        for name, values in tensors.items():
            if name not in self._pieces:
                raise OptdError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown tensor '{name}'")
            flat = as_float32(values)
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
        if not self._shards:
            raise OptdError(grpc.StatusCode.FAILED_PRECONDITION,
                            f"sharded session '{self.id}' has no parts (deleted or resharded)")
        results = {}
        for e, part in self._shards.items():
            try:
                results[e] = call(part.session, e)
            except OptdError as error:
                raise _named(error, part.address) from None
        return results

    def _common_step(self, steps, what):
        """The step every part reported in `steps` (by endpoint), or FAILED_PRECONDITION naming
        each part's."""
        if len(set(steps.values())) > 1:
            each = ", ".join(f"{self._shards[e].address} at step {step}"
                             for e, step in steps.items())
            raise OptdError(grpc.StatusCode.FAILED_PRECONDITION,
                            f"the parts of session '{self.id}' {what} different steps: {each}")
        return next(iter(steps.values()))

    def info(self):
        """The session's optd_pb2.SessionInfo, put together from its parts': every tensor whole
        (a batched tensor's slices as one, with the fewest steps_applied of them); `step` the
        steps every part has completed (the next step is step + 1: a part already past it
        replays it); `checkpoint_step` the parts' common one, -1 when they differ; bytes
        summed."""
        infos = self._each(lambda s, e: s.info())
        first = next(iter(infos.values()))
        checkpoint_steps = {i.checkpoint_step for i in infos.values()}
        merged = optd_pb2.SessionInfo(
            session_id=self.id, step=min(i.step for i in infos.values()),
            state_bytes=sum(i.state_bytes for i in infos.values()),
            loaded=all(i.loaded for i in infos.values()),
            checkpoint_step=checkpoint_steps.pop() if len(checkpoint_steps) == 1 else -1,
            backend=", ".join(sorted({i.backend for i in infos.values()})),
            workers_pending=max(i.workers_pending for i in infos.values()))
        merged.config.CopyFrom(first.config)
        del merged.config.tensors[:]
        there = {(e, t.config.name): t for e, i in infos.items() for t in i.tensors}
        for t in self._config.tensors:
            pieces = [there[(e, name)] for e, name, _, _ in
                      sorted(self._pieces[t.name], key=lambda piece: piece[2])]
            out = merged.tensors.add()
            out.CopyFrom(pieces[0])
            out.config.name = t.name
            del out.config.shape[:]
            out.config.shape.extend(t.shape)
            out.num_elements = sum(p.num_elements for p in pieces)
            out.steps_applied = min(p.steps_applied for p in pieces)
            _join_auto_choices(out, pieces)
            merged.config.tensors.add().CopyFrom(out.config)
        return merged

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
                          values=self._join({e: r.values for e, r in results.items()}),
                          # durable only once every part is on disk
                          checkpoint_step=min(r.checkpoint_step for r in results.values()),
                          checkpoint_error='; '.join(f'{e}: {r.checkpoint_error}'
                                                     for e, r in results.items()
                                                     if r.checkpoint_error))

    def update_hyperparams(self, updates):
        """Session.update_hyperparams on the parts holding tensors of the updated groups, each
        part all or none; NOT_FOUND for a group no part holds. An instance's failure is raised
        naming it, and the parts before it keep their update."""
        held = frozenset().union(*(part.groups for part in self._shards.values()))
        for u in updates:
            if u["group"] not in held:
                raise OptdError(grpc.StatusCode.NOT_FOUND,
                                f"session '{self.id}' has no group '{u['group']}'")

        def update(session, e):
            mine = [u for u in updates if u["group"] in self._shards[e].groups]
            if mine:
                session.update_hyperparams(mine)
        self._each(update)

    def checkpoint(self, shared=False):
        """Checkpoints every part (`shared`: into the shared state root too, where a resharded
        session restores from) and returns their step; FAILED_PRECONDITION naming each instance's
        step when the parts are at different steps."""
        return self._common_step(self._each(lambda s, e: s.checkpoint(shared).step),
                                 "were checkpointed at")

    def restore(self):
        """Restores every part from its last checkpoint (after an instance restarted further back
        than its peers) and returns the common step; FAILED_PRECONDITION naming each instance's
        step when the checkpoints are not of one step."""
        return self._common_step(self._each(lambda s, e: s.restore()), "were restored at")

    def export_state(self, parameters=True):
        """Session.export_state of the whole session: every part's state put together, each
        tensor whole (a batched tensor's slices joined in order), the header's config the whole
        session's. FAILED_PRECONDITION naming each instance's step when the parts are at
        different steps."""
        exported = self._each(lambda s, e: s.export_state(parameters))
        step = self._common_step({e: h.step for e, (h, _) in exported.items()}, "are at")
        header = optd_pb2.StateHeader(config=self._config, step=step, parameters=parameters)
        groups = {}
        for h, _ in exported.values():
            for u in h.hyperparams:
                groups.setdefault(u.group, u)
        header.hyperparams.extend(groups[g] for g in sorted(groups))
        states = {e: {t.name: t for t in h.tensors} for e, (h, _) in exported.items()}
        records = {}
        for t in self._config.tensors:
            pieces = sorted(self._pieces[t.name], key=lambda piece: piece[2])
            parts = [states[e][there] for e, there, _, _ in pieces]
            out = header.tensors.add(name=t.name, elements=int(np.prod(t.shape)),
                                     steps_applied=min(p.steps_applied for p in parts),
                                     state_buffers=parts[0].state_buffers)
            out.state_elements.extend(sum(p.state_elements[b] for p in parts)
                                      for b in range(len(parts[0].state_buffers)))
            _join_auto_choices(out, parts)
            for buffer in ([""] if parameters else []) + list(parts[0].state_buffers):
                records[(t.name, buffer)] = np.concatenate(
                    [exported[e][1][(there, buffer)] for e, there, _, _ in pieces])
        return header, records

    def import_state(self, header, records):
        """Session.import_state into every part: each tensor's records split as the session
        places it (a batched tensor's slices, its state buffers in equal parts per slice). Each
        part takes its share all or nothing; should one refuse, the parts that took theirs are at
        the imported step and the others not (import again)."""
        whole = {t.name: t for t in header.tensors}
        missing = [t.name for t in self._config.tensors if t.name not in whole]
        if missing:
            raise OptdError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"the state lacks tensors of session '{self.id}': {missing}")
        shares = {}
        for e, tensors in self._part_tensors.items():
            part = optd_pb2.StateHeader(step=header.step, parameters=header.parameters)
            part.config.CopyFrom(header.config)
            del part.config.tensors[:]
            part.config.tensors.extend(tensors)
            part.hyperparams.extend(header.hyperparams)
            shares[e] = (part, {})
        for name, pieces in self._pieces.items():
            t = whole[name]
            for e, there, offset, count in pieces:
                part, share = shares[e]
                n = len(pieces)
                piece = part.tensors.add(name=there, steps_applied=t.steps_applied,
                                         elements=count, state_buffers=t.state_buffers,
                                         state_elements=[c // n for c in t.state_elements])
                index = offset // count if n > 1 else 0
                if t.HasField("auto_choices"):
                    # One choice per matrix: a slice takes its matrices' choices.
                    piece.auto_choices.CopyFrom(t.auto_choices)
                    per = len(t.auto_choices.newton_schulz_steps) // n
                    for field in ("newton_schulz_steps", "row_normalize"):
                        values = list(getattr(t.auto_choices, field))
                        del getattr(piece.auto_choices, field)[:]
                        getattr(piece.auto_choices, field).extend(
                            values[index * per:(index + 1) * per])
                for buffer in ([""] if header.parameters else []) + list(t.state_buffers):
                    values = as_float32(records[(name, buffer)])
                    size = values.size // n
                    share[(there, buffer)] = values[index * size:(index + 1) * size]
        steps = self._each(lambda s, e: s.import_state(*shares[e]).step)
        return self._common_step(steps, "imported")

    def reshard(self, clients, addresses, epoch, memory_bytes=None):
        """Moves the session onto `clients` (named by `addresses`) at a later `epoch`: checkpoints
        every part into the shared state root, creates the new parts from those checkpoints (a
        ShardedSession with a ShardRestore), then deletes the parts left on instances that own
        nothing any more. Every daemon involved needs --shared_state_root (FAILED_PRECONDITION
        naming the one without). Returns the new session; this one must not be used
        afterwards."""
        if epoch <= self.epoch:
            raise ValueError(f"resharding needs an epoch after {self.epoch}, got {epoch}")
        restore = ShardRestore(instances=[], session_id=self.id)
        for part in self._shards.values():
            try:
                info = part.client.server_info()
            except OptdError as error:
                raise _named(error, part.address) from None
            if not info.shared_state:
                raise _named(OptdError(grpc.StatusCode.FAILED_PRECONDITION,
                                       "the daemon has no --shared_state_root, so its part "
                                       "cannot move"), part.address)
            restore.instances.append(info.instance_name)
            restore.tokens[part.address] = part.session.token
            restore.source_tokens[info.instance_name] = part.session.token
        self.checkpoint(shared=True)
        moved = ShardedSession(clients, addresses, self._config, self.id, epoch, memory_bytes,
                               restore=restore)
        kept = {part.address for part in moved._shards.values()}
        for part in self._shards.values():
            if part.address not in kept:
                self._delete_part(part)
        self._shards = {}
        return moved

    @staticmethod
    def _delete_part(part):
        """Deletes a part, as its daemon allows: with the admin token when the client has one,
        otherwise with the part's own token. Errors are ignored: the part may be gone already."""
        session = part.session
        if part.client.admin_token:
            session = part.client.open_session(session.id, part.client.admin_token)
        try:
            session.delete()
        except OptdError:
            pass

    def delete(self):
        """Deletes the session on every instance that holds a part."""
        for part in self._shards.values():
            self._delete_part(part)
        self._shards = {}
