"""The decode cache of DeepSeek-V4's hybrid attention (hybrid_attention.py); docs/design/v4-attention.md.

Per block it holds what the release holds, nothing per token beyond the window and the entries:

  every block   the last n_win - 1 rows of the shared K = V head (B, n_win - 1, D): with the new token
                they are the n_win the query sees
  hca           the compressed entries so far (B, T // m', D); the C, Z rows of the tokens past the last
                closed window (B, < m', D) each, pooled into an entry once the window closes
  csa           the same at m = csa_rate, with C, Z of width 2D, and the Ca half (C and Z + B) of the last
                closed window (B, m, D) each, which the next entry's overlapping window pools; the lightning
                indexer's compressed keys (B, T // m, d^I) and its own buffer and Ca half

Every row of a batch sits at the same position (one length), as in a prefill followed by decode steps;
chunks of any length (a prompt, one token, a few) may follow each other, and each equals the full forward
over the whole sequence (tests/test_v4_attention.py). The protocol is Transformer.forward's: `layer(i)`,
`window(S)`, `advance(S)`.

Rewinding (speculative decoding drops rejected drafts): the state cannot simply be cut, since entries pool
whole windows, so a `rewindable` cache keeps, per block, its state from before the last forward (tensor
references: updates build new tensors, never write in place) and that forward's new rows and C, Z
projections; `truncate(length)` restores the state and replays the first length - mark of those rows,
for any length between the last forward's start (mark) and the current length. Replaying pools the same
windows from the same projections, so it equals a cache that never saw the dropped tokens.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from .compressor import Compressor


class CompressorState:
    """One compressor's running state: its entries, its unpooled C / Z rows and (overlapping) the Ca half."""

    def __init__(self, rewindable: bool = False):
        self.entries: torch.Tensor | None = None  # (B, n, D), roped
        self.kv: torch.Tensor | None = None  # (B, r, c D), r < m: tokens of the open window
        self.gate: torch.Tensor | None = None
        self.prior: tuple[torch.Tensor, torch.Tensor] | None = None  # (C, Z + B) (B, m, D) of the last window's Ca
        self.count = 0  # entries so far: the open window starts at position count * m
        self.rewindable, self._undo = rewindable, None

    def update(self, compressor: Compressor, x: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
        """Add the S new tokens x (B, S, d); return every entry so far (B, n, D), the new closed windows' included."""
        kv, gate = compressor.project(x)
        if self.rewindable:  # the state before, and what this forward adds (hybrid_cache.py header)
            self._undo = (self._state(), kv, gate, compressor, inv_freq)
        return self._add(compressor, kv, gate, inv_freq)

    def _add(self, compressor: Compressor, kv: torch.Tensor, gate: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
        if self.kv is not None:
            kv, gate = torch.cat([self.kv, kv], dim=1), torch.cat([self.gate, gate], dim=1)
        m = compressor.rate
        usable = kv.shape[1] // m * m
        new = compressor.pool(kv[:, :usable], gate[:, :usable], inv_freq, self.count * m, self.prior)
        if usable and compressor.overlap:  # the last closed window's Ca half, its slot biases added (as pooled)
            D = compressor.head_dim
            last = slice(usable - m, usable)
            self.prior = (kv[:, last, :D], gate[:, last, :D] + compressor.ape[:, :D])
        self.kv, self.gate = kv[:, usable:], gate[:, usable:]
        self.entries = new if self.entries is None else torch.cat([self.entries, new], dim=1)
        self.count += new.shape[1]
        return self.entries

    def _state(self) -> tuple:
        return self.entries, self.kv, self.gate, self.prior, self.count

    def truncate(self, keep: int) -> None:
        """Back to the state before the last update, plus its first `keep` tokens."""
        state, kv, gate, compressor, inv_freq = self._undo
        self.entries, self.kv, self.gate, self.prior, self.count = state
        if keep:
            self._add(compressor, kv[:, :keep], gate[:, :keep], inv_freq)

    def map(self, others: list["CompressorState"], fn) -> "CompressorState":
        """A state whose every tensor is fn([that tensor of self and others]) (rows stacked or sliced)."""
        out = CompressorState(self.rewindable)
        out.count = self.count
        pick = lambda get: None if get(self) is None else fn([get(s) for s in [self, *others]])
        out.entries, out.kv, out.gate = pick(lambda s: s.entries), pick(lambda s: s.kv), pick(lambda s: s.gate)
        if self.prior is not None:
            out.prior = (fn([s.prior[0] for s in [self, *others]]), fn([s.prior[1] for s in [self, *others]]))
        return out

    def tensors(self) -> list[torch.Tensor]:
        """Everything held between steps (what `frugallm info` counts, hybrid_values)."""
        return [t for t in (self.entries, self.kv, self.gate, *(self.prior or ())) if t is not None]


class HybridLayerCache:
    """One block's state (see the header)."""

    def __init__(self, owner: "HybridCache", window: int, compressed: bool, indexed: bool):
        self.owner, self.size = owner, window - 1
        self.kv: torch.Tensor | None = None  # (B, <= n_win - 1, D): positions [length - rows, length)
        rewindable = owner.rewindable
        self.compressed = CompressorState(rewindable) if compressed else None
        self.index = CompressorState(rewindable) if indexed else None
        self._undo = None

    def update_window(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new rows kv (B, S, D); return the rows the S queries may read (B, R + S, D) and their
        positions (R + S,); keep the last n_win - 1."""
        if self.owner.rewindable:
            self._undo = (self.kv, kv)
        rows = kv if self.kv is None else torch.cat([self.kv, kv], dim=1)
        end = self.owner.length + kv.shape[1]
        self.kv = rows[:, max(0, rows.shape[1] - self.size):]
        return rows, torch.arange(end - rows.shape[1], end, device=kv.device)

    def truncate(self, keep: int) -> None:
        if self._undo is not None:
            before, new = self._undo
            rows = new[:, :keep] if before is None else torch.cat([before, new[:, :keep]], dim=1)
            self.kv = rows[:, max(0, rows.shape[1] - self.size):] if rows.shape[1] else None
        for state in (self.compressed, self.index):
            if state is not None and state._undo is not None:
                state.truncate(keep)

    def map(self, owner: "HybridCache", others: list["HybridLayerCache"], fn) -> "HybridLayerCache":
        """This block's state in `owner`, every tensor fn([that tensor of self and others])."""
        out = HybridLayerCache.__new__(HybridLayerCache)
        out.owner, out.size, out._undo = owner, self.size, None
        out.kv = None if self.kv is None else fn([self.kv] + [o.kv for o in others])
        out.compressed = None if self.compressed is None else self.compressed.map([o.compressed for o in others], fn)
        out.index = None if self.index is None else self.index.map([o.index for o in others], fn)
        return out

    def tensors(self) -> list[torch.Tensor]:
        states = [s for s in (self.compressed, self.index) if s is not None]
        return ([self.kv] if self.kv is not None else []) + [t for s in states for t in s.tensors()]


class HybridCache:
    """Every block's HybridLayerCache, for n_layers blocks of cfg (default the main stack's) from block
    `first` (an MTP module's: first = n_layers + k, n_layers = 1), and the length. rewindable: `truncate`
    may drop the tokens of the last forward (speculative decoding; see the header)."""

    def __init__(self, cfg: ModelConfig, batch_size: int, n_layers: int | None = None, first: int = 0,
                 device: torch.device | str = "cpu", rewindable: bool = False):
        if cfg.attention != "hybrid":
            raise ValueError("HybridCache is the cache of attention='hybrid' models; use model/kv_cache.py KVCache")
        n_layers = cfg.n_layers if n_layers is None else n_layers
        kinds = cfg.layer_types[first:first + n_layers]
        self.rewindable = rewindable
        self._layers = [HybridLayerCache(self, cfg.sliding_window, k != "sliding", k == "csa") for k in kinds]
        self.batch_size, self.length, self.static, self.device = batch_size, 0, False, device
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # the protocol's: all equal
        self._mark = 0  # the length before the last forward: `truncate` goes back no further

    def layer(self, i: int) -> HybridLayerCache:
        return self._layers[i]

    def window(self, S: int) -> tuple[torch.Tensor, None]:
        """Positions (B, S) of the S new tokens; no mask (each block builds its own)."""
        self._mark = self.length
        positions = self.length + torch.arange(S, device=self.device)
        return positions.expand(self.batch_size, S), None

    def advance(self, S: int) -> None:
        self.length += S
        self.lengths += S

    def truncate(self, length: int) -> None:
        """Keep the first `length` tokens: between the last forward's start and now (a rewindable cache)."""
        if length == self.length:
            return
        if not self.rewindable or not self._mark <= length <= self.length:
            raise ValueError(f"this HybridCache can go back to a length in [{self._mark}, {self.length}] "
                             f"(the last forward's tokens{'' if self.rewindable else ', rewindable=True'}), "
                             f"not {length}")
        for layer in self._layers:
            layer.truncate(length - self._mark)
        self.length = length
        self.lengths.fill_(length)

    @classmethod
    def stack(cls, caches: list["HybridCache"]) -> "HybridCache":
        """One cache over the rows of several at the same length, in order (the engine batches requests at
        one length this way; `split` undoes it). The inputs are left as they were."""
        if len(caches) == 1:
            return caches[0]
        if len({c.length for c in caches}) != 1:
            raise ValueError(f"HybridCache.stack needs caches of one length, not {[c.length for c in caches]}")
        return caches[0]._map(sum(c.batch_size for c in caches), caches[1:], lambda ts: torch.cat(ts, dim=0))

    def split(self, sizes: list[int]) -> list["HybridCache"]:
        """Caches over consecutive rows, sizes[i] each (summing to the batch size)."""
        if sum(sizes) != self.batch_size:
            raise ValueError(f"sizes {sizes} must sum to the batch size {self.batch_size}")
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return [self._map(n, [], lambda ts, a=a, n=n: ts[0][a:a + n]) for a, n in zip(starts, sizes)]

    def _map(self, batch_size: int, others: list["HybridCache"], fn) -> "HybridCache":
        out = HybridCache.__new__(HybridCache)
        out.rewindable, out.static, out.device, out.length = self.rewindable, False, self.device, self.length
        out.batch_size, out._mark = batch_size, self.length
        out.lengths = torch.full((batch_size,), self.length, dtype=torch.long, device=self.lengths.device)
        out._layers = [layer.map(out, [o.layer(i) for o in others], fn) for i, layer in enumerate(self._layers)]
        return out

    def held_values(self) -> int:
        """Values held for the tokens so far, every block and row together (hybrid_values counts the same)."""
        return sum(t.numel() for layer in self._layers for t in layer.tensors())


def hybrid_values(cfg: ModelConfig, T: int) -> dict[str, int]:
    """Values one sequence of T tokens holds in the main stack's HybridCache, by part: the window rows of
    every block, the compressed CSA entries with their open window's C, Z rows and the Ca half, the
    indexer's keys (likewise), and the HCA entries with their open window's rows. HybridCache.held_values
    measures the same (tests/test_v4_generate.py)."""
    D, dI, m, mh = cfg.head_dim, cfg.index_head_dim, cfg.csa_rate, cfg.hca_rate
    kinds = cfg.layer_types[:cfg.n_layers]
    per = {"window": min(T, cfg.sliding_window - 1) * D * len(kinds)}
    # overlapping compressor of width w: entries T // m x w, open rows (T % m) x 2w for C and Z each, and
    # once a window closed the last one's Ca half (m x w, C and Z + B)
    overlap = lambda w: T // m * w + T % m * 4 * w + (2 * m * w if T >= m else 0)
    per["csa"] = overlap(D) * kinds.count("csa")
    per["indexer keys"] = overlap(dI) * kinds.count("csa")
    per["hca"] = (T // mh * D + T % mh * 2 * D) * kinds.count("hca")
    return per


CONTEXTS = (1024, 32768, 1 << 20)


def hybrid_cache_lines(cfg: ModelConfig) -> list[str]:
    """`frugallm info`'s cache lines for attention='hybrid': bytes per token of context at 1k, 32k and 1M
    tokens, what the main stack's HybridCache holds for one sequence (hybrid_values), at bf16 (an inference
    plan's usual dtype; fp32 doubles it), by part."""
    kinds = cfg.layer_types[:cfg.n_layers]
    counts = ", ".join(f"{kinds.count(k)} {k}" for k in ("sliding", "csa", "hca") if kinds.count(k))
    lines = [f"  hybrid cache per token of context, bf16 ({cfg.n_layers} layers: {counts}; window "
             f"{cfg.sliding_window - 1} rows, CSA 1/{cfg.csa_rate}, HCA 1/{cfg.hca_rate}):"]
    for T in CONTEXTS:
        parts = hybrid_values(cfg, T)
        total = sum(parts.values()) * 2
        detail = ", ".join(f"{k} {v * 2 / T:,.1f}" for k, v in parts.items() if v)
        lines.append(f"    {T:>9,} tokens  {total / T:>10,.1f} B/token ({detail}); {_size(total)} in all")
    return lines


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.1f} {unit}"
        n /= 1024
