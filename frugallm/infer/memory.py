"""Sizing the server's memory: the KV-cache budget in tokens, and the bytes the process should stay under.

The cache budget (`max_cache_tokens`) is what the engine (engine.py) admits requests against; the memory budget
is what `serve` prints and /health reports beside the resident size, so an operator can see the process keep
to it (tests/test_server_load.py checks it under load).
"""

from __future__ import annotations

import os

import torch

from ..model.hybrid_cache import hybrid_values
from ..model.kv_cache import token_widths

SLACK = 512 << 20  # memory budget headroom: requests in flight, event queues, allocator slack


def bytes_per_token(cfg, dtype: torch.dtype) -> int:
    """Generation state per reserved token: the cache of every layer, latents, rope key and, with DSA, the
    indexer's key (model/kv_cache.py token_widths), + the int64 token id. A hybrid (V4) cache holds less per
    token the longer the context (a fixed window, 1/m compressed rows): its bound is a 1-token sequence's, a
    window row and the open windows' C, Z rows in every block (model/hybrid_cache.py hybrid_values)."""
    if cfg.attention == "hybrid":
        return sum(hybrid_values(cfg, 1).values()) * dtype.itemsize + 8
    return cfg.n_layers * sum(token_widths(cfg).values()) * dtype.itemsize + 8


def rss(field: str = "VmRSS") -> int | None:
    """This process's resident memory (VmRSS) or its peak (VmHWM), in bytes; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) << 10 for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) << 10 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def default_cache_tokens(model, slots: int) -> int:
    """Half the memory available now (the model loaded), in tokens of generation state, at most `slots` contexts."""
    per = bytes_per_token(model.config, model.embed.weight.dtype)
    return max(1, min(slots * model.config.max_seq_len, _available_memory() // 2 // per))


def memory_budget(model, max_cache_tokens: int, prefill_chunk: int = 256, base: int | None = None) -> int:
    """Bytes the serving process should stay under: `base` (default: its RSS now, the model loaded, else the
    weights + 1 GiB), the cache budget, the largest prefill chunk's transients, and SLACK."""
    cfg, dtype = model.config, model.embed.weight.dtype
    if base is None:
        base = rss() or sum(p.numel() * p.element_size() for p in model.parameters()) + (1 << 30)
    T, S, H = min(cfg.max_seq_len, max_cache_tokens), min(prefill_chunk, max_cache_tokens), cfg.n_heads
    elem = dtype.itemsize
    scores = 3 * H * S * T * 4  # fp32 scores, their masked copy, the softmax (model/attention.py, naive path)
    expanded = 2 * T * H * (2 * cfg.qk_nope_head_dim + cfg.v_head_dim + cfg.qk_rope_head_dim) * elem  # K, V
    logits = 2 * S * cfg.vocab_size * 4  # every position's logits in fp32 and their log-softmax (echo)
    return base + max_cache_tokens * bytes_per_token(cfg, dtype) + scores + expanded + logits + SLACK
