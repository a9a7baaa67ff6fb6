"""`frugallm estimate`: what training a model costs, from its FLOPs per token (model/flops.py).

    GPU-hours = tokens x train FLOPs per token (at the phase's context) / (MFU x the GPU's dense bf16 peak)

MFU (model FLOPs utilisation) is the one free number. DeepSeek-V3's Table 1 fixes it: 14.8T tokens of
pre-training at 4K context (260.6 GFLOPs a token with its MTP module) in 2,664K H800 GPU-hours is 40.7 %
of the H800's 989 TFLOP/s bf16 peak (FP8 GEMMs make that possible: it is 20 % of the FP8 peak). The
default MFU, 40 %, is that figure, rounded. With it the estimator predicts V3's context extension
(two 1000-step phases at 32K and 128K; V3 §4.3) and the whole budget, and gives V2's per-trillion cost
and V3.2's continued pre-training, whose GPU-hours the papers state differently or not at all. For
frugallm's own presets on this CPU (`--gpu cpu`) the MFU is measured: a few real training steps of the
model against the host's measured GEMM peak (host.py).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import torch

from ..config import ModelConfig, get_preset
from ..model.flops import train_flops_per_token

# dense bf16 peaks (FLOP/s, without sparsity) and the $ per GPU-hour V3's report assumes
ACCELERATORS = {"h800": ("NVIDIA H800 SXM", 989e12), "h100": ("NVIDIA H100 SXM", 989e12),
                "h200": ("NVIDIA H200", 989e12), "a100": ("NVIDIA A100 SXM", 312e12)}
DEFAULT_MFU = 0.40  # what V3's Table 1 implies (module header); `frugallm estimate --preset v3` shows 40.7 %
DEFAULT_PRICE = 2.0  # $ per GPU-hour (V3 Table 1)


@dataclass(frozen=True)
class Phase:
    stage: str  # the paper's cost line it belongs to: its published GPU-hours are per stage
    name: str
    tokens: float
    seq_len: int
    dense: bool = False  # attends every earlier key even with a DSA indexer (V3.2's warm-up)


@dataclass(frozen=True)
class Published:
    """A training run as its paper describes it: phases, and GPU-hours per stage where published."""
    preset: str
    source: str
    phases: tuple[Phase, ...]
    hours: dict[str, float] = field(default_factory=dict)  # stage -> published GPU-hours
    note: str = ""


PUBLISHED = {
    "v3": Published("v3", "DeepSeek-V3 Technical Report, Table 1, §4.3", (
        Phase("pre-training", "pre-training at 4K", 14.8e12, 4096),
        Phase("context extension", "YaRN to 32K: 1000 steps x 1920 sequences", 1000 * 1920 * 32768, 32768),
        Phase("context extension", "YaRN to 128K: 1000 steps x 480 sequences", 1000 * 480 * 131072, 131072)),
        {"pre-training": 2_664_000, "context extension": 119_000, "post-training": 5_000},
        "post-training (SFT and RL) is counted as published: its token counts are not"),
    "v2": Published("v2", "DeepSeek-V2 §3.2.3 (172.8K GPU-hours per trillion tokens)", (
        Phase("pre-training", "pre-training at 4K", 8.1e12, 4096),),
        {"pre-training": 172_800 * 8.1}, "V2 states a cost per trillion tokens; the total is 8.1 x that"),
    "v32": Published("v32", "DeepSeek-V3.2 §2.1.1 (continued pre-training from V3.1-Terminus)", (
        Phase("continued pre-training", "dense warm-up: 1000 steps x 16 sequences of 128K", 1000 * 16 * 131072,
              131072, dense=True),
        Phase("continued pre-training", "sparse training: 15000 steps x 480 sequences of 128K",
              15000 * 480 * 131072, 131072)), {},
        "the paper states no GPU-hours; the warm-up (dense attention) is counted as full training, though only "
        "its indexers learn"),
}
# DeepSeek-V4: the release states "more than 32T" pre-training tokens for both models, and neither GPU-hours nor
# the context schedule; 4K is assumed for all of them (V3's pre-training context), so at longer phases the
# hybrid attention would add a little (model/flops.py)
for _name, _model in (("v4-flash", "V4-Flash"), ("v4-pro", "V4-Pro")):
    PUBLISHED[_name] = Published(_name, f"DeepSeek-{_model} model card (pre-trained on more than 32T tokens)", (
        Phase("pre-training", "pre-training: 32T tokens, context assumed 4K", 32e12, 4096),), {},
        "the release states no GPU-hours and no context schedule: 4K context assumed throughout")


def parse_tokens(text: str) -> float:
    """'14.8T', '500B', '2M', '1e9', '4096' -> a number of tokens; a ValueError naming the form otherwise."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kKmMbBtT]?)\s*", str(text))
    if not m:
        raise ValueError(f"--tokens {text!r} is not a token count: write e.g. 14.8T, 500B, 2M or 1e9")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[m[2].lower()]
    return float(m[1]) * scale


@dataclass
class Row:
    stage: str
    name: str
    tokens: float | None
    seq_len: int | None
    flops_per_token: float | None
    gpu_hours: float
    published: float | None = None

    @property
    def flops(self) -> float | None:
        return None if self.tokens is None else self.tokens * self.flops_per_token


def estimate(cfg: ModelConfig, phases: list[Phase], peak: float, mfu: float,
             published: dict[str, float] | None = None) -> list[Row]:
    """One row per phase (GPU-hours at `mfu` of `peak`), then the published stages with no phases."""
    published = dict(published or {})
    rows = []
    for p in phases:
        fpt = train_flops_per_token(cfg, p.seq_len, dense=p.dense)
        rows.append(Row(p.stage, p.name, p.tokens, p.seq_len, fpt, p.tokens * fpt / (mfu * peak) / 3600))
    stages = {p.stage for p in phases}
    for stage, hours in published.items():
        if stage not in stages:  # counted as published: nothing here to estimate it from
            rows.append(Row(stage, f"{stage} (published figure)", None, None, None, hours, hours))
    return rows


def implied_mfu(cfg: ModelConfig, phases: list[Phase], hours: float, peak: float) -> float:
    """The MFU at which `phases` take `hours` GPU-hours."""
    return sum(p.tokens * train_flops_per_token(cfg, p.seq_len, p.dense) for p in phases) / (hours * 3600 * peak)


def measure_cpu(cfg: ModelConfig, seq_len: int, steps: int = 3, max_params: float = 3e8) -> tuple[float, float, str]:
    """(peak FLOP/s, MFU, how) of training `cfg` on this CPU: the host profile's GEMM peak in the dtype
    the training plan picks, and the MFU of `steps` real AdamW steps at `frugallm train`'s default batch
    (16 rows of at most 256 tokens): the fastest step counts, as a busy machine only slows steps down."""
    from ..model.count import count_params
    from ..model.transformer import Transformer
    from ..plan import apply, resolve

    plan = resolve("train")
    name = "bf16" if plan.dtype == torch.bfloat16 else "fp32"
    from ..host import host_profile

    peak = host_profile().gemm_gflops[name] * 1e9
    if count_params(cfg)["total"] > max_params:
        return peak, DEFAULT_MFU, f"{name} GEMM peak measured; model too large to step here, MFU assumed"
    S = min(seq_len, cfg.max_seq_len, 256)
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    forward = apply(model, plan).forward
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    B = 16
    ids = torch.randint(0, cfg.vocab_size, (B, S + 1))
    times = []
    for _ in range(steps + 1):  # the first step warms up (allocations, oneDNN primitives)
        t = time.perf_counter()
        with plan.autocast_context():
            loss = forward(ids[:, :-1], targets=ids[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    tps = B * S / min(times[1:])
    return peak, tps * train_flops_per_token(cfg, S) / peak, f"{name}, {steps} train steps of {B} x {S} tokens"


def run_estimate(cfg: ModelConfig, label: str, *, tokens: float | None, seq_len: int | None, gpu: str, gpus: int,
                 mfu: float | None, price: float | None, published: Published | None = None) -> dict:
    """The whole estimate as a dict (`--json` prints it; `lines` words it)."""
    if seq_len is None:
        seq_len = min(4096, cfg.max_seq_len)
    elif seq_len > cfg.max_seq_len:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's context (max_seq_len={cfg.max_seq_len}); "
                         f"pass at most {cfg.max_seq_len}")
    if gpu == "cpu":
        peak, measured_mfu, how = measure_cpu(cfg, seq_len)
        from ..host import host_profile

        hw, mfu = f"this CPU ({host_profile().cpu_model}; {how})", mfu or measured_mfu
    elif gpu in ACCELERATORS:
        hw, peak = ACCELERATORS[gpu]
        mfu = mfu or DEFAULT_MFU
    else:
        raise ValueError(f"--gpu {gpu!r} is not known; choose one of: {', '.join([*ACCELERATORS, 'cpu'])}")
    price = (0.0 if gpu == "cpu" else DEFAULT_PRICE) if price is None else price
    if not 0 < mfu <= 1:
        raise ValueError(f"--mfu {mfu} must be a fraction in (0, 1], e.g. 0.4 for 40 %")
    if tokens is not None or published is None:
        if tokens is None:
            raise ValueError("give --tokens (e.g. 14.8T): this model has no published training run to follow")
        phases, hours, source = [Phase("training", f"training at {seq_len} tokens of context", tokens, seq_len)], {}, ""
    else:
        phases, hours, source = list(published.phases), published.hours, published.source
    rows = estimate(cfg, phases, peak, mfu, hours)
    total = sum(r.gpu_hours for r in rows)
    out = {"model": label, "hardware": hw, "unit": "CPU-hours" if gpu == "cpu" else "GPU-hours", "peak_flops": peak, "mfu": mfu, "gpus": gpus, "price_per_gpu_hour": price,
           "source": source, "note": published.note if published and tokens is None else "",
           "rows": [dict(vars(r), flops=r.flops) for r in rows], "gpu_hours": total,
           "days": total / gpus / 24, "cost": total * price}
    if hours:
        stage = {}
        for r in rows:
            stage.setdefault(r.stage, []).append(r)
        out["published"] = {s: {"published": h, "estimated": sum(r.gpu_hours for r in stage.get(s, [])),
                                "implied_mfu": implied_mfu(cfg, [p for p in phases if p.stage == s], h, peak)
                                if any(p.stage == s for p in phases) else None} for s, h in hours.items()}
        out["published_total"] = sum(hours.values())
    return out


def _hours(h: float) -> str:
    return f"{h / 1e3:,.1f}K" if h >= 1e3 else f"{h:,.2f}" if h >= 0.01 else f"{h * 3600:,.2f} s"


def lines(e: dict):
    """`frugallm estimate`'s report, a line at a time."""
    yield f"frugallm estimate: {e['model']} on {e['gpus']:,} x {e['hardware']}"
    yield (f"  peak {e['peak_flops'] / 1e12:,.3g} TFLOP/s per device, MFU {e['mfu']:.1%}"
           + (f"; phases from {e['source']}" if e["source"] else ""))
    yield f"  {'phase':<58} {'tokens':>9} {'GFLOP/token':>12} {'FLOPs':>9} {e['unit']:>10}"
    for r in e["rows"]:
        tokens = "" if r["tokens"] is None else f"{r['tokens']:.3g}"
        fpt = "" if r["flops_per_token"] is None else f"{r['flops_per_token'] / 1e9:,.4g}"
        flops = "" if r["flops"] is None else f"{r['flops']:.3g}"
        yield f"  {r['name']:<58} {tokens:>9} {fpt:>12} {flops:>9} {_hours(r['gpu_hours']):>10}"
    for stage, p in e.get("published", {}).items():
        mfu = "" if p["implied_mfu"] is None else f"; the published figure implies MFU {p['implied_mfu']:.1%}"
        yield (f"  {stage}: estimated {_hours(p['estimated'])} {e['unit']}, published {_hours(p['published'])} "
               f"({p['estimated'] / p['published'] - 1:+.1%}){mfu}")
    total = f"  total: {_hours(e['gpu_hours'])} {e['unit']}"
    if "published_total" in e:
        total += f" (published {_hours(e['published_total'])}: {e['gpu_hours'] / e['published_total'] - 1:+.1%})"
    total += f" = {e['days']:,.1f} days on {e['gpus']:,}"
    yield total + (f", ${e['cost']:,.0f} at ${e['price_per_gpu_hour']:g}/hour" if e["price_per_gpu_hour"] else "")
    if e["note"]:
        yield f"  note: {e['note']}"
