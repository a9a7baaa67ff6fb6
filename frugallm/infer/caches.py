"""The decode cache of each attention kind, for generate (generate.py), drafting (speculative.py) and the
engine (engine.py): MLA's latent KVCache (model/kv_cache.py) or V4's HybridCache (model/hybrid_cache.py).

They differ in one way that shapes every caller: a KVCache row keeps its own length (ragged prompts batch
together, a row rewinds by lowering its length), while a HybridCache holds ONE length for all its rows
(its window and compressors pool whole windows at one position) and rewinds only within its last forward
(`truncate`). So with hybrid attention
  - generate runs the prompts of each length as a batch of its own and interleaves their steps
    (`by_length`): the same tokens as running each alone;
  - speculative decoding rewinds the verify forward's rejected drafts with `truncate` (rewindable caches);
  - the engine keeps one HybridCache per request (`HybridRows`) and runs the requests that sit at the same
    length, and read the same number of tokens, in one forward;
  - a compiled decoder (kernels/compiled.py, a static KVCache traced as one graph) is refused.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..model.hybrid_cache import HybridCache
from ..model.kv_cache import KVCache


def is_hybrid(model) -> bool:
    return model.config.attention == "hybrid"


def hybrid_decode(model, decoder) -> bool:
    """Whether the model decodes over HybridCache; a compiled decoder is refused for it."""
    if decoder is not None and is_hybrid(model):
        raise ValueError("a compiled decode step (--compile) traces MLA's static latent cache, and this model has "
                         "V4 hybrid attention (attention='hybrid'): run it without --compile")
    return is_hybrid(model)


def new_cache(model, batch_size: int, max_len: int, n_layers: int | None = None, first: int = 0,
              rewindable: bool = False):
    """A cache for `batch_size` rows of `max_len` positions of the blocks [first, first + n_layers)."""
    cfg, weight = model.config, model.embed.weight
    if cfg.attention == "hybrid":
        return HybridCache(cfg, batch_size, n_layers, first, device=weight.device, rewindable=rewindable)
    return KVCache(cfg, batch_size, max_len, dtype=weight.dtype, device=weight.device, n_layers=n_layers)


def set_lengths(cache, lengths: torch.Tensor) -> None:
    """Every row's length (B,): a KVCache takes them as they are (stale slots are masked), a HybridCache needs
    them equal and within its last forward (it rewinds by replaying)."""
    if isinstance(cache, HybridCache):
        n = int(lengths.max())
        if int(lengths.min()) != n:
            raise ValueError(f"a HybridCache holds one length for all its rows, not {lengths.tolist()}")
        cache.truncate(n)
    else:
        cache.lengths.copy_(lengths)


def by_length(prompts: list[list[int]], stream, stats: dict | None, pad) -> Iterator[torch.Tensor]:
    """generate_stream's steps for prompts of different lengths, each length a batch of its own run by
    `stream(prompts, stats)`: every step yields as many tokens (B, k) as all groups have ready; a group
    whose rows all stopped pads with `pad` (its stop id)."""
    groups: dict[int, list[int]] = {}
    for b, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(b)
    rows = list(groups.values())
    parts = [{} for _ in rows]
    streams = [stream([prompts[b] for b in r], s) for r, s in zip(rows, parts)]
    ready = [torch.zeros(len(r), 0, dtype=torch.long) for r in rows]
    live = [True] * len(rows)
    try:
        while True:
            for g, it in enumerate(streams):
                while live[g] and ready[g].shape[1] == 0:
                    try:
                        ready[g] = torch.cat([ready[g], next(it).cpu()], dim=1)
                    except StopIteration:
                        live[g] = False
            if not any(r.shape[1] for r in ready):
                return
            k = min(r.shape[1] for g, r in enumerate(ready) if r.shape[1] or live[g])
            out = torch.full((len(prompts), k), int(pad) if pad is not None else 0, dtype=torch.long)
            for g, r in enumerate(rows):
                if ready[g].shape[1]:
                    out[r] = ready[g][:, :k]
                    ready[g] = ready[g][:, k:]
            yield out
    finally:
        for it in streams:
            it.close()
        if stats is not None:
            _merge_stats(stats, parts, len(prompts))


def _merge_stats(stats: dict, parts: list[dict], B: int) -> None:
    for key in ("prompt_tokens", "new_tokens", "forwards", "drafted", "accepted", "prefill_s", "decode_s"):
        stats[key] = sum(p.get(key, 0) for p in parts)
    spec = any(p.get("acceptance") is not None for p in parts)
    stats["acceptance"] = stats["accepted"] / max(stats["drafted"], 1) if spec else None
    stats["tokens_per_forward"] = (stats["new_tokens"] / B - 1) / max(stats["forwards"] / len(parts), 1)


class HybridRows:
    """The engine's cache for hybrid models: one HybridCache per row (request), and their lengths (rows,).
    `rows(a, b)` is a view sharing the same caches; `forward` runs the rows of one length together."""

    def __init__(self, model, rows: int, max_len: int, old: "HybridRows | None" = None, used: int = 0):
        """rows requests (max_len: the engine's reservation, which only the budget checks); with `old`, its first
        `used` rows carry over (a bigger block)."""
        self.model, self.max_len = model, max_len
        self.caches: list[HybridCache | None] = [None] * rows
        self.lengths = torch.zeros(rows, dtype=torch.long)
        if old is not None:
            self.caches[:used] = old.caches[:used]
            self.lengths[:used] = old.lengths[:used]

    @classmethod
    def _over(cls, model, caches: list, lengths: torch.Tensor, max_len: int) -> "HybridRows":
        view = cls.__new__(cls)
        view.model, view.caches, view.lengths, view.max_len = model, caches, lengths, max_len
        return view

    def buffers(self) -> list:
        """No shared buffers to copy or swap by row (the engine's KVCache protocol): see `swap`, `__init__`."""
        return []

    def reset(self, r: int) -> None:
        self.caches[r] = HybridCache(self.model.config, 1, device=self.model.embed.weight.device)
        self.lengths[r] = 0

    def swap(self, i: int, j: int) -> None:
        self.caches[i], self.caches[j] = self.caches[j], self.caches[i]

    def rows(self, a: int, b: int) -> "HybridRows":
        return HybridRows._over(self.model, _Slice(self.caches, a, b), self.lengths[a:b], self.max_len)

    def forward(self, ids: torch.Tensor, take: list[int], logits_at: torch.Tensor | None) -> torch.Tensor:
        """Logits of rows' next `take[r]` tokens ids[r, :take[r]] (B, S): at `logits_at` (B, 1) -> (B, 1, V),
        or every position (None) -> (B, S, V). Rows at the same length reading as many tokens share one
        forward (their caches stacked along the batch, then split back)."""
        groups: dict[tuple[int, int], list[int]] = {}
        for r, t in enumerate(take):
            groups.setdefault((int(self.lengths[r]), t), []).append(r)
        out = None
        for (_, t), rows in groups.items():
            cache = HybridCache.stack([self.caches[r] for r in rows])
            at = None if logits_at is None else logits_at[rows]
            logits = self.model(ids[rows, :t], cache=cache, logits_at=at).logits
            if len(rows) > 1:
                for r, c in zip(rows, cache.split([1] * len(rows))):
                    self.caches[r] = c
            if out is None:
                out = logits.new_zeros(len(take), ids.shape[1] if logits_at is None else 1, logits.shape[-1])
            out[rows, :logits.shape[1]] = logits
        return out


class _Slice:
    """caches[a:b] that writes through to the parent list."""

    def __init__(self, items: list, a: int, b: int):
        self.items, self.a, self.n = items, a, b - a

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.items[self.a + i]

    def __setitem__(self, i: int, value) -> None:
        self.items[self.a + i] = value

