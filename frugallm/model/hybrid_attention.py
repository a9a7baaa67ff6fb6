"""DeepSeek-V4's hybrid attention: V4 §2.3; docs/design/v4-attention.md.

Every block attends with H query heads to ONE shared head that is both key and value (multi-query,
K = V), over the last n_win tokens (the sliding window, the query's own included) and, by the block's
kind (config `layer_types`), over compressed entries of the whole past (compressor.py):

    sliding   the window only
    csa       + the index_topk entries of 4:1 overlapping compression the lightning indexer picks (§2.3.1)
    hca       + every closed entry of 128:1 compression, attended densely (§2.3.2)

    c_q = RMSNorm(W^DQ h)                      (B, S, dq)      the query latent (the indexer reads it too)
    q   = RoPE(RMSNorm_unweighted(W^UQ c_q))   (B, S, H, D)    each head normalised alone, no weight
    kv  = RoPE(RMSNorm(W^KV h))                (B, S, D)       one head: the keys AND the values
    o_t = sum_s p[t, s] kv_s,  p = exp(l_ts) / (exp(sink_h) + sum_s' exp(l_ts')),  l = q . kv / sqrt(D)

RoPE is partial: it rotates the last d_r = qk_rope_head_dim dims of each head (interleaved pairs,
rope.py apply_rope_tail), at the tokens' positions; the compressed entries are rotated at their
windows' first positions. Sliding blocks rotate with rope_theta and no scaling, CSA / HCA blocks with
compress_rope_theta and the config's YaRN (cos/sin unscaled). Since the values carry the rotation
too, the output's last d_r dims are rotated back by the query's own angle (RoPE at -t), which leaves
each value's contribution a function of its distance to the query only.

The sink (one learned logit per head, `attn_sink`) takes part in the softmax's denominator only: a
head can attend to "nothing". The output projection is grouped and low-rank: the H heads' outputs
(H D per token, 32768 for V4-Flash) are split into g = o_groups groups of H D / g, each projected
alone to o_lora_rank (wo_a, block-diagonal), and the g o_lora_rank values mixed by wo_b.

Parameter names follow the release's checkpoint (wq_a, q_norm, wq_b, wkv, kv_norm, wo_a, wo_b,
attn_sink, compressor, indexer). Shapes: B batch, S tokens, H heads, D = head_dim, n compressed
entries, T = S + n keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .compressor import CompressedIndexer, Compressor, entry_visible
from .norm import RMSNorm, upcast
from .rope import apply_rope_tail, inv_freq, rope_angles


class GroupedLinear(nn.Module):
    """x (..., g, i) -> (..., g, o): group k multiplies by rows [k o, (k + 1) o) of weight (g o, i), i.e. a
    block-diagonal (g i) x (g o) matrix stored as its g blocks (the release's wo_a layout). Not an
    nn.Linear: a kernel twin (kernels/swap.py) would treat it as one dense matrix."""

    def __init__(self, in_per_group: int, out_per_group: int, groups: int):
        super().__init__()
        self.groups, self.out_per_group = groups, out_per_group
        self.weight = nn.Parameter(torch.empty(groups * out_per_group, in_per_group))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.view(self.groups, self.out_per_group, -1)  # (g, o, i)
        return torch.einsum("...gi,goi->...go", x, w)


def rope_configs(cfg: ModelConfig) -> tuple[ModelConfig, ModelConfig]:
    """The RoPE of sliding blocks (rope_theta, unscaled) and of CSA / HCA blocks (compress_rope_theta with
    the config's scaling), as configs inv_freq reads."""
    return cfg.replace(rope_scaling="none"), cfg.replace(rope_theta=cfg.compress_rope_theta)


def window_visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """(..., S, T) bool: query at q_pos (..., S) sees key at k_pos (..., T) iff t - n_win < s <= t."""
    d = q_pos[..., :, None] - k_pos[..., None, :]
    return (d >= 0) & (d < window)


def sink_attention(q: torch.Tensor, kv: torch.Tensor, visible: torch.Tensor, sink: torch.Tensor | None,
                   scale: float) -> torch.Tensor:
    """q (B, S, H, D) over the shared K = V rows kv (B, T, D) where visible (S, T) / (B, S, T), the sink
    logits (H,) in every denominator -> (B, S, H, D). The heads fold into the rows of one
    (B, H S, D) x (B, D, T) product: the shared head is read once, never expanded over heads."""
    B, S, H, D = q.shape
    T = kv.shape[1]
    scores = upcast(q.transpose(1, 2).reshape(B, H * S, D) @ kv.transpose(1, 2)).view(B, H, S, T) * scale
    scores = scores.masked_fill(~visible.unsqueeze(-3), float("-inf"))
    if sink is not None:  # a column of logits per head that no value follows: softmax, then drop it
        column = upcast(sink).view(1, H, 1, 1).expand(B, H, S, 1)
        p = torch.cat([scores, column.to(scores.dtype)], dim=-1).softmax(dim=-1)[..., :T]
    else:
        p = scores.softmax(dim=-1)
    out = p.type_as(kv).reshape(B, H * S, T) @ kv  # (B, H S, D)
    return out.view(B, H, S, D).transpose(1, 2)


class HybridAttention(nn.Module):
    """One block's V4 attention: sliding window, plus CSA or HCA entries by `layer_types[layer_id]`."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.kind = cfg.layer_types[layer_id]
        self.n_heads, self.head_dim, self.window = cfg.n_heads, cfg.head_dim, cfg.sliding_window
        self.o_groups, self.eps = cfg.o_groups, cfg.norm_eps
        H, D = cfg.n_heads, cfg.head_dim
        self.wq_a = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)  # W^DQ
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
        self.wq_b = nn.Linear(cfg.q_lora_rank, H * D, bias=False)  # W^UQ
        self.wkv = nn.Linear(cfg.dim, D, bias=False)  # the shared K = V head
        self.kv_norm = RMSNorm(D, cfg.norm_eps)
        self.wo_a = GroupedLinear(H * D // cfg.o_groups, cfg.o_lora_rank, cfg.o_groups)
        self.wo_b = nn.Linear(cfg.o_groups * cfg.o_lora_rank, cfg.dim, bias=False)
        self.attn_sink = nn.Parameter(torch.zeros(H)) if cfg.attn_sink else None
        rate = {"csa": cfg.csa_rate, "hca": cfg.hca_rate}.get(self.kind, 0)
        self.rate = rate
        self.compressor = Compressor(cfg.dim, D, rate, self.kind == "csa", cfg.norm_eps) if rate else None
        self.indexer = CompressedIndexer(cfg) if self.kind == "csa" else None
        self.rope_cfg = rope_configs(cfg)[self.kind != "sliding"]
        self.softmax_scale = D ** -0.5

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The sink and the compressors' slot biases start at zero (no sink weight, plain softmax gates)."""
        for p in (self.attn_sink, *(m.ape for m in self.modules() if isinstance(m, Compressor))):
            if p is not None:
                p.zero_()

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, cache=None, absorb: bool = False,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, S, d) -> (B, S, d). Without a cache the S tokens are positions 0..S-1 (training, prefill);
        with one (hybrid_cache.py HybridLayerCache) they follow its tokens, at positions (B, S), every row
        at the same position. Block's signature: cos/sin (the model's MLA tables), mask and absorb are
        unused; this block computes its own angles and masks."""
        if cache is not None and not hasattr(cache, "update_window"):
            raise ValueError("attention='hybrid' decodes with model/hybrid_cache.py HybridCache, not an MLA KVCache")
        B, S, _ = x.shape
        pos = torch.arange(S, device=x.device) if cache is None else positions[0]
        inv = inv_freq(self.rope_cfg).to(x.device)
        cos, sin = rope_angles(inv, pos)  # (S, d_r/2)
        q_lat = self.q_norm(self.wq_a(x))
        q = self.wq_b(q_lat).view(B, S, self.n_heads, self.head_dim)
        q = F.rms_norm(upcast(q), (self.head_dim,), eps=self.eps).type_as(q)  # per head, no weight
        q = apply_rope_tail(q, cos[:, None], sin[:, None])
        kv = apply_rope_tail(self.kv_norm(self.wkv(x)), cos, sin)  # (B, S, D)
        kv, k_pos = (kv, pos) if cache is None else cache.update_window(kv)  # (B, R + S, D) with a cache
        visible = window_visible(pos, k_pos, self.window)  # (S, R + S)
        if self.compressor is not None:
            entries, keys = self._compressed(x, inv, cache)  # (B, n, D), CSA: (B, n, d^I)
            seen = entry_visible(pos, entries.shape[1], self.rate)  # (S, n)
            if self.indexer is not None:
                seen = self.indexer(x, q_lat, cos, sin, keys, seen)
            kv = torch.cat([kv, entries], dim=1)
            visible = torch.cat([visible.expand(*seen.shape[:-1], visible.shape[-1]), seen], dim=-1)
        out = sink_attention(q, kv, visible, self.attn_sink, self.softmax_scale)
        return self.project_out(apply_rope_tail(out, cos[:, None], -sin[:, None]))

    def _compressed(self, x: torch.Tensor, inv: torch.Tensor, cache) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The compressed entries the S tokens x (B, S, d) may see, and with CSA the indexer's compressed
        keys (computed without autograd: the selection carries no gradient): from x alone, or the cache's."""
        with torch.no_grad():
            if self.indexer is None:
                keys = None
            elif cache is None:
                keys = self.indexer.compressor(x, inv)
            else:
                keys = cache.index.update(self.indexer.compressor, x, inv)
        if cache is None:
            return self.compressor(x, inv), keys
        return cache.compressed.update(self.compressor, x, inv), keys

    def project_out(self, out: torch.Tensor) -> torch.Tensor:
        """(B, S, H, D), rotated back -> (B, S, d) through the grouped low-rank projection."""
        B, S = out.shape[:2]
        grouped = self.wo_a(out.reshape(B, S, self.o_groups, -1))  # (B, S, g, o_lora_rank)
        return self.wo_b(grouped.flatten(2))
