"""What the trainer asks of the process world: one process (`Local`) or torch.distributed (`Distributed`).

The trainer's loop is the same either way; it calls these hooks where the world matters:
which micro-batches this rank reads, sums of logged values, the gradient norm, the expert load for
the bias update, and full tensors for checkpoints. `Local` is the reference twin: every hook is the
identity, and a run on ranks must match it (tests/test_parallel.py).

`Distributed.parallelize` applies parallelism from outside the model, in one documented order (as
torchtitan's `parallelize`):
  1. expert parallelism: each MoE layer's routed experts -> this rank's E/ep slice (expert.py);
  2. pipeline parallelism (pipeline.py): this rank's stages of the model, with their EP slices; the
     EP ranks of a stage read their own micro-batches and sum their dense gradients after the
     schedule (dp must be 1: FSDP inside pipeline stages is not built); or
  3. data parallelism with FSDP2 (`fully_shard`, which runs on gloo): the expert slices sharded over
     the dp ranks holding the same slice, each Block and then the root over all ep * dp data ranks.
     Gradients are summed, not averaged (set_gradient_divide_factor(1)): each rank's loss is already
     its share of the step's global mean, so the sum over ranks is the one-process gradient.
Checkpoints hold full tensors (gathered here), so a run saved on N ranks loads on M, 1 included.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

from .layout import Layout


class Local:
    """One process: the reference every distributed run must match."""

    rank = 0
    world = 1
    data_rank = 0
    data_ranks = 1
    is_main = True
    layout = Layout(1, 1, 1)

    def micro_batches(self, step: int, grad_accum: int) -> list[int]:
        """The global micro-batch indices this rank runs in optimizer step `step`."""
        first = step * grad_accum
        return list(range(first + self.data_rank, first + grad_accum, self.data_ranks))

    def parallelize(self, model: nn.Module) -> nn.Module:
        return model

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over the data ranks (the logged loss parts, target counts)."""
        return list(values)

    def any(self, flag: bool) -> bool:
        return flag

    def broadcast(self, value: int) -> int:
        """Rank 0's value on every rank (a time budget's plan, so every rank stops at the same step)."""
        return value

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def all_reduce_load(self, load: torch.Tensor) -> None:
        """Sum the per-expert token counters in place across every rank (the bias update's input)."""

    def full(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The whole tensor behind `name` (a parameter, buffer, or one of its optimizer moments)."""
        return tensor

    def shard(self, name: str, full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """This rank's part of a full tensor, laid out as the parameter `like` (optimizer state on load)."""
        return full

    def ep_bytes(self) -> int:
        """All-to-all payload bytes sent between ranks (forward dispatch + combine, all ranks) since the last call."""
        return 0

    pipeline = None  # parallel/pipeline.py's Pipeline when pp > 1

    def eval_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
        """The main-head loss of one batch (pipeline ranks pass it stage to stage)."""
        return model(x, targets=y).lm_loss.item()

    def before_save(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Bring the whole model to every rank that writes (pipeline stages live on several ranks)."""

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


class Distributed(Local):
    """torch.distributed under torchrun: gloo on CPU, NCCL when CUDA is there."""

    def __init__(self, layout: Layout, fp8_dispatch: bool = False, backend: str | None = None,
                 timeout_s: float = 600.0, pipeline: dict | None = None):
        from torch.distributed.device_mesh import init_device_mesh

        self.device = "cuda" if torch.cuda.is_available() and backend != "gloo" else "cpu"
        if self.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():
            dist.init_process_group(backend or ("nccl" if self.device == "cuda" else "gloo"),
                                    timeout=datetime.timedelta(seconds=timeout_s))
        self.layout, self.fp8_dispatch, self.pipeline_args = layout, fp8_dispatch, pipeline or {}
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if self.world != layout.world:
            raise RuntimeError(f"the layout {layout} does not match the world of {self.world} processes")
        self.mesh = init_device_mesh(self.device, (layout.pp, layout.dp, layout.ep), mesh_dim_names=("pp", "dp", "ep"))
        self.data_mesh = self.mesh["dp", "ep"]._flatten("data")  # the ep * dp ranks of one pipeline stage
        self.data_group = self.data_mesh.get_group()
        self.ep_group = self.mesh["ep"].get_group()
        self.pp_group = self.mesh["pp"].get_group()
        self.data_rank, self.data_ranks = self.data_mesh.get_local_rank(), layout.data_ranks
        self.is_main = self.rank == 0
        self.expert_names: set[str] = set()
        self._model: nn.Module | None = None

    def parallelize(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import fully_shard

        from ..model.transformer import Block
        from .expert import ExpertParallelExperts, apply_expert_parallel

        self._model = model
        if self.layout.ep > 1:
            apply_expert_parallel(model, self.ep_group, self.fp8_dispatch)
        self.expert_names = {f"{name}.{p}" for name, m in model.named_modules()
                             if isinstance(m, ExpertParallelExperts) for p in ("w1", "w2", "w3")}
        if self.layout.pp > 1:  # stages of the whole model, EP slices inside them; layout.py keeps dp = 1
            from .pipeline import Pipeline

            a = self.pipeline_args
            overlap = bool(a.get("overlap"))
            if overlap and self.layout.ep > 1:  # the backward's all-to-alls get their own group (overlap.py)
                from torch.distributed.device_mesh import init_device_mesh

                second = init_device_mesh(self.device, (self.layout.pp, self.layout.dp, self.layout.ep),
                                          mesh_dim_names=("pp", "dp", "ep"))["ep"].get_group()
                for m in model.modules():
                    if isinstance(m, ExpertParallelExperts):
                        m.backward_group = second
            self.pipeline = Pipeline(model, self.layout.pp, self.mesh["pp"].get_local_rank(), self.pp_group,
                                     a["schedule"], a["n_microbatches"] // self.data_ranks, a["micro_shape"],
                                     self.device, after_backward=self._sum_replicated_grads, overlap=overlap)
            return model
        if self.data_ranks > 1:
            experts = [m for m in model.modules() if isinstance(m, ExpertParallelExperts)]
            ignored = set()
            if self.layout.dp > 1:  # the dp ranks holding the same slice shard it; FSDP sums their grads
                shards = [fully_shard(m, mesh=self.mesh["dp"]) for m in experts]
            else:  # each EP rank's slice is its own (its gradient already holds every rank's tokens)
                shards, ignored = [], {p for m in experts for p in m.parameters()}
            shards += [fully_shard(m, mesh=self.data_mesh, ignored_params=ignored or None)
                       for m in model.modules() if isinstance(m, Block)]
            shards.append(fully_shard(model, mesh=self.data_mesh, ignored_params=ignored or None))
            for m in shards:  # a plain SUM (gloo has no PREMUL_SUM, which FSDP picks for a factor on fp32)
                m.set_gradient_divide_factor(1.0)
                m.set_force_sum_reduction_for_comms(True)
        return model

    def sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=self.data_group)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        t = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.long, device=self.device)
        dist.broadcast(t, src=0)
        return int(t.item())

    def _sum_replicated_grads(self) -> None:
        """Pipeline with ep > 1 (no FSDP): the EP ranks of a stage hold the same dense parameters and
        read different micro-batches; sum those gradients over them (one flat all-reduce)."""
        if self.data_ranks == 1:
            return
        grads = [p.grad for n, p in self._model.named_parameters() if p.grad is not None and n not in self.expert_names]
        if grads:
            flat = torch.cat([g.flatten() for g in grads])
            dist.all_reduce(flat, group=self.data_group)
            for g, part in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(part.view_as(g))

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """clip_grad_norm_ over the whole model. Every gradient element lives on exactly one rank
        (FSDP shards, EP slices, pipeline stages), so the global squared norm is the sum over ranks of
        the local ones (the parameters sit on meshes of different sizes, which torch's own clip cannot
        mix); a pipeline's dense gradients, the same on the stage's ep ranks, count once."""
        once = 1.0 / self.data_ranks if self.pipeline is not None else 1.0
        named = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
        local = [g.to_local() if hasattr(g, "to_local") else g for _, g in named]
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for (name, _), g in zip(named, local):
            sq += g.double().pow(2).sum() * (1.0 if name in self.expert_names else once)
        if self.world > 1:
            dist.all_reduce(sq)
        norm = sq.sqrt()
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in local:
            g.mul_(coef.to(g.dtype))
        return norm.to(local[0].dtype) if local else norm

    def all_reduce_load(self, load: torch.Tensor) -> None:
        # over the whole world: a layer's counters are zero on ranks without its pipeline stage, so every
        # rank gets every layer's load (and the same bias, the same token count, the same MaxVio)
        dist.all_reduce(load)

    def sum_stages(self, values: list[float]) -> list[float]:
        """Element-wise sums over the pipeline ranks (each holds its stages' parts of the loss of its
        micro-batches); `sum` then adds the data ranks' micro-batches."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=self.pp_group)
        return t.tolist()

    def eval_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
        return self.pipeline.forward_loss(x, y) if self.pipeline is not None else super().eval_loss(model, x, y)

    def before_save(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if self.pipeline is not None:
            self.pipeline.sync_full(model, optimizer)

    def full(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if hasattr(tensor, "full_tensor"):  # an FSDP2 DTensor
            tensor = tensor.full_tensor()
        if name in self.expert_names and self.layout.ep > 1:  # this rank's E/ep experts -> all E
            parts = [torch.empty_like(tensor) for _ in range(self.layout.ep)]
            dist.all_gather(parts, tensor.contiguous(), group=self.ep_group)
            tensor = torch.cat(parts)
        return tensor

    def shard(self, name: str, full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import distribute_tensor

        if name in self.expert_names and self.layout.ep > 1:
            local = full.shape[0] // self.layout.ep
            rank = dist.get_rank(self.ep_group)
            full = full[rank * local:(rank + 1) * local]
        if hasattr(like, "device_mesh"):
            return distribute_tensor(full.to(like.dtype), like.device_mesh, like.placements)
        return full.to(like.dtype)

    def ep_bytes(self) -> int:
        from .expert import ExpertParallelExperts

        t = torch.zeros((), dtype=torch.float64, device=self.device)
        for m in self._model.modules() if self._model is not None else ():
            if isinstance(m, ExpertParallelExperts):
                t += m.bytes_sent
                m.bytes_sent = 0
        dist.all_reduce(t)  # every rank: with a pipeline, each holds some of the layers
        return int(t.item())

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def runtime_for(layout: Layout, fp8_dispatch: bool = False, pipeline: dict | None = None) -> Local:
    """Local for a one-process layout, else the process group torchrun set up. pipeline (pp > 1):
    schedule, n_microbatches (per step) and micro_shape (batch, seq_len)."""
    return Local() if layout.world == 1 else Distributed(layout, fp8_dispatch, pipeline=pipeline)
