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
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from .compressor import Compressor


class CompressorState:
    """One compressor's running state: its entries, its unpooled C / Z rows and (overlapping) the Ca half."""

    def __init__(self):
        self.entries: torch.Tensor | None = None  # (B, n, D), roped
        self.kv: torch.Tensor | None = None  # (B, r, c D), r < m: tokens of the open window
        self.gate: torch.Tensor | None = None
        self.prior: tuple[torch.Tensor, torch.Tensor] | None = None  # (C, Z + B) (B, m, D) of the last window's Ca
        self.count = 0  # entries so far: the open window starts at position count * m

    def update(self, compressor: Compressor, x: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
        """Add the S new tokens x (B, S, d); return every entry so far (B, n, D), the new closed windows' included."""
        kv, gate = compressor.project(x)
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


class HybridLayerCache:
    """One block's state (see the header)."""

    def __init__(self, owner: "HybridCache", window: int, compressed: bool, indexed: bool):
        self.owner, self.size = owner, window - 1
        self.kv: torch.Tensor | None = None  # (B, <= n_win - 1, D): positions [length - rows, length)
        self.compressed = CompressorState() if compressed else None
        self.index = CompressorState() if indexed else None

    def update_window(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new rows kv (B, S, D); return the rows the S queries may read (B, R + S, D) and their
        positions (R + S,); keep the last n_win - 1."""
        rows = kv if self.kv is None else torch.cat([self.kv, kv], dim=1)
        end = self.owner.length + kv.shape[1]
        self.kv = rows[:, max(0, rows.shape[1] - self.size):]
        return rows, torch.arange(end - rows.shape[1], end, device=kv.device)


class HybridCache:
    """Every block's HybridLayerCache, for n_layers blocks of cfg (default the main stack's), and the length."""

    def __init__(self, cfg: ModelConfig, batch_size: int, n_layers: int | None = None, first: int = 0,
                 device: torch.device | str = "cpu"):
        if cfg.attention != "hybrid":
            raise ValueError("HybridCache is the cache of attention='hybrid' models; use model/kv_cache.py KVCache")
        n_layers = cfg.n_layers if n_layers is None else n_layers
        kinds = cfg.layer_types[first:first + n_layers]
        self._layers = [HybridLayerCache(self, cfg.sliding_window, k != "sliding", k == "csa") for k in kinds]
        self.batch_size, self.length, self.static, self.device = batch_size, 0, False, device
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # the protocol's: all equal

    def layer(self, i: int) -> HybridLayerCache:
        return self._layers[i]

    def window(self, S: int) -> tuple[torch.Tensor, None]:
        """Positions (B, S) of the S new tokens; no mask (each block builds its own)."""
        positions = self.length + torch.arange(S, device=self.device)
        return positions.expand(self.batch_size, S), None

    def advance(self, S: int) -> None:
        self.length += S
        self.lengths += S
