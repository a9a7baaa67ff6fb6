"""The parallel layout (ep x pp x dp ranks), checked before any process group exists, and the launch.

World = pp * dp * ep ranks, laid out as a (pp, dp, ep) mesh (ep fastest, so an EP group is a block
of neighbouring ranks: on several nodes it stays inside one node, where the all-to-all is cheapest).
The ep * dp ranks of one pipeline stage are the *data ranks*: each reads its own micro-batches, as
in V3, where expert parallelism runs across the data-parallel ranks.

A step is `grad_accum` micro-batches in all, whatever the world size: data rank r runs micro-batches
r, r + R, r + 2R, ... (R = ep * dp). So every token is read once per epoch, one process with the same
config computes the same step, and a run saved on N ranks resumes on M ranks exactly.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass

from ..config import ModelConfig
from ..plan import one_process_refusals
from .config import ParallelConfig

PP_SCHEDULES = ("dualpipev", "1f1b", "zbv")


class LayoutError(ValueError):
    """A layout that cannot run; raised before any process starts, naming the fields to change."""


@dataclass(frozen=True)
class Layout:
    ep: int
    pp: int
    dp: int

    @property
    def world(self) -> int:
        return self.ep * self.pp * self.dp

    @property
    def data_ranks(self) -> int:
        return self.ep * self.dp

    def __str__(self) -> str:
        return f"ep {self.ep} x pp {self.pp} x dp {self.dp} = {self.world} ranks"


def resolve(model_cfg: ModelConfig, train_cfg: ParallelConfig, world: int) -> Layout:
    """The layout `train_cfg` asks for on `world` ranks (dp=0: whatever the rest leaves), or a LayoutError
    listing every problem at once. train_cfg: the run's TrainConfig (train/config.py), read for its
    ParallelConfig fields, grad_accum, and the features that run in one process only (teacher, fp8,
    compile, optim_state_dtype)."""
    ep, pp, dp = train_cfg.ep, train_cfg.pp, train_cfg.dp
    errors = []
    for name, value in (("ep", ep), ("pp", pp)):
        if value < 1:
            errors.append(f"{name}={value} must be >= 1")
    if dp < 0:
        errors.append(f"dp={dp} must be >= 1, or 0 for world / (ep * pp)")
    if errors:
        raise LayoutError("invalid parallel layout: " + "; ".join(errors))
    auto = dp == 0
    if auto:
        if world % (ep * pp):
            errors.append(f"the world of {world} ranks does not divide by ep * pp = {ep} * {pp}; launch a multiple "
                          f"of {ep * pp} processes or change --ep / --pp")
        dp = max(1, world // (ep * pp))
    layout = Layout(ep, pp, dp)
    if layout.world != world and not (auto and errors):
        errors.append(f"ep * pp * dp = {ep} * {pp} * {dp} = {layout.world} must equal the world size {world} "
                      f"(torchrun's --nproc-per-node x --nnodes); change --ep / --pp / --dp, or --dp 0 to fill it")
    experts = model_cfg.n_routed_experts if any(map(model_cfg.is_moe_layer, range(model_cfg.n_layers))) else 0
    if ep > 1 and not experts:
        errors.append(f"ep={ep} needs routed experts, and this model has no MoE layer; use --ep 1")
    elif ep > 1 and model_cfg.n_routed_experts % ep:
        errors.append(f"n_routed_experts={model_cfg.n_routed_experts} must divide by ep={ep}")
    if train_cfg.overlap and (pp == 1 or train_cfg.pp_schedule != "dualpipev"):
        errors.append("overlap runs DualPipeV's forward-and-backward pairs concurrently: it needs --pp > 1 with "
                      "pp_schedule=dualpipev")
    if train_cfg.fp8_dispatch and ep == 1:
        errors.append("fp8_dispatch compresses the expert-parallel all-to-all and needs ep > 1")
    grad_accum = grad_accum_for(layout, train_cfg)
    if grad_accum % layout.data_ranks:
        errors.append(f"grad_accum={grad_accum} (micro-batches per step, in all) must divide by the "
                      f"{layout.data_ranks} data ranks (ep * dp), each running its share; "
                      f"e.g. --set grad_accum={layout.data_ranks * max(1, grad_accum // layout.data_ranks)}")
    if pp > 1:
        chunks = grad_accum // max(layout.data_ranks, 1)
        if train_cfg.pp_schedule not in PP_SCHEDULES:
            errors.append(f"pp_schedule={train_cfg.pp_schedule!r} must be one of {', '.join(PP_SCHEDULES)}")
        stages = 2 * pp if train_cfg.pp_schedule in ("dualpipev", "zbv") else pp
        if model_cfg.n_layers < stages:
            errors.append(f"n_layers={model_cfg.n_layers} cannot fill {stages} pipeline stages "
                          f"({train_cfg.pp_schedule} with pp={pp}); use fewer stages or more layers")
        need = 2 * pp if train_cfg.pp_schedule == "dualpipev" else pp
        if chunks < need:
            errors.append(f"{train_cfg.pp_schedule} with pp={pp} needs >= {need} micro-batches per data rank, "
                          f"and grad_accum={grad_accum} over {layout.data_ranks} data ranks gives {chunks}; "
                          f"raise grad_accum to {need * layout.data_ranks}")
        if dp > 1:
            errors.append(f"pp={pp} with dp={dp} is not built yet (FSDP inside pipeline stages); use --dp 1 with "
                          "--pp (--ep may be > 1), or --pp 1")
        if model_cfg.index_topk > 0:  # each stage's indexers would need their KL in that stage's backward
            errors.append("pp > 1 does not train the DSA indexer yet (model/indexer_loss.py); use --pp 1 "
                          "(--ep and --dp work)")
        if train_cfg.pp_schedule == "1f1b" and model_cfg.n_mtp:
            errors.append("pp_schedule=1f1b puts the MTP module (which reads the embedding) on another rank than "
                          "the embedding; use dualpipev or zbv (V-shaped: both on rank 0), or --set n_mtp=0")
    errors += one_process_refusals(layout.world, fp8=train_cfg.fp8, compile=train_cfg.compile,  # the plan's rules
                                   teacher=bool(train_cfg.teacher), optim_state_dtype=train_cfg.optim_state_dtype)
    if errors:
        raise LayoutError("invalid parallel layout: " + "; ".join(errors))
    return layout


def fewest_micro_batches(layout: Layout, pp_schedule: str) -> int:
    """The smallest grad_accum `layout` takes: one micro-batch per data rank, and per pipeline the
    schedule's minimum (DualPipeV: 2 * pp, its two directions; 1F1B and ZB-V: pp)."""
    per_rank = 2 * layout.pp if layout.pp > 1 and pp_schedule == "dualpipev" else layout.pp
    return layout.data_ranks * per_rank


def grad_accum_for(layout: Layout, train_cfg: ParallelConfig) -> int:
    """train_cfg.grad_accum, or where it is None (the default) the fewest micro-batches `layout` takes."""
    if train_cfg.grad_accum is None:
        return fewest_micro_batches(layout, train_cfg.pp_schedule)
    return train_cfg.grad_accum


def world_from_env() -> int:
    """torchrun's WORLD_SIZE, or 1 for a plain process."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def torchrun_command(nproc: int, argv: list[str], nnodes: int = 1, node_rank: int = 0,
                     rdzv_endpoint: str = "") -> list[str]:
    """The torchrun command that runs `python -m frugallm <argv>` on nproc processes per node."""
    torchrun = shutil.which("torchrun") or ""
    cmd = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    cmd += [f"--nproc-per-node={nproc}", f"--nnodes={nnodes}"]
    if nnodes > 1:
        if not rdzv_endpoint:
            raise LayoutError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
        cmd += [f"--node-rank={node_rank}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}"]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", "frugallm", *argv]
