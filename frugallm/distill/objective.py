"""The distillation objective of a training run: what the trainer calls instead of the plain LM loss
when `TrainConfig.teacher` is set (`frugallm distill`).

Per optimizer step the trainer (train/trainer.py) first prepares its micro-batches, then counts the
unmasked targets of all of them (the global denominator), then runs forward + backward on each:

    prepare(model, x, y, windows, step, k) -> (x, y, windows | None)
        an on-policy micro-batch (a fraction `on_policy` of them, chosen by a hash of (seed, step, k),
        so a resumed run picks the same ones) keeps the first half of its window as the prompt and
        lets the student sample the rest at temperature 1 (GKD, Agarwal et al. 2023; TRL's `lmbda`);
        targets on the prompt are masked, windows becomes None (the offline cache does not cover it)
    loss(out, x, y, windows, denominator) -> (loss to backward, parts for the metrics)
        (1 - w) CE + w tau^2 D(p_teacher || q_student) summed over unmasked tokens / denominator
        (distill/losses.py), plus the model's MTP and balance terms weighted by this micro-batch's
        share of the targets. On-policy micro-batches take D alone (w = 1): a CE toward the
        student's own samples would only reinforce them (TRL's GKD loss is the divergence alone).

The teacher is online (a no-grad forward per micro-batch) unless kd_topk > 0: then its top-k
log-probs over the whole training split are computed once (distill/offline.py, beside the data
cache) and looked up by window index.
"""

from __future__ import annotations

import hashlib
import time
from typing import Callable

import torch

from ..formats import topk_cache
from .config import DistillConfig
from .losses import distill_loss
from .offline import build_topk_cache
from .teacher import Teacher


class Distillation:
    def __init__(self, cfg: DistillConfig, tokenizer, student_vocab_size: int, splits, log: Callable[[str], None]):
        # cfg: the run's TrainConfig (train/config.py), read for its DistillConfig fields and its seed and seq_len
        self.cfg = cfg
        self.teacher = Teacher.load(cfg.teacher, tokenizer, student_vocab_size)
        log(f"teacher {cfg.teacher}: {self.teacher!r}; {self.teacher.dtype_reason}")
        self.cache = None
        if cfg.kd_topk:
            t0 = time.perf_counter()
            self.cache = build_topk_cache(self.teacher, splits.train, root=splits.directory.parent / topk_cache.ROOT,
                                          data_fingerprint=splits.directory.name, seq_len=cfg.seq_len,
                                          k=cfg.kd_topk, temperature=cfg.kd_temperature)
            log(f"offline teacher: top-{cfg.kd_topk} log-probs of {self.cache.tokens:,} tokens, "
                f"{self.cache.bytes_per_token:.0f} bytes/token ({self.cache.bytes / 2**20:.1f} MiB), "
                f"built in {self.cache.build_seconds:.1f}s (ready after {time.perf_counter() - t0:.1f}s)")

    def on_policy_due(self, step: int, k: int) -> bool:
        if self.cfg.on_policy <= 0:
            return False
        h = int.from_bytes(hashlib.sha256(f"{self.cfg.seed}|{step}|{k}".encode()).digest()[:8], "little")
        return h / 2**64 < self.cfg.on_policy

    def prepare(self, model, x: torch.Tensor, y: torch.Tensor, windows: list[int], step: int, k: int):
        if not self.on_policy_due(step, k):
            return x, y, windows
        from ..infer.generate import generate

        B, S = x.shape
        P = S // 2  # the prompt: the window's first half, as the data has it
        was_training = model.training
        model.eval()
        seed = int.from_bytes(hashlib.sha256(f"on-policy|{self.cfg.seed}|{step}|{k}".encode()).digest()[:4], "little")
        new = generate(model, x[:, :P], S + 1 - P, temperature=1.0, seed=seed)  # (B, S + 1 - P), no stop
        model.train(was_training)
        window = torch.cat([x[:, :P], new], dim=1)  # (B, S + 1)
        x, y = window[:, :-1], window[:, 1:].clone()
        y[:, :P - 1] = -100  # targets inside the prompt: not the student's own
        return x, y, None

    def loss(self, out, x: torch.Tensor, y: torch.Tensor, windows: list[int] | None, denominator: int):
        """out: the student's ModelOutput of forward(x, targets=y) -> (loss, its parts as floats: "loss",
        "ce", "kd" (each already divided by the step's denominator, so micro-batches add up) and
        "agreement" (top-1 teacher-student match, weighted by this micro-batch's share of targets))."""
        cfg = self.cfg
        if windows is not None and self.cache is not None:
            teacher = self.cache.get(windows)  # TopK (B, S, k)
        else:
            teacher = self.teacher.logits(x)  # (B, S, V) fp32
        weight = cfg.kd_weight if windows is not None else 1.0  # on-policy: the divergence alone
        targets = int((y != -100).sum())
        parts = distill_loss(out.logits, y, teacher, kind=cfg.kd_loss, beta=cfg.kd_beta,
                             temperature=cfg.kd_temperature, kd_weight=weight, tau_squared=cfg.kd_tau_squared,
                             denominator=denominator, ce_sum=out.lm_loss * targets)  # the forward's own CE
        share = int(parts["tokens"]) / max(denominator, 1)
        extra = sum(t for t in (out.mtp_loss, out.balance_loss, out.indexer_loss) if t is not None)
        loss = parts["loss"] + extra * share
        return loss, {"loss": loss.item(), "ce": parts["ce"].item(), "kd": parts["kd"].item(),
                      "agreement": parts["agreement"].item() * share}
