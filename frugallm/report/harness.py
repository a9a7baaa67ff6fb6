"""The report's small training runs: byte-level data, a model sized to the budget, arms that differ in one
thing (docs/report.md "How the experiments are sized").

Data: the Python standard library's own *.py sources (the built-in corpus of `frugallm train`), read as bytes
(vocab 256: no tokenizer to train), split by file with crc32(path) % 20 == 0 -> validation. Every arm of a
section starts from the same seed and reads the same batches, so arms differ only in what the section compares.

Sizing: a section gets `share` seconds. `plan` times a few steps of the largest scale (SCALES, largest
first) and keeps the first one at which every arm gets at least its minimum number of steps; the steps
are then as many as fit. Each arm also stops at a deadline (1.5x its planned time), so a host that slows
down mid-run costs steps, not the budget.
"""

from __future__ import annotations

import math
import statistics
import sysconfig
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import ModelConfig, get_preset
from ..model.moe import MoE
from ..model.transformer import Transformer
from ..plan import apply, resolve
from ..train.optim import ExpertBiasUpdate, build_optimizer, lr_at

# (name, ModelConfig overrides of the `tiny` preset, batch, seq): largest first; vocab 256 (bytes), no MTP
SCALES = {
    "tiny": (dict(), 8, 128),
    "mini": (dict(dim=128, inter_dim=384, n_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=16,
                  qk_rope_head_dim=16, v_head_dim=16, moe_inter_dim=64), 8, 64),
    "micro": (dict(dim=64, n_layers=2, inter_dim=128, n_heads=2, q_lora_rank=0, kv_lora_rank=16,
                   qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
                   n_activated_experts=2, moe_inter_dim=32, n_expert_groups=1, n_limited_groups=1), 4, 32),
}
_DATA: dict = {}


def stdlib_bytes(max_train: int = 8 << 20) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) uint8 tensors from the stdlib sources in sorted path order (read once per process)."""
    if "tv" not in _DATA:
        root = Path(sysconfig.get_paths()["stdlib"])
        train, val, n = [], [], 0
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if "site-packages" in rel or "__pycache__" in rel:
                continue
            if zlib.crc32(rel.encode()) % 20 == 0:
                val.append(path.read_bytes())
            elif n < max_train:
                train.append(path.read_bytes())
                n += len(train[-1])
        joined = lambda parts: torch.frombuffer(bytearray(b"\n".join(parts)), dtype=torch.uint8)
        _DATA["tv"] = (joined(train), joined(val))
    return _DATA["tv"]


def windows(tokens: torch.Tensor, starts: torch.Tensor, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each (B, seq), from windows of seq + 1 bytes starting at `starts` (B,)."""
    w = tokens[starts[:, None] + torch.arange(seq + 1)].long()
    return w[:, :-1], w[:, 1:]


def config(scale: str, **overrides) -> ModelConfig:
    over, _, seq = SCALES[scale]
    return get_preset("tiny", **{"vocab_size": 256, "max_seq_len": max(seq, 128), "n_mtp": 0, **over, **overrides})


@dataclass
class Arm:
    """What a section's arm changes: model config overrides, and training options."""
    name: str
    model: dict = field(default_factory=dict)
    gamma: float = 1e-2  # aux-loss-free bias speed; 1e-2 for runs of a few hundred steps (LOG.md, issue 4)
    fp8: bool = False
    dtype: str = "fp32"  # training precision: fp32 | bf16 | auto (the host's choice)
    lr: float = 3e-3


@dataclass
class Trained:
    arm: Arm
    model: torch.nn.Module
    losses: list[float]  # main-head training loss per step
    val_loss: float
    max_vio: list[float]  # per step: MaxVio of the step's batch, mean over MoE layers
    loads: list[list[int]]  # per step: tokens per expert of the first MoE layer
    step_s: float  # median seconds per step
    steps: int
    plan: str  # the precision plan, in words


class Sizing:
    """The scale and step count that fit a share: `Sizing.fit(share, arms, ...)`."""

    def __init__(self, scale: str, steps: int, probe_s: float, note: str):
        self.scale, self.steps, self.probe_s, self.note = scale, steps, probe_s, note
        self.batch, self.seq = SCALES[scale][1:]

    @classmethod
    def fit(cls, share: float, arms: list[Arm], min_steps: int = 60, max_steps: int = 400, spent: float = 0.0,
            extra_s: float = 0.0, scales=tuple(SCALES), repeat: float = 1.0) -> "Sizing":
        """Time 3 steps of each arm at each scale (largest first); keep the first scale at which `min_steps`
        steps of every arm (each `repeat` times) fit in share - spent - extra_s seconds."""
        start = time.monotonic()
        for scale in scales:
            kinds: dict = {}
            for arm in arms:  # arms differing only in config values cost alike: time one of each precision
                kinds.setdefault((arm.fp8, arm.dtype, arm.model.get("residual")), []).append(arm)
            per_step = repeat * sum(probe(group[0], scale) * len(group) for group in kinds.values())
            left = share - spent - extra_s - (time.monotonic() - start)
            steps = int(left / per_step) if per_step > 0 else max_steps
            if steps >= min_steps or scale == scales[-1]:
                steps = max(4, min(max_steps, steps))
                note = (f"scale {scale} ({SCALES[scale][1]} x {SCALES[scale][2]} bytes per step), {steps} steps per "
                        f"arm: measured {per_step:.3f} s for one step of all {len(arms)} arms")
                if scale != scales[0]:
                    note += f"; shrunk from {scales[0]}, where under {min_steps} steps fitted"
                if steps == max_steps:
                    note += f"; capped at {max_steps} steps"
                return cls(scale, steps, time.monotonic() - start, note)
        raise AssertionError("unreachable")


def probe(arm: Arm, scale: str) -> float:
    """Seconds per training step of `arm` at `scale`: the second of two steps of a fresh model."""
    return train_arm(arm, scale, steps=2, probe=True).step_s


def _batches(steps: int, batch: int, seq: int, seed: int) -> torch.Tensor:
    train, _ = stdlib_bytes()
    g = torch.Generator().manual_seed(1234 + seed)
    return torch.randint(0, len(train) - seq - 1, (steps, batch), generator=g)


@torch.no_grad()
def val_loss(model, seq: int, n: int = 32, batch: int = 8, plan=None) -> float:
    _, val = stdlib_bytes()
    starts = torch.linspace(0, len(val) - seq - 2, n).long()
    model.eval()
    losses = []
    for i in range(0, n, batch):
        with plan.autocast_context() if plan else torch.autocast("cpu", enabled=False):
            losses.append(model(*windows(val, starts[i:i + batch], seq)).lm_loss.float().item())
    model.train()
    return statistics.fmean(losses)


def train_arm(arm: Arm, scale: str, steps: int, seed: int = 0, deadline_s: float | None = None, probe: bool = False,
              teacher=None, kd_weight: float = 0.0) -> Trained:
    """Train `arm` for `steps` steps at `scale` (AdamW (0.9, 0.95), wd 0.1, warm-up then cosine to 10 %, clip 1,
    the aux-loss-free bias hook); with a teacher, the loss is distill_loss's (1 - w) CE + w KD."""
    from ..distill.losses import distill_loss

    _, batch, seq = SCALES[scale]
    torch.manual_seed(seed)
    model = Transformer(config(scale, **arm.model))
    plan = resolve("train", dtype=arm.dtype, fp8=arm.fp8)
    model = apply(model, plan).model.train()
    opt = build_optimizer(model, arm.lr, 0.1, (0.9, 0.95), 1e-8)
    bias = ExpertBiasUpdate(model, gamma=arm.gamma)
    first_moe = next((m for m in model.modules() if isinstance(m, MoE)), None)
    train, _ = stdlib_bytes()
    starts = _batches(steps, batch, seq, seed)
    losses, times, vio, loads = [], [], [], []
    t_end = None if deadline_s is None else time.monotonic() + deadline_s
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, arm.lr, max(1, min(20, steps // 8)), 0.1, "cosine", 0.2)
        x, y = windows(train, starts[step], seq)
        t0 = time.perf_counter()
        with plan.autocast_context():
            out = model(x, targets=None if teacher is not None else y)
            if teacher is not None:
                with torch.no_grad():
                    t_logits = teacher(x).logits.float()
                loss = distill_loss(out.logits.float(), y, t_logits, kd_weight=kd_weight)["loss"]
                loss = loss + (out.balance_loss if out.balance_loss is not None else 0.0)
                main = torch.nn.functional.cross_entropy(out.logits.detach().float().flatten(0, 1), y.flatten()).item()
            else:
                loss, main = out.loss, out.lm_loss.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if first_moe is not None:
            loads.append(first_moe.tokens_per_expert.tolist())
        opt.step()
        step_vio = bias.step()
        times.append(time.perf_counter() - t0)
        losses.append(main)
        vio.append(statistics.fmean(step_vio) if step_vio else 0.0)
        if not math.isfinite(main) or (t_end is not None and time.monotonic() > t_end):
            break
    step_s = statistics.median(times[1:] or times)  # the first step pays one-time allocations
    val = float("nan") if probe else val_loss(model, seq, plan=plan)
    return Trained(arm, model, losses, val, vio, loads, step_s, len(losses), plan.describe().splitlines()[0])


def train_arms(arms: list[Arm], sizing: Sizing, share: float, **kw) -> list[Trained]:
    """Each arm in turn, the same seed and batches, each stopped at 1.5x its part of the share."""
    from .core import progress

    per_arm = max(1.0, (share - sizing.probe_s) / len(arms))
    out = []
    for arm in arms:
        progress(f"      {arm.name}: {sizing.steps} steps at scale {sizing.scale}")
        out.append(train_arm(arm, sizing.scale, sizing.steps, deadline_s=1.5 * per_arm, **kw))
    return out


def tail_mean(values: list[float], fraction: float = 0.25) -> float:
    """Mean of the last `fraction` of a series (at least one value)."""
    tail = values[-max(1, int(len(values) * fraction)):]
    return statistics.fmean(tail) if tail else float("nan")
