"""The parallelism part of a training run's config (train/config.py composes it into TrainConfig).

It lives here so parallel/ never imports train/. The fields are checked together, with the model and
the world size, by layout.py `resolve` before any process group exists; alone they have no rule.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ParallelConfig:
    # --- parallelism (frugallm/parallel/; under torchrun, or `frugallm train --nproc N`): world = ep * pp * dp
    ep: int = 1  # expert parallelism: the routed experts sharded over ep ranks, which read their own micro-batches
    pp: int = 1  # pipeline ranks (parallel/pipeline.py); V schedules run 2 stages per rank
    dp: int = 0  # data parallelism (FSDP2) degree; 0 = world / (ep * pp)
    pp_schedule: str = "dualpipev"  # dualpipev | 1f1b | zbv
    fp8_dispatch: bool = False  # EP: send the dispatch payload as FP8 + scales (V3 §3.3.3); changes the numbers
    overlap: bool = False  # DualPipeV: each overlapped forward & backward pair runs concurrently (parallel/overlap.py)
    trace_step: int = 0  # record this step's per-rank timeline into run/trace/ (parallel/timeline.py); 0 = none

    def problems(self) -> list[str]:
        """This part's invalid values, one message each: none alone (layout.py checks the layout)."""
        return []
