"""A training run's config: everything that is not the model, as one flat TrainConfig.

TrainConfig is composed of parts by dataclass inheritance, each part holding a group of fields and
checking its own values (`problems()`): DataConfig, ScheduleConfig, PrecisionConfig and EvalConfig
here, ParallelConfig in parallel/config.py and DistillConfig in distill/config.py (so those rooms
never import train/). Field access and JSON stay flat: `cfg.lr`, `--set lr=1e-3` and an old
train_config.json all read the same, and every field name is disjoint from ModelConfig's, so
`--set key=value` finds its config by name alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ModelConfig, check_keys, check_types, read_config
from ..distill.config import DistillConfig
from ..parallel.config import ParallelConfig


@dataclass
class DataConfig:
    # --- data
    data: str = ""  # "" = the built-in corpus (Python stdlib sources); a path, glob, or "hf:NAME"
    text_field: str = "text"  # JSONL field holding the text
    val_fraction: float = 0.01
    seq_len: int = 256
    batch_size: int = 16
    grad_accum: int | None = None  # micro-batches per optimizer step, in all ranks; None = the fewest the
    # parallel layout takes (1 in one process, one per data rank, a pipeline's minimum: parallel/layout.py)
    tokenizer: str = ""  # tokenizer.json (or its dir); "" = reuse the run's, or train one on the data
    tokenizer_train_chars: int = 8_000_000  # text sampled to train a tokenizer

    def problems(self) -> list[str]:
        return out_of_range(self, seq_len="> 0", batch_size="> 0", grad_accum="> 0", tokenizer_train_chars="> 0",
                            val_fraction="in (0, 1)")


@dataclass
class ScheduleConfig:
    # --- optimisation (V3 §4.2: AdamW (0.9, 0.95), wd 0.1, clip 1.0)
    steps: int = 500  # the run's length; with a time_budget, the most it may plan
    time_budget: str = ""  # "" = none; "90s", "8m", "1h": plan the steps that fit (trainer.py), capped by steps
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None  # None = 30, cut to a quarter of a shorter run (train/schedule.py)
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay, the V3 style)
    decay_fraction: float = 0.2  # wsd: the final fraction of steps that decays to min_lr
    weight_decay: float = 0.1  # matrices only; never norms, biases or the gate bias
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    # --- MoE balance and MTP schedules
    bias_gamma: float = 1e-3  # aux-loss-free bias update speed; 0 = no bias update
    bias_freeze_tokens: int = 0  # gamma becomes 0 after this many tokens; 0 = never
    mtp_lambda_late: float = 0.1  # V3: lambda 0.3 for the first ~68% of tokens, then 0.1
    mtp_lambda_late_from: float = 0.7  # fraction of steps after which mtp_lambda_late applies
    # --- DSA (V3.2 §2.1.1; docs/design/dsa.md "Training"), for a model with an indexer (index_topk > 0):
    # "sparse" = top-k attention, everything trained, the indexer by its KL alone (how the model runs);
    # "warmup" = dense attention, only the indexers trained (by the KL), the main model frozen
    dsa_stage: str = "sparse"

    def problems(self) -> list[str]:
        errors = []
        if self.schedule not in ("cosine", "wsd"):
            errors.append(f"schedule={self.schedule!r} must be 'cosine' or 'wsd'")
        if self.dsa_stage not in ("warmup", "sparse"):
            errors.append(f"dsa_stage={self.dsa_stage!r} must be 'warmup' or 'sparse'")
        try:
            duration_seconds(self.time_budget)
        except ValueError as e:
            errors.append(str(e))
        # every number: a negative grad_clip turned training into gradient ascent, a negative
        # min_lr_ratio or warmup_steps bent the schedule, a NaN passed every `<=` test
        return errors + out_of_range(
            self, steps="> 0", lr="> 0", min_lr_ratio="in [0, 1]", warmup_steps=">= 0", decay_fraction="in [0, 1]",
            weight_decay=">= 0", beta1="in [0, 1)", beta2="in [0, 1)", adam_eps="> 0", grad_clip="> 0",
            bias_gamma=">= 0", bias_freeze_tokens=">= 0", mtp_lambda_late=">= 0", mtp_lambda_late_from="in [0, 1]")


@dataclass
class PrecisionConfig:
    # --- precision and speed
    precision: str = "auto"  # auto (host.py measures: bf16 only where clearly faster) | bf16 (autocast,
    # fp32 master weights) | fp32. A run's train_config.json records the resolved dtype, never "auto".
    fp8: bool = False  # V3 fine-grained FP8 GEMMs in every Linear and routed expert (kernels/fp8.py)
    optim_state_dtype: str = "fp32"  # AdamW moments: fp32 (torch's AdamW) | bf16 (fp32 master weights)
    compile: bool = False
    threads: int = 0  # 0 = all cores
    seed: int = 0

    def problems(self) -> list[str]:
        errors = []
        if self.precision not in ("auto", "bf16", "fp32"):
            errors.append(f"precision={self.precision!r} must be 'auto', 'bf16' or 'fp32'")
        if self.optim_state_dtype not in ("fp32", "bf16"):
            errors.append(f"optim_state_dtype={self.optim_state_dtype!r} must be 'fp32' or 'bf16'")
        if self.seed >= 2**63:  # torch.manual_seed's range
            errors.append(f"seed={self.seed} must be < 2**63")
        return errors + out_of_range(self, threads=">= 0", seed=">= 0")


@dataclass
class EvalConfig:
    # --- eval, logging, checkpoints
    eval_every: int = 100
    eval_batches: int = 8
    log_every: int = 10
    save_every: int = 200
    keep_last: int = 2
    skip_nonfinite: bool = False  # skip a step whose loss is NaN/inf instead of stopping
    sample_tokens: int = 120  # a sample printed at the end; 0 = none
    sample_prompt: str = "def "

    def problems(self) -> list[str]:
        return out_of_range(self, eval_batches="> 0", log_every="> 0", eval_every="> 0", save_every="> 0",
                            keep_last="> 0", sample_tokens=">= 0")


RANGES = {"> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0, "in [0, 1]": lambda v: 0 <= v <= 1,
          "in [0, 1)": lambda v: 0 <= v < 1, "in (0, 1)": lambda v: 0 < v < 1}


def out_of_range(cfg, **ranges: str) -> list[str]:
    """'name=value must be R' for each field outside its range R (a key of RANGES); NaN and infinity are
    outside every range (a NaN compares False with everything, so `value <= 0` alone lets it through)."""
    errors = []
    for name, words in ranges.items():
        value = getattr(cfg, name)
        if value is None:  # an optional field's automatic value (e.g. warmup_steps): resolved where it is used
            continue
        finite = isinstance(value, int) or math.isfinite(value)  # (an int of 400 digits overflows isfinite)
        if not (finite and RANGES[words](value)):
            errors.append(f"{name}={value} must be {words}" + ("" if finite else " and finite"))
    return errors


# in the order their fields appear (a dataclass collects its bases' fields in reverse MRO order, hence the
# reversed base list below): train_config.json keeps the key order it always had
PARTS = (DataConfig, ScheduleConfig, PrecisionConfig, ParallelConfig, DistillConfig, EvalConfig)


@dataclass
class TrainConfig(EvalConfig, DistillConfig, ParallelConfig, PrecisionConfig, ScheduleConfig, DataConfig):
    """Everything about a training run that is not the model: the parts above, flat."""

    def __post_init__(self) -> None:
        errors = check_types(self)
        if errors:  # comparisons in the parts would fail on a wrong type with a TypeError
            raise ValueError("invalid TrainConfig: " + "; ".join(errors))
        errors = self.problems()
        if errors:
            raise ValueError("invalid TrainConfig: " + "; ".join(errors))

    def problems(self) -> list[str]:
        """Every part's problems, part by part."""
        return [message for part in PARTS for message in part.problems(self)]

    to_dict = ModelConfig.to_dict
    to_json = ModelConfig.to_json

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        check_keys(cls, d)
        return cls(**d)

    @classmethod
    def from_json(cls, path: str | Path) -> "TrainConfig":
        return read_config(cls, path)


def duration_seconds(text: str) -> float | None:
    """'90s', '8m', '1.5h' -> seconds; '' -> None (no time budget)."""
    if text == "":
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smh])", str(text))
    seconds = float(match[1]) * {"s": 1, "m": 60, "h": 3600}[match[2]] if match else 0.0
    if seconds <= 0:
        raise ValueError(f"time_budget={text!r} must be a positive number followed by s, m or h "
                         f"(e.g. '90s', '8m', '1.5h'), or '' for no time budget")
    return seconds


def apply_overrides(model: ModelConfig, train: TrainConfig, pairs: list[str]) -> tuple[ModelConfig, TrainConfig]:
    """Apply `key=value` strings to whichever config owns `key`; values parse as JSON, else as text."""
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    train_fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    model_changes, train_changes = {}, {}
    for pair in pairs:
        key, eq, raw = pair.partition("=")
        if not eq:
            raise ValueError(f"--set {pair!r} must look like key=value")
        if key not in fields and key not in train_fields:
            raise ValueError(f"unknown config key {key!r}; valid keys are: model: {', '.join(fields)}; "
                             f"train: {', '.join(train_fields)}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        current = getattr(model if key in fields else train, key)
        if isinstance(current, bool) and not isinstance(value, bool):
            raise ValueError(f"--set {key}={raw}: expected true or false")
        if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(current, str) and not isinstance(value, str):
            value = raw
        (model_changes if key in fields else train_changes)[key] = value
    return model.replace(**model_changes), dataclasses.replace(train, **train_changes)


__all__ = ["TrainConfig", "DataConfig", "ScheduleConfig", "PrecisionConfig", "ParallelConfig", "DistillConfig",
           "EvalConfig", "apply_overrides", "duration_seconds"]
