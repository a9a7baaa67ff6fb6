"""DeepSeek-V4's KV compressors and CSA's lightning indexer: V4 §2.3.1 (CSA) and §2.3.2 (HCA);
docs/design/v4-attention.md.

A compressor turns every m consecutive tokens into ONE compressed KV entry of width D (the attention's
shared K=V head width), by a softmax-gated sum over the tokens of its window, per channel:

    C = H W^KV,  Z = H W^Z                                  (B, L, c D) each, c = 1 (HCA) or 2 (CSA)
    entry_w = RMSNorm( sum_j softmax_j(Z_j + B_j) * C_j )   j over the window's slots, B = `ape` (m, c D)

HCA (§2.3.2, eqs. 20-23): c = 1, m = hca_rate (m' = 128), the window is tokens [w m, (w + 1) m).
CSA (§2.3.1): c = 2, m = csa_rate (4): each token carries two series, Ca = [:D] and Cb = [D:], and entry w
pools 2m slots, Ca of window w - 1 beside Cb of window w, so windows of 2m tokens overlap by m (stride m);
window 0's Ca slots are empty (zero value, -inf gate: weight 0). RoPE then rotates the entry's last d_r
dims at position w m, the position of its window's first token, with the compressed RoPE (theta =
compress_rope_theta). Query t may see entry w only once its window has closed: w < (t + 1) // m.

The lightning indexer of CSA (§2.3.1, eqs. 13-17) runs its own overlapping compressor at width d^I
(index_head_dim) and scores query t against every compressed key s as V3.2's indexer does:

    I[t, s] = sum_h  w[t, h] * ReLU(q[t, h] . k[s] / sqrt(d^I)),  q = W^IQ c_q (the query latent),
    w = W^W h / sqrt(H^I) (float32)

then keeps the index_topk visible entries of largest I (indexer.py `select`: ties go to the earliest
entries). The selection is discrete: it carries no gradient, and the indexer is not trained by the LM loss.

Parameter names follow the release's checkpoint (wkv, wgate, ape, norm; wq_b, weights_proj).
Shapes: B batch, S tokens, L = n m tokens pooled, n entries, D entry width, H^I indexer heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .indexer import HeadWeights, select
from .norm import RMSNorm, upcast
from .rope import apply_rope_tail, rope_angles


class Compressor(nn.Module):
    """m tokens -> one roped entry of width D; overlapping (CSA) or not (HCA)."""

    def __init__(self, dim: int, head_dim: int, rate: int, overlap: bool, eps: float):
        super().__init__()
        self.head_dim, self.rate, self.overlap = head_dim, rate, overlap
        width = (2 if overlap else 1) * head_dim
        self.wkv = nn.Linear(dim, width, bias=False)  # W^KV
        self.wgate = nn.Linear(dim, width, bias=False)  # W^Z
        self.ape = nn.Parameter(torch.zeros(rate, width))  # B, the learned bias of each slot of a window
        self.norm = RMSNorm(head_dim, eps)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, L, d) -> C, Z (B, L, c D): what a cache buffers until a window closes."""
        return self.wkv(x), self.wgate(x)

    def pool(self, kv: torch.Tensor, gate: torch.Tensor, inv_freq: torch.Tensor, start: int = 0,
             prior: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """C, Z (B, n m, c D) of n whole windows, the first at position `start` -> entries (B, n, D), roped.
        prior: the (C, Z + B) of the window before `start`'s Ca half, (B, m, D) each (CSA with a cache)."""
        B, L, width = kv.shape
        n, m = L // self.rate, self.rate
        if n == 0:
            return kv.new_zeros(B, 0, self.head_dim)
        kv = kv.view(B, n, m, width)
        gate = gate.view(B, n, m, width) + self.ape  # float32 where ape is
        if self.overlap:
            kv = self._overlap(kv, 0.0, None if prior is None else prior[0])
            gate = self._overlap(gate, float("-inf"), None if prior is None else prior[1])
        weights = gate.softmax(dim=2, dtype=torch.float32).to(kv.dtype)  # over the window's slots, per channel
        entries = self.norm((kv * weights).sum(dim=2))  # (B, n, D)
        cos, sin = rope_angles(inv_freq, torch.arange(n, device=kv.device) * m + start)
        return apply_rope_tail(entries, cos, sin)

    def _overlap(self, t: torch.Tensor, fill: float, prior: torch.Tensor | None) -> torch.Tensor:
        """(B, n, m, 2D) -> (B, n, 2m, D): window w's slots are Ca of window w - 1 (window 0: `prior`, or
        `fill`), then Cb of window w."""
        B, n, m, _ = t.shape
        D = self.head_dim
        first = t.new_full((B, 1, m, D), fill) if prior is None else prior[:, None].to(t.dtype)
        previous = torch.cat([first, t[:, :-1, :, :D]], dim=1)  # (B, n, m, D)
        return torch.cat([previous, t[..., D:]], dim=2)

    def forward(self, x: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
        """Without a cache: x (B, S, d) -> the entries of its S // m whole windows (B, S // m, D); the
        tokens past the last whole window make no entry yet."""
        L = x.shape[1] // self.rate * self.rate
        return self.pool(*self.project(x[:, :L]), inv_freq)


def entry_visible(positions: torch.Tensor, n: int, rate: int) -> torch.Tensor:
    """(..., S, n) bool: query at position t sees entry w iff its window has closed, w < (t + 1) // rate.
    positions (..., S) absolute."""
    return torch.arange(n, device=positions.device) < ((positions + 1) // rate)[..., None]


class CompressedIndexer(nn.Module):
    """CSA's lightning indexer: its own compressed keys (B, n, d^I), and the top-k of I per query."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        self.compressor = Compressor(cfg.dim, cfg.index_head_dim, cfg.csa_rate, True, cfg.norm_eps)
        self.wq_b = nn.Linear(cfg.q_lora_rank, cfg.index_n_heads * cfg.index_head_dim, bias=False)  # W^IQ
        self.weights_proj = HeadWeights(cfg.dim, cfg.index_n_heads)  # W^W

    def scores(self, x: torch.Tensor, q_lat: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               keys: torch.Tensor) -> torch.Tensor:
        """I (B, S, n) float32: queries x (B, S, d), q_lat (B, S, dq) at angles cos/sin (S or B x S, d_r/2)
        against compressed keys (B, n, d^I), every pair (the caller masks)."""
        B, S, _ = x.shape
        q = self.wq_b(q_lat).view(B, S, self.n_heads, self.head_dim)
        q = apply_rope_tail(q, cos.unsqueeze(-2), sin.unsqueeze(-2))
        dots = F.relu(upcast(q) @ upcast(keys).transpose(1, 2)[:, None]) * self.head_dim ** -0.5  # (B, S, H, n)
        w = self.weights_proj(x) * self.n_heads ** -0.5  # (B, S, H) float32
        return (dots * w[..., None]).sum(dim=2)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, q_lat: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                keys: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """visible (S, n) or (B, S, n) narrowed to each query's top index_topk entries by I (itself while
        n <= index_topk: every visible entry is kept)."""
        if keys.shape[1] <= self.topk:
            return visible
        return select(self.scores(x, q_lat, cos, sin, keys), self.topk, visible)
