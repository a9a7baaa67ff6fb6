"""GRPOConfig: everything about a GRPO run that is not the model; flat, JSON round-trip, validated. It is
the run's train_config.json (a GRPO run is an ordinary run directory: docs/design/grpo.md)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ModelConfig, check_keys, check_types, read_config
from .objective import NORMS

# variant -> the fields it sets (docs/design/grpo.md "Variants"); explicit flags win over them
VARIANTS = {
    "grpo": {"loss_norm": "sequence", "scale_rewards": True, "eps_low": 0.2, "eps_high": 0.2,
             "dynamic_sampling": False},
    "dr_grpo": {"loss_norm": "constant", "scale_rewards": False, "eps_low": 0.2, "eps_high": 0.2,
                "dynamic_sampling": False},
    "dapo": {"loss_norm": "token", "scale_rewards": True, "eps_low": 0.2, "eps_high": 0.28,
             "dynamic_sampling": True},
}


@dataclass
class GRPOConfig:
    kind: str = "grpo"  # marks train_config.json as a GRPO run's
    init_from: str = ""  # the policy's and the reference's weights: a run or Hugging Face directory
    reference: str = ""  # the checkpoint init_from resolved to (what a resume reloads as the reference)
    task: str = ""  # a JSONL file or a built-in task (tasks.py)
    rewards: str = "verifier"  # comma-separated reward names (rewards.py); "verifier": the record's own
    variant: str = "grpo"  # grpo | dr_grpo | dapo: the defaults of the five fields below
    loss_norm: str = "sequence"
    scale_rewards: bool = True
    eps_low: float = 0.2
    eps_high: float = 0.2
    dynamic_sampling: bool = False
    max_sample_rounds: int = 3  # dynamic sampling: rounds of prompts sampled per step to refill the batch
    overlong_buffer: int = 0  # DAPO's soft overlong punishment over the last N tokens of max_new_tokens; 0 = off
    group: int = 8  # G completions per prompt
    prompts_per_step: int = 8
    max_new_tokens: int = 32
    temperature: float = 1.0
    beta: float = 0.04  # KL weight to the reference (DeepSeekMath's); 0 = no reference model at all
    mu: int = 1  # policy updates per batch of rollouts (the ratio is 1 on the first)
    lr: float = 2e-5
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    micro_batch: int = 32  # completions per forward/backward (memory only: the loss is the batch's)
    steps: int = 200
    time_budget: str = ""  # "8m": stop at the last step that fits, capped by steps
    save_every: int = 10
    keep_last: int = 2
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16 | auto: the training forward's (rollouts run the fp32 weights)
    threads: int = 0  # torch threads; 0 = torch's default

    def __post_init__(self) -> None:
        errors = check_types(self)
        if not errors:
            errors = self.problems()
        if errors:
            raise ValueError("invalid GRPOConfig: " + "; ".join(errors))

    def problems(self) -> list[str]:
        out = []
        if self.kind != "grpo":
            out.append(f"kind={self.kind!r} must be 'grpo'")
        if self.variant not in VARIANTS:
            out.append(f"variant={self.variant!r}: choose one of {', '.join(VARIANTS)}")
        if self.loss_norm not in NORMS:
            out.append(f"loss_norm={self.loss_norm!r}: choose one of {', '.join(NORMS)}")
        for name in ("group", "prompts_per_step", "max_new_tokens", "mu", "max_sample_rounds", "micro_batch",
                     "steps", "save_every", "keep_last"):
            if getattr(self, name) < 1:
                out.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.group < 2:
            out.append(f"group={self.group} must be >= 2: advantages are relative to the group")
        if not 0 <= self.overlong_buffer <= self.max_new_tokens:
            out.append(f"overlong_buffer={self.overlong_buffer} must be in [0, max_new_tokens={self.max_new_tokens}]")
        if not 0 <= self.eps_low < 1 or self.eps_high < 0:
            out.append(f"eps_low={self.eps_low} must be in [0, 1) and eps_high={self.eps_high} >= 0")
        if self.beta < 0 or self.lr <= 0 or self.temperature <= 0:
            out.append(f"beta={self.beta} must be >= 0, lr={self.lr} and temperature={self.temperature} > 0")
        if self.precision not in ("fp32", "bf16", "auto"):
            out.append(f"precision={self.precision!r}: choose fp32, bf16 or auto")
        return out

    def reward_names(self) -> list[str]:
        return [name.strip() for name in self.rewards.split(",") if name.strip()]

    to_dict = ModelConfig.to_dict
    to_json = ModelConfig.to_json

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GRPOConfig":
        check_keys(cls, d)
        return cls(**d)

    @classmethod
    def from_json(cls, path: str | Path) -> "GRPOConfig":
        return read_config(cls, path)


def with_variant(variant: str, **fields) -> GRPOConfig:
    """A config of `variant`'s defaults, then `fields` (those given, not None) over them."""
    if variant not in VARIANTS:
        raise ValueError(f"--variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    given = {k: v for k, v in fields.items() if v is not None}
    return GRPOConfig(**{"variant": variant, **VARIANTS[variant], **given})


RESUMABLE = ("steps", "time_budget", "save_every", "keep_last", "threads")


def resume_conflicts(saved: GRPOConfig, asked: GRPOConfig) -> list[str]:
    return [f"{f.name}: run has {getattr(saved, f.name)!r}, asked {getattr(asked, f.name)!r}"
            for f in dataclasses.fields(GRPOConfig)
            if f.name not in RESUMABLE + ("reference",) and getattr(saved, f.name) != getattr(asked, f.name)]


def parse_sets(pairs: list[str]) -> dict:
    """--set key=value pairs -> GRPOConfig fields, each value read as its field's type."""
    fields = {f.name: f for f in dataclasses.fields(GRPOConfig)}
    out = {}
    for pair in pairs:
        key, eq, text = pair.partition("=")
        if not eq or key not in fields:
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE with KEY one of {', '.join(fields)}")
        kind = type(getattr(GRPOConfig(), key))
        try:
            if kind is bool:
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                out[key] = text.lower() in ("true", "1")
            else:
                out[key] = kind(text)
        except ValueError:
            raise ValueError(f"--set {pair!r}: {key} takes a {kind.__name__}") from None
    return out
