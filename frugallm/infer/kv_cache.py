"""The MLA latent cache: per layer only c_kv (B, T_max, kv_lora_rank) and k_pe (B, T_max, d_r).

That is (kv_lora_rank + qk_rope_head_dim) values per token per layer, e.g. 576 for V3, instead
of the H * (192 + 128) a naive K/V cache holds (REFERENCE §2.4). Buffers are preallocated at a
static shape; `pos` is the number of positions written, and the model advances it.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig


class LatentCache:
    """One layer's slice of the cache; MLA calls `update` with the new latents."""

    def __init__(self, c_kv: torch.Tensor, k_pe: torch.Tensor):
        self.c_kv, self.k_pe = c_kv, k_pe  # (B, T_max, dc), (B, T_max, dr)

    def update(self, start: int, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + c_kv.shape[1]
        self.c_kv[:, start:end] = c_kv
        self.k_pe[:, start:end] = k_pe
        return self.c_kv[:, :end], self.k_pe[:, :end]


class KVCache:
    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", n_layers: int | None = None):
        max_len = max_len or cfg.max_seq_len
        n_layers = cfg.n_layers if n_layers is None else n_layers
        self.c_kv = torch.zeros(n_layers, batch_size, max_len, cfg.kv_lora_rank, dtype=dtype, device=device)
        self.k_pe = torch.zeros(n_layers, batch_size, max_len, cfg.qk_rope_head_dim, dtype=dtype, device=device)
        self._layers = [LatentCache(self.c_kv[i], self.k_pe[i]) for i in range(n_layers)]
        self.pos = 0

    def layer(self, i: int) -> LatentCache:
        return self._layers[i]

    def reset(self) -> None:
        self.pos = 0

    def values_per_token(self) -> int:
        """Cached values per token, all layers: n_layers * (kv_lora_rank + qk_rope_head_dim)."""
        return self.c_kv.shape[0] * (self.c_kv.shape[-1] + self.k_pe.shape[-1])
