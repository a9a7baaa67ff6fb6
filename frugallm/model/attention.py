"""Multi-head Latent Attention (MLA): V2 §2.1, V3 §2.1.1; docs/design/mla.md.

Keys and values are rebuilt from a compressed latent c_kv = kv_norm(W^DKV h) (d_c per token)
plus ONE rope key k_pe = RoPE(W^KR h) (d_r per token) shared by all heads. Only those two are
ever cached: (d_c + d_r) values per token per layer.

Two paths, one class, same weights:
  naive     up-project c_kv to per-head k_nope / v and run ordinary attention.
            Compute-friendly: used for training and prefill.
  absorbed  fold W^UK into the query and W^UV into the output, and attend over the latent
            directly: MQA with one 576-dim key "head". Data-movement-friendly: used for decode.

With DSA (index_topk > 0, DeepSeek-V3.2 §2.1) a lightning indexer (indexer.py) narrows the mask of
each query to its top-k keys before either path runs, so both attend to the same keys; the absorbed path
then reads only those k latent rows per query (MLA._over_rows, the paper's sparse decode), the naive one
masks (docs/design/dsa.md, Cache).

Shapes: B batch, S new tokens, T = start + S attended tokens, H heads,
dn = qk_nope_head_dim, dr = qk_rope_head_dim, dv = v_head_dim, dc = kv_lora_rank.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .indexer import Indexer, top_rows
from .norm import RMSNorm, upcast
from .rope import apply_rope, softmax_scale

# With DSA the absorbed path gathers each query's top-k latent rows while S * k <= GATHER_RATIO * T (MLA._rows).
GATHER_RATIO = 4


class MLA(nn.Module):
    # the absorbed path reads wkv_b's weight matrix itself (W^UK, W^UV per head), not through its
    # forward: a kernel twin of wkv_b must keep `.weight` cheap (kernels/swap.py)
    reads_weight = ("wkv_b",)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.dn, self.dr, self.dv = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.dc = cfg.kv_lora_rank
        qk = cfg.n_heads * cfg.qk_head_dim
        self.q_lora_rank = cfg.q_lora_rank
        if cfg.q_lora_rank > 0:
            self.wq_a = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)  # W^DQ
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.wq_b = nn.Linear(cfg.q_lora_rank, qk, bias=False)  # [W^UQ; W^QR], per head [nope | rope]
        else:
            self.wq = nn.Linear(cfg.dim, qk, bias=False)
        self.wkv_a = nn.Linear(cfg.dim, self.dc + self.dr, bias=False)  # [W^DKV; W^KR]
        self.kv_norm = RMSNorm(self.dc, cfg.norm_eps)
        self.wkv_b = nn.Linear(self.dc, cfg.n_heads * (self.dn + self.dv), bias=False)  # per head [W^UK | W^UV]
        self.wo = nn.Linear(cfg.n_heads * self.dv, cfg.dim, bias=False)
        self.softmax_scale = softmax_scale(cfg)
        # DSA: reads x and the query latent, masks the keys (None: dense attention, V2/V3)
        self.indexer = Indexer(cfg) if cfg.index_topk > 0 else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor | None = None,
                cache=None, absorb: bool = False, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, S, dim); cos/sin (S, dr/2) or (B, S, dr/2), the RoPE tables at the tokens' positions.

        Without a cache the S tokens are positions 0..S-1 under a causal mask (training).
        With a cache (model/kv_cache.py), positions (B, S) are each token's absolute position,
        `cache.update(positions, c_kv, k_pe)` returns the latents of all T cached positions, and
        mask (B, S, T) says which of them each token sees (None: all of them, i.e. one new token
        per row and every row of the same length).
        """
        B, S, _ = x.shape
        q_lat = self.q_norm(self.wq_a(x)) if self.q_lora_rank > 0 else None  # (B, S, dq), the query latent
        q = self.wq_b(q_lat) if q_lat is not None else self.wq(x)
        q = q.view(B, S, self.n_heads, self.dn + self.dr)
        q_nope, q_pe = q.split([self.dn, self.dr], dim=-1)
        q_pe = apply_rope(q_pe, cos.unsqueeze(-2), sin.unsqueeze(-2))  # (B, S, H, dr)

        c_kv, k_pe = self.wkv_a(x).split([self.dc, self.dr], dim=-1)
        c_kv = self.kv_norm(c_kv)  # (B, S, dc); k_pe is split off BEFORE the norm and never normalised
        k_pe = apply_rope(k_pe, cos, sin)  # (B, S, dr), one head for all
        if cache is not None:
            c_kv, k_pe = cache.update(positions, c_kv, k_pe)  # (B, T, dc), (B, T, dr)
        elif S > 1:
            mask = causal_mask(S, S, 0, x.device)  # (S, S)
        learn = self.indexer is not None and self.indexer.learning(self.training, cache)  # DSA training
        if learn and absorb:
            raise ValueError("training the DSA indexer reads the naive path's attention; call with absorb=False")
        if learn:  # warm-up: mask as it is; sparse: the top-k, and I kept for the KL (indexer_loss.py)
            mask = self.indexer.train_mask(x, q_lat, cos, sin, mask)
        elif self.indexer is not None:  # each query keeps its top index_topk visible keys: (B, S, T)
            mask = self.indexer(x, q_lat, cos, sin, positions, cache, mask)
        if absorb:
            out = self._absorbed(q_nope, q_pe, c_kv, k_pe, mask, self._rows(mask, S, c_kv.shape[1]))
        else:
            out = self._naive(q_nope, q_pe, c_kv, k_pe, mask, learn)
        return self.wo(out.flatten(2))

    def _naive(self, q_nope, q_pe, c_kv, k_pe, mask: torch.Tensor | None, learn: bool = False) -> torch.Tensor:
        B, S, H, _ = q_nope.shape
        T = c_kv.shape[1]
        kv = self.wkv_b(c_kv).view(B, T, H, self.dn + self.dv)
        k_nope, v = kv.split([self.dn, self.dv], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # (B, H, S, dn+dr)
        k = torch.cat([k_nope, k_pe[:, :, None].expand(B, T, H, self.dr)], dim=-1).transpose(1, 2)
        # Explicit attention, not SDPA: on CPU, SDPA with dv != dn+dr runs an fp32 math path and
        # its flash kernel is slow at these head dims. The two GEMMs run in the model dtype (bf16:
        # AMX), the mask and softmax in at least fp32, as in the reference and HF eager.
        scores = upcast(q @ k.transpose(-1, -2)) * self.softmax_scale  # (B, H, S, T)
        if mask is not None:  # (S, T) or (B, S, T) -> broadcast over heads
            scores = scores.masked_fill(~mask.unsqueeze(-3), float("-inf"))
        p = scores.softmax(dim=-1)
        if learn:  # the probabilities (B, H, S, T), detached, are the indexer's target (training only)
            self.indexer.learn(p.detach(), mask)
        o = p.type_as(v) @ v.transpose(1, 2)  # (B, H, S, dv)
        return o.transpose(1, 2)  # (B, S, H, dv)

    def _rows(self, mask: torch.Tensor | None, S: int, T: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The indexer's top-k keys as row indices (B, S, k) and their validity (indexer.py top_rows), for the
        absorbed path to gather (the paper's sparse attention), or None to attend over all T rows under the mask.

        Gathering copies S * k rows (B, S, k, dc + dr) where the masked path reads T rows once (and scores
        H * S * T pairs), so it is chosen while S * k <= GATHER_RATIO * T: every decode step (S = 1 < T / k
        once the indexer narrows), verify steps and short chunks; a long absorbed chunk stays masked (at
        S = T = 4096, k = 2048, dc = 512, fp32 the copy alone would be 17 GB). Measured on one layer of
        H = 8, dc = 256, dr = 32, k = 256, fp32, 2 threads (AMD EPYC zen4 KVM guest), ms masked -> gathered:
        T = 1024: S = 1 0.25 -> 0.22, S = 16 1.16 -> 1.06, S = 64 4.20 -> 5.03 (the one loss: S * k = 16 T);
        T = 4096: S = 1 0.61 -> 0.24, S = 16 4.5 -> 1.3, S = 64 18.4 -> 11.6;
        T = 16384: S = 1 5.7 -> 0.29, S = 16 140 -> 10.5."""
        if self.indexer is None or T <= self.indexer.topk or S * self.indexer.topk > GATHER_RATIO * T:
            return None  # no indexer, nothing narrowed (the mask is MLA's own), or a long chunk
        return top_rows(mask, self.indexer.topk)

    def _absorbed(self, q_nope, q_pe, c_kv, k_pe, mask: torch.Tensor | None,
                  rows: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        # The absorbed weights are per-head batches of one bmm, on strided views of wkv_b (no copies):
        # (H, B*S, dn) x (H, dn, dc) and (H, B*S, dc) x (H, dc, dv). Between them, attention over the
        # latent rows: all T under the mask, or with DSA the k rows each query's indexer kept (rows).
        B, S, H, _ = q_nope.shape
        wkv_b = self.wkv_b.weight.view(H, self.dn + self.dv, self.dc)
        q_lat = torch.bmm(q_nope.permute(2, 0, 1, 3).reshape(H, B * S, self.dn), wkv_b[:, : self.dn])  # W^UK
        if rows is None:
            x = self._over_all(q_lat, q_pe, c_kv, k_pe, mask)
        else:
            x = self._over_rows(q_lat, q_pe, c_kv, k_pe, *rows)
        out = torch.bmm(x, wkv_b[:, self.dn:].transpose(1, 2))  # W^UV absorbed: (H, B*S, dv)
        return out.view(H, B, S, self.dv).permute(1, 2, 0, 3)  # (B, S, H, dv)

    def _over_all(self, q_lat, q_pe, c_kv, k_pe, mask: torch.Tensor | None) -> torch.Tensor:
        """q_lat (H, B*S, dc), q_pe (B, S, H, dr) over all T latent rows -> (H, B*S, dc).
        Every head attends to the same single latent "key/value head" (MQA), so heads fold into
        the rows of one (B, H*S, .) x (B, ., T) matmul: the cache is read once and never expanded
        over heads."""
        B, S, H, _ = q_pe.shape
        T, dc = c_kv.shape[1], self.dc
        q_lat = q_lat.view(H, B, S, dc).transpose(0, 1).reshape(B, H * S, dc)
        q_r = q_pe.transpose(1, 2).reshape(B, H * S, self.dr)
        scores = q_lat @ c_kv.transpose(1, 2) + q_r @ k_pe.transpose(1, 2)  # (B, H*S, T)
        scores = upcast(scores).view(B, H, S, T) * self.softmax_scale
        if mask is not None:
            scores = scores.masked_fill(~mask.unsqueeze(-3), float("-inf"))
        p = scores.softmax(dim=-1).type_as(c_kv).view(B, H * S, T)  # softmax in float32
        return (p @ c_kv).view(B, H, S, dc).permute(1, 0, 2, 3).reshape(H, B * S, dc)  # attention over the latent

    def _over_rows(self, q_lat, q_pe, c_kv, k_pe, idx: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """DSA's sparse attention (DeepSeek-V3.2 §2.1): q_lat (H, B*S, dc), q_pe (B, S, H, dr) over only
        the k latent rows idx (B, S, k) of each query, valid (B, S, k) False at padding -> (H, B*S, dc).
        The step reads S * k rows (B, S, k, dc + dr) of the cache, not T: its cost stops growing with
        the context, beyond the indexer's O(T) scan."""
        B, S, k = idx.shape
        H, dc = q_lat.shape[0], self.dc
        at = torch.arange(B, device=idx.device)[:, None, None]
        c, r = c_kv[at, idx], k_pe[at, idx]  # (B, S, k, dc), (B, S, k, dr): the selected rows only
        q_lat = q_lat.view(H, B, S, dc).permute(1, 2, 0, 3)  # (B, S, H, dc): heads share each query's rows
        scores = q_lat @ c.transpose(-1, -2) + q_pe @ r.transpose(-1, -2)  # (B, S, H, k)
        scores = upcast(scores) * self.softmax_scale
        scores = scores.masked_fill(~valid.unsqueeze(-2), float("-inf"))
        p = scores.softmax(dim=-1).type_as(c)  # softmax in float32
        return (p @ c).permute(2, 0, 1, 3).reshape(H, B * S, dc)


def causal_mask(S: int, T: int, start_pos: int, device) -> torch.Tensor:
    """(S, T) bool, True where query i (absolute position start_pos + i) may attend key j."""
    i = torch.arange(S, device=device)[:, None] + start_pos
    return torch.arange(T, device=device)[None, :] <= i
