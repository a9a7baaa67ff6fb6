"""Turning logits into a next token: greedy, temperature, top-k, top-p."""

from __future__ import annotations

import torch


def probs(logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """logits (..., V) -> the sampling distribution (..., V) in float32 after temperature, top-k and top-p.

    temperature must be > 0 (greedy decoding has no distribution; `sample` handles it apart).
    """
    logits = logits.float()
    # shifted so the max is 0 before dividing: a tiny temperature sends the rest to -inf, never inf - inf = NaN
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        p = sorted_logits.softmax(dim=-1)
        drop = p.cumsum(dim=-1) - p > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits.softmax(dim=-1)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the last dim. Widened to fp32 first: exact (every bf16 value is an fp32 value,
    and ties still go to the first index), and torch's bf16 argmax is ~5x slower on a CPU (50 vs
    11 us over a 16k vocabulary, a percent of a 100M model's decode step)."""
    return logits.float().argmax(dim=-1)


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). temperature 0 = greedy (argmax)."""
    if temperature <= 0:
        return greedy(logits)
    return torch.multinomial(probs(logits, temperature, top_k, top_p), 1, generator=generator).squeeze(-1)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Clear errors for sampling settings that have no meaning."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1 (or None for no top-k)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (or None for no top-p)")
