"""Expert parallelism: the routed experts sharded over a process group (V3 §3.2.2; torchtitan's EP).

With EP degree `ep`, rank j of the EP group holds experts [j*E/ep, (j+1)*E/ep) and every rank of
the group reads its own tokens (the EP group is also a data group, as in V3). One MoE layer:

  1. gate locally: weights (N, K), expert ids (N, K) over all E experts;
  2. sort the N*K (token, expert) pairs by expert, so the rows bound for rank j are contiguous;
  3. exchange counts: all_to_all of the (ep, E/ep) per-expert counts, so each rank knows how many
     rows it will receive from each source, for each of its experts;
  4. dispatch: all_to_all_single with uneven splits of the (N*K, d+1) rows, the routing weight
     riding as the last column (the receiver applies it to the hidden before w2, as the one-process
     grouped path does, so both compute the same products in the same order);
  5. regroup the received rows by local expert (they arrive grouped by source first), run the local
     grouped GEMMs (moe.sorted_experts), undo the regrouping;
  6. combine: the reverse all_to_all_single, then the un-sort and the sum over the K slots.

Both all_to_alls are autograd functions (their backward is the reverse exchange), so the router,
the tokens and the experts all get their gradients. Counts travel as int64 and never need grads.

Optional (V3 §3.3.3): `fp8_dispatch=True` sends the dispatch payload as e4m3 in 1x128 tiles plus
fp32 scales, both viewed as uint8 so any backend moves them; the receiver dequantizes. It changes
the numbers (that is its point), so the exactness tests run without it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.profiler import record_function

from ..kernels.experts import sort_by_expert, sorted_experts, unsort
from ..model.moe import RoutedExperts
from ..kernels.fp8 import BLOCK, act_dequant, act_quant
from ..kernels.swap import swap_matmuls
from .timeline import COMM


def all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group,
               fp8: bool = False, backward_group=None) -> torch.Tensor:
    """all_to_all_single with uneven splits along dim 0, differentiable: the backward is the reverse
    exchange of the gradient (in its own precision, also when the forward sent FP8), on
    `backward_group` if given (same ranks; parallel/overlap.py runs backwards beside forwards). Both
    directions show on a timeline as "frugallm:a2a" (parallel/timeline.py)."""
    return _AllToAll.apply(x, output_splits, input_splits, group, fp8, backward_group or group)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group, fp8, backward_group):
        ctx.splits, ctx.group = (output_splits, input_splits), backward_group
        with record_function(COMM):
            wire = fp8_encode(x) if fp8 else x.contiguous()
            out = wire.new_empty(sum(output_splits), wire.shape[1])
            dist.all_to_all_single(out, wire, output_splits, input_splits, group=group)
        return fp8_decode(out, x.shape[1], x.dtype) if fp8 else out

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        with record_function(COMM):
            out = grad.new_empty(sum(input_splits), grad.shape[1])
            dist.all_to_all_single(out, grad.contiguous(), input_splits, output_splits, group=ctx.group)
        return out, None, None, None, None, None


class ExpertParallelExperts(nn.Module):
    """RoutedExperts' drop-in twin holding only this rank's E/ep experts: w1 / w3 (E/ep, I, d), w2 (E/ep, d, I).
    Same call signature: x (N, d), routing weights (N, K), global expert ids (N, K) -> (N, d)."""

    kernel = "expert-parallel"  # a twin, named as kernels/swap.py's twins are (kernels_in_use, converted)

    def __init__(self, experts: RoutedExperts, group, fp8_dispatch: bool = False):
        super().__init__()
        self.group, self.fp8_dispatch = group, fp8_dispatch
        self.backward_group = group  # the backward's exchanges; parallel/overlap.py gives them their own
        self.ep, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.n_experts = experts.w1.shape[0]
        if self.n_experts % self.ep:
            raise ValueError(f"{self.n_experts} routed experts do not divide over ep={self.ep} ranks")
        self.local = self.n_experts // self.ep
        self.first = self.rank * self.local  # global id of this rank's first expert
        rows = slice(self.first, self.first + self.local)
        for name in ("w1", "w2", "w3"):  # a copy of our slice: the full stack is freed with the old module
            setattr(self, name, nn.Parameter(getattr(experts, name).detach()[rows].clone()))
        self.limit = getattr(experts, "limit", 0.0)  # V4's clamped SwiGLU (model/moe.py gated)
        self.bytes_sent = 0  # dispatch + combine payload bytes this rank sent to other ranks (benchmarks)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        N, K = idx.shape
        d = x.shape[1]
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        # pairs sorted by expert, hence by destination rank: xs (N*K, d), w (N*K, 1), counts (E,) int64
        xs, w, order, counts = sort_by_expert(x.to(dtype), weights, idx, self.n_experts)
        w = w.to(dtype)
        received = torch.empty_like(counts)
        with record_function(COMM):
            dist.all_to_all_single(received, counts, group=self.group)  # (ep * local,): source-major
        received = received.view(self.ep, self.local)  # [source rank, local expert]
        send = counts.view(self.ep, self.local).sum(1).tolist()
        recv = received.sum(1).tolist()

        payload = torch.cat([xs, w], dim=1)  # (N*K, d + 1): the weight rides with its row
        rows = all_to_all(payload, recv, send, self.group, self.fp8_dispatch, self.backward_group)  # (M, d + 1): by source, then expert
        # regroup by local expert: a stable sort of each received row's expert label
        label = torch.arange(self.local, device=x.device).repeat(self.ep).repeat_interleave(received.flatten())
        by_expert = label.argsort(stable=True)
        rows = rows.index_select(0, by_expert)
        out = sorted_experts(rows[:, :d].contiguous(), rows[:, d:], received.sum(0), self.w1.to(dtype), self.w2.to(dtype),
                             self.w3.to(dtype), self.limit)
        out = out.new_empty(out.shape).index_copy_(0, by_expert, out)  # back to source-major order
        back = all_to_all(out, send, recv, self.group, backward_group=self.backward_group)  # (N*K, d) in `order`
        row_bytes = (d + 1) + 4 * -(-(d + 1) // BLOCK) if self.fp8_dispatch else (d + 1) * payload.element_size()
        self.bytes_sent += (row_bytes * (sum(send) - send[self.rank])  # dispatch: our rows to other ranks
                            + d * out.element_size() * (sum(recv) - recv[self.rank]))  # combine: theirs back
        return unsort(back, order, N, K).to(x.dtype)

    def extra_repr(self) -> str:
        return f"experts={self.first}..{self.first + self.local - 1} of {self.n_experts}, ep={self.ep}"


def apply_expert_parallel(model: nn.Module, group, fp8_dispatch: bool = False) -> list[ExpertParallelExperts]:
    """Swap every MoE layer's RoutedExperts for its EP twin holding this rank's slice (the model's
    code is untouched: MoE.forward calls `self.experts(x, weights, idx)` either way). Returns the
    new modules. Run it on identically initialised (or loaded) full models on every rank."""
    def make(name, module, reads_weight):  # kernels/swap.py: the one mechanism that puts twins in
        return ExpertParallelExperts(module, group, fp8_dispatch) if type(module) is RoutedExperts else None

    return [model.get_submodule(name) for name in swap_matmuls(model, make)]


# ------------------------------------------------------------------ FP8 dispatch (V3 §3.3.3)

def fp8_encode(x: torch.Tensor) -> torch.Tensor:
    """(M, c) float -> (M, c + 4 t) uint8, t = ceil(c / 128): kernels/fp8.py's 1x128 activation tiles
    (e4m3 codes, then the tiles' fp32 scales), as bytes, so any backend moves them."""
    q, scale = act_quant(x)
    return torch.cat([q.view(torch.uint8), scale.view(torch.uint8)], dim=1)


def fp8_decode(wire: torch.Tensor, columns: int, dtype: torch.dtype) -> torch.Tensor:
    """fp8_encode's inverse: (M, c + 4 t) uint8 -> (M, c) in dtype."""
    q = wire[:, :columns].contiguous().view(torch.float8_e4m3fn)
    scale = wire[:, columns:].clone(memory_format=torch.contiguous_format).view(torch.float32)  # offset 0: aligned
    return act_dequant(q, scale, dtype=dtype)
