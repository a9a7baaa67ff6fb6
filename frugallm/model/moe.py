"""DeepSeekMoE: shared experts + fine-grained routed experts (DeepSeekMoE §3; V3 §2.1.2; docs/design/moe.md).

    y = x_shared(x) + sum_k w_k * Expert_{idx_k}(x)

Gate, in order (V3-code `Gate.forward`):
  1. s = sigmoid(x W^T) or softmax, in float32            (N, E)
  2. selection scores s + b, b an fp32 bias used ONLY for selection (aux-loss-free balancing)
  3. group-limited: keep the `n_limited_groups` best of `n_expert_groups` groups, fill the
     others with -inf (not 0: biased sigmoid scores can be negative, docs/design/moe.md)
  4. idx = top-K of the selection scores; w = s.gather(idx), the UNBIASED scores
     (never (s+b)-b, which cancels to 0 in fp32 when |b| >> s); sigmoid: w /= sum w; w *= route_scale

DeepSeek-V4's changes (docs/design/moe.md): scores sqrt(softplus(x W^T)) (`sqrtsoftplus`); the first
`n_hash_layers` MoE layers take their K experts from a frozen token-id table, tid2eid[id] (hash routing),
weighted by the same normalised scores and never biased; and SwiGLU clamped by `swiglu_limit` (gate
min(a, l), up clamp(b, -l, l)) in the routed and the shared experts.

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


def gated(a: torch.Tensor, b: torch.Tensor, limit: float = 0.0) -> torch.Tensor:
    """SwiGLU's hidden silu(a) * b, a = w1 x the gate, b = w3 x the up projection; with limit > 0
    (V4's swiglu_limit) silu(min(a, limit)) * clamp(b, -limit, limit), which bounds the hidden."""
    if limit > 0:
        a, b = a.clamp(max=limit), b.clamp(min=-limit, max=limit)
    return F.silu(a) * b


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); the dense FFN and the shared experts (limit: `gated`)."""

    def __init__(self, dim: int, inter_dim: int, limit: float = 0.0):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)  # gate_proj
        self.w2 = nn.Linear(inter_dim, dim, bias=False)  # down_proj
        self.w3 = nn.Linear(dim, inter_dim, bias=False)  # up_proj
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(gated(self.w1(x), self.w3(x), self.limit))


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig, hashed: bool = False):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        # A buffer, so no optimizer ever sees it; kept float32 by _apply below. A hash-routed gate
        # selects by its table, so it has no selection bias to balance.
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts) if cfg.gate_bias and not hashed else None)
        # (vocab, K) int64 expert ids per token id, frozen; a checkpoint's table replaces the initial one
        self.register_buffer("tid2eid", hash_table(cfg.vocab_size, cfg.n_routed_experts, cfg.n_activated_experts)
                             if hashed else None)

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

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, d) -> weights (N, K) fp32, indices (N, K), unbiased scores (N, E) fp32; ids (N,) the
        tokens' ids, which a hash-routed gate selects by."""
        cfg = self.cfg
        with torch.autocast(x.device.type, enabled=False):  # router logits stay fp32 under bf16 autocast
            logits = F.linear(upcast(x), upcast(self.weight))
        if cfg.score_func == "sigmoid":
            scores = logits.sigmoid()
        elif cfg.score_func == "sqrtsoftplus":
            scores = F.softplus(logits).sqrt()
        else:
            scores = logits.softmax(dim=-1)
        if self.tid2eid is not None:
            if ids is None:
                raise ValueError("a hash-routed MoE layer (n_hash_layers) selects experts by token id: pass the "
                                 "input ids down with the hidden states (Transformer.forward does)")
            return self._weigh(scores, self.tid2eid[ids]), self.tid2eid[ids], scores
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
        return self._weigh(scores, idx), idx, scores

    def _weigh(self, scores: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The routing weights of the chosen experts: their unbiased scores, normalised, scaled."""
        weights = scores.gather(1, idx)
        if self.cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.cfg.route_scale


def hash_table(vocab_size: int, n_experts: int, k: int) -> torch.Tensor:
    """A fixed token-id -> K distinct experts table (vocab, K) for a hash-routed layer trained from
    scratch: experts h(t), h(t)+1, ..., h(t)+K-1 (mod E), h a multiplicative (Fibonacci) hash of the id,
    so ids spread evenly over the experts. A V4 checkpoint brings its own table (its tid2eid)."""
    t = torch.arange(vocab_size, dtype=torch.long)
    h = (t * 2654435761) % (1 << 32) % n_experts
    return (h[:, None] + torch.arange(k)) % n_experts


class RoutedExperts(nn.Module):
    """The E fine-grained routed experts, stacked in nn.Linear layout (out, in): w1 / w3 (E, I, d),
    w2 (E, d, I). x (N, d), routing weights (N, K) and expert ids (N, K) -> sum_k w_k E_k(x) (N, d).

    A module of its own, like nn.Linear, for the same reason: it is where a matmul runs, so a
    numerics or compile converter swaps it for a twin (kernels/swap.py), as it swaps Linears."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int, limit: float = 0.0):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.limit = limit  # V4's swiglu_limit (`gated`); every twin (kernels/) applies the same

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return loop_experts(x, weights, idx, self.w1, self.w2, self.w3, self.limit)

    def extra_repr(self) -> str:
        E, I, d = self.w1.shape
        return f"experts={E}, dim={d}, inter_dim={I}" + (f", limit={self.limit:g}" if self.limit else "")


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, hashed: bool = False):
        super().__init__()
        self.cfg = cfg
        # experts before the gate: named_parameters() keeps the order that init_weights draws in
        self.experts = RoutedExperts(cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim, cfg.swiglu_limit)
        self.gate = Gate(cfg, hashed)
        self.shared_experts = (MLP(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim, cfg.swiglu_limit)
                               if cfg.n_shared_experts else None)
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

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, S, d), ids (B, S) the tokens (hash routing) -> (y (B, S, d), sequence balance loss or None)."""
        B, S, d = x.shape
        flat = x.reshape(-1, d)
        weights, idx, scores = self.gate(flat, None if ids is None else ids.reshape(-1))
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


def swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, limit: float = 0.0) -> torch.Tensor:
    """One expert: w2(silu(w1 x) * w3 x) on rows x (n, d), with w1 / w3 (I, d) and w2 (d, I) (limit: `gated`)."""
    return F.linear(gated(F.linear(x, w1), F.linear(x, w3), limit), w2)


def loop_experts(x, weights, idx, w1, w2, w3, limit: float = 0.0) -> torch.Tensor:
    """Reference: for each expert, gather its tokens, run it, scatter-add the weighted output."""
    y = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        token, slot = torch.where(idx == e)
        if token.numel():
            out = swiglu(x[token], w1[e], w2[e], w3[e], limit) * weights[token, slot, None]
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
