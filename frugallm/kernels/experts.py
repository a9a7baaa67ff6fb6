"""Routed experts, fast: tokens sorted by expert and one grouped GEMM per weight (docs/design/moe.md).

model/moe.py keeps the paper's reference (`loop_experts`: one masked pass per expert). The twins
here compute the same sum, sum_k w_k E_{idx_k}(x), with the (token, expert) pairs sorted so that
each expert's rows are contiguous:

  grouped_experts   eager training and prefill: one torch._grouped_mm per weight (`GroupedExperts`,
                    the twin every execution plan puts in; plan.py)
  per_expert        the same sort, one caller-supplied kernel per expert with tokens (the small-batch
                    fallback, and the int8 / fp8 / prepacked twins' experts)
  sorted_experts    the grouped GEMMs on rows already sorted (shared with expert parallelism)
  static_experts    compiled decode (kernels/compiled.py): no data-dependent shapes: gathered GEMVs
                    at batch 1, every expert densely for a batch

The sort and its undoing are written once (`sort_by_expert`, `unsort`): pure permutations and
integer counts, so every path sums the same products. tests/test_moe.py compares each with the loop.
N tokens, K experts per token, E experts, d model dim, I expert width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.moe import RoutedExperts, gated, swiglu
from ..model.norm import upcast
from .swap import swap_matmuls


def over_same_weights(cls: type, experts: RoutedExperts) -> RoutedExperts:
    """A `cls` (RoutedExperts or one of its twins) holding `experts`' own Parameter objects, in its
    training mode: what every experts twin's constructor shares, so an optimizer built before still
    holds them and the state dict keeps its names."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    new.w1, new.w2, new.w3 = experts.w1, experts.w2, experts.w3
    new.limit = getattr(experts, "limit", 0.0)  # V4's clamped SwiGLU (model/moe.py gated)
    new.train(experts.training)
    return new


class GroupedExperts(RoutedExperts):
    """RoutedExperts whose forward runs `grouped_experts`: the same Parameter objects and state dict.
    `replaceable`: kernels/swap.py offers it to later converters as its plain self, so expert
    parallelism, prepacking or compiled decode can still take its place."""

    kernel = "grouped"
    replaceable = True

    @classmethod
    def from_experts(cls, experts: RoutedExperts) -> "GroupedExperts":
        return over_same_weights(cls, experts)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return grouped_experts(x, weights, idx, self.w1, self.w2, self.w3, self.limit)

    def as_plain(self) -> RoutedExperts:
        """The reference module over the same Parameter objects (what swap_matmuls offers)."""
        return over_same_weights(RoutedExperts, self)


def use_grouped_experts(model: nn.Module, grouped: bool = True) -> list[str]:
    """Every plain RoutedExperts becomes a GroupedExperts (grouped=False: back to the plain
    reference), in place, through swap_matmuls. Returns the swapped names."""
    def make(name, m, reads_weight):
        if type(m) is not RoutedExperts:
            return None
        return GroupedExperts.from_experts(m) if grouped else m

    return swap_matmuls(model, make)


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


def grouped_experts(x, weights, idx, w1, w2, w3, limit: float = 0.0) -> torch.Tensor:
    """Sort the N*K (token, expert) pairs by expert, so each expert's rows are contiguous, then one
    grouped GEMM per weight (torch._grouped_mm) instead of E small ones.

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
        return per_expert(x, weights, idx, E, lambda e, rows: swiglu(rows, w1[e], w2[e], w3[e], limit))
    xs, w, order, counts = sort_by_expert(x, weights, idx, E)  # (N*K, d), rows of one expert contiguous
    out = sorted_experts(xs, w.to(x.dtype), counts, w1, w2, w3, limit)
    return unsort(out, order, N, K)


def sorted_experts(xs, w, counts, w1, w2, w3, limit: float = 0.0) -> torch.Tensor:
    """The grouped GEMMs on rows already sorted by expert: xs (M, d), the first counts[0] rows for
    expert 0, then counts[1] for expert 1, ...; w (M, 1) each row's routing weight, applied to the
    hidden before w2. -> (M, d). Shared with expert parallelism (parallel/expert.py), whose rows
    arrive from other ranks already grouped. Dtypes without a grouped_mm kernel (float64) and
    batches with no rows run one GEMM per expert, with the same order of operations."""
    if xs.dtype in (torch.float32, torch.bfloat16, torch.float16) and xs.shape[0] > 0:
        offs = counts.cumsum(0, dtype=torch.int32)  # end row of each expert's group
        h = gated(grouped_mm(xs, w1.transpose(1, 2), offs), grouped_mm(xs, w3.transpose(1, 2), offs), limit)
        return grouped_mm(h * w, w2.transpose(1, 2), offs)
    out = [F.linear(gated(F.linear(rows, w1[e]), F.linear(rows, w3[e]), limit) * we, w2[e])
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


def gathered_experts(x, weights, idx, w1, w2, w3, limit: float = 0.0) -> torch.Tensor:
    """Static shapes, for compiled decode with fewer (token, expert) pairs than experts: each pair
    reads its own expert's rows, w[idx] (N, K, ., .), inside one reduction, so a compiler fuses
    the gather into the GEMV and nothing is copied or sorted. Accumulates in fp32."""
    xf = upcast(x)[:, None, None, :]  # (N, 1, 1, d)
    h = gated((xf * upcast(w1[idx])).sum(-1), (xf * upcast(w3[idx])).sum(-1), limit)  # (N, K, I)
    h = h * weights[..., None]
    return (h[:, :, None, :] * upcast(w2[idx])).sum(dim=(1, 3)).to(x.dtype)  # sum over I and K


def dense_experts(x, weights, idx, w1, w2, w3, limit: float = 0.0) -> torch.Tensor:
    """Static shapes, for compiled decode of a batch: every expert on every token, weighted by the
    (N, E) routing weights (zero where not chosen). E/K times the routed FLOPs, but each expert's
    weights are read once, in three GEMMs over the stacked matrices: at decode batch sizes the
    union of the chosen experts is most of them anyway and the GEMMs are bandwidth-bound."""
    N, K = idx.shape
    E, I, d = w1.shape
    dense = torch.zeros(N, E, dtype=weights.dtype, device=x.device).scatter(1, idx, weights)  # (N, E)
    a = F.linear(x, w1.reshape(E * I, d)).view(N, E, I)
    b = F.linear(x, w3.reshape(E * I, d)).view(N, E, I)
    h = (gated(upcast(a), b, limit) * dense[..., None]).to(x.dtype)
    return F.linear(h.view(N, E * I), w2.permute(1, 0, 2).reshape(d, E * I))  # sum_e w2_e h_e


def static_experts(x, weights, idx, w1, w2, w3, limit: float = 0.0) -> torch.Tensor:
    """The experts of compiled decode steps (kernels/compiled.py StaticExperts): under torch.compile,
    no data-dependent shapes (no sort, no per-expert split): gathered with fewer pairs than experts
    (batch-1 decode), dense otherwise. Eager calls (prefill) keep the grouped path."""
    if not torch.compiler.is_compiling():
        return grouped_experts(x, weights, idx, w1, w2, w3, limit)
    return (gathered_experts if idx.numel() < w1.shape[0] else dense_experts)(x, weights, idx, w1, w2, w3, limit)
