"""Fine-grained FP8 (REFERENCE §8; V3 §3.3): the quantisers.

Every tensor is E4M3 (max 448) with an fp32 scale per group, from the current max-abs (online
scaling: no amax history). The scale is the DEQUANT multiplier, as in DeepSeek's kernels and
checkpoints:

    s = max(amax, 1e-4) / 448          (ue8m0: s = 2^ceil(log2 s), a power of two rounded UP)
    q = e4m3(clamp(x / s, -448, 448))  round-to-nearest-even;  x ~= q * s

The 1e-4 floor makes an all-zero group give s = 1e-4/448 and q = 0: never inf or NaN. The clamp
is explicit (REFERENCE §8.4: do not rely on the cast saturating).

Groups, with their shapes:
    act_quant     x (..., K)   1 x 128 tiles along the LAST dim   -> s (..., ceil(K/128))
    weight_quant  W (N, K)     128 x 128 blocks                   -> s (ceil(N/128), ceil(K/128))
Ragged edges (K or N not a multiple of 128) are zero-padded to a full group before the max-abs
(zeros never raise it, so the scale is that of the real elements) and the padding is dropped
from the codes: q keeps the input's shape. This is the layout of DeepSeek's `weight_scale_inv`
(REFERENCE §8.3); the reference act_quant instead requires K % 128 == 0.

A 128 x 1 group (a column tile along tokens, for the Wgrad GEMM) is act_quant of the
transposed tensor; see fp8_linear.py for the three GEMMs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK = 128
E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
AMAX_FLOOR = 1e-4  # the reference kernel's clamp: all-zero groups quantise to 0


def _scale(amax: torch.Tensor, scale_fmt: str | None) -> torch.Tensor:
    """fp32 amax per group -> fp32 dequant scale s = max(amax, 1e-4) / 448 (ue8m0: rounded up to 2^k)."""
    s = amax.float().clamp_min(AMAX_FLOOR) / E4M3_MAX
    if scale_fmt == "ue8m0":
        # frexp is exact: s = m * 2^e with m in [0.5, 1). s is already 2^(e-1) when m == 0.5,
        # else the next power of two up is 2^e. (log2 + ceil can round the wrong way near 2^k.)
        m, e = torch.frexp(s)
        s = torch.ldexp(torch.ones_like(s), torch.where(m == 0.5, e - 1, e))
    elif scale_fmt is not None:
        raise ValueError(f"scale_fmt={scale_fmt!r} must be None or 'ue8m0'")
    return s


def _cast(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> e4m3fn: explicit clamp, then the round-to-nearest-even cast."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def act_quant(x: torch.Tensor, block: int = BLOCK, scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) any float dtype -> (q (..., K) e4m3fn, s (..., ceil(K/block)) fp32), 1 x block tiles."""
    K = x.shape[-1]
    nb = -(-K // block)
    xf = F.pad(x.float(), (0, nb * block - K)).unflatten(-1, (nb, block))  # (..., nb, block)
    s = _scale(xf.abs().amax(dim=-1), scale_fmt)  # (..., nb)
    q = _cast(xf / s[..., None]).flatten(-2)[..., :K].contiguous()
    return q, s


def act_dequant(q: torch.Tensor, s: torch.Tensor, block: int = BLOCK,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q (..., K) e4m3fn, s (..., ceil(K/block)) fp32 -> x (..., K) in `dtype`."""
    K = q.shape[-1]
    if s.shape[-1] != -(-K // block) or s.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"act scale shape {tuple(s.shape)} does not match codes {tuple(q.shape)} in 1x{block} tiles")
    return (q.float() * s.float().repeat_interleave(block, dim=-1)[..., :K]).to(dtype)


def weight_quant(w: torch.Tensor, block: int = BLOCK, scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """W (N, K) any float dtype -> (q (N, K) e4m3fn, scale_inv (ceil(N/block), ceil(K/block)) fp32)."""
    if w.dim() != 2:
        raise ValueError(f"weight_quant takes a 2-D (out, in) weight, got shape {tuple(w.shape)}")
    N, K = w.shape
    nr, nc = -(-N // block), -(-K // block)
    wf = F.pad(w.float(), (0, nc * block - K, 0, nr * block - N)).view(nr, block, nc, block)
    s = _scale(wf.abs().amax(dim=(1, 3)), scale_fmt)  # (nr, nc)
    q = _cast(wf / s[:, None, :, None]).view(nr * block, nc * block)[:N, :K].contiguous()
    return q, s


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
