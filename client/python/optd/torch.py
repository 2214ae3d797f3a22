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

state_dict() checkpoints the session in the daemon and returns which; load_state_dict() puts the
daemon back to that checkpoint (its last) and copies its parameters into the model. To resume in
a new process, create the session with keep_session=True (else it is deleted when its optimizer
goes), then attach to it: RemoteOptimizer(..., session=client.open_session(id, token)), which
downloads the daemon's parameters into the model, then load_state_dict().

Param groups may also be given as torch's list of dicts, and the session's settings as keyword
arguments (RemoteOptimizer's docstring); `with RemoteOptimizer(...) as optimizer:` deletes a
session it created on the way out.

Sharded over several instances, the same on the same backend bit for bit:

    optimizer = RemoteOptimizer(model.named_parameters(), [client_a, client_b, client_c],
                                preset="keller", lr=0.02, session_id="run")
    ...
    optimizer.reshard([client_a, client_b])  # through the daemons' --shared_state_root
"""

import secrets
import warnings
import weakref

import torch

from optd.sharded import ShardedSession
from optd.v1 import optd_pb2

# Name parts (split at "." and "_") that mark an embedding or an output head.
EMBEDDING_NAME_PARTS = frozenset({"embed", "embedding", "embeddings", "emb", "wte", "wpe"})
HEAD_NAME_PARTS = frozenset({"head", "classifier"})
_GROUPS = {"matrix": "matrices", "adamw": "vectors"}


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


def _delete_quietly(session):
    """The finalizer of an optimizer that created its session: deletes it, and says nothing
    when it cannot (the daemon gone, the session already deleted)."""
    try:
        session.delete()
    except Exception:  # noqa: BLE001 -- a finalizer must not raise
        pass


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

    session: an optd.Session or optd.sharded.ShardedSession to attach to instead of creating
    one (its tensors must be these parameters), not with a list of clients. sync: what attaching
    does with the parameters, "download" (default: the daemon's, which a training run stepped,
    are copied into the model, and the groups' lr, weight_decay and momentum are the daemon's)
    or "upload" (the model's replace the daemon's); a created session is always uploaded to.

    Lifetime: a session this optimizer created is deleted by close(), on leaving a `with
    RemoteOptimizer(...) as optimizer:` block, or when the optimizer is garbage-collected or
    the interpreter exits, unless keep_session=True (then only close() deletes it). An
    attached session is left alone unless close(delete=True).
    """

    def __init__(self, params, client=None, *, preset="keller", lr=0.02, weight_decay=None,
                 adamw_lr=3e-3, adamw_weight_decay=None, overrides=None, assign=None,
                 analysis_interval=0, wire_dtype="fp32", session_id="", session=None,
                 addresses=None, placement_epoch=1, sync=None, keep_session=False,
                 non_finite_policy="reject", checkpoint_interval=0, step_result="parameters",
                 straggler_timeout=None):
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
        self._names = {id(p): name for name, p in named}
        self._parameters = dict(named)
        self._wire_dtype = wire_dtype
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

        if session is None and client is None:
            raise ValueError("RemoteOptimizer needs a client to create its session, or a session")
        sharded = isinstance(client, (list, tuple))
        if session is not None and sharded:
            raise ValueError("session= attaches to an existing session and takes no list of "
                             "clients; pass a sharded session as an optd.sharded.ShardedSession")
        if addresses is not None and not sharded:
            raise ValueError("addresses= names the instances of a sharded session: pass a list "
                             "of clients")
        if session is None:
            config = optd_pb2.SessionConfig(
                analysis_interval=int(analysis_interval),
                non_finite_policy=_NON_FINITE_POLICIES[non_finite_policy],
                checkpoint_interval=int(checkpoint_interval),
                step_result=_STEP_RESULTS[step_result],
                straggler_timeout_seconds=float(straggler_timeout or 0))
            for name, p in named:
                config.tensors.add(name=name, shape=list(p.shape), group=tensor_group[name])
            for group in self.param_groups:
                settings = dict(group["optd_overrides"])
                settings["lr"] = group["lr"]
                if "weight_decay" in group:
                    settings["weight_decay"] = group["weight_decay"]
                g = config.groups.add(name=group["optd_group"], preset=group["optd_preset"])
                for key, value in settings.items():
                    g.overrides.add(key=key, value=_text(value))
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
        self._finalizer = None
        try:
            info = session.info()
            shapes = {t.config.name: (tuple(t.config.shape), t.config.group)
                      for t in info.tensors}
            expected = {name: (tuple(p.shape), tensor_group[name]) for name, p in named}
            if shapes != expected:
                raise ValueError(f"session {session.id!r} holds other tensors than these "
                                 f"parameters: {shapes} against {expected}")
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
        self._deleted = False

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
        if getattr(self, "_initialized", False):
            raise NotImplementedError("RemoteOptimizer's tensors are fixed when its session is "
                                      "created; build a new optimizer for new parameters")
        super().add_param_group(param_group)

    @property
    def steps(self):
        """Steps the daemon has applied for this session."""
        return self._step

    def _sync(self):
        """Sends changed hyperparameters, and uploads parameters the model changed in place."""
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

    @torch.no_grad()
    def step(self, closure=None):
        """Sends every gradient to optd (parameters without one get no update, as in torch),
        applies the step there and copies the new parameters into the model. Without any
        gradient it does nothing."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        gradients = {name: p.grad for name, p in self._parameters.items() if p.grad is not None}
        if not gradients:
            return loss
        self._sync()
        result = self.session.step(self._step + 1, gradients, wire_dtype=self._wire_dtype)
        if result.checkpoint_error:
            warnings.warn(f'optd: step {result.step} is not durable (the daemon is at step '
                          f'{result.step}, its last checkpoint at {result.checkpoint_step}): '
                          f'{result.checkpoint_error}', RuntimeWarning)
        self._step = result.step
        for name, values in result.values.items():
            p = self._parameters[name]
            if self._delta:
                p.add_(torch.from_numpy(values).view_as(p))
            else:
                p.copy_(torch.from_numpy(values).view_as(p))
            self._versions[name] = p._version
        return loss

    def state_dict(self):
        """Checkpoints the session in the daemon; the returned dict says which, at which step
        (and where, for a session on one instance)."""
        if isinstance(self.session, ShardedSession):
            step, path = self.session.checkpoint(), None
        else:
            saved = self.session.checkpoint()
            step, path = saved.step, saved.path
        return {"optd": {"session_id": self.session.id, "step": step, "path": path},
                "param_groups": [{"optd_group": g["optd_group"], "lr": g["lr"]}
                                 for g in self.param_groups]}

    def load_state_dict(self, state_dict):
        """Puts the daemon back to the checkpoint `state_dict` names, which must be the session's
        last, and copies its parameters into the model; the groups' rates are state_dict's.
        Nothing changes when it cannot."""
        saved = state_dict["optd"]
        if saved["session_id"] != self.session.id:
            raise ValueError(f"state_dict is of session {saved['session_id']!r}, "
                             f"this optimizer's is {self.session.id!r}")
        last = self.session.info().checkpoint_step
        if last != saved["step"]:
            raise ValueError(f"the daemon's last checkpoint is of step {last}, state_dict's of "
                             f"step {saved['step']}: only the last checkpoint can be restored")
        self._step = self.session.restore()
        info = self.session.info()
        rates = {g["optd_group"]: g["lr"] for g in state_dict["param_groups"]}
        for group in self.param_groups:
            group["lr"] = rates.get(group["optd_group"], group["lr"])
        self._fill_groups(info)
        self._sent = {}  # the checkpoint holds its own rates: send the groups' with the next step
        for group in self.param_groups:
            self._sent[group["optd_group"]] = None
        self._download()

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
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if (delete if delete is not None else self._owned) and not self._deleted:
            self.session.delete()
            self._deleted = True


__all__ = ["RemoteOptimizer", "default_assignment"]
