"""The GRPO objective as pure functions of per-token log-probs (docs/design/grpo.md).

Shapes: N completions (P prompts x G samples each, grouped consecutively), T = the longest completion;
every (N, T) tensor is right-padded and `mask` (N, T) marks real completion tokens.

    overlong(|o|)    DAPO's soft length penalty, 0 .. -1 over the last `buffer` tokens before max_len
    advantages(r)    A_i = r_i - mean(group), divided by std(group) + 1e-4 unless scale=False (Dr. GRPO)
    ratio            rho_it = exp(logp_it - old_it)                   old: the policy that sampled
    policy term      min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)   (eps_high > eps_low: DAPO's clip-higher)
    KL (k3)          exp(ref - logp) - (ref - logp) - 1 >= 0, unbiased for KL(pi || ref) (Schulman's k3)
    per-token loss   l_it = -(policy term) + beta * k3
    normalisation    "sequence": mean over i of (sum_t l_it / |o_i|)      GRPO (DeepSeekMath eq. 3)
                     "token":    sum_it l_it / sum_i |o_i|                DAPO's token-level loss
                     "constant": sum_it l_it / (N * max_len)              Dr. GRPO (no length normalisation)

A batch split into chunks for memory passes the whole batch's `n_seqs` / `n_tokens`, so the chunks'
losses add up to the batch's loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NORMS = ("sequence", "token", "constant")
STD_EPS = 1e-4  # added to the group's std: a group with equal rewards gets A = 0, never 0 / 0


def advantages(rewards: torch.Tensor, group: int, scale: bool = True) -> torch.Tensor:
    """rewards (N,) in groups of `group` consecutive completions -> A (N,), relative to the group's mean,
    over its std (Bessel-corrected, as torch.std) + STD_EPS when `scale`."""
    if rewards.numel() % group:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group}")
    r = rewards.double().view(-1, group)
    a = r - r.mean(dim=1, keepdim=True)
    if scale:
        a = a / (r.std(dim=1, keepdim=True) + STD_EPS) if group > 1 else a
    return a.view(-1).to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int) -> torch.Tensor:
    """DAPO's soft overlong punishment (eq. 13), added to the rewards: lengths (N,) -> (N,) in [-1, 0],
    0 up to max_len - buffer tokens, then falling linearly to -1 at max_len (a truncated completion):
        R = ((max_len - buffer) - |o|) / buffer   for max_len - buffer < |o| <= max_len
    |o| counts the completion's tokens, its end-of-text token included. buffer 0: no penalty."""
    if buffer <= 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    over = (lengths.float() - (max_len - buffer)).clamp(0, buffer)
    return -over / buffer


def equal_groups(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """(N / group,) bool: groups whose rewards are all equal (zero advantage: no learning signal;
    DAPO's dynamic sampling drops them)."""
    r = rewards.view(-1, group)
    return (r == r[:, :1]).all(dim=1)


@dataclass
class LossStats:
    policy: float  # the policy term's share of the loss (sign as in the loss)
    kl: float  # mean k3 per completion token
    clip_fraction: float  # share of completion tokens whose clipped term is the one taken
    ratio_mean: float


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantage: torch.Tensor, mask: torch.Tensor, *,
              ref_logp: torch.Tensor | None = None, beta: float = 0.0, eps_low: float = 0.2,
              eps_high: float = 0.2, norm: str = "sequence", max_len: int | None = None,
              n_seqs: int | None = None, n_tokens: int | None = None) -> tuple[torch.Tensor, LossStats]:
    """The loss to minimise (a scalar with logp's graph) and its parts, for (N, T) logp / old_logp /
    ref_logp / mask and advantages (N,). max_len: the "constant" normaliser's length (the rollouts'
    max_new_tokens); n_seqs / n_tokens: the whole batch's counts when this is one chunk of it."""
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r}: choose one of {NORMS}")
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs the reference model's log-probs (ref_logp)")
    m = mask.to(logp.dtype)
    n_seqs = logp.shape[0] if n_seqs is None else n_seqs
    n_tokens = int(mask.sum()) if n_tokens is None else n_tokens
    ratio = torch.exp(logp - old_logp)
    A = advantage.to(logp.dtype)[:, None]
    unclipped, clipped = ratio * A, ratio.clamp(1 - eps_low, 1 + eps_high) * A
    policy = -torch.minimum(unclipped, clipped)  # (N, T)
    kl = torch.zeros_like(logp)
    if beta > 0:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
    per_token = (policy + beta * kl) * m
    if norm == "sequence":
        scale = 1.0 / (m.sum(dim=1, keepdim=True).clamp_min(1) * max(n_seqs, 1))
    elif norm == "token":
        scale = torch.full_like(m[:, :1], 1.0 / max(n_tokens, 1))
    else:
        if max_len is None:
            raise ValueError('norm="constant" needs max_len (the rollouts\' max_new_tokens)')
        scale = torch.full_like(m[:, :1], 1.0 / (max(n_seqs, 1) * max_len))
    loss = (per_token * scale).sum()
    with torch.no_grad():
        # the clipped term is the one taken where it is strictly smaller than the unclipped one: rho past
        # 1 + eps_high with A > 0, or below 1 - eps_low with A < 0 (there its gradient is zero)
        taken = (clipped < unclipped) & mask
        count = max(int(mask.sum()), 1)
        stats = LossStats(policy=float((policy * m * scale).sum()), kl=float((kl * m).sum()) / count,
                          clip_fraction=int(taken.sum()) / count, ratio_mean=float((ratio * m).sum()) / count)
    return loss, stats


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """logits (N, T, V), tokens (N, T) -> log pi(token) (N, T) in fp32 of the distribution sampled at
    `temperature` (the rollouts', so that the ratio compares like with like)."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return logits.log_softmax(-1).gather(-1, tokens.clamp_min(0)[..., None]).squeeze(-1)
