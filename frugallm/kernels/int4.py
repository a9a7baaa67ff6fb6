"""The "int4" weight-only format: GGUF q4_0's codes and scales, held as torch tensors.

    W (N, K) ~= (c - 8) * d[:, k // 32]    c in [0, 15] (a signed code c - 8 in [-8, 7]), d (N, K/32) fp16

Quantization is llama.cpp's q4_0 rule (quantize_row_q4_0_ref, and gguf-py's numpy twin): per group of
32 inputs, m = the signed value of largest magnitude (the first on ties), d = m / -8 (fp32),
c = min(15, trunc(w / d + 8.5)) with 1/d taken in fp32 (0 for an all-zero group), and d stored
rounded to fp16. So the code of m is 0 (= -8 * d, exact) and the other codes round half up.

Packing, two codes a byte, each group of 32 codes as 16 bytes in q4_0's order: byte j holds code j
in its low nibble and code j + 16 in its high nibble. `packed` is uint8 (N, K/2), `d` fp16 (N, K/32):
4.5 bits a weight, as q4_0 (a q4_0 block is the fp16 d then the 16 bytes), so a GGUF q4_0 tensor
reads in as codes by copying bytes (formats/gguf_read.py), and writes back the same way.

The eager path dequantizes then runs F.linear (`int4_linear`); the compiled batch-1 path
(kernels/compiled_quant.py) unpacks inside the traced GEMV, so only the packed bytes are read.
Matrices whose input width K is not a multiple of 32 have no int4 form (`fits`): kernels/quantize.py
quantize_model leaves them high precision, as llama.cpp's converter leaves them f16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GROUP = 32  # q4_0's block length, along K
HALF = GROUP // 2


def fits(shape) -> bool:
    """Whether a (..., N, K) weight has an int4 form: K a multiple of the group."""
    return shape[-1] % GROUP == 0


def quantize_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W (..., N, K) float -> (packed uint8 (..., N, K/2), d fp16 (..., N, K/32)), by q4_0's rule."""
    if not fits(w.shape):
        raise ValueError(f"int4 quantizes groups of {GROUP} inputs and this weight is {tuple(w.shape)} "
                         f"(K = {w.shape[-1]}): keep it high precision (quantize_model does) or use int8")
    g = w.detach().float().unflatten(-1, (-1, GROUP))  # (..., N, G, 32)
    m = g.gather(-1, g.abs().argmax(-1, keepdim=True))  # signed value of largest magnitude, first on ties
    d = m / -8
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    c = (g * inv + 8.5).trunc_().clamp_(0, 15).to(torch.uint8)  # fp32 ops in q4_0's order
    return pack_codes(c.flatten(-2)), d[..., 0].to(torch.float16)


def pack_codes(c: torch.Tensor) -> torch.Tensor:
    """Unsigned codes uint8 (..., K) in [0, 15] -> packed uint8 (..., K/2), q4_0's byte order."""
    g = c.to(torch.uint8).unflatten(-1, (-1, 2, HALF))  # (..., G, [first 16, last 16], 16)
    return (g[..., 0, :] | (g[..., 1, :] << 4)).flatten(-2)


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """Packed uint8 (..., K/2) -> unsigned codes uint8 (..., K) in [0, 15]: pack_codes undone."""
    g = packed.unflatten(-1, (-1, HALF))  # (..., G, 16)
    return torch.stack([g & 15, g >> 4], dim=-2).flatten(-3)


def dequantize_int4(packed: torch.Tensor, d: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The reference: packed (..., N, K/2) + d (..., N, K/32) -> W (..., N, K) in dtype (fp32 products:
    (c - 8) * d is exact in fp32, then rounded once to dtype)."""
    c = unpack_codes(packed).unflatten(-1, (-1, GROUP)).float() - 8
    return (c * d.float()[..., None]).flatten(-2).to(dtype)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """x (..., K), packed (N, K/2), d (N, K/32) -> (..., N) in x.dtype: dequantize, then F.linear (the
    eager path and the reference of the compiled GEMV)."""
    return F.linear(x, dequantize_int4(packed, d, x.dtype))


def empty_like_int4(shape, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Placeholders with the shapes and dtypes quantize_int4 gives a (..., N, K) weight."""
    *lead, N, K = shape
    return (torch.empty(*lead, N, K // 2, dtype=torch.uint8, device=device),
            torch.empty(*lead, N, K // GROUP, dtype=torch.float16, device=device))
