"""Autoregressive generation over the latent KV cache: prefill (naive MLA), then decode (absorbed)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .kv_cache import KVCache
from .sampling import sample


@torch.inference_mode()
def generate_stream(model, input_ids, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                    top_p: float | None = None, seed: int | None = None, stop: int | Sequence[int] | None = None,
                    speculative: bool = False, stats: dict | None = None) -> Iterator[torch.Tensor]:
    """Yields the new tokens of each model step as (B, k) int64 (k >= 1; k > 1 only with speculative)."""
    input_ids = torch.as_tensor(input_ids)
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be > 0")
    B, T = input_ids.shape
    limit = model.config.max_seq_len
    if T + max_new_tokens > limit:
        raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds the context of {limit} tokens")
    stops = torch.tensor([stop] if isinstance(stop, int) else list(stop or []), dtype=torch.long)
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.config, B, T + max_new_tokens, dtype=dtype, device=input_ids.device)
    generator = torch.Generator(device=input_ids.device).manual_seed(seed) if seed is not None else None
    logits = model(input_ids, cache=cache).logits[:, -1]
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for i in range(max_new_tokens):
        token = sample(logits, temperature, top_k, top_p, generator)
        yield token[:, None]
        done |= torch.isin(token, stops)
        if done.all():
            break
        if i + 1 < max_new_tokens:
            logits = model(token[:, None], cache=cache).logits[:, -1]


def generate(model, input_ids, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """input_ids (B, T) -> new token ids (B, T_new), T_new <= max_new_tokens (shorter if every row hit `stop`)."""
    return torch.cat(list(generate_stream(model, input_ids, max_new_tokens, **kwargs)), dim=1)
