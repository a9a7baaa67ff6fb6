"""Token-level knowledge distillation losses: a student matches the teacher's next-token distribution.

Per token, with teacher p = softmax(z_t / τ) and student q = softmax(z_s / τ) over the vocabulary:

    fkl   forward KL    KL(p ‖ q) = Σ p (log p − log q)          mode-covering (soft-target CE − H(p))
    rkl   reverse KL    KL(q ‖ p) = Σ q (log q − log p)          mode-seeking
    jsd   generalised JSD(β), exactly as TRL's GKDTrainer.generalized_jsd_loss (GKD, arXiv 2306.13649 eq. 1):
              M = β p + (1 − β) q
              JSD(β) = β KL(p ‖ M) + (1 − β) KL(q ‖ M)
          with the endpoints special-cased as TRL does: β = 0 IS forward KL(p ‖ q), β = 1 IS reverse
          KL(q ‖ p). (The interior formula itself tends to 0 at both ends: JSD(β)/β → KL(p ‖ q) as
          β → 0 and JSD(β)/(1 − β) → KL(q ‖ p) as β → 1.)
    tvd   total variation  ½ Σ |p − q|

The training loss (Hinton) mixes the hard-label cross-entropy (at τ = 1) with the divergence:

    loss = (1 − w) · CE + w · τ² · D          (τ² optional: it keeps D's gradient scale comparable across τ;
                                             TRL does not scale, DistillKit does)

reduced as a SUM over unmasked tokens divided by `denominator`. The trainer passes the number of
unmasked tokens in the whole optimizer step (all micro-batches), so accumulating micro-batch gradients
gives exactly the gradient of one big batch (TRL #4719); without it, the batch's own count is used.

Offline (top-k) teachers. A `TopK` record holds, per token, the teacher's k most likely ids and their
log-probs at temperature τ (log-softmax over the FULL vocabulary, then top-k), plus optionally the
log of the mass outside them. The student side always uses its full-vocabulary logsumexp:
log q_i = z_i/τ − logsumexp(z/τ) over all V, gathered at the k ids.

Missing-mass rule: the "rest bucket". Both distributions are coarsened to k + 1 outcomes, the k ids
and one bucket for everything else: p_rest = 1 − Σ_k p_i (stored exactly by offline.py, else derived
and clipped at 0), q_rest = the student's mass outside the k ids (a logsumexp over the complement, not
1 − Σ q, so it is exact when tiny). The divergence is computed exactly on the coarsened pair. That
pair is a function of (p, q), so by the data-processing inequality each divergence here is a lower
bound of the dense one, never a made-up value; the teacher's k+1 log-probs are renormalised to sum
to 1 (16-bit storage rounds them). When the k ids cover the vocabulary (k = V) the bucket is empty on
both sides and dropped, so top-k with k = V equals the dense loss exactly.

Shapes: N tokens (B·S flattened), V vocabulary, k top-k width. Everything is computed in at least fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .fused import dense_divergence

KINDS = ("fkl", "rkl", "jsd", "tvd")


@dataclass
class TopK:
    """A sparse teacher: its top-k next-token ids and log-probs at `temperature`, per token.

    ids (..., k) int, logprobs (..., k) float: log-softmax(z_t / τ) over the full vocabulary at those ids;
    rest (...) float or None: log of the teacher's mass outside the k ids (None: derived, 1 − Σ p);
    temperature: the τ the log-probs were taken at (None: not recorded, not checked)."""
    ids: torch.Tensor
    logprobs: torch.Tensor
    rest: torch.Tensor | None = None
    temperature: float | None = None

    def __post_init__(self):
        if self.ids.shape != self.logprobs.shape:
            raise ValueError(f"TopK ids {tuple(self.ids.shape)} and logprobs {tuple(self.logprobs.shape)} differ")
        if self.rest is not None and self.rest.shape != self.ids.shape[:-1]:
            raise ValueError(f"TopK rest {tuple(self.rest.shape)} must be ids' shape without k, "
                             f"{tuple(self.ids.shape[:-1])}")

    @property
    def k(self) -> int:
        return self.ids.shape[-1]

    def map(self, fn) -> "TopK":
        """The same record with `fn` applied to each per-token tensor, e.g. `rec.map(lambda x: x[:2])`
        for a micro-batch's rows, or `rec.map(lambda x: x.to(device))`."""
        return TopK(fn(self.ids), fn(self.logprobs), None if self.rest is None else fn(self.rest),
                    self.temperature)

    def flatten(self) -> "TopK":
        """(..., k) -> (N, k)."""
        k = self.k
        return TopK(self.ids.reshape(-1, k), self.logprobs.reshape(-1, k),
                    None if self.rest is None else self.rest.reshape(-1), self.temperature)


# --- numerics that stay finite (and keep finite gradients) around zero probabilities --------------

def _at_least_fp32(x: torch.Tensor) -> torch.dtype:
    """The dtype the divergences and losses compute in: fp32, or x's own if wider."""
    return torch.promote_types(x.dtype, torch.float32)  # bf16 -> fp32; fp64 (tests) stays fp64


def _safe_log(x: torch.Tensor) -> torch.Tensor:
    """log x, -inf at x == 0, with a zero (not NaN) gradient there: the 'double where' trick."""
    pos = x > 0
    return torch.where(pos, torch.where(pos, x, 1.0).log(), float("-inf"))


def safe_logsumexp(x: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim, -inf for an all -inf row without NaN gradients (torch's gives NaN)."""
    hi = x.amax(-1, keepdim=True)
    hi = torch.where(torch.isfinite(hi), hi, 0.0).detach()  # any finite shift is exact; detached: no grad
    return _safe_log((x - hi).exp().sum(-1)) + hi.squeeze(-1)


def _log_mix(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    """log(β p + (1 − β) q), elementwise, shifted by the larger of the two so nothing under/overflows."""
    hi = torch.maximum(log_p, log_q)
    hi = torch.where(torch.isfinite(hi), hi, 0.0).detach()
    return _safe_log(beta * (log_p - hi).exp() + (1 - beta) * (log_q - hi).exp()) + hi


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a ‖ b) = Σ a (log a − log b) over the last dim, with 0 · log(0 / b) = 0 (xlogy-style):
    where a == 0 the difference is replaced by 0 BEFORE it is formed, so -inf − -inf never reaches a
    product. a > 0 where b == 0 gives +inf, the true value."""
    a = log_a.exp()
    diff = torch.where(a > 0, log_a - log_b, 0.0)
    return (a * diff).sum(-1)


def divergence(log_p: torch.Tensor, log_q: torch.Tensor, kind: str, beta: float = 0.5) -> torch.Tensor:
    """D(p, q) over the last dim from log-probabilities (-inf allowed): (N, M), (N, M) -> (N,)."""
    if kind == "fkl":
        return _kl(log_p, log_q)
    if kind == "rkl":
        return _kl(log_q, log_p)
    if kind == "jsd":
        if beta == 0:  # TRL's endpoints: forward KL at β = 0, reverse KL at β = 1
            return _kl(log_p, log_q)
        if beta == 1:
            return _kl(log_q, log_p)
        log_m = _log_mix(log_p, log_q, beta)  # (N, M) mixture: β of the teacher, 1 − β of the student
        return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
    if kind == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    raise ValueError(f"kind={kind!r} must be one of {', '.join(KINDS)}")


# --- the per-token divergence ---------------------------------------------------------------------

def _check(kind: str, beta: float, temperature: float) -> None:
    if kind not in KINDS:
        raise ValueError(f"kd kind={kind!r} must be one of {', '.join(KINDS)}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta={beta} must be in [0, 1] (0: forward KL, 1: reverse KL)")
    if not temperature > 0:
        raise ValueError(f"kd temperature={temperature} must be > 0")


def _topk_pair(student_logits: torch.Tensor, teacher: TopK, temperature: float):
    """(log p, log q) over the k ids + the rest bucket (see the module header), each (N, k + 1), or
    (N, k) when k = V (no bucket)."""
    dtype = _at_least_fp32(student_logits)
    ids = teacher.ids.long()  # (N, k)
    z = student_logits.to(dtype) / temperature  # (N, V)
    lse = safe_logsumexp(z)  # (N,) over the FULL vocabulary
    log_q = z.gather(-1, ids) - lse[:, None]  # (N, k)
    log_p = teacher.logprobs.to(dtype)  # (N, k) at τ already
    if teacher.k == z.shape[-1]:  # the k ids are the whole vocabulary: nothing is missing
        return log_p - safe_logsumexp(log_p)[:, None], log_q
    log_q_rest = safe_logsumexp(z.scatter(-1, ids, float("-inf"))) - lse  # (N,) the student's mass elsewhere
    if teacher.rest is not None:
        log_p_rest = teacher.rest.to(dtype)
    else:
        log_p_rest = _safe_log((1 - log_p.exp().sum(-1)).clamp_min(0))
    log_p = torch.cat([log_p, log_p_rest[:, None]], -1)  # (N, k + 1)
    log_p = log_p - safe_logsumexp(log_p)[:, None]  # sums to 1 (16-bit storage rounds the stored values)
    return log_p, torch.cat([log_q, log_q_rest[:, None]], -1)


def kd_divergence(student_logits: torch.Tensor, teacher: torch.Tensor | TopK, kind: str = "fkl",
                  beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """Per-token divergence D(p_teacher^τ, q_student^τ): student_logits (N, V), teacher dense logits
    (N, V) or a TopK record (N, k) taken at the same τ -> (N,) in fp32 (fp64 for fp64 inputs).
    Not scaled by τ²; distill_loss does that."""
    _check(kind, beta, temperature)
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be (N, V), got {tuple(student_logits.shape)}")
    if isinstance(teacher, TopK):
        if teacher.ids.shape[0] != student_logits.shape[0] or teacher.ids.dim() != 2:
            raise ValueError(f"TopK ids {tuple(teacher.ids.shape)} must be (N, k) with N = "
                             f"{student_logits.shape[0]}, the student's tokens")
        if teacher.temperature is not None and abs(teacher.temperature - temperature) > 1e-9:
            raise ValueError(f"the top-k record was taken at temperature {teacher.temperature}, the loss asks for "
                             f"{temperature}; rebuild the offline cache at this temperature")
        log_p, log_q = _topk_pair(student_logits, teacher, temperature)
    else:
        if teacher.shape != student_logits.shape:
            raise ValueError(f"teacher logits {tuple(teacher.shape)} must match the student's "
                             f"{tuple(student_logits.shape)}; slice a padded teacher vocabulary to the student's "
                             f"(distill.teacher.match_vocab)")
        # closed-form gradients in cache-sized blocks (fused.py): ~5x faster than autograd through `divergence`
        return dense_divergence(student_logits, teacher, kind, beta, temperature, _at_least_fp32(student_logits))
    return divergence(log_p, log_q, kind, beta)


# --- the training loss ----------------------------------------------------------------------------

def distill_loss(student_logits: torch.Tensor, targets: torch.Tensor, teacher: torch.Tensor | TopK, *,
                 kind: str = "fkl", beta: float = 0.5, temperature: float = 1.0, kd_weight: float = 0.5,
                 tau_squared: bool = True, ignore_index: int = -100,
                 denominator: int | torch.Tensor | None = None,
                 ce_sum: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """(1 − w)·CE + w·τ²·D summed over the unmasked tokens, divided by `denominator`.

    student_logits (..., V) (e.g. (B, S, V)); targets (...) next-token ids, `ignore_index` where masked;
    teacher: dense logits (..., V) or TopK (..., k). denominator: the number of unmasked tokens in the
    whole optimizer step (sum over micro-batches) under gradient accumulation; None: this batch's count.
    ce_sum: the summed hard-label CE of these unmasked tokens when the caller has it already (the student's
    forward with targets computes it: objective.py passes lm_loss x count), saving a (N, V) log-softmax
    forward and backward; None: computed here. With kd_weight = 1 it is reported only, never differentiated.

    Returns {"loss": with grad, to backward; "ce", "kd": the summed CE and (unscaled) D / denominator,
    detached, so micro-batch values add up to the step's means; "agreement": the fraction of this
    batch's unmasked tokens where the student's argmax is the teacher's; "tokens": that count}."""
    _check(kind, beta, temperature)
    if not 0.0 <= kd_weight <= 1.0:
        raise ValueError(f"kd_weight={kd_weight} must be in [0, 1] (0: plain CE, 1: distillation only)")
    V = student_logits.shape[-1]
    if targets.shape != student_logits.shape[:-1]:
        raise ValueError(f"targets {tuple(targets.shape)} must be student_logits' shape without the vocabulary, "
                         f"{tuple(student_logits.shape[:-1])}")
    lead = student_logits.shape[:-1]
    if isinstance(teacher, TopK):
        if teacher.ids.shape[:-1] != lead:
            raise ValueError(f"TopK ids {tuple(teacher.ids.shape)} must be (*{tuple(lead)}, k)")
        teacher_flat: torch.Tensor | TopK = teacher.flatten()  # (N, k)
    else:
        teacher_flat = teacher.reshape(-1, teacher.shape[-1])  # (N, V); kd_divergence checks V

    keep = targets.reshape(-1) != ignore_index  # (N,) the unmasked tokens
    logits = student_logits.reshape(-1, V)[keep]  # (n, V): masked rows never enter either term
    tgt = targets.reshape(-1)[keep]  # (n,)
    t = teacher_flat.map(lambda x: x[keep]) if isinstance(teacher_flat, TopK) else teacher_flat[keep]
    n = int(keep.sum())
    denom = n if denominator is None else denominator
    if isinstance(denom, torch.Tensor):
        denom = denom.to(torch.float64).item()
    denom = max(float(denom), 1.0)  # an all-masked batch contributes 0, not NaN

    dtype = _at_least_fp32(logits)
    if ce_sum is None:
        with torch.set_grad_enabled(torch.is_grad_enabled() and kd_weight < 1):  # w = 1: a metric only
            ce = F.cross_entropy(logits.to(dtype), tgt, reduction="sum")  # hard labels at τ = 1
    else:
        ce = ce_sum
    kd = kd_divergence(logits, t, kind, beta, temperature).sum()  # (n,) -> ()
    scale = temperature ** 2 if tau_squared else 1.0
    loss = kd_weight * scale * kd / denom
    if kd_weight < 1:
        loss = loss + (1 - kd_weight) * ce / denom

    with torch.no_grad():
        if n == 0:
            agreement = torch.zeros((), dtype=dtype)
        else:
            student_top = logits.argmax(-1)  # (n,)
            if isinstance(t, TopK):
                teacher_top = t.ids.long().gather(-1, t.logprobs.argmax(-1, keepdim=True)).squeeze(-1)
            else:
                teacher_top = t.argmax(-1)
            agreement = (student_top == teacher_top).to(dtype).mean()
    return {"loss": loss, "ce": ce.detach() / denom, "kd": kd.detach() / denom, "agreement": agreement,
            "tokens": torch.tensor(n)}
