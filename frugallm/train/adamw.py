"""AdamW with low-precision moments and fp32 master weights (V3 §3.3.3: BF16 moments).

Stock torch.optim.AdamW keeps exp_avg / exp_avg_sq in the parameter's dtype, so "bf16 moments
for fp32 parameters" needs this small variant (docs/design/fp8.md). Per parameter p (fp32 master):

    m = b1 m + (1 - b1) g          computed in fp32 from the stored bf16 m, stored back in bf16
    v = b2 v + (1 - b2) g^2        likewise
    p = p (1 - lr wd) - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)     in fp32

The moments are rounded to bf16 (8 mantissa bits, round-to-nearest-even) once per step; the
update itself, the master weights and the gradients stay fp32. Memory: 4 (weight) + 4 (grad) +
2 + 2 (moments) bytes per parameter instead of 4 + 4 + 4 + 4. The state has the same keys as
torch's AdamW ("step", "exp_avg", "exp_avg_sq"), so checkpoint.py saves and restores it alike;
`state_dtype` tells the loader which dtype the moments come back in.
"""

from __future__ import annotations

import torch


class AdamWLowPrecision(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, state_dtype: torch.dtype = torch.bfloat16):
        if lr <= 0 or eps < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid AdamW hyper-parameters lr={lr} betas={betas} eps={eps}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.state_dtype = state_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamWLowPrecision does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, dtype=self.state_dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.state_dtype)
                state["step"] += 1
                t = state["step"].item()
                g = p.grad.float()
                m = state["exp_avg"].float().lerp_(g, 1 - b1)
                v = state["exp_avg_sq"].float().mul_(b2).addcmul_(g, g, value=1 - b2)
                state["exp_avg"].copy_(m)  # the only roundings: the moments, to state_dtype
                state["exp_avg_sq"].copy_(v)
                denom = (v / (1 - b2**t)).sqrt_().add_(eps)
                master = p.float()  # p itself when fp32 (the master); a copy for a low-precision p
                master.mul_(1 - lr * wd).addcdiv_(m, denom, value=-lr / (1 - b1**t))
                if master is not p:
                    p.copy_(master)
        return loss
