"""Autoregressive generation over the latent KV cache: prefill (naive MLA), then decode (absorbed)."""

from __future__ import annotations

import torch

from .kv_cache import KVCache
from .sampling import sample


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             stop: int | None = None) -> torch.Tensor:
    """input_ids (B, T) -> new token ids (B, T_new), T_new <= max_new_tokens (shorter if every row hit `stop`)."""
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be > 0")
    B, T = input_ids.shape
    limit = model.config.max_seq_len
    if T + max_new_tokens > limit:
        raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds the context of {limit} tokens")
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.config, B, T + max_new_tokens, dtype=dtype, device=input_ids.device)
    generator = torch.Generator(device=input_ids.device).manual_seed(seed) if seed is not None else None
    logits = model(input_ids, cache=cache).logits[:, -1]
    out, done = [], torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        token = sample(logits, temperature, top_k, top_p, generator)
        out.append(token)
        if stop is not None:
            done |= token == stop
            if done.all():
                break
        if len(out) < max_new_tokens:
            logits = model(token[:, None], cache=cache).logits[:, -1]
    model.train(was_training)
    return torch.stack(out, dim=1)
