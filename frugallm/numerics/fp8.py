"""Fine-grained FP8 (REFERENCE §8): 128x128 weight blocks, E4M3, `weight_scale_inv` layout.

weight_scale_inv is the DEQUANT multiplier: W ~= q * s[i // 128, j // 128], shape
(ceil(out/128), ceil(in/128)); ragged edge blocks are simply smaller.
"""

from __future__ import annotations

import torch

BLOCK = 128


def weight_dequant(q: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q (M, N) float8_e4m3fn, scale_inv (ceil(M/block), ceil(N/block)) fp32 -> W (M, N) in `dtype`."""
    M, N = q.shape
    rows, cols = -(-M // block), -(-N // block)
    if tuple(scale_inv.shape) != (rows, cols):
        raise ValueError(f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected ({rows}, {cols}) "
                         f"for a ({M}, {N}) weight in {block}x{block} blocks")
    s = scale_inv.float().repeat_interleave(block, 0)[:M].repeat_interleave(block, 1)[:, :N]
    return (q.float() * s).to(dtype)
