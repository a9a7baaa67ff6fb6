"""What a training run measures and shows: validation loss, MFU's numerator and denominator, and the
progress line (a tqdm bar on a terminal, plain lines in logs and CI). The trainer calls these; the
benchmarks use them to measure the same way."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from ..config import ModelConfig
from ..names import TRAIN_CONFIG
from ..model.flops import train_flops_per_token  # noqa: F401 (the MFU numerator, re-exported)
from ..model.transformer import Transformer
from ..parallel.runtime import Local
from . import data


def matmul_peak(dtype: torch.dtype, n: int = 1024) -> float:
    """Measured FLOP/s of an n^3 matmul in `dtype`: the denominator of the MFU estimate."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(3):
        a @ b
    return 3 * 2 * n**3 / (time.perf_counter() - t)


def evaluate(model: Transformer, batches: data.Batches, n_batches: int, autocast, world: Local = Local()) -> float:
    """Mean main-head loss over the first `n_batches` val batches (the same ones every time). On
    several data ranks each reads every R-th batch; a rank past the end runs batch 0 and counts
    nothing, since every forward is collective (FSDP gathers, EP all-to-alls)."""
    n = eval_batch_count(batches, n_batches)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    R = world.data_ranks
    with torch.no_grad(), autocast():
        for i in range(world.data_rank, -(-n // R) * R, R):
            x, y = batches.get(i if i < n else 0)
            targets = int((y != -100).sum()) if i < n else 0  # a mean over target tokens (SFT masks)
            total += world.eval_loss(model, x, y) * targets
            count += targets
    total, count = world.sum([total, count])
    model.train(was_training)
    return total / max(count, 1)


def eval_batch_count(batches: data.Batches, n_batches: int) -> int:
    """How many of `n_batches` val batches exist; a ValueError naming the fix when none does."""
    n = min(n_batches, batches.windows // batches.batch_size)
    if n <= 0:
        raise ValueError(f"cannot evaluate {n_batches} batches: the val split holds {batches.windows} windows of "
                         f"{batches.seq_len + 1} tokens, fewer than one batch of {batches.batch_size}; use more "
                         "data, a larger val_fraction, or a smaller seq_len or batch_size")
    return n


def evaluate_run(run, source=None, n_batches: int = 16, log=print) -> str:
    """`frugallm eval`: the run's validation loss and perplexity over `n_batches` val batches of its
    own data (or of `source`'s val split) beside the unigram baseline's, as one line. Eval is a
    prefill: the plan's dtype (plan.resolve("eval")), bf16 by autocast over the fp32 weights where
    the host measures it faster; log(line) is told that choice."""
    import math

    from .config import TrainConfig
    from ..formats.checkpoint import latest, load_tokenizer
    from ..plan import load, resolve

    ckpt = latest(run) if Path(run).is_dir() else None
    if ckpt is None and source is None:  # a model that is not a run (a GGUF, a Hugging Face folder) has no data
        raise FileNotFoundError(f"{run} holds no valid checkpoint, so it names no data; pass --data to evaluate it")
    cfg = TrainConfig.from_json(ckpt / TRAIN_CONFIG) if ckpt else TrainConfig()
    model, tok = load(run), load_tokenizer(run)
    splits = data.prepare(cfg.data if source is None else source, tok, cfg.val_fraction, cfg.text_field)
    seq_len = min(cfg.seq_len, model.config.max_seq_len)
    batches = data.val_batches(splits.val, seq_len, cfg.batch_size, mask=splits.val_mask)
    masks = splits.train_mask, splits.val_mask  # SFT records: only target tokens count
    plan = resolve("eval")
    log(plan.reasons[0])
    loss = evaluate(model, batches, n_batches, plan.autocast_context)
    return (f"{run} ({ckpt.name if ckpt else 'weights'}) on {splits.manifest['source']} val: loss {loss:.4f}, "
            f"perplexity {math.exp(loss):.2f}, unigram baseline "
            f"{data.unigram_loss(splits.train, splits.val, model.config.vocab_size, *masks):.4f}")


class Progress:
    """A tqdm bar on a terminal; plain lines every `log_every` steps otherwise (CI, pipes), and a short
    line for each step before the first of them (the first steps are the slowest: the wait is shown)."""

    def __init__(self, total: int, initial: int, log, bar: bool = True):
        self.bar = None
        self.log = log
        self.start, self.initial = time.perf_counter(), initial
        self.note, self.lines = "", 0  # note: a time budget's re-plan, shown on the next line
        if bar and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def set_total(self, total: int, note: str = "") -> None:  # a time budget's plan or re-plan
        self.note = note
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def step_done(self, step: int, total: int, loss: float, lr: float) -> None:
        """A step without a metrics line: the bar moves; plain lines show each step until the first metrics line."""
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()
        elif self.lines == 0:
            self.log(f"step {step}/{total} | loss {loss:.3f} | lr {lr:.2e} | {time.perf_counter() - self.start:.0f}s")

    def update(self, step: int, total: int, metrics: dict) -> None:
        text = f"loss {metrics['loss']:.3f}"
        if "kd" in metrics:  # distillation: its loss blends CE and KD; CE compares with a `train` run's loss
            text += f" (ce {metrics['ce']:.3f}, kd {metrics['kd']:.3f}, teacher agreement {metrics['agreement']:.0%})"
        text += f" | {metrics['tokens_per_s']:,.0f} tok/s"
        if self.note:
            text, self.note = f"{text} | {self.note}", ""
        self.lines += 1
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(text, refresh=True)
        else:
            elapsed = time.perf_counter() - self.start
            eta = elapsed / max(step - self.initial, 1) * (total - step)
            self.log(f"step {step}/{total} | {text} | lr {metrics['lr']:.2e} | {elapsed:.0f}s, ETA {eta:.0f}s")

    def close(self):
        if self.bar is not None:
            self.bar.close()
