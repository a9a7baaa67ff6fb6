"""Optimizer-side pieces of training: the aux-loss-free MoE bias update as a step hook.

The bias update is a side effect of a whole optimizer step, not of a forward
(docs/design/moe.md): forwards only count tokens per expert; this hook applies the sign rule once per
`optimizer.step()`, from the load of every micro-batch since the previous step, so it composes
with gradient accumulation and pipelining.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ..model.hyperconn import static_parameters
from ..model.moe import MoE, update_expert_bias
from .adamw import AdamWLowPrecision


class ExpertBiasUpdate:
    """b_i += gamma * sign(mean_load - load_i) after every optimizer step (arXiv 2408.15664 Alg. 1; V3 §2.1.2).

    gamma: the update speed (V3: 0.001). freeze_after_tokens: gamma becomes 0 once this many
    tokens have been trained (V3 ran its last 500B tokens at gamma = 0); None never freezes.
    all_reduce: sums the load counters in place across ranks (EP/DP) before the rule.
    """

    def __init__(self, model: nn.Module, gamma: float = 1e-3, freeze_after_tokens: int | None = None,
                 all_reduce: Callable[[torch.Tensor], None] | None = None):
        if gamma < 0:
            raise ValueError(f"gamma={gamma} must be >= 0")
        self.model, self.gamma, self.freeze_after_tokens, self.all_reduce = model, gamma, freeze_after_tokens, all_reduce
        self.tokens_seen = 0
        self.last_max_violation: list[float] = []  # per MoE layer, for the step just taken
        self._moe = [m for m in model.modules() if isinstance(m, MoE)]

    def gamma_at(self, tokens_seen: int) -> float:
        frozen = self.freeze_after_tokens is not None and tokens_seen >= self.freeze_after_tokens
        return 0.0 if frozen else self.gamma

    def step(self) -> list[float]:
        """Apply the rule from the counters filled since the last call; returns MaxVio per layer."""
        gamma = self.gamma_at(self.tokens_seen)  # the schedule at the start of this step's tokens
        if self.all_reduce is not None:  # the whole step's load, every rank's tokens, before anything reads it
            for m in self._moe:
                self.all_reduce(m.tokens_per_expert)
        if self._moe:  # every routed token is counted K times in each MoE layer
            first = self._moe[0]
            self.tokens_seen += int(first.tokens_per_expert.sum().item()) // first.cfg.n_activated_experts
        self.last_max_violation = update_expert_bias(self.model, gamma)
        return self.last_max_violation

    def discard(self) -> None:
        """Forget the load counted since the last step (a skipped step must not move the bias)."""
        for m in self._moe:
            m.tokens_per_expert.zero_()

    def attach(self, optimizer: torch.optim.Optimizer):
        """Run `step()` after every `optimizer.step()`; returns the removable hook handle."""
        return optimizer.register_step_post_hook(lambda opt, args, kwargs: self.step())


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float, state_dtype: str = "fp32") -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (embeddings, projections, stacked experts);
    norms and HC/mHC's static coefficients (A_r = I, b_res: decay would shrink the residual or
    flatten the mixing) get none, and the gate bias is a buffer the optimizer never sees.

    state_dtype: "fp32" = torch's AdamW (moments in the parameters' dtype); "bf16" = bf16
    moments with fp32 master weights (adamw.py, the V3 recipe), 4 bytes/param less."""
    static = {id(p) for p in static_parameters(model)}
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2 and id(p) not in static]
    no_decay = [p for p in model.parameters() if p.requires_grad and (p.dim() < 2 or id(p) in static)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if state_dtype == "bf16":
        return AdamWLowPrecision(groups, lr=lr, betas=betas, eps=eps, state_dtype=torch.bfloat16)
    if state_dtype != "fp32":
        raise ValueError(f"state_dtype={state_dtype!r} must be 'fp32' or 'bf16'")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float, schedule: str,
          decay_fraction: float) -> float:
    """Learning rate for optimizer step `step` (0-based; a re-planned run's nominal step is fractional,
    train/schedule.py).

    cosine: linear warmup, then cosine from peak to min_ratio * peak at the last step.
    wsd:    linear warmup, constant peak, then the final `decay_fraction` of steps decays (cosine)
            to min_ratio * peak: the V3 style (constant to 10T tokens, then decay). A decay shorter
            than 2 steps (a run under 10 steps at 0.2) is stretched to the last 2, from the peak to the floor.
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    floor = peak * min_ratio
    if schedule == "wsd":
        decay_start = int(total * (1 - decay_fraction))
        decay_start = max(warmup, min(decay_start, total - 2) if decay_fraction > 0 else decay_start)
        if step < decay_start:
            return peak
        progress = (step - decay_start) / max(1, total - 1 - decay_start)
    else:
        progress = (step - warmup) / max(1, total - 1 - warmup)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
