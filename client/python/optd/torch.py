"""optd.torch.RemoteOptimizer: a torch.optim.Optimizer whose step runs in an optd daemon.

    model = ...
    optimizer = RemoteOptimizer(model.named_parameters(), optd.Client("127.0.0.1:50051"),
                                preset="keller", lr=0.02, adamw_lr=3e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=1000)
    for batch in data:
        optimizer.zero_grad()
        loss(model, batch).backward()
        optimizer.step()          # gradients to optd, new parameters back into the model
        scheduler.step()

Grouping (DESIGN.md): 2-D hidden weights go to the Muon-family `preset`; vectors, embeddings and
the output head to AdamW (default_assignment); `assign` maps a parameter name to "matrix" or
"adamw" to override. Parameters that do not require grad are left out.

param_groups are torch's: "lr", "weight_decay" and "momentum" (for the AdamW group, its β1), so
torch's LR and momentum schedulers work; a change reaches the daemon (UpdateHyperparams) with the
next step. The daemon holds the authoritative parameters:
a step copies them into the model, and a parameter the model changed in place since (a
model.load_state_dict, a re-initialization) is uploaded before the step.

state_dict() is the optimizer's state itself, exported from the daemon as tensors in torch's
layout (momentum, Adam moments, per-parameter steps, the groups' rates, the session's step):
torch.save writes it anywhere, and load_state_dict() puts it into any new optimizer's session,
on any daemon or number of instances:

    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
    ...                                   # later, in a new process with a new optimizer
    saved = torch.load(path)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])

The daemon's own checkpoints (--state_dir) are for crash durability. To go on with a session
that outlived its process instead, create it with keep_session=True (else it is deleted when its
optimizer goes), then attach to it: RemoteOptimizer(..., session=client.open_session(id, token)),
which downloads the daemon's parameters into the model.

In torch.distributed (process_group, default the default group once it is initialized), the
ranks share one session: rank 0 creates it, and with grad_reduce="optd" every rank sends its
gradients as a worker and the daemon steps their mean (no DDP all-reduce needed); with
grad_reduce="ddp" (under DistributedDataParallel) rank 0 steps the reduced gradients and
broadcasts the new parameters.

Param groups may also be given as torch's list of dicts, and the session's settings as keyword
arguments (RemoteOptimizer's docstring); `with RemoteOptimizer(...) as optimizer:` deletes a
session it created on the way out.

Sharded over several instances, the same on the same backend bit for bit:

    optimizer = RemoteOptimizer(model.named_parameters(), [client_a, client_b, client_c],
                                preset="keller", lr=0.02, session_id="run")
    ...
    optimizer.reshard([client_a, client_b])  # through the daemons' --shared_state_root
"""

import contextlib
import ipaddress
import secrets
import warnings
import weakref

import torch
import torch.distributed as dist

from optd import wire
from optd.client import _MAX_MESSAGE_BYTES, OptdError, Session, _region_refused
from optd.sharded import ShardedSession
from optd.v1 import optd_pb2

# Name parts (split at "." and "_") that mark an embedding or an output head.
EMBEDDING_NAME_PARTS = frozenset({"embed", "embedding", "embeddings", "emb", "wte", "wpe"})
HEAD_NAME_PARTS = frozenset({"head", "classifier"})
_GROUPS = {"matrix": "matrices", "adamw": "vectors"}
# A state entry's key for the tensor's ns.steps=auto / direction=auto choices (optd.v1
# AutoChoices, serialized): optimizer state like the momentum, but not a buffer.
AUTO_CHOICES = "optd_auto_choices"


def _parts(name):
    return set(name.replace("_", ".").split("."))


def default_assignment(named_parameters):
    """Parameter name -> "matrix" or "adamw", DESIGN.md's default grouping: 2-D (and larger)
    hidden weights on the matrix preset; vectors, embeddings and the output head on AdamW.

    Embeddings and heads are told by a part of their name ("wte.weight", "tok_emb.weight",
    "lm_head.weight"). When no parameter is named a head, the last parameter of two or more
    dimensions is the head (a plain nn.Sequential's last Linear), unless the model names
    embeddings and its output size is not theirs: then the head is tied to the embedding and
    that parameter is a hidden one."""
    named = list(named_parameters)
    embeddings = [p for name, p in named if _parts(name) & EMBEDDING_NAME_PARTS]
    heads = [name for name, _ in named if _parts(name) & HEAD_NAME_PARTS]
    kinds = {name: "adamw" if p.dim() < 2 or _parts(name) & (EMBEDDING_NAME_PARTS |
                                                              HEAD_NAME_PARTS) else "matrix"
             for name, p in named}
    matrices = [(name, p) for name, p in named if p.dim() >= 2]
    if matrices and not heads:
        name, p = matrices[-1]
        if not embeddings or any(p.shape[0] == e.shape[0] for e in embeddings):
            kinds[name] = "adamw"
    return kinds


def _text(value):
    return repr(float(value)) if isinstance(value, float) else str(value)


_NON_FINITE_POLICIES = {"reject": optd_pb2.NON_FINITE_POLICY_REJECT,
                        "skip_step": optd_pb2.NON_FINITE_POLICY_SKIP_STEP}
_STEP_RESULTS = {"parameters": optd_pb2.STEP_RESULT_PARAMETERS,
                 "delta": optd_pb2.STEP_RESULT_DELTA}
# What a param group dict may hold besides "params" (torch's own keys and optd's).
_GROUP_KEYS = frozenset({"lr", "weight_decay", "momentum", "preset", "overrides", "name"})


def _named(params, counter):
    """(name, parameter) pairs from named_parameters() pairs or plain parameters (named p0, p1,
    ... across the whole optimizer, `counter` holding the next number)."""
    named = []
    for item in ([params] if isinstance(params, torch.Tensor) else params):
        if isinstance(item, tuple):
            named.append(item)
        else:
            named.append((f"p{counter[0]}", item))
            counter[0] += 1
    return named


def _group_config(group):
    """The session's GroupConfig of a param group: its preset, overrides, lr and (where the group
    sets it) weight_decay."""
    settings = dict(group["optd_overrides"], lr=group["lr"])
    if "weight_decay" in group:
        settings["weight_decay"] = group["weight_decay"]
    config = optd_pb2.GroupConfig(name=group["optd_group"], preset=group["optd_preset"])
    for key, value in settings.items():
        config.overrides.add(key=key, value=_text(value))
    return config


def _delete_quietly(session):
    """The finalizer of an optimizer that created its session: deletes it, and says nothing
    when it cannot (the daemon gone, the session already deleted)."""
    try:
        session.delete()
    except Exception:  # noqa: BLE001 -- a finalizer must not raise
        pass


_GRAD_REDUCE = ("optd", "ddp")


class _Ranks:
    """The process group an optimizer spans: its size, this process's rank in it, and
    broadcasts from its rank 0."""

    def __init__(self, group):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        if group is None or group is dist.group.WORLD:
            self.root = 0
        else:
            global_rank = getattr(dist, "get_global_rank", None) or \
                dist.distributed_c10d._get_global_rank
            self.root = global_rank(group, 0)

    @staticmethod
    def of(process_group):
        """The _Ranks of `process_group` (None: the default group) when torch.distributed is
        initialized and it has more than one rank; else None."""
        if not (dist.is_available() and dist.is_initialized()):
            if process_group is not None:
                raise ValueError("process_group given, but torch.distributed is not initialized")
            return None
        ranks = _Ranks(process_group)
        return ranks if ranks.size > 1 else None

    def broadcast(self, value):
        """Rank 0's `value` (any picklable object), on every rank."""
        box = [value]
        dist.broadcast_object_list(box, src=self.root, group=self.group)
        return box[0]

    def from_root(self, call):
        """Runs call() on rank 0 and returns its result on every rank; raises everywhere when it
        raised there (on the other ranks as a RuntimeError naming it), so no rank waits on a
        collective the root left."""
        result, error = None, None
        if self.rank == 0:
            try:
                result = call()
            except BaseException as e:  # noqa: BLE001 -- told to the other ranks, then raised
                error = e
            self.broadcast((result, None if error is None else f"{type(error).__name__}: {error}"))
            if error is not None:
                raise error
            return result
        result, text = self.broadcast(None)
        if text is not None:
            raise RuntimeError(f"optd: rank 0 of the process group failed: {text}")
        return result

    def broadcast_tensors(self, tensors):
        """Copies rank 0's values of `tensors` into every rank's, one flat buffer per dtype."""
        by_dtype = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            flat = torch._utils._flatten_dense_tensors([t.detach() for t in group])
            dist.broadcast(flat, src=self.root, group=self.group)
            if self.rank != 0:
                for t, value in zip(group, torch._utils._unflatten_dense_tensors(flat, group)):
                    t.copy_(value)


def _on_this_host(target):
    """Whether a gRPC target names this host: a Unix socket, localhost or a loopback address."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    for prefix in ("dns:///", "ipv4:", "ipv6:"):
        target = target.removeprefix(prefix)
    host = target[1:target.find("]")] if target.startswith("[") else target.rsplit(":", 1)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RemoteOptimizer(torch.optim.Optimizer):
    """See the module docstring.

    params: named_parameters() (the names label the daemon's tensors and its metrics), plain
    parameters (named p0, p1, ...), or torch's list of param group dicts: "params" (parameters
    or (name, parameter) pairs) and any of "lr", "weight_decay", "momentum" (for AdamW, its β1),
    "preset" (the group's rule; without it the group's parameters must all be matrices, stepped
    with `preset`, or all vectors/embeddings/heads, stepped with AdamW: default_assignment),
    "overrides" (key=value stage settings) and "name" (the daemon's group name, default
    "group<i>"). client: an optd.Client, or a list of them, one per instance: then the session
    is sharded over those instances (optd.sharded.ShardedSession) at `placement_epoch`,
    `addresses` naming them in errors (default: each client's target), and named `session_id`
    or a fresh "torch-..." id. overrides: key=value stage settings for the matrix preset (the
    kernels' OverrideKeys, e.g. {"precision": "fp32"}). wire_dtype: how gradients travel (fp32,
    bf16, fp16).

    The session's own settings: analysis_interval (the daemon's analyzer runs every that many
    steps; 0: off), non_finite_policy ("reject": a NaN or infinite gradient fails the step;
    "skip_step": the step completes changing nothing), checkpoint_interval (the daemon
    checkpoints every that many steps; 0: only on request), step_result ("parameters": the new
    parameters come back and are copied into the model, bit for bit the daemon's; "delta": new
    minus old come back and are added, which rounds), straggler_timeout (seconds a
    multi-worker step waits; None: the daemon's default).

    overlap: send each gradient as backward produces it (True), in step() (False), or "auto"
    (where the gradients would not fit one message; README "Clients"). step_path: the RPC a
    step not overlapped takes, "auto" (one message while it fits), "stream" or "small"
    (Session.step's `path`).

    shared_memory: step through a shared-memory region of the daemon's (optd.v1
    AttachSharedMemory) instead of sending the tensors' bytes over gRPC: each step writes the
    gradients into it and reads the results from it, and its messages carry no tensor bytes.
    "auto" (default): where the client's daemon is on this host (a loopback address or a Unix
    socket) and the gradients fit one message; True: always (an error where it cannot be);
    False: never. The session is charged the region, 8 bytes per parameter per worker. Where the
    region cannot be opened (the daemon in another container or running as another user), "auto"
    steps over gRPC and `shared_memory_error` says why.

    session: an optd.Session or optd.sharded.ShardedSession to attach to instead of creating
    one (its tensors must be these parameters), not with a list of clients. sync: what attaching
    does with the parameters, "download" (default: the daemon's, which a training run stepped,
    are copied into the model, and the groups' lr, weight_decay and momentum are the daemon's)
    or "upload" (the model's replace the daemon's); a created session is always uploaded to.

    process_group: the torch.distributed group whose ranks share this optimizer's session
    (default: the default group, once torch.distributed is initialized; a group of one rank is
    no group). Rank 0 creates the session (or attaches to `session`) and the others join it with
    its id and token, so with grad_reduce="optd" every rank needs a client. grad_reduce: "optd"
    (every rank sends its gradients as worker `rank` of a session of the group's size; the
    daemon steps their mean, every rank gets the new parameters) or "ddp" (the gradients are
    already reduced, as under DistributedDataParallel: rank 0 steps them through a one-worker
    session and broadcasts the new parameters).

    Lifetime: a session this optimizer created carries a lease: the daemon deletes it once no
    call has used it for `delete_after_idle` seconds (default a day; None or 0: never), so a
    process that dies leaves nothing behind for long. It is deleted at once by close(), on
    leaving a `with RemoteOptimizer(...) as optimizer:` block, or when the optimizer is
    garbage-collected or the interpreter exits, unless keep_session=True (then only close() or
    the lease deletes it). An attached session is left alone unless close(delete=True).
    """

    def __init__(self, params, client=None, *, preset="keller", lr=0.02, weight_decay=None,
                 adamw_lr=3e-3, adamw_weight_decay=None, overrides=None, assign=None,
                 analysis_interval=0, wire_dtype="fp32", session_id="", session=None,
                 addresses=None, placement_epoch=1, sync=None, keep_session=False,
                 non_finite_policy="reject", checkpoint_interval=0, step_result="parameters",
                 straggler_timeout=None, process_group=None, grad_reduce="optd",
                 delete_after_idle=86400.0, overlap="auto", step_path="auto",
                 shared_memory="auto"):
        params = list(params)
        dict_groups = bool(params) and isinstance(params[0], dict)
        counter = [0]
        if dict_groups:
            if not all(isinstance(g, dict) for g in params):
                raise ValueError("RemoteOptimizer takes parameters or a list of param group "
                                 "dicts, not both")
            user_groups = [(dict(g), _named(g.get("params", ()), counter)) for g in params]
            named = [pair for _, members in user_groups for pair in members]
        else:
            named = _named(params, counter)
        named = [(name, p) for name, p in named if p.requires_grad]
        if not named:
            raise ValueError("RemoteOptimizer got no parameters that require grad")
        if len({name for name, _ in named}) != len(named):
            raise ValueError("RemoteOptimizer got two parameters of the same name")
        if len({id(p) for _, p in named}) != len(named):
            raise ValueError("RemoteOptimizer got a parameter twice")
        assign = dict(assign or {})
        unknown = set(assign) - {name for name, _ in named}
        if unknown:
            raise ValueError(f"assign names parameters the model does not have (or that do not "
                             f"require grad): {sorted(unknown)}")
        kinds = {**default_assignment(named), **assign}
        bad = {name: kind for name, kind in kinds.items() if kind not in _GROUPS}
        if bad:
            raise ValueError(f"assign takes 'matrix' or 'adamw', got {bad}")
        if non_finite_policy not in _NON_FINITE_POLICIES:
            raise ValueError(f"non_finite_policy is one of {sorted(_NON_FINITE_POLICIES)}, got "
                             f"{non_finite_policy!r}")
        if step_result not in _STEP_RESULTS:
            raise ValueError(f"step_result is one of {sorted(_STEP_RESULTS)}, got "
                             f"{step_result!r}")
        if sync not in (None, "download", "upload"):
            raise ValueError(f"sync is 'download' or 'upload', got {sync!r}")
        config_options = dict(analysis_interval=int(analysis_interval),
                              non_finite_policy=_NON_FINITE_POLICIES[non_finite_policy],
                              checkpoint_interval=int(checkpoint_interval),
                              step_result=_STEP_RESULTS[step_result],
                              straggler_timeout_seconds=float(straggler_timeout or 0),
                              delete_after_idle_seconds=float(delete_after_idle or 0))
        self._names = {id(p): name for name, p in named}
        self._parameters = dict(named)
        self._wire_dtype = wire_dtype
        self._preset, self._lr, self._adamw_lr = preset, lr, adamw_lr  # add_param_group's defaults
        if step_path not in ("auto", "stream", "small"):
            raise ValueError(f"step_path is 'auto', 'stream' or 'small', got {step_path!r}")
        if shared_memory not in (True, False, "auto"):
            raise ValueError(f"shared_memory is True, False or 'auto', got {shared_memory!r}")
        self.step_path = step_path  # Session.step's path for a step not overlapped
        self._delta = step_result == "delta"
        groups = []
        if dict_groups:
            requires_grad = {id(p) for _, p in named}
            for i, (spec, members) in enumerate(user_groups):
                members = [(name, p) for name, p in members if id(p) in requires_grad]
                extra = set(spec) - _GROUP_KEYS - {"params"}
                if extra:
                    raise ValueError(f"param group {i} has keys optd does not know: "
                                     f"{sorted(extra)} (it takes {sorted(_GROUP_KEYS)})")
                name = str(spec.get("name", f"group{i}"))
                group_preset = spec.get("preset")
                if group_preset is None:
                    found = {kinds[n] for n, _ in members}
                    if len(found) > 1:
                        raise ValueError(
                            f"param group {i} ({name!r}) holds matrices and vectors, embeddings "
                            "or heads, which step with different rules: give it a 'preset' or "
                            "split it (optd.torch.default_assignment says which is which)")
                    group_preset = "adamw" if found == {"adamw"} else preset
                group = {"params": [p for _, p in members],
                         "lr": spec.get("lr", adamw_lr if group_preset == "adamw" else lr),
                         "optd_group": name, "optd_preset": group_preset,
                         "optd_overrides": dict(spec.get("overrides") or {})}
                for key in ("weight_decay", "momentum"):
                    if key in spec:
                        group[key] = spec[key]
                groups.append(group)
            if len({g["optd_group"] for g in groups}) != len(groups):
                raise ValueError("two param groups have the same name")
            tensor_group = {name: g["optd_group"] for g, (_, members) in zip(groups, user_groups)
                            for name, _ in members}
        else:
            for kind, group_lr, group_wd in (("matrix", lr, weight_decay),
                                             ("adamw", adamw_lr, adamw_weight_decay)):
                members = [p for name, p in named if kinds[name] == kind]
                if members:
                    group = {"params": members, "lr": group_lr, "optd_group": _GROUPS[kind],
                             "optd_preset": preset if kind == "matrix" else "adamw",
                             "optd_overrides": dict(overrides or {}) if kind == "matrix" else {}}
                    if group_wd is not None:
                        group["weight_decay"] = group_wd
                    groups.append(group)
            tensor_group = {name: _GROUPS[kinds[name]] for name, _ in named}
        # Momentum asked for by a group: sent once the session exists (it is no creation
        # override for every preset).
        asked_momentum = {g["optd_group"]: g["momentum"] for g in groups if "momentum" in g}
        # "momentum" in the defaults tells torch's schedulers (OneCycleLR, CyclicLR) that they
        # may cycle it; the daemon's values replace the placeholder below.
        super().__init__(groups, {"momentum": 0.0})
        self._initialized = True

        if grad_reduce not in _GRAD_REDUCE:
            raise ValueError(f"grad_reduce is one of {_GRAD_REDUCE}, got {grad_reduce!r}")
        ranks = _Ranks.of(process_group)
        sharded = isinstance(client, (list, tuple))
        if overlap not in (True, False, "auto"):
            raise ValueError(f"overlap is True, False or 'auto', got {overlap!r}")
        overlappable = not (sharded or isinstance(session, ShardedSession) or
                            (ranks is not None and grad_reduce == "ddp"))
        if overlap is True and not overlappable:
            raise ValueError("overlap=True needs one session taking this process's gradients: "
                             "not a sharded session, not grad_reduce='ddp'")
        if ranks is not None and (sharded or isinstance(session, ShardedSession)):
            raise ValueError("the ranks of a process group share one session on one daemon; a "
                             "sharded session cannot span a process group")
        root = ranks is None or ranks.rank == 0
        if session is None and client is None and (root or grad_reduce == "optd"):
            raise ValueError("RemoteOptimizer needs a client to create its session, or a session"
                             + ("" if root else " (with grad_reduce='optd' every rank sends its "
                                                "own gradients)"))
        if session is not None and sharded:
            raise ValueError("session= attaches to an existing session and takes no list of "
                             "clients; pass a sharded session as an optd.sharded.ShardedSession")
        if addresses is not None and not sharded:
            raise ValueError("addresses= names the instances of a sharded session: pass a list "
                             "of clients")
        self._ranks = ranks
        self._grad_reduce = grad_reduce
        # Shared memory where one daemon on this host takes this process's gradients: "auto"
        # where they fit one message (a larger model's steps overlap backward instead).
        fits = (sum(p.numel() for _, p in named) * wire.element_bytes(wire_dtype) <=
                _MAX_MESSAGE_BYTES)
        local = client is not None and not sharded and _on_this_host(client.target)
        if shared_memory is True and (sharded or isinstance(session, ShardedSession)):
            raise ValueError("shared_memory=True needs one daemon: not a sharded session")
        self._want_shared = shared_memory is True or (shared_memory == "auto" and local and fits
                                                      and not isinstance(session,
                                                                         ShardedSession))
        self._require_shared = shared_memory is True
        self.shared_memory_error = None  # why steps go over gRPC where shared memory was wanted
        self._finalizer = None
        self._owned = False
        self._deleted = False
        self.session = None
        self._stream = None  # the overlapped Step of the backward under way
        self._region_plan = None  # _step_in_region's views of the region, made once
        self.overlapped_steps = 0  # steps whose gradients went out during backward
        self._no_sync = 0
        if ranks is None:
            self._open(named, tensor_group, asked_momentum, client, session, sharded, sync,
                       keep_session, session_id, addresses, placement_epoch, 1, config_options)
        else:
            world_size = ranks.size if grad_reduce == "optd" else 1
            # Rank 0 creates (or attaches to) the job's session; the others learn its id, token,
            # step and rates from it, then take its parameters.
            shared = ranks.from_root(lambda: self._open(
                named, tensor_group, asked_momentum, client, session, sharded, sync,
                keep_session, session_id, addresses, placement_epoch, world_size,
                config_options))
            if not root:
                session_id, token, rates, self._step = shared
                if client is not None or session is not None:
                    self.session = (client.open_session(session_id, token) if client is not None
                                    else Session(session._stub, session_id, token))
                self._sent = {}
                for group, (lr_, wd, momentum) in zip(self.param_groups, rates):
                    group["lr"], group["weight_decay"], group["momentum"] = lr_, wd, momentum
                    self._sent[group["optd_group"]] = (lr_, wd, momentum)
            with torch.no_grad():
                if grad_reduce == "ddp":
                    ranks.broadcast_tensors(list(self._parameters.values()))
                    self._versions = {name: p._version for name, p in self._parameters.items()}
                elif not root:
                    self._download()
        if self.session is not None and self._want_shared and (
                ranks is None or grad_reduce == "optd" or ranks.rank == 0):
            self._attach_shared_memory()
        # Overlap: where one session takes this process's gradients as they come (not sharded,
        # not DDP's rank-0 stepping), and "auto" where they would not fit one message anyway.
        streamed = (sum(p.numel() for _, p in named) * wire.element_bytes(wire_dtype) >
                    _MAX_MESSAGE_BYTES)
        contiguous = all(p.is_contiguous() for _, p in named)  # results land in place
        if overlap is True and not contiguous:
            raise ValueError("overlap=True copies results into the parameters in place: every "
                             "parameter must be contiguous")
        shared = getattr(self.session, "shared_memory", None)
        attached = shared is not None and shared(self._worker_id()) is not None
        self._overlap = overlap is True or (overlap == "auto" and overlappable and streamed and
                                            contiguous and not attached)
        self._accumulators = []
        if self._overlap:
            self._hook_parameters(named)

    def _open(self, named, tensor_group, asked_momentum, client, session, sharded, sync,
              keep_session, session_id, addresses, placement_epoch, world_size, config_options):
        """Creates this optimizer's session (or attaches to `session`), uploads or downloads the
        parameters, and returns what the other ranks of a process group need: the session's id
        and token, each group's (lr, weight_decay, momentum) and the step."""
        if session is None:
            config = optd_pb2.SessionConfig(world_size=world_size,
                                            shared_memory=self._want_shared, **config_options)
            for name, p in named:
                config.tensors.add(name=name, shape=list(p.shape), group=tensor_group[name])
            config.groups.extend(_group_config(group) for group in self.param_groups)
            if sharded:
                session = ShardedSession(
                    client, addresses or [c.target for c in client], config,
                    session_id or f"torch-{secrets.token_hex(8)}", placement_epoch)
            else:
                session = client.create_session(config, session_id)
            created = True
        else:
            created = False
        self.session = session
        try:
            info = session.info()
            shapes = {t.config.name: (tuple(t.config.shape), t.config.group)
                      for t in info.tensors}
            expected = {name: (tuple(p.shape), tensor_group[name]) for name, p in named}
            if shapes != expected:
                raise ValueError(f"session {session.id!r} holds other tensors than these "
                                 f"parameters: {shapes} against {expected}")
            if not sharded and not isinstance(session, ShardedSession) and \
                    max(info.config.world_size, 1) != world_size:
                raise ValueError(f"session {session.id!r} has world_size "
                                 f"{info.config.world_size}, this optimizer needs {world_size}")
            self._step = info.step
            if created and asked_momentum:
                session.update_hyperparams([{"group": g, "momentum": float(m)}
                                            for g, m in asked_momentum.items()])
                info = session.info()
            self._fill_groups(info, daemon_rates=not created and sync != "upload")
            if created or sync == "upload":
                self._upload(list(self._parameters))
            else:
                self._download()
        except BaseException:
            if created:
                session.delete()
            raise
        if created and not keep_session:
            self._finalizer = weakref.finalize(self, _delete_quietly, session)
        self._owned = created
        return (session.id, getattr(session, "token", None),
                [self._hyperparams(g) for g in self.param_groups], self._step)

    def _attach_shared_memory(self):
        """Maps this worker's shared-memory region; where that cannot be (the daemon on another
        host, in another container, or running as another user; a session created without it)
        steps go over gRPC and shared_memory_error says why, unless shared_memory=True."""
        try:
            self.session.attach_shared_memory(self._worker_id())
        except (OSError, OptdError) as e:
            if self._require_shared:
                raise
            self.shared_memory_error = f"{type(e).__name__}: {e}"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _fill_groups(self, info, daemon_rates=False):
        """weight_decay and momentum (AdamW's β1 for the AdamW group) of each group, and with
        `daemon_rates` its lr too, as the daemon holds them; a group's value that differs from
        the daemon's is sent with the next step."""
        by_group = {t.config.group: t for t in info.tensors}
        self._sent = {}
        for group in self.param_groups:
            t = by_group[group["optd_group"]]
            if daemon_rates:
                group["lr"] = t.lr
            group["weight_decay"] = t.weight_decay
            group["momentum"] = t.momentum
            self._sent[group["optd_group"]] = (float(t.lr), float(t.weight_decay),
                                               float(t.momentum))

    def _download(self):
        """Copies the daemon's parameters into the model."""
        values = self.session.get_parameters()
        with torch.no_grad():
            for name, p in self._parameters.items():
                p.copy_(torch.from_numpy(values[name]).view_as(p))
        self._versions = {name: p._version for name, p in self._parameters.items()}

    @staticmethod
    def _hyperparams(group):
        return (float(group["lr"]), float(group["weight_decay"]), float(group["momentum"]))

    def _upload(self, names):
        self.session.upload_parameters({name: self._parameters[name] for name in names})
        self._versions = {name: p._version for name, p in self._parameters.items()}

    def add_param_group(self, param_group):
        """torch's add_param_group on a live optimizer: the group's parameters (or (name,
        parameter) pairs) become new tensors of the session (optd.v1 AddTensors, all or nothing)
        in a new group of their own, stepped from the next step on; the group dict takes the keys
        __init__'s group dicts do. Without "preset", matrices step with the optimizer's preset and
        vectors, embeddings and heads (by name) with AdamW; a group mixing them needs one. Not on
        a sharded session. In a process group every rank calls it."""
        if not getattr(self, "_initialized", False):
            super().add_param_group(param_group)
            return
        if isinstance(self.session, ShardedSession):
            raise NotImplementedError("add_param_group on a sharded session: its client places "
                                      "the tensors; build the optimizer with every group")
        if not isinstance(param_group, dict):
            raise TypeError("add_param_group takes a dict with 'params'")
        spec = dict(param_group)
        extra = set(spec) - _GROUP_KEYS - {"params"}
        if extra:
            raise ValueError(f"the param group has keys optd does not know: {sorted(extra)} "
                             f"(it takes {sorted(_GROUP_KEYS)})")
        counter = [len(self._parameters)]
        members = [(n, p) for n, p in _named(spec.get("params", ()), counter) if p.requires_grad]
        if not members:
            raise ValueError("the param group has no parameters that require grad")
        taken = [n for n, p in members if n in self._parameters or id(p) in self._names]
        if taken or len({n for n, _ in members}) != len(members):
            raise ValueError(f"the param group names or holds parameters the optimizer has: "
                             f"{taken or [n for n, _ in members]}")
        name = str(spec.get("name", f"group{len(self.param_groups)}"))
        if any(g["optd_group"] == name for g in self.param_groups):
            raise ValueError(f"the optimizer has a param group {name!r} already")
        preset = spec.get("preset")
        if preset is None:
            kinds = {"adamw" if p.dim() < 2 or _parts(n) & (EMBEDDING_NAME_PARTS |
                                                             HEAD_NAME_PARTS) else "matrix"
                     for n, p in members}
            if len(kinds) > 1:
                raise ValueError("the param group holds matrices and vectors, embeddings or "
                                 "heads, which step with different rules: give it a 'preset' "
                                 "or split it")
            preset = "adamw" if kinds == {"adamw"} else self._preset
        group = {"params": [p for _, p in members],
                 "lr": spec.get("lr", self._adamw_lr if preset == "adamw" else self._lr),
                 "optd_group": name, "optd_preset": preset,
                 "optd_overrides": dict(spec.get("overrides") or {})}
        if "weight_decay" in spec:
            group["weight_decay"] = spec["weight_decay"]
        config = _group_config(group)
        tensors = [optd_pb2.TensorConfig(name=n, shape=list(p.shape), group=name)
                   for n, p in members]

        def add():
            info = self.session.add_tensors(tensors, [config])
            if "momentum" in spec:
                self.session.update_hyperparams([{"group": name,
                                                  "momentum": float(spec["momentum"])}])
                info = self.session.info()
            t = next(t for t in info.tensors if t.config.group == name)
            self.session.upload_parameters(dict(members))
            return float(t.lr), float(t.weight_decay), float(t.momentum)
        if self._ranks is None:
            rates = add()
        else:
            rates = self._ranks.from_root(add)
        super().add_param_group(group)
        group = self.param_groups[-1]
        group["lr"], group["weight_decay"], group["momentum"] = rates
        self._sent[name] = rates
        for n, p in members:
            self._names[id(p)] = n
            self._parameters[n] = p
        with torch.no_grad():
            if self._ranks is not None and self._grad_reduce == "ddp":
                self._ranks.broadcast_tensors([p for _, p in members])
            elif self._ranks is not None and self._ranks.rank != 0:
                if self.session is not None:
                    self.session._shapes = None
                values = self.session.get_parameters([n for n, _ in members])
                for n, p in members:
                    p.copy_(torch.from_numpy(values[n]).view_as(p))
        self._versions = {n: p._version for n, p in self._parameters.items()}
        if self._overlap:
            self._hook_parameters(members)

    @property
    def steps(self):
        """Steps the daemon has applied for this session."""
        return self._step

    def _sync(self):
        """Sends changed hyperparameters, and uploads parameters the model changed in place. In a
        process group only rank 0 does (every rank runs the same schedule)."""
        if self._ranks is not None and self._ranks.rank != 0:
            return
        updates = []
        for group in self.param_groups:
            now = self._hyperparams(group)
            if now != self._sent[group["optd_group"]]:
                updates.append({"group": group["optd_group"], "lr": now[0],
                                "weight_decay": now[1], "momentum": now[2]})
        if updates:
            self.session.update_hyperparams(updates)
            self._sent = {g["optd_group"]: self._hyperparams(g) for g in self.param_groups}
        changed = [name for name, p in self._parameters.items()
                   if p._version != self._versions[name]]
        if changed:
            self._upload(changed)

    def _hook_parameters(self, members):
        """A hook on each parameter's gradient accumulator (as DDP hooks it): it runs once
        backward has written the parameter's .grad, and sends that gradient."""
        me = weakref.ref(self)

        def ready(name):
            optimizer = me()
            if optimizer is not None:
                optimizer._gradient_ready(name)
        with torch.enable_grad():
            for name, p in members:
                accumulator = p.expand_as(p).grad_fn.next_functions[0][0]
                accumulator.register_hook(lambda *_, name=name: ready(name))
                self._accumulators.append(accumulator)

    def _worker_id(self):
        return self._ranks.rank if self._ranks is not None and self._grad_reduce == "optd" else 0

    def _gradient_ready(self, name):
        """Sends `name`'s gradient on the step's stream, opening it with the first one of a
        backward pass (hyperparameters and changed parameters go to the daemon first)."""
        if self._no_sync:
            return
        grad = self._parameters[name].grad
        if grad is None:
            return
        if self._stream is None:
            self._sync()
            self._stream = self.session.stream_step(self._step + 1, wire_dtype=self._wire_dtype,
                                                    worker_id=self._worker_id())
            self._streamed = {}
        if name in self._streamed:
            return  # a second backward before step(): step() finds the gradient changed
        self._streamed[name] = (grad, grad._version)
        self._stream.send(name, grad)

    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside send nothing: gradient accumulation, where only the last
        micro-batch's backward (outside) sends the accumulated gradients. As DDP's no_sync."""
        self._no_sync += 1
        try:
            yield
        finally:
            self._no_sync -= 1

    def zero_grad(self, set_to_none=False):
        """torch's zero_grad; a backward's gradients sent without a step() since are withdrawn."""
        self._drop_stream()
        super().zero_grad(set_to_none)

    def _drop_stream(self):
        if self._stream is not None:
            self._stream.cancel()
            self._stream = None

    def _finish_stream(self, stream):
        """Ends the overlapped step: sends the gradients backward did not (a parameter's grad
        left from before), and copies each result chunk into its parameter as it arrives.
        Returns the StepResult, or None (the call cancelled) when a sent gradient changed since
        (clipping, a GradScaler's unscale_, a second backward): the serial path sends them as
        they are now."""
        current = {name: p.grad for name, p in self._parameters.items() if p.grad is not None}
        if any(current.get(name) is not grad or grad._version != version
               for name, (grad, version) in self._streamed.items()):
            stream.cancel()
            return None
        for name, grad in current.items():
            if name not in self._streamed:
                stream.send(name, grad)
        self._sync()  # rates changed between backward and step()

        def arrived(name, offset, values):
            self._take(self._parameters[name].data.view(-1)[offset:offset + values.size],
                       torch.from_numpy(values))
        return stream.finish(on_chunk=arrived)

    def _take(self, target, values):
        """A step's result into a parameter (or a piece of one): the new values, or with
        step_result="delta" the change, added."""
        if self._delta:
            target.add_(values)
        else:
            target.copy_(values)

    def _step_in_region(self, gradients):
        """The step through this worker's shared memory with every gradient copied into it in
        one torch.cat and every result copied out of it, where it can go that way: the region
        attached, the fp32 wire, every parameter with an fp32 CPU gradient and fp32 results,
        the region's tensors these parameters. None otherwise, and when the daemon no longer
        has that region (nothing counted: Session.step attaches again)."""
        if (self._wire_dtype != "fp32" or self.step_path != "auto" or
                not isinstance(self.session, Session)):
            return None
        shared = self.session.shared_memory(self._worker_id())
        if shared is None or len(gradients) != len(shared.slots):
            return None
        plan = self._region_plan
        if plan is None or plan[0] is not shared:
            names = list(shared.slots)
            if set(names) != set(self._parameters) or any(
                    slot.dtype not in (optd_pb2.DTYPE_UNSPECIFIED, optd_pb2.DTYPE_FP32)
                    for slot in shared.slots.values()):
                return None
            params = [self._parameters[n] for n in names]
            plan = self._region_plan = (
                shared, params, torch.from_numpy(shared.gradient_area),
                [torch.from_numpy(shared.result(n)).view(p.shape) for n, p in zip(names, params)])
        _, params, gradient_area, results = plan
        grads = [gradients[self._names[id(p)]] for p in params]
        if any(g.dtype != torch.float32 or g.device.type != "cpu" for g in grads):
            return None
        torch.cat([g.reshape(-1) for g in grads], out=gradient_area)
        try:
            result = self.session.step_written(self._step + 1, worker_id=self._worker_id(),
                                               values=False)
        except OptdError as e:
            if not _region_refused(e):
                raise
            self._region_plan = None
            return None
        if result.kind != optd_pb2.STEP_RESULT_NONE:
            for p, values in zip(params, results):
                self._take(p, values)
        return result

    def _remote_step(self):
        """Sends this process's gradients as its worker's and copies the step's results into
        the parameters; returns whether a step ran (not without any gradient)."""
        stream, self._stream = self._stream, None
        result = self._finish_stream(stream) if stream is not None else None
        if result is not None:
            self.overlapped_steps += 1
        else:
            gradients = {name: p.grad for name, p in self._parameters.items()
                         if p.grad is not None}
            if not gradients:
                return False
            self._sync()
            result = self._step_in_region(gradients)
        if result is None:
            # Shared-memory results are views of the region: copied into the parameters below,
            # before this worker's next step.
            result = self.session.step(self._step + 1, gradients, wire_dtype=self._wire_dtype,
                                       worker_id=self._worker_id(), path=self.step_path,
                                       **({"copy_results": False}
                                          if isinstance(self.session, Session) else {}))
            for name, values in result.values.items():
                p = self._parameters[name]
                self._take(p, torch.from_numpy(values).view_as(p))
        if result.checkpoint_error:
            warnings.warn(f'optd: step {result.step} is not durable (the daemon is at step '
                          f'{result.step}, its last checkpoint at {result.checkpoint_step}): '
                          f'{result.checkpoint_error}', RuntimeWarning)
        self._step = result.step
        self._versions = {name: p._version for name, p in self._parameters.items()}
        return True

    @torch.no_grad()
    def step(self, closure=None):
        """Sends every gradient to optd (parameters without one get no update, as in torch),
        applies the step there and copies the new parameters into the model. Without any
        gradient it does nothing.

        In a process group with grad_reduce="optd" every rank sends its own gradients as its
        worker and receives the step's parameters (the daemon steps their mean); with
        grad_reduce="ddp" the gradients are already reduced, rank 0 alone steps and the new
        parameters are broadcast to the others. Every rank calls step()."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._ranks is None or self._grad_reduce == "optd":
            self._remote_step()
            return loss

        def root_step():
            return self._remote_step(), self._step
        stepped, self._step = self._ranks.from_root(root_step)
        if stepped:
            self._ranks.broadcast_tensors(list(self._parameters.values()))
            self._versions = {name: p._version for name, p in self._parameters.items()}
        return loss

    def _order(self):
        """Parameter names in torch's state_dict order: the groups' parameters, in turn."""
        return [self._names[id(p)] for group in self.param_groups for p in group["params"]]

    def state_dict(self):
        """The optimizer's state in torch's layout, exported from the daemon (optd.v1
        ExportState): "state" maps each parameter's index to its "step" (the steps that changed
        it) and its state buffers as tensors ("momentum", "adam_first_moment",
        "adam_second_moment", "normuon_second_moment"; in the parameter's shape where they have
        its size); "param_groups" holds each group's lr, weight_decay, momentum, preset and
        parameter indices; "optd" the session's step, the parameter names and the config the
        state belongs to. torch.save writes it anywhere; the parameters themselves are the
        model's (model.state_dict())."""
        if self.session is None:
            raise RuntimeError("this rank holds no session (grad_reduce='ddp' without a client): "
                               "take the state_dict on rank 0")
        header, records = self.session.export_state(parameters=False)
        names = self._order()
        index = {name: i for i, name in enumerate(names)}
        state = {}
        for t in header.tensors:
            p = self._parameters[t.name]
            entry = {"step": torch.tensor(float(t.steps_applied))}
            if t.HasField("auto_choices"):
                # ns.steps=auto / direction=auto: the per-matrix choices are state too.
                entry[AUTO_CHOICES] = t.auto_choices.SerializeToString()
            for buffer, count in zip(t.state_buffers, t.state_elements):
                values = torch.from_numpy(records[(t.name, buffer)].copy())
                entry[buffer] = values.view_as(p) if count == p.numel() else values
            state[index[t.name]] = entry
        groups = []
        for group in self.param_groups:
            saved = {key: group[key] for key in ("lr", "weight_decay", "momentum", "optd_group",
                                                 "optd_preset", "optd_overrides")}
            saved["params"] = [index[self._names[id(p)]] for p in group["params"]]
            groups.append(saved)
        return {"state": state, "param_groups": groups,
                "optd": {"format": 1, "step": header.step, "names": names,
                         "config": header.config.SerializeToString()}}

    def _import(self, state_dict):
        """The session takes `state_dict`'s optimizer state and step, the groups' rates and the
        model's current parameters (optd.v1 ImportState, all or nothing)."""
        saved = state_dict.get("optd", {})
        if saved.get("format") != 1:
            raise ValueError("state_dict is not an optd.torch state_dict of format 1 (one from "
                             "RemoteOptimizer.state_dict(); the checkpoint pointers of earlier "
                             "versions cannot be loaded)")
        names = list(saved["names"])
        if sorted(names) != sorted(self._parameters):
            extra, lacking = set(names) - set(self._parameters), set(self._parameters) - set(names)
            raise ValueError(f"state_dict holds the state of parameters {sorted(extra)} this "
                             f"optimizer lacks, and lacks {sorted(lacking)}")
        groups = {g["optd_group"]: g for g in state_dict["param_groups"]}
        if sorted(groups) != sorted(g["optd_group"] for g in self.param_groups):
            raise ValueError(f"state_dict's param groups are {sorted(groups)}, this optimizer's "
                             f"{sorted(g['optd_group'] for g in self.param_groups)}")
        header = optd_pb2.StateHeader(step=int(saved["step"]), parameters=True)
        header.config.ParseFromString(saved["config"])
        for name, g in groups.items():
            header.hyperparams.add(group=name, lr=float(g["lr"]),
                                   weight_decay=float(g["weight_decay"]),
                                   momentum=float(g["momentum"]))
        records = {}
        for i, name in enumerate(names):
            entry = state_dict["state"].get(i, state_dict["state"].get(str(i)))
            if entry is None:
                raise ValueError(f"state_dict has no state for parameter {i} ({name!r})")
            buffers = [key for key in entry if key not in ("step", AUTO_CHOICES)]
            p = self._parameters[name]
            tensor = header.tensors.add(name=name, steps_applied=int(entry["step"]),
                                        state_buffers=buffers, elements=p.numel(),
                                        state_elements=[entry[b].numel() for b in buffers])
            if AUTO_CHOICES in entry:
                tensor.auto_choices.ParseFromString(entry[AUTO_CHOICES])
            records[(name, "")] = p
            for b in buffers:
                records[(name, b)] = entry[b]
        self.session.import_state(header, records)
        return header.step, groups

    def load_state_dict(self, state_dict):
        """Puts state_dict (from state_dict(), of this or another session, on any daemon or
        number of instances) into this optimizer's session: its optimizer state, step and group
        rates, with the model's current parameters (load the model's own state_dict before or
        after: parameters changed in place are uploaded with the next step). Nothing changes
        when it does not fit (other parameters, shapes or presets). In a process group every rank
        calls it; rank 0 imports and the others take the session's parameters."""
        if self._ranks is None:
            step, groups = self._import(state_dict)
        else:
            step, groups = self._ranks.from_root(lambda: self._import(state_dict))
        self._step = step
        self._sent = {}
        for group in self.param_groups:
            g = groups[group["optd_group"]]
            for key in ("lr", "weight_decay", "momentum"):
                group[key] = g[key]
            self._sent[group["optd_group"]] = self._hyperparams(group)
        with torch.no_grad():
            if self._ranks is not None and self._grad_reduce == "ddp":
                self._ranks.broadcast_tensors(list(self._parameters.values()))
            elif self._ranks is not None and self._ranks.rank != 0:
                self._download()
        self._versions = {name: p._version for name, p in self._parameters.items()}

    def reshard(self, clients, *, addresses=None, placement_epoch=None):
        """Moves a sharded optimizer's session onto `clients` (optd.Client, one per instance;
        `addresses` name them, default each client's target) at a later `placement_epoch`
        (default the next), through the daemons' --shared_state_root
        (optd.sharded.ShardedSession.reshard); training goes on from the same step."""
        if not isinstance(self.session, ShardedSession):
            raise ValueError("only a sharded session reshards: build the RemoteOptimizer with a "
                             "list of clients")
        clients = list(clients)
        self.session = self.session.reshard(
            clients, addresses or [c.target for c in clients],
            placement_epoch or self.session.epoch + 1)

    def close(self, delete=None):
        """Ends this optimizer's use of its session: deletes it from the daemon if this
        optimizer created it (or `delete` is True; False keeps it), with the session's own
        token, so no admin token is needed. A session already deleted is not deleted again."""
        self._drop_stream()
        self._region_plan = None  # its views would keep the region mapped
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if (delete if delete is not None else self._owned) and not self._deleted:
            self.session.delete()
            self._deleted = True


__all__ = ["RemoteOptimizer", "default_assignment"]
