"""DeepSeekMoE: shared experts + fine-grained routed experts (DeepSeekMoE §3; V3 §2.1.2; docs/design/moe.md).

    y = x_shared(x) + sum_k w_k * Expert_{idx_k}(x)

Gate, in order (V3-code `Gate.forward`):
  1. s = sigmoid(x W^T) or softmax, in float32            (N, E)
  2. selection scores s + b, b an fp32 bias used ONLY for selection (aux-loss-free balancing)
  3. group-limited: keep the `n_limited_groups` best of `n_expert_groups` groups, fill the
     others with -inf (not 0: biased sigmoid scores can be negative, docs/design/moe.md)
  4. idx = top-K of the selection scores; w = s.gather(idx), the UNBIASED scores
     (never (s+b)-b, which cancels to 0 in fp32 when |b| >> s); sigmoid: w /= sum w; w *= route_scale

Routed experts: `loop_experts` is the reference (one masked pass per expert). The fast twins
(tokens sorted by expert, one grouped GEMM per weight; static shapes for compiled decoding) live
in kernels/experts.py and are put in by the execution plan (plan.py). Expert weights are stacked
(E, out, in) so every path shares them.

Load balancing lives outside forward: training forwards only ADD to `tokens_per_expert`; the
bias update (`update_expert_bias`) runs once per optimizer step from the whole step's load.
N tokens, E routed experts, K active experts, d model dim, I expert width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .norm import upcast


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); the dense FFN and the shared experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)  # gate_proj
        self.w2 = nn.Linear(inter_dim, dim, bias=False)  # down_proj
        self.w3 = nn.Linear(dim, inter_dim, bias=False)  # up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        # A buffer, so no optimizer ever sees it; kept float32 by _apply below.
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts) if cfg.gate_bias else None)

    def _apply(self, fn, recurse=True):
        # model.to(bf16) must not round the bias: V3 biases are ~5 in magnitude, where bf16's
        # resolution (~0.03) exceeds the score differences it has to order (docs/design/moe.md).
        bias = self._buffers.pop("bias")
        super()._apply(fn, recurse)
        if bias is not None:
            moved = fn(bias)
            bias = moved if moved.dtype == torch.float32 else bias.to(device=moved.device)
        self._buffers["bias"] = bias
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, d) -> weights (N, K) fp32, indices (N, K), unbiased scores (N, E) fp32."""
        cfg = self.cfg
        with torch.autocast(x.device.type, enabled=False):  # router logits stay fp32 under bf16 autocast
            logits = F.linear(upcast(x), upcast(self.weight))
        scores = logits.sigmoid() if cfg.score_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores if self.bias is None else scores + self.bias
        G = cfg.n_expert_groups
        if G > 1:
            grouped = choice.view(-1, G, cfg.n_routed_experts // G)
            if cfg.group_score == "top2_sum":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_scores = grouped.amax(dim=-1)
            keep = group_scores.topk(cfg.n_limited_groups, dim=-1).indices  # (N, n_limited_groups)
            mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = grouped.masked_fill(~mask[..., None], float("-inf")).flatten(1)
        idx = choice.topk(cfg.n_activated_experts, dim=-1).indices
        weights = scores.gather(1, idx)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * cfg.route_scale, idx, scores


class RoutedExperts(nn.Module):
    """The E fine-grained routed experts, stacked in nn.Linear layout (out, in): w1 / w3 (E, I, d),
    w2 (E, d, I). x (N, d), routing weights (N, K) and expert ids (N, K) -> sum_k w_k E_k(x) (N, d).

    A module of its own, like nn.Linear, for the same reason: it is where a matmul runs, so a
    numerics or compile converter swaps it for a twin (kernels/swap.py), as it swaps Linears."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return loop_experts(x, weights, idx, self.w1, self.w2, self.w3)

    def extra_repr(self) -> str:
        E, I, d = self.w1.shape
        return f"experts={E}, dim={d}, inter_dim={I}"


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # experts before the gate: named_parameters() keeps the order that init_weights draws in
        self.experts = RoutedExperts(cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim)
        self.gate = Gate(cfg)
        self.shared_experts = MLP(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim) if cfg.n_shared_experts else None
        # tokens routed to each expert since the last bias update; int64, so model.to(bf16) leaves it exact
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.n_routed_experts, dtype=torch.long),
                             persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, *args):
        # checkpoints written before the experts were a module of their own name them `ffn.w1`
        # (and `ffn.w1_scale_inv`); today's name is `ffn.experts.w1`
        for key in [k for k in state_dict if k.startswith(prefix) and "." not in k[len(prefix):]]:
            new = prefix + upgrade_expert_name(key[len(prefix):])
            if new != key:
                state_dict[new] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, S, d) -> (y (B, S, d), sequence-wise balance loss or None)."""
        B, S, d = x.shape
        flat = x.reshape(-1, d)
        weights, idx, scores = self.gate(flat)
        y = self.experts(flat, weights, idx).view(B, S, d)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        balance = None
        if self.training:
            with torch.no_grad():
                flat_idx = idx.flatten()
                self.tokens_per_expert.index_add_(0, flat_idx, torch.ones_like(flat_idx))
            if self.cfg.balance_loss_alpha > 0:
                balance = sequence_balance_loss(scores.view(B, S, -1), idx.view(B, S, -1), self.cfg)
        return y, balance


def upgrade_expert_name(name: str) -> str:
    """A state-dict or parameter name from before the routed experts were a module of their own
    ('layers.1.ffn.w1', 'w2_scale_inv' relative to its MoE) -> today's ('layers.1.ffn.experts.w1');
    any other name is returned as it is. Only routed experts were ever bare w1 / w2 / w3 (MLP's are
    nn.Linear: 'w1.weight')."""
    head, _, last = name.rpartition(".")
    if last.split("_scale_inv")[0] in ("w1", "w2", "w3") and not head.endswith("experts"):
        return f"{head}.experts.{last}" if head else f"experts.{last}"
    return name


def swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """One expert: w2(silu(w1 x) * w3 x) on rows x (n, d), with w1 / w3 (I, d) and w2 (d, I)."""
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def loop_experts(x, weights, idx, w1, w2, w3) -> torch.Tensor:
    """Reference: for each expert, gather its tokens, run it, scatter-add the weighted output."""
    y = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        token, slot = torch.where(idx == e)
        if token.numel():
            out = swiglu(x[token], w1[e], w2[e], w3[e]) * weights[token, slot, None]
            y.index_add_(0, token, out.to(x.dtype))
    return y


def sequence_balance_loss(scores: torch.Tensor, idx: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """L_Bal = alpha * sum_i f_i P_i per sequence, averaged over the batch (V3 eqs. 17-20).

    scores (B, S, E) unbiased; idx (B, S, K) the experts actually selected (biased, group-limited):
    a project choice (docs/design/moe.md), since that is the load the bias balances. f_i = E/(K S) * count_i,
    P_i = mean_t s_{i,t} / sum_j s_{j,t}. At perfect balance f_i = 1 and sum P = 1, so L = alpha.
    """
    B, S, E = scores.shape
    K = idx.shape[-1]
    counts = torch.zeros(B, E, device=scores.device, dtype=scores.dtype).scatter_add_(
        1, idx.flatten(1), torch.ones(B, S * K, device=scores.device, dtype=scores.dtype))
    f = counts * (E / (K * S))
    P = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)
    return cfg.balance_loss_alpha * (f * P).sum(dim=-1).mean()


def max_violation(load: torch.Tensor) -> float:
    """MaxVio = (max_i load_i - mean load) / mean load (LF §4.1); 0 at perfect balance."""
    mean = load.float().mean()
    return float((load.float().max() - mean) / mean) if mean > 0 else 0.0


@torch.no_grad()
def update_expert_bias(model: nn.Module, gamma: float, all_reduce=None) -> list[float]:
    """The aux-loss-free update, once per optimizer step (LF Alg. 1; V3 §2.1.2):

        b_i += gamma * sign(mean(c) - c_i)

    c = tokens routed to each expert over the whole step (all micro-batches; pass `all_reduce`
    to sum it across ranks first). Overloaded experts go down by gamma, underloaded up, an expert
    exactly at the mean is unchanged: the plain sign rule, not mean-centred (a project choice, docs/design/moe.md).
    Resets the counters and returns each MoE layer's MaxVio for the step.
    """
    violations = []
    for module in model.modules():
        if isinstance(module, MoE):
            if all_reduce is not None:
                all_reduce(module.tokens_per_expert)
            load = module.tokens_per_expert.double()
            module.tokens_per_expert.zero_()
            violations.append(max_violation(load))
            if module.gate.bias is not None and gamma:
                module.gate.bias += gamma * torch.sign(load.mean() - load).float()
    return violations
