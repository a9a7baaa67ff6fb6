"""CPU inference layout: bf16 weights prepacked once into oneDNN's blocked format.

Why: at batch 1 a decode step is a few hundred GEMVs, and `F.linear` on a plain (N, K) bf16
weight has oneDNN reorder that weight into its blocked layout on EVERY call, so each GEMV reads
the matrix twice and writes it once. Reordering once at load time and calling the same kernel on
the packed weight (`torch.ops.mkldnn._linear_pointwise`, what torch.compile's CPU freezing pass
emits) gives the identical output, bit for bit (tests/test_prepack.py), with one read.
Measured on this machine, one thread, bf16, M = 1 (LOG.md):

    weight (N x K)      F.linear       prepacked
    16384 x 768 head    1549 us        688 us      (16 -> 37 GB/s)
    2048 x 768           216 us         99 us
    160 x 768 expert      28 us         19 us      (small matrices stay call-overhead bound)

Fusions that need no new numerics: SwiGLU's w1 and w3 read the same input, so they are packed as
one [w1; w3] (2I, d) matrix: one GEMM instead of two, per dense FFN, shared expert and routed
expert. Everything else (norms, RoPE, attention, routing) is the model's own code.

`prepack(model)` swaps modules in place, from outside the model (kernels/swap.py swap_matmuls):
    PackedLinear   nn.Linear twin (not wkv_b: MLA's absorbed path reads wkv_b.weight)
    PackedMLP      model/moe.py's MLP with [w1; w3] fused
    PackedExperts  RoutedExperts as per-expert packed [w1; w3] and w2; only experts with tokens run
It is an inference-only, CPU-only, bf16-only layout, used only where the host profile says oneDNN
packs bf16 weights (AVX-512-BF16 / AMX / AVX-NE-CONVERT hosts; host.py): packed weights are not parameters (no grads,
no optimizer), `model.to(...)` leaves them alone, and state_dict() writes the plain weights back, so
a packed model saves like the original. Call it last, after any dtype cast; on a model that is not
bf16 on CPU, or where oneDNN is missing, it changes nothing (`unavailable_reason` says why).
"""

from __future__ import annotations

import torch
from torch import nn

from ..model.moe import MLP, RoutedExperts, gated
from .experts import per_expert
from .swap import swap_matmuls

DTYPE = torch.bfloat16


def unavailable_reason(model: nn.Module) -> str | None:
    """Why `prepack` would leave this model as it is, or None when it applies."""
    from ..host import host_profile

    p = next(model.parameters(), None)
    host = host_profile()
    if not host.bf16_prepack:
        return f"this host's oneDNN does not prepack bf16 weights ({host.cpu_model}, ISA {host.capability}, " \
               f"profile {host.source})"
    if p is None or p.device.type != "cpu" or p.dtype != DTYPE:
        return f"prepacking is for bf16 weights on CPU; this model is {p.dtype if p is not None else 'empty'} " \
               f"on {p.device if p is not None else '-'} (cast it with .to(torch.bfloat16) first)"
    return None


def pack(w: torch.Tensor) -> torch.Tensor:
    """(N, K) bf16 -> an opaque oneDNN tensor for `linear`. The batch hint 1 is decode's M; any M
    still runs (prefill), through the same kernel."""
    return torch.ops.mkldnn._reorder_linear_weight(w.detach().to(DTYPE).contiguous(), 1)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ packed (N, K)^T (+ bias, added inside the GEMM as F.linear does). x in another
    dtype (fp32 checks) is cast in and out."""
    if x.dtype != DTYPE:
        return torch.ops.mkldnn._linear_pointwise(x.to(DTYPE), packed, bias, "none", [], "").to(x.dtype)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, limit: float = 0.0) -> torch.Tensor:
    h = linear(x, w13)  # (..., 2I) = [w1 x | w3 x]
    a, b = h.chunk(2, dim=-1)
    return linear(gated(a, b, limit), w2)


class PackedLinear(nn.Module):
    kernel = "prepacked-bf16"

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.packed = pack(lin.weight)
        self.bias = None if lin.bias is None else nn.Parameter(lin.bias.detach().to(DTYPE), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:  # the plain matrix, rebuilt on access (saving, inspection)
        return self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.packed, self.bias)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias.detach()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, prepacked bf16"


class PackedMLP(nn.Module):
    """SwiGLU w2(silu(w1 x) * w3 x) with w1 and w3 packed as one matrix."""

    kernel = "prepacked-bf16"

    def __init__(self, mlp: MLP):
        super().__init__()
        self.inter_dim = mlp.w1.out_features
        self.w13, self.w2 = pack(torch.cat([mlp.w1.weight, mlp.w3.weight])), pack(mlp.w2.weight)
        self.limit = mlp.limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _swiglu(x, self.w13, self.w2, self.limit)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        w1, w3 = self.w13.to_dense().split(self.inter_dim)
        destination.update({prefix + "w1.weight": w1, prefix + "w2.weight": self.w2.to_dense(), prefix + "w3.weight": w3})


class PackedExperts(nn.Module):
    """RoutedExperts (E, I, d) / (E, d, I) as E packed [w1; w3] and E packed w2."""

    kernel = "prepacked-bf16"

    def __init__(self, experts: RoutedExperts):
        super().__init__()
        self.inter_dim = experts.w1.shape[1]
        self.w13s = [pack(torch.cat([a, b])) for a, b in zip(experts.w1, experts.w3)]
        self.w2s = [pack(w) for w in experts.w2]
        self.limit = getattr(experts, "limit", 0.0)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """RoutedExperts' signature: one fused SwiGLU per expert that got tokens (kernels/experts.py per_expert)."""
        N, K = idx.shape
        if N == 1:  # decode at batch 1: the K experts in pair order, no sort / gather / scatter
            out = torch.cat([_swiglu(x, self.w13s[e], self.w2s[e], self.limit) for e in idx[0].tolist()])  # (K, d)
            return (out * weights.view(K, 1).to(x.dtype)).view(1, K, -1).sum(dim=1)
        return per_expert(x, weights, idx, len(self.w2s),
                          lambda e, rows: _swiglu(rows, self.w13s[e], self.w2s[e], self.limit))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        w13 = torch.stack([p.to_dense() for p in self.w13s])
        w1, w3 = w13.split(self.inter_dim, dim=1)
        destination.update({prefix + "w1": w1, prefix + "w2": torch.stack([p.to_dense() for p in self.w2s]),
                            prefix + "w3": w3})


def prepack(model: nn.Module) -> list[str]:
    """Swap every nn.Linear, MLP and RoutedExperts of a bf16 CPU model for its prepacked twin, in
    place (kernels/swap.py swap_matmuls); a Linear whose weight the model reads directly
    (MLA's wkv_b) stays plain, as rebuilding a packed weight costs a copy. Returns the names
    swapped; [] (and nothing changed) when `unavailable_reason(model)` says it does not apply."""
    if unavailable_reason(model):
        return []
    twins = {nn.Linear: PackedLinear, MLP: PackedMLP, RoutedExperts: PackedExperts}
    with torch.no_grad():
        return swap_matmuls(model, lambda name, m, reads_weight: None if reads_weight else twins[type(m)](m))
