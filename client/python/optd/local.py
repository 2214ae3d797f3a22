"""Keller's Muon in plain torch, for comparison with optd (torch 1.13 has no torch.optim.Muon).

LocalMuon is KellerJordan/Muon's update in fp32: EMA momentum, Nesterov, 5 Newton–Schulz steps
with (3.4445, −4.7750, 2.0315) on X/(‖X‖+1e-7) (transposed when tall), scaled by
√max(1, rows/cols). It equals optd's `keller` preset with `precision=fp32` and no weight decay, up
to the order of fp32 operations; the tests use it as RemoteOptimizer's local reference and the
main job times it against the remote step.
"""

import torch


class LocalMuon(torch.optim.Optimizer):
    def __init__(self, params, lr, momentum=0.95):
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - group["momentum"])
                u = p.grad.lerp(buf, group["momentum"])
                x = u.T if u.size(0) > u.size(1) else u
                x = x / (x.norm() + 1e-7)
                for _ in range(5):
                    a = x @ x.T
                    x = 3.4445 * x + (-4.7750 * a + 2.0315 * a @ a) @ x
                o = x.T if u.size(0) > u.size(1) else x
                p.add_(o * max(1, p.size(0) / p.size(1)) ** 0.5, alpha=-group["lr"])
