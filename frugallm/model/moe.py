"""DeepSeekMoE: shared experts + fine-grained routed experts (DeepSeekMoE §3; V3 §2.1.2; docs/design/moe.md).

    y = x_shared(x) + sum_k w_k * Expert_{idx_k}(x)

Gate, in order (V3-code `Gate.forward`):
  1. s = sigmoid(x W^T) or softmax, in float32            (N, E)
  2. selection scores s + b, b an fp32 bias used ONLY for selection (aux-loss-free balancing)
  3. group-limited: keep the `n_limited_groups` best of `n_expert_groups` groups, fill the
     others with -inf (not 0: biased sigmoid scores can be negative, docs/design/moe.md)
  4. idx = top-K of the selection scores; w = s.gather(idx), the UNBIASED scores
     (never (s+b)-b, which cancels to 0 in fp32 when |b| >> s); sigmoid: w /= sum w; w *= route_scale

Routed experts have two implementations with the same output: `loop` (reference: one masked
pass per expert) and `grouped` (default: tokens sorted by expert, one grouped GEMM per weight),
plus two static-shape ones for compiled decoding (`gathered`, `dense`; `static_experts` picks).
Expert weights are stacked (E, out, in) so both paths share them.

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

    def __init__(self, n_experts: int, dim: int, inter_dim: int, impl: str = "grouped"):
        super().__init__()
        self.impl = impl  # grouped (sorted tokens, one grouped GEMM) or loop (reference)
        self.w1 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        experts = grouped_experts if self.impl == "grouped" else loop_experts
        return experts(x, weights, idx, self.w1, self.w2, self.w3)

    def extra_repr(self) -> str:
        E, I, d = self.w1.shape
        return f"experts={E}, dim={d}, inter_dim={I}, impl={self.impl}"


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # experts before the gate: named_parameters() keeps the order that init_weights draws in
        self.experts = RoutedExperts(cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim, cfg.moe_impl)
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


def _expert(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def _autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run a matmul on x in: its dtype on x's device type when autocast is on
    there, else x's own."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def sort_by_expert(x, weights, idx, n_experts: int):
    """The N*K (token, expert) pairs sorted by expert, so that each expert's rows are contiguous:
    x (N, d), weights / idx (N, K) -> xs (N*K, d) in x's dtype; w (N*K, 1) each row's routing
    weight, still in weights' dtype (each caller casts it where it applies it); order (N*K,) the
    pair ids (token * K + slot) in expert order, a stable sort, so tokens keep their order within
    an expert; counts (E,) int64 rows per expert, on x's device (an index_add: CUDA's bincount
    reads its input's max back to the host to size its output). Pure permutations and integer
    counts: no floating-point arithmetic here."""
    K = idx.shape[1]
    flat = idx.flatten()
    order = flat.argsort(stable=True)
    xs = x.index_select(0, order // K)
    w = weights.flatten().index_select(0, order)[:, None]
    counts = torch.zeros(n_experts, dtype=torch.int64, device=x.device).index_add_(0, flat, torch.ones_like(flat))
    return xs, w, order, counts


def unsort(out, order, N: int, K: int, gather: bool = False) -> torch.Tensor:
    """sort_by_expert undone, then the sum over the K slots: out (N*K, d) in expert order -> (N, d).
    Each pair's row goes back to its own place (token * K + slot), so the sum runs over the slots
    in slot order whatever the routing: no accumulating scatter, deterministic. Two ways, the same
    forward values: a scatter-copy (index_copy_, whose backward saves `out` itself, for its shape),
    or with gather=True a gather by the inverse permutation (index_select, whose backward saves only
    the index, and scatters the gradient into zeros: a -0.0 gradient comes back +0.0)."""
    if gather:
        inverse = torch.empty_like(order).index_copy_(0, order, torch.arange(N * K, device=order.device))
        rows = out.index_select(0, inverse)
    else:
        rows = out.new_empty(N * K, out.shape[1]).index_copy_(0, order, out)
    return rows.view(N, K, -1).sum(dim=1)


def loop_experts(x, weights, idx, w1, w2, w3) -> torch.Tensor:
    """Reference: for each expert, gather its tokens, run it, scatter-add the weighted output."""
    y = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        token, slot = torch.where(idx == e)
        if token.numel():
            out = _expert(x[token], w1[e], w2[e], w3[e]) * weights[token, slot, None]
            y.index_add_(0, token, out.to(x.dtype))
    return y


@torch.library.custom_op("frugallm::grouped_mm", mutates_args=())
def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm behind an op of our own, so torch.compile treats it as one opaque call in
    every dtype (its own meta kernel takes bf16 only, and without it a compiled fp32 MoE broke into
    per-expert graphs). offs (E,) int32: the end row of each group.
    a (M, K) @ b (E, K, N) -> (M, N), rows offs[e-1]:offs[e] times b[e] (the forward, grad of a);
    a (K, M) @ b (M, N) -> (E, K, N), group e summing columns/rows offs[e-1]:offs[e] (grad of b)."""
    return torch._grouped_mm(_gemm_layout(a), _gemm_layout(b), offs=offs)


def _gemm_layout(t: torch.Tensor) -> torch.Tensor:
    # _grouped_mm takes row- or column-major operands only; a broadcast gradient (stride 0, e.g.
    # from .sum()) is neither
    return t if 1 in t.stride()[-2:] and 0 not in t.stride() else t.contiguous()


@grouped_mm.register_fake
def _grouped_mm_shape(a, b, offs):
    if b.dim() == 3:
        return a.new_empty(a.shape[0], b.shape[2])
    return a.new_empty(offs.shape[0], a.shape[0], b.shape[1])


def _grouped_mm_backward(ctx, grad):
    a, b = ctx.saved_tensors  # forward is always the (M, K) @ (E, K, N) case
    grad_a = grouped_mm(grad, b.transpose(1, 2), ctx.offs) if ctx.needs_input_grad[0] else None
    grad_b = grouped_mm(a.t(), grad, ctx.offs) if ctx.needs_input_grad[1] else None
    return grad_a, grad_b, None


def _grouped_mm_save(ctx, inputs, output):
    a, b, offs = inputs
    ctx.save_for_backward(a, b)
    ctx.offs = offs


grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_save)


def grouped_experts(x, weights, idx, w1, w2, w3) -> torch.Tensor:
    """Fast path: sort the N*K (token, expert) pairs by expert, so each expert's rows are
    contiguous, then one grouped GEMM per weight (torch._grouped_mm) instead of E small ones.

    The routing weight multiplies the (N*K, I) hidden before w2 (linear, so the same sum, on
    fewer elements than the (N*K, d) output), and the un-sort is a scatter-copy to each pair's
    own row followed by a sum over the K slots: no accumulating scatter in the forward.
    """
    N, K = idx.shape
    E = w1.shape[0]
    dtype = _autocast_dtype(x)  # grouped_mm is not on autocast's list: cast as autocast would
    x, w1, w2, w3 = x.to(dtype), w1.to(dtype), w2.to(dtype), w3.to(dtype)
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or N * K < E:
        # float64 (no grouped_mm kernel), or fewer pairs than experts (decode: most groups are
        # empty, and CPU grouped_mm still runs a GEMM per group): one GEMM per non-empty group
        return per_expert(x, weights, idx, E, lambda e, rows: _expert(rows, w1[e], w2[e], w3[e]))
    xs, w, order, counts = sort_by_expert(x, weights, idx, E)  # (N*K, d), rows of one expert contiguous
    out = sorted_experts(xs, w.to(x.dtype), counts, w1, w2, w3)
    return unsort(out, order, N, K)


def sorted_experts(xs, w, counts, w1, w2, w3) -> torch.Tensor:
    """The grouped GEMMs on rows already sorted by expert: xs (M, d), the first counts[0] rows for
    expert 0, then counts[1] for expert 1, ...; w (M, 1) each row's routing weight, applied to the
    hidden before w2. -> (M, d). Shared with expert parallelism (parallel/expert.py), whose rows
    arrive from other ranks already grouped. Dtypes without a grouped_mm kernel (float64) and
    batches with no rows run one GEMM per expert, with the same order of operations."""
    if xs.dtype in (torch.float32, torch.bfloat16, torch.float16) and xs.shape[0] > 0:
        offs = counts.cumsum(0, dtype=torch.int32)  # end row of each expert's group
        h = F.silu(grouped_mm(xs, w1.transpose(1, 2), offs)) * grouped_mm(xs, w3.transpose(1, 2), offs)
        return grouped_mm(h * w, w2.transpose(1, 2), offs)
    out = [F.linear(F.silu(F.linear(rows, w1[e])) * F.linear(rows, w3[e]) * we, w2[e])
           for e, (rows, we) in enumerate(zip(xs.split(counts.tolist()), w.split(counts.tolist())))]
    return torch.cat(out) if out else xs.new_zeros(0, w2.shape[1])


def per_expert(x, weights, idx, n_experts: int, expert) -> torch.Tensor:
    """The routed experts as one call `expert(e, rows) -> (rows, d)` per expert that got tokens:
    the (token, expert) pairs sorted by expert so each expert's rows are contiguous, the routing
    weight on the output, then the un-sort (a scatter-copy to each pair's row) and a sum over the
    K slots. Shared by the grouped path's small-batch fallback and the numerics converters
    (kernels/quantize.py, kernels/prepack.py), which bring their own expert kernels."""
    N, K = idx.shape
    xs, w, order, counts = sort_by_expert(x, weights, idx, n_experts)  # (N*K, d)
    sizes = counts.tolist()
    out = torch.cat([expert(e, rows) for e, rows in enumerate(xs.split(sizes)) if sizes[e]]) * w.to(x.dtype)
    return unsort(out, order, N, K)


def gathered_experts(x, weights, idx, w1, w2, w3) -> torch.Tensor:
    """Static shapes, for compiled decode with fewer (token, expert) pairs than experts: each pair
    reads its own expert's rows, w[idx] (N, K, ., .), inside one reduction, so a compiler fuses
    the gather into the GEMV and nothing is copied or sorted. Accumulates in fp32."""
    xf = upcast(x)[:, None, None, :]  # (N, 1, 1, d)
    h = F.silu((xf * upcast(w1[idx])).sum(-1)) * (xf * upcast(w3[idx])).sum(-1)  # (N, K, I)
    h = h * weights[..., None]
    return (h[:, :, None, :] * upcast(w2[idx])).sum(dim=(1, 3)).to(x.dtype)  # sum over I and K


def dense_experts(x, weights, idx, w1, w2, w3) -> torch.Tensor:
    """Static shapes, for compiled decode of a batch: every expert on every token, weighted by the
    (N, E) routing weights (zero where not chosen). E/K times the routed FLOPs, but each expert's
    weights are read once, in three GEMMs over the stacked matrices: at decode batch sizes the
    union of the chosen experts is most of them anyway and the GEMMs are bandwidth-bound."""
    N, K = idx.shape
    E, I, d = w1.shape
    dense = torch.zeros(N, E, dtype=weights.dtype, device=x.device).scatter(1, idx, weights)  # (N, E)
    a = F.linear(x, w1.reshape(E * I, d)).view(N, E, I)
    b = F.linear(x, w3.reshape(E * I, d)).view(N, E, I)
    h = (F.silu(upcast(a)) * b * dense[..., None]).to(x.dtype)
    return F.linear(h.view(N, E * I), w2.permute(1, 0, 2).reshape(d, E * I))  # sum_e w2_e h_e


def static_experts(x, weights, idx, w1, w2, w3) -> torch.Tensor:
    """The experts of compiled decode steps (kernels/compiled.py StaticExperts): under torch.compile, no
    data-dependent shapes (no sort, no per-expert split): gathered with fewer pairs than experts
    (batch-1 decode), dense otherwise. Eager calls (prefill) keep the grouped path."""
    if not torch.compiler.is_compiling():
        return grouped_experts(x, weights, idx, w1, w2, w3)
    return (gathered_experts if idx.numel() < w1.shape[0] else dense_experts)(x, weights, idx, w1, w2, w3)


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
