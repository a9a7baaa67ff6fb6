"""Rotary position embedding in DeepSeek's interleaved-pair layout, with YaRN.

Only the decoupled RoPE part of MLA (qk_rope_head_dim = d_r) is rotated. Adjacent pairs
(x[2i], x[2i+1]) form one complex number rotated by angle pos * freq_i, freq_i = theta^(-2i/d_r)
(V3-code `apply_rotary_emb`). HF de-interleaves q and k the same way before rotate-half, so the
scores are equal; the absorbed path caches k_pe in this layout and dots it with q_pe directly.

YaRN (docs/design/rope-yarn.md): frequencies of the low-frequency pairs are divided by `factor` with a
linear ramp between the correction dims of beta_fast and beta_slow; the softmax scale is then
multiplied by yarn_mscale(factor, mscale_all_dim)^2 (done in attention.py).
"""

from __future__ import annotations

import math

import torch

from ..config import ModelConfig, yarn_mscale
from .norm import upcast


def _correction_dim(n_rot: float, dim: int, base: float, orig_len: int) -> float:
    # the pair index whose wavelength completes n_rot rotations over orig_len tokens
    return dim * math.log(orig_len / (n_rot * 2 * math.pi)) / (2 * math.log(base))


def yarn_range(cfg: ModelConfig) -> tuple[int, int]:
    """(low, high) pair indices of the YaRN ramp, truncated as the reference does."""
    d = cfg.qk_rope_head_dim
    low = math.floor(_correction_dim(cfg.beta_fast, d, cfg.rope_theta, cfg.original_seq_len))
    high = math.ceil(_correction_dim(cfg.beta_slow, d, cfg.rope_theta, cfg.original_seq_len))
    return max(low, 0), min(high, d - 1)


def inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """(d_r/2,) float32 inverse frequencies, YaRN-blended when rope_scaling == 'yarn'."""
    d = cfg.qk_rope_head_dim
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    if cfg.rope_scaling == "yarn":
        low, high = yarn_range(cfg)
        if low == high:
            high += 0.001  # avoid a zero-width ramp
        ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        # ramp = 0 keeps the original (high) frequency, ramp = 1 divides it by the factor
        freqs = freqs / cfg.rope_factor * ramp + freqs * (1 - ramp)
    return freqs


def rope_attn_factor(cfg: ModelConfig) -> float:
    """Multiplier of cos/sin (HF `attention_factor`); 1.0 without YaRN and for DeepSeek releases."""
    if cfg.rope_scaling != "yarn":
        return 1.0
    if cfg.rope_attn_factor is not None:
        return cfg.rope_attn_factor
    return yarn_mscale(cfg.rope_factor, cfg.mscale) / yarn_mscale(cfg.rope_factor, cfg.mscale_all_dim)


def softmax_scale(cfg: ModelConfig) -> float:
    """(d_nope + d_rope)^-0.5, times mscale^2 under YaRN; it multiplies the whole logit."""
    scale = cfg.qk_head_dim ** -0.5
    if cfg.rope_scaling == "yarn" and cfg.mscale_all_dim:
        scale *= yarn_mscale(cfg.rope_factor, cfg.mscale_all_dim) ** 2
    return scale


def rope_tables(cfg: ModelConfig, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables of shape (max_seq_len, d_r/2), float32, attention factor included."""
    pos = torch.arange(cfg.max_seq_len, dtype=torch.float32, device=device)
    angles = torch.outer(pos, inv_freq(cfg).to(device))
    a = rope_attn_factor(cfg)
    return angles.cos() * a, angles.sin() * a


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (..., S, [H,] d_r) by cos/sin broadcastable to (..., S, [1,] d_r/2).

    Computed in (at least) float32 and cast back, so bf16 activations do not lose the rotation's precision.
    """
    xr = upcast(x).unflatten(-1, (-1, 2))
    x0, x1 = xr[..., 0], xr[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


def apply_rope_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., d_r) in the half-split layout: pair i is (x[i], x[i + d_r/2]), rotated by cos/sin
    broadcastable to (..., d_r/2). The DSA indexer's RoPE (model/indexer.py) is laid out this way, not
    in MLA's interleaved pairs: the same angles, applied to other pairs of dims. In at least float32."""
    x0, x1 = upcast(x).chunk(2, dim=-1)
    return torch.cat((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).type_as(x)


def rope_angles(inv: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (..., d_r/2) float32 of positions (...) for inverse frequencies inv (d_r/2,), computed per
    call: V4's compressed entries sit at positions w * m that no table row holds (hybrid_attention.py)."""
    angles = positions[..., None].float() * inv.to(positions.device)
    return angles.cos(), angles.sin()


def apply_rope_tail(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V4's partial RoPE: interleaved pairs of the LAST 2 * cos.shape[-1] dims of x (..., D) rotated
    (apply_rope), the leading D - d_r dims passed through; cos/sin broadcastable to (..., d_r/2)."""
    d = 2 * cos.shape[-1]
    return torch.cat([x[..., : x.shape[-1] - d], apply_rope(x[..., x.shape[-1] - d:], cos, sin)], dim=-1)
