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


# --- the OpenAI request options the server applies per request (infer/engine.py)
LOGPROB_FLOOR = -9999.0  # a token the sampler cannot pick (top-k / top-p) reports this, not -inf: JSON has no -inf


def adjust(logits: torch.Tensor, counts: torch.Tensor | None = None, presence: float = 0.0, frequency: float = 0.0,
           bias: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """OpenAI's logit_bias and presence / frequency penalties on one row of logits (V,), as a new fp32 tensor.

    counts (V,): how often each token was generated so far in this completion (the prompt does not count,
    as in OpenAI's and vLLM's definition); a token generated c times loses presence * [c > 0] + frequency * c.
    bias: (ids, values) added to those ids' logits (OpenAI: values in [-100, 100]; -100 bans a token).
    """
    x = logits.float().clone()
    if bias is not None:
        x.index_add_(0, bias[0], bias[1])
    if counts is not None:
        x -= presence * (counts > 0) + frequency * counts
    return x


def choose(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
           generator: torch.Generator | None, logprobs: int | None) -> tuple[int, tuple | None]:
    """One row (V,) of adjusted logits -> (token, logprob entry or None).

    The entry is (token, its log-prob, [(id, log-prob)] * logprobs alternatives, best first), the log-probs of
    the distribution the token was drawn from: after temperature, top-k and top-p (vLLM's "processed
    logprobs"); greedy (temperature 0) reports the softmax of the adjusted logits at temperature 1.
    """
    if temperature <= 0:
        token, logp = int(greedy(logits)), (logits.float().log_softmax(-1) if logprobs is not None else None)
    else:
        p = probs(logits, temperature, top_k, top_p)
        token = int(torch.multinomial(p, 1, generator=generator))
        logp = p.log() if logprobs is not None else None
    if logp is None:
        return token, None
    return token, entry(logp, token, logprobs)


def entry(logp: torch.Tensor, token: int, k: int) -> tuple:
    """(token, logp[token], top-k [(id, logp)]) from log-probs (V,), with -inf raised to LOGPROB_FLOOR."""
    logp = logp.clamp_min(LOGPROB_FLOOR)
    top = logp.topk(k) if k else None
    alternatives = list(zip(top.indices.tolist(), top.values.tolist())) if k else []
    return token, float(logp[token]), alternatives


def prompt_entries(prompt: list[int], logits: torch.Tensor, start: int, k: int) -> list[tuple]:
    """`entry` records for prompt tokens start+1 .. start+len(logits) from their logits (S, V), the model's own
    distribution (echo), with k alternatives; the prompt's first token, at start 0, gets log-prob None."""
    records = [(prompt[0], None, [])] if start == 0 else []
    logp = logits.log_softmax(-1)
    return records + [entry(logp[i], prompt[start + i + 1], k) for i in range(len(logits))
                      if start + i + 1 < len(prompt)]
