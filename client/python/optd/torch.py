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
a new process, attach to the session: RemoteOptimizer(..., session=client.open_session(id,
token)), then load_state_dict().

Sharded over several instances, the same on the same backend bit for bit:

    optimizer = RemoteOptimizer(model.named_parameters(), [client_a, client_b, client_c],
                                preset="keller", lr=0.02, session_id="run")
    ...
    optimizer.reshard([client_a, client_b])  # through the daemons' --shared_state_root
"""

import secrets
import warnings

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


class RemoteOptimizer(torch.optim.Optimizer):
    """See the module docstring.

    params: named_parameters() (the names label the daemon's tensors and its metrics), or plain
    parameters (named p0, p1, ...). client: an optd.Client, or a list of them, one per instance:
    then the session is sharded over those instances (optd.sharded.ShardedSession) at
    `placement_epoch`, `addresses` naming them in errors (default: each client's target), and
    named `session_id` or a fresh "torch-..." id. overrides: key=value stage settings for the
    matrix preset (the kernels' OverrideKeys, e.g. {"precision": "fp32"}). analysis_interval:
    the daemon's analyzer runs every that many steps (0: off). wire_dtype: how gradients travel
    (fp32, bf16, fp16). session: an optd.Session or optd.sharded.ShardedSession to attach to
    instead of creating one (its tensors must be these parameters), not with a list of clients;
    session_id names a new one.
    """

    def __init__(self, params, client=None, *, preset="keller", lr=0.02, weight_decay=None,
                 adamw_lr=3e-3, adamw_weight_decay=None, overrides=None, assign=None,
                 analysis_interval=0, wire_dtype="fp32", session_id="", session=None,
                 addresses=None, placement_epoch=1):
        named = list(params)
        if named and not isinstance(named[0], tuple):
            named = [(f"p{i}", p) for i, p in enumerate(named)]
        named = [(name, p) for name, p in named if p.requires_grad]
        if not named:
            raise ValueError("RemoteOptimizer got no parameters that require grad")
        assign = dict(assign or {})
        unknown = set(assign) - {name for name, _ in named}
        if unknown:
            raise ValueError(f"assign names parameters the model does not have (or that do not "
                             f"require grad): {sorted(unknown)}")
        kinds = {**default_assignment(named), **assign}
        bad = {name: kind for name, kind in kinds.items() if kind not in _GROUPS}
        if bad:
            raise ValueError(f"assign takes 'matrix' or 'adamw', got {bad}")
        self._names = {id(p): name for name, p in named}
        self._parameters = dict(named)
        self._wire_dtype = wire_dtype
        groups = []
        for kind, group_lr, group_wd in (("matrix", lr, weight_decay),
                                         ("adamw", adamw_lr, adamw_weight_decay)):
            members = [p for name, p in named if kinds[name] == kind]
            if members:
                group = {"params": members, "lr": group_lr, "optd_group": _GROUPS[kind]}
                if group_wd is not None:
                    group["weight_decay"] = group_wd
                groups.append(group)
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
            config = optd_pb2.SessionConfig(analysis_interval=int(analysis_interval))
            for name, p in named:
                config.tensors.add(name=name, shape=list(p.shape), group=_GROUPS[kinds[name]])
            for group in self.param_groups:
                is_matrix = group["optd_group"] == "matrices"
                settings = dict(overrides or {}) if is_matrix else {}
                settings["lr"] = group["lr"]
                if "weight_decay" in group:
                    settings["weight_decay"] = group["weight_decay"]
                g = config.groups.add(name=group["optd_group"],
                                      preset=preset if is_matrix else "adamw")
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
        try:
            info = session.info()
            shapes = {t.config.name: (tuple(t.config.shape), t.config.group)
                      for t in info.tensors}
            expected = {name: (tuple(p.shape), _GROUPS[kinds[name]]) for name, p in named}
            if shapes != expected:
                raise ValueError(f"session {session.id!r} holds other tensors than these "
                                 f"parameters: {shapes} against {expected}")
            self._step = info.step
            self._fill_groups(info)
            self._upload(list(self._parameters))
        except BaseException:
            if created:
                session.delete()
            raise

    def _fill_groups(self, info):
        """weight_decay and momentum (AdamW's β1 for the AdamW group) of each group, as the
        daemon holds them."""
        by_group = {t.config.group: t for t in info.tensors}
        for group in self.param_groups:
            t = by_group[group["optd_group"]]
            group["weight_decay"] = t.weight_decay
            group["momentum"] = t.momentum
        self._sent = {g["optd_group"]: self._hyperparams(g) for g in self.param_groups}

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
        values = self.session.get_parameters()
        with torch.no_grad():
            for name, p in self._parameters.items():
                p.copy_(torch.from_numpy(values[name]).view_as(p))
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

    def close(self):
        """Deletes the session from the daemon."""
        self.session.delete()


__all__ = ["RemoteOptimizer", "default_assignment"]
