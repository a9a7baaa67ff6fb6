"""The MLA latent cache: per layer only c_kv (B, T_max, kv_lora_rank) and k_pe (B, T_max, d_r).

That is (kv_lora_rank + qk_rope_head_dim) values per token per layer, e.g. 576 for V3, instead
of the H * (192 + 128) a naive K/V cache holds (V2 Table 1; docs/design/kv-cache.md). With DSA
(index_topk > 0, model/indexer.py) each layer also holds the indexer's keys index_k (B, T_max,
index_head_dim) beside its latents: 576 + 128 values per token per layer for V3.2. Buffers are preallocated at a
static shape and reused across requests (`reset`). Each layer has buffers of its own, not a slice
of one stacked tensor: a compiled step (kernels/compiled.py) then writes its new latents in place,
where slices of a shared base made the traced graph copy every layer's buffer each step.

Rows keep their own lengths, so a batch may hold prompts of different lengths: row b's next
tokens go to positions lengths[b], lengths[b] + 1, ... Slots past a row's length may hold stale
latents (right padding of a shorter prompt, rejected speculative drafts); the mask of `window`
hides them, and the next write overwrites them. Rewinding a row is just lowering its length.

A `static` cache (`KVCache.over`, for compiled decode steps, kernels/compiled.py) never reads its
lengths on the host: every step attends over all the buffer's slots under a mask, so the traced
graph has no data-dependent shapes. The caller checks the bounds instead.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig


def token_widths(cfg: ModelConfig) -> dict[str, int]:
    """Values one layer caches per token, by part: the latent c_kv, the rope key k_pe and, with DSA, the
    indexer's key (0 without). V3: 512 + 64 + 0; V3.2: 512 + 64 + 128. What `KVCache` allocates, and what the
    server's budget (infer/memory.py) and `frugallm info` count."""
    return {"latent": cfg.kv_lora_rank, "rope key": cfg.qk_rope_head_dim,
            "indexer key": cfg.index_head_dim if cfg.index_topk > 0 else 0}


def cache_lines(cfg: ModelConfig) -> list[str]:
    """`frugallm info`'s KV-cache lines: values and bytes one token holds per layer and in all n_layers layers of
    the main model, at fp32 (the dtype `info` builds the model at) and bf16 (an inference plan's usual dtype),
    and with DSA the part that is the indexer's keys."""
    w = token_widths(cfg)
    per, index = sum(w.values()), w["indexer key"]
    parts = " + ".join(f"{k} {v}" for k, v in w.items() if v)
    share = f": {index / per:.1%} DSA indexer keys" if index else ""
    lines = [f"  KV cache per token: {per} values a layer ({parts}{share})"]
    for label, n in (("per layer", 1), (f"all {cfg.n_layers} layers", cfg.n_layers)):
        sizes = ", ".join(f"{n * per * b:,} B {name}" + (f" (indexer keys {n * index * b:,} B)" if index else "")
                          for name, b in (("fp32", 4), ("bf16", 2)))
        lines.append(f"    {label:<14} {sizes}")
    return lines


class LatentCache:
    """One layer's slice of the cache; MLA calls `update` with the new latents."""

    def __init__(self, owner: "KVCache", i: int):
        self.owner, self.c_kv, self.k_pe = owner, owner.c_kv[i], owner.k_pe[i]  # (B, T_max, dc), (B, T_max, dr)
        self.index_k = owner.index_k[i] if owner.index_k is not None else None  # (B, T_max, D) or None

    def update(self, positions: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write c_kv (B, S, dc), k_pe (B, S, dr) at positions (B, S); return the first T slots of every row."""
        self._write(self.c_kv, positions, c_kv)
        self._write(self.k_pe, positions, k_pe)
        T = self.owner._T
        return self.c_kv[:, :T], self.k_pe[:, :T]

    def update_index(self, positions: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Write the DSA indexer's keys (B, S, D) at positions (B, S); return the first T slots (B, T, D)."""
        if self.index_k is None:
            raise ValueError("this KVCache holds no indexer keys: build it from the model's config "
                             "(index_topk > 0), or pass index_k to KVCache.over")
        self._write(self.index_k, positions, keys)
        return self.index_k[:, :self.owner._T]

    def _write(self, buffer: torch.Tensor, positions: torch.Tensor, new: torch.Tensor) -> None:
        start = self.owner._start
        if start is not None:  # every row at the same length: a plain slice copy
            buffer[:, start:start + new.shape[1]] = new
        else:
            rows = torch.arange(new.shape[0], device=new.device)[:, None]
            buffer[rows, positions] = new


class KVCache:
    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", n_layers: int | None = None):
        """Room for `max_len` positions (default the context) of `n_layers` layers (default the main stack)."""
        max_len = max_len or cfg.max_seq_len
        n_layers = cfg.n_layers if n_layers is None else n_layers
        buffers = lambda width: [torch.zeros(batch_size, max_len, width, dtype=dtype, device=device)
                                 for _ in range(n_layers)]
        self._adopt(buffers(cfg.kv_lora_rank), buffers(cfg.qk_rope_head_dim),
                    torch.zeros(batch_size, dtype=torch.long, device=device), static=False,
                    index_k=buffers(cfg.index_head_dim) if cfg.index_topk > 0 else None)

    @classmethod
    def over(cls, c_kv: list[torch.Tensor], k_pe: list[torch.Tensor], lengths: torch.Tensor,
             static: bool = True, index_k: list[torch.Tensor] | None = None) -> "KVCache":
        """A cache on existing buffers, per layer (B, T, dc) and (B, T, dr) (and (B, T, D) indexer keys with
        DSA), and lengths (B,), e.g. another cache's or a slice of its rows (the server's batches): writes
        land in them, nothing is copied."""
        cache = cls.__new__(cls)
        cache._adopt(c_kv, k_pe, lengths, static=static, index_k=index_k)
        return cache

    def _adopt(self, c_kv: list[torch.Tensor], k_pe: list[torch.Tensor], lengths: torch.Tensor, static: bool,
               index_k: list[torch.Tensor] | None = None) -> None:
        # lengths: positions written, per row
        self.c_kv, self.k_pe, self.lengths, self.static = list(c_kv), list(k_pe), lengths, static
        self.index_k = None if index_k is None else list(index_k)
        self._layers = [LatentCache(self, i) for i in range(len(c_kv))]
        self._start, self._T = 0, 0

    def buffers(self) -> list[list[torch.Tensor]]:
        """Every per-layer buffer list: c_kv, k_pe and, with DSA, index_k; for code that copies or moves rows."""
        return [self.c_kv, self.k_pe] + ([self.index_k] if self.index_k is not None else [])

    def rows(self, a: int, b: int) -> "KVCache":
        """A dynamic cache on rows [a, b) of this one (views of every buffer, indexer keys included, and of
        lengths): its writes land here."""
        view = lambda buffers: [x[a:b] for x in buffers]
        return KVCache.over(view(self.c_kv), view(self.k_pe), self.lengths[a:b], static=False,
                            index_k=None if self.index_k is None else view(self.index_k))

    @property
    def max_len(self) -> int:
        return self.c_kv[0].shape[1]

    def layer(self, i: int) -> LatentCache:
        return self._layers[i]

    def window(self, S: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Positions (B, S) of S new tokens per row, and the (B, S, T) mask of the slots each may see.

        The mask is None when no slot needs hiding: one new token per row, all rows equally long.
        A static cache always masks, over all its slots, and never syncs with the host.
        """
        if self.static:
            self._start, self._T = None, self.max_len
            positions = self.lengths[:, None] + torch.arange(S, device=self.lengths.device)
            return positions, torch.arange(self.max_len, device=self.lengths.device) <= positions[..., None]
        lo, hi = int(self.lengths.min()), int(self.lengths.max())
        self._start, self._T = (lo if lo == hi else None), hi + S
        if self._T > self.max_len:
            raise ValueError(f"the cache holds {self.max_len} positions; writing {S} more after {hi} needs "
                             f"{self._T}: allocate a larger KVCache")
        positions = self.lengths[:, None] + torch.arange(S, device=self.lengths.device)
        if S == 1 and lo == hi:
            return positions, None
        slots = torch.arange(self._T, device=self.lengths.device)
        return positions, slots <= positions[..., None]

    def advance(self, S: int) -> None:
        self.lengths += S

    def reset(self) -> None:
        self.lengths.zero_()

    def values_per_token(self) -> int:
        """Cached values per token, all layers: n_layers * (kv_lora_rank + qk_rope_head_dim [+ index_head_dim])."""
        index = 0 if self.index_k is None else self.index_k[0].shape[-1]
        return len(self.c_kv) * (self.c_kv[0].shape[-1] + self.k_pe[0].shape[-1] + index)

    def bytes_per_token(self) -> int:
        return self.values_per_token() * self.c_kv[0].element_size()
