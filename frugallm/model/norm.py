"""RMSNorm, shared by the blocks, the MLA latents and the MTP modules."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def upcast(x: torch.Tensor) -> torch.Tensor:
    """x in at least float32: bf16/fp16 go up to fp32, fp64 stays fp64 (the exactness tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), normalised in float32 and cast back before the weight
    (the HF DeepSeek order, so bf16 results match it bit for bit)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(upcast(x), (x.shape[-1],), eps=self.eps).type_as(x)
