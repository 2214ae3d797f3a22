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
the output head to AdamW (default_assignment: embeddings and heads by name, the head also as the
last parameter of two or more dimensions); `assign` maps a parameter name to "matrix" or "adamw"
to override.

param_groups are torch's: each has "lr" (and "weight_decay"), so torch's LR schedulers work; a
change reaches the daemon before the next step (UpdateHyperparams). state_dict() checkpoints the
session in the daemon and returns where; load_state_dict() restores the daemon's last checkpoint
and reloads the model's parameters from it.
"""

import torch

from optd.v1 import optd_pb2

ADAMW_NAMES = ("embed", "wte", "wpe", "lm_head", "head", "classifier")
_GROUPS = {"matrix": "matrices", "adamw": "vectors"}


def default_assignment(named_parameters, adamw_names=ADAMW_NAMES):
    """Parameter name -> "matrix" or "adamw", DESIGN.md's default grouping: 2-D hidden weights on
    the matrix preset; vectors, embeddings and the output head on AdamW. Embeddings and heads are
    told by name (any of `adamw_names` in it); the output head also by position, as the last
    parameter of two or more dimensions (a plain nn.Sequential's last Linear)."""
    named = list(named_parameters)
    kinds = {name: "adamw" if p.dim() < 2 or any(part in name for part in adamw_names)
             else "matrix" for name, p in named}
    matrices = [name for name, p in named if p.dim() >= 2]
    if matrices:
        kinds[matrices[-1]] = "adamw"
    return kinds


def _text(value):
    return repr(value) if isinstance(value, float) else str(value)


class RemoteOptimizer(torch.optim.Optimizer):
    """See the module docstring. `params`: named_parameters() (names label the daemon's tensors
    and its metrics), or plain parameters (named p0, p1, ...). `client`: an optd.Client.
    `overrides`: extra key=value stage settings for the matrix preset (the kernels'
    OverrideKeys, e.g. {"ns.dtype": "fp32"}). `analysis_interval`: the daemon's analyzer runs
    every that many steps (0: off). `wire_dtype`: how gradients travel (fp32, bf16, fp16)."""

    def __init__(self, params, client, *, preset="keller", lr=0.02, weight_decay=None,
                 adamw_lr=3e-3, adamw_weight_decay=None, overrides=None, assign=None,
                 adamw_names=ADAMW_NAMES, analysis_interval=0, wire_dtype="fp32",
                 session_id=""):
        named = list(params)
        if named and not isinstance(named[0], tuple):
            named = [(f"p{i}", p) for i, p in enumerate(named)]
        if not named:
            raise ValueError("RemoteOptimizer got no parameters")
        assign = dict(assign or {})
        unknown = set(assign) - {name for name, _ in named}
        if unknown:
            raise ValueError(f"assign names parameters the model does not have: {sorted(unknown)}")
        kinds = {**default_assignment(named, adamw_names), **assign}
        bad = {name: kind for name, kind in kinds.items() if kind not in _GROUPS}
        if bad:
            raise ValueError(f"assign takes 'matrix' or 'adamw', got {bad}")
        self._names = {id(p): name for name, p in named}
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
        super().__init__(groups, {})

        config = optd_pb2.SessionConfig(analysis_interval=int(analysis_interval))
        for name, p in named:
            config.tensors.add(name=name, shape=list(p.shape), group=_GROUPS[kinds[name]])
        for group in self.param_groups:
            is_matrix = group["optd_group"] == "matrices"
            settings = dict(overrides or {}) if is_matrix else {}
            settings["lr"] = group["lr"]
            if "weight_decay" in group:
                settings["weight_decay"] = group["weight_decay"]
            g = config.groups.add(name=group["optd_group"], preset=preset if is_matrix else "adamw")
            for key, value in settings.items():
                g.overrides.add(key=key, value=_text(value))
        self.session = client.create_session(config, session_id)
        self._sent = {g["optd_group"]: (g["lr"], g.get("weight_decay")) for g in self.param_groups}
        self._step = 0
        self.session.upload_parameters({name: p for name, p in named})

    @property
    def steps(self):
        """Steps the daemon has applied for this optimizer."""
        return self._step

    def _sync_hyperparams(self):
        updates = []
        for group in self.param_groups:
            now = (group["lr"], group.get("weight_decay"))
            if now != self._sent[group["optd_group"]]:
                update = {"group": group["optd_group"], "lr": float(group["lr"])}
                if now[1] is not None:
                    update["weight_decay"] = float(now[1])
                updates.append(update)
        if updates:
            self.session.update_hyperparams(updates)
            for group in self.param_groups:
                self._sent[group["optd_group"]] = (group["lr"], group.get("weight_decay"))

    @torch.no_grad()
    def step(self, closure=None):
        """Sends every gradient to optd (parameters without one get no update, as in torch),
        applies the step there and copies the new parameters into the model."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync_hyperparams()
        gradients, parameters = {}, {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    name = self._names[id(p)]
                    gradients[name] = p.grad
                    parameters[name] = p
        result = self.session.step(self._step + 1, gradients, wire_dtype=self._wire_dtype)
        self._step = result.step
        for name, values in result.values.items():
            p = parameters.get(name)
            if p is not None:
                p.copy_(torch.from_numpy(values).view_as(p))
        return loss

    def state_dict(self):
        """Checkpoints the session in the daemon; the returned dict says which, at which step."""
        saved = self.session.checkpoint()
        return {"optd": {"session_id": self.session.id, "step": saved.step, "path": saved.path},
                "param_groups": [{"lr": g["lr"], "weight_decay": g.get("weight_decay"),
                                  "optd_group": g["optd_group"]} for g in self.param_groups]}

    def load_state_dict(self, state_dict):
        """Restores the daemon's last checkpoint of this session (which must be the one
        `state_dict` names) and reloads the model's parameters from it."""
        saved = state_dict["optd"]
        if saved["session_id"] != self.session.id:
            raise ValueError(f"state_dict is of session {saved['session_id']!r}, "
                             f"this optimizer's is {self.session.id!r}")
        step = self.session.restore()
        if step != saved["step"]:
            raise ValueError(f"the daemon's last checkpoint is of step {step}, state_dict's of "
                             f"step {saved['step']}: only the last checkpoint can be restored")
        self._step = step
        for group, stored in zip(self.param_groups, state_dict["param_groups"]):
            group["lr"] = stored["lr"]
            if stored["weight_decay"] is not None:
                group["weight_decay"] = stored["weight_decay"]
        # The checkpoint holds its own hyperparameters; send the groups' on the next step.
        self._sent = {g["optd_group"]: (None, None) for g in self.param_groups}
        values = self.session.get_parameters()
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    p.copy_(torch.from_numpy(values[self._names[id(p)]]).view_as(p))


__all__ = ["RemoteOptimizer", "default_assignment"]
