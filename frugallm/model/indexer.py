"""The lightning indexer and top-k selection of DeepSeek Sparse Attention (DSA): DeepSeek-V3.2 §2.1.

Each query token t scores every key token s it may see with a few small heads:

    I[t, s] = sum_h  w[t, h] * ReLU(q[t, h] . k[s])          (V3.2 eq. 1)

  q[t, h]  = W^IQ c_q[t], per head (d^I each): read from MLA's query latent c_q = q_norm(W^DQ h)
  k[s]     = LayerNorm(W^IK h[s]) (d^I), ONE key per token shared by all indexer heads (like MLA's k_pe)
  w[t, h]  = W^W h[t] (the release's `weights_proj`), computed and kept in float32
  RoPE     on the first d_r = qk_rope_head_dim dims of q and k, in the HALF-SPLIT layout
           (rope.py apply_rope_halves), while MLA rotates interleaved pairs (rope.py apply_rope)

scaled as the release scales it: the dot products by d^I^-0.5 before the ReLU (a positive factor, so
the same as after), the weights by H^I^-0.5. The main attention of query t then sees only the
index_topk keys with the largest I[t, s] among those it may see at all (all of them while there are
no more than index_topk): a boolean mask (B, S, T) that MLA applies in its naive and its absorbed
path alike (attention.py). Selection is not differentiable, so it runs without autograd.

Ties. ReLU makes I[t, s] exactly 0 wherever every head's dot product is <= 0 (probability 2^-H^I for
random weights, large with few heads), so the k-th and (k+1)-th scores can be equal. torch.topk breaks
such ties in an order that depends on the row's length, so a full forward and a cached decode step
could keep different keys. `select` breaks them by position instead (the earliest tied keys win),
which makes the choice a function of the scores alone: a cached decode step keeps exactly the keys
the full forward keeps. Without ties every rule gives the same set.

The indexer's keys k[s] are cached beside MLA's latents (kv_cache.py): d^I values per token per layer.

Training (V3.2 §2.1.1; indexer_loss.py): with a `stage` set (set_dsa_stage) and in training mode without
a cache, the indexer scores from its inputs detached, keeps the scores with autograd, and the attention
hands it its probabilities (attention.py `learn`) for the KL loss, which waits in `loss` until the model
collects it (take_indexer_loss). "warmup" leaves the attention dense, "sparse" masks it to the top-k.
Inference (eval mode, or a cache) never computes either.

Shapes: B batch, S new tokens, T attended positions, H = index_n_heads, D = index_head_dim,
dr = qk_rope_head_dim, dq = q_lora_rank, d = dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .indexer_loss import STAGES, attention_target, indexer_kl
from .norm import upcast
from .rope import apply_rope_halves

# Queries scored per pass: the (S, H, T) float32 block of dot products is the indexer's largest
# intermediate; chunks of S keep it near 2^26 values (256 MB) at any sequence length.
_BLOCK = 1 << 26


class LayerNorm(nn.Module):
    """y = (x - mean) / sqrt(var + eps) * weight + bias over the last dim, in float32 and cast back: the
    indexer's key norm (the release uses a LayerNorm here, with eps 1e-6, not an RMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(upcast(x), (x.shape[-1],), upcast(self.weight), upcast(self.bias), self.eps).type_as(x)


class HeadWeights(nn.Module):
    """w = x W^T (N, d) -> (N, H) in float32, its weight kept float32 when the model is cast (as the
    release keeps `weights_proj`): the weights sum H ReLU terms whose differences decide the top-k.
    Not an nn.Linear, so no kernel twin (kernels/swap.py) ever lowers its precision."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_heads, dim))

    def _apply(self, fn, recurse=True):
        # model.to(bf16) moves this weight but never casts it below float32 (cf. the gate bias, model/moe.py)
        weight = self._parameters.pop("weight")
        super()._apply(fn, recurse)
        moved = fn(weight)
        least = torch.promote_types(moved.dtype, torch.float32)
        if moved.dtype != least:
            moved = weight.detach().to(device=moved.device, dtype=least)
        weight.data = moved
        self._parameters["weight"] = weight
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = upcast(x)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x, self.weight.to(x.dtype))


class Indexer(nn.Module):
    """The lightning indexer of one layer: scores (B, S, T) and the top-k mask over them."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.dr, self.topk = (cfg.index_n_heads, cfg.index_head_dim,
                                                           cfg.qk_rope_head_dim, cfg.index_topk)
        self.wq_b = nn.Linear(cfg.q_lora_rank, cfg.index_n_heads * cfg.index_head_dim, bias=False)  # W^IQ
        self.wk = nn.Linear(cfg.dim, cfg.index_head_dim, bias=False)  # W^IK
        self.k_norm = LayerNorm(cfg.index_head_dim)
        self.weights_proj = HeadWeights(cfg.dim, cfg.index_n_heads)  # W^W
        self.stage: str | None = None  # None: not trained; "warmup" | "sparse" (set_dsa_stage)
        self.loss: torch.Tensor | None = None  # this layer's KL since the model last collected it
        self._scores: torch.Tensor | None = None  # I (B, S, T) with autograd, between train_mask and learn

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE (half-split) on the first dr dims of x (..., D); the other D - dr pass unrotated."""
        rot, rest = x.split([self.dr, self.head_dim - self.dr], dim=-1)
        return torch.cat([apply_rope_halves(rot, cos, sin), rest], dim=-1)

    def keys(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (B, S, d), cos/sin (S or B x S, dr/2) -> the tokens' keys k (B, S, D), what the cache holds."""
        return self._rope(self.k_norm(self.wk(x)), cos, sin)

    def scores(self, x: torch.Tensor, q_lat: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               keys: torch.Tensor) -> torch.Tensor:
        """I (B, S, T) float32 of S queries (x (B, S, d), q_lat (B, S, dq) the query latent) against keys
        (B, T, D), every pair, visible or not (the caller masks). Differentiable, for training the indexer."""
        B, S, _ = x.shape
        q = self._rope(self.wq_b(q_lat).view(B, S, self.n_heads, self.head_dim), cos.unsqueeze(-2), sin.unsqueeze(-2))
        w = self.weights_proj(x) * self.n_heads ** -0.5  # (B, S, H) fp32
        k_t = upcast(keys).transpose(1, 2)[:, None]  # (B, 1, D, T)
        step = max(1, _BLOCK // max(1, self.n_heads * keys.shape[1]))
        out = []
        for a in range(0, S, step):  # (B, s, H, D) @ (B, 1, D, T) -> (B, s, H, T) dot products
            dots = F.relu((upcast(q[:, a:a + step]) @ k_t) * self.head_dim ** -0.5)
            out.append((w[:, a:a + step, None, :] @ dots).squeeze(-2))  # sum over heads: (B, s, T)
        return torch.cat(out, dim=1)

    def learning(self, training: bool, cache) -> bool:
        """Whether this forward trains the indexer: a stage is set, in training mode, without a cache."""
        return self.stage is not None and training and cache is None

    def train_mask(self, x: torch.Tensor, q_lat: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   visible: torch.Tensor | None) -> torch.Tensor | None:
        """Training: the mask the attention runs under (visible itself in the warm-up, the top-k of I in
        the sparse stage), keeping I (B, S, T) with autograd for `learn`. The inputs are detached (V3.2
        §2.1.1): the KL trains the indexer alone, and the LM loss never reaches it (selection is discrete)."""
        x, q_lat = x.detach(), q_lat.detach()
        keys = self.keys(x, cos, sin)
        self._scores = self.scores(x, q_lat, cos, sin, keys)
        if self.stage == "warmup" or keys.shape[1] <= self.topk:
            return visible
        return select(self._scores.detach(), self.topk, visible)

    def learn(self, probs: torch.Tensor, mask: torch.Tensor | None) -> None:
        """The attention's probabilities (B, H, S, T) under `mask` (what train_mask returned) -> self.loss."""
        self.loss = indexer_kl(attention_target(probs), self._scores, mask)
        self._scores = None

    @torch.no_grad()
    def forward(self, x: torch.Tensor, q_lat: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                positions: torch.Tensor | None = None, cache=None,
                visible: torch.Tensor | None = None) -> torch.Tensor | None:
        """The keys each query attends to: visible (S, T) / (B, S, T) bool, or None for all, narrowed to
        the top index_topk by I. With a cache (kv_cache.py LatentCache) the S new keys are written at
        positions (B, S) and all T cached ones scored. Returns visible itself while T <= index_topk."""
        keys = self.keys(x, cos, sin)  # (B, S, D)
        if cache is not None:
            keys = cache.update_index(positions, keys)  # (B, T, D)
        if keys.shape[1] <= self.topk:  # every visible key is among the top k: nothing to score
            return visible
        return select(self.scores(x, q_lat, cos, sin, keys), self.topk, visible)


def select(scores: torch.Tensor, k: int, visible: torch.Tensor | None = None) -> torch.Tensor:
    """(B, S, T) bool: True at the k visible keys of largest score per query (all visible keys where
    fewer than k are); ties at the k-th score go to the earliest keys (see the header).

    scores (B, S, T) float; visible (S, T) or (B, S, T) bool, None = all visible; k < T.
    """
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    kth = scores.topk(k, dim=-1).values[..., -1:]  # (B, S, 1) the k-th largest score
    above = scores > kth
    tied = scores == kth
    room = k - above.sum(dim=-1, keepdim=True)  # how many of the tied keys fit, earliest first
    keep = above | (tied & (tied.cumsum(dim=-1) <= room))
    # where fewer than k keys are visible, kth is -inf and the tied ones are the hidden keys: drop them
    return keep if visible is None else keep & visible


def top_rows(keep: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`select`'s mask as indices, for attention that gathers the kept rows (attention.py, sparse decode).

    keep (B, S, T) bool with at most k True per query -> idx (B, S, k) int64, the kept positions in
    ascending order, and valid (B, S, k) bool: False at the padding where a query keeps fewer than k
    (idx 0 there, a slot that always exists; the caller masks it out). One O(T) pass with static
    shapes (a compiled step traces it): each kept key's rank among the kept ones is its column, the
    keys not kept all land in a spare column k that is dropped, and unfilled columns keep their 0.
    """
    B, S, T = keep.shape
    rank = torch.where(keep, keep.long().cumsum(dim=-1) - 1, k)  # (B, S, T) column of each key, k = dropped
    idx = torch.zeros(B, S, k + 1, dtype=torch.long, device=keep.device)
    idx.scatter_(-1, rank, torch.arange(T, device=keep.device).expand(B, S, T))
    valid = torch.arange(k, device=keep.device) < keep.sum(dim=-1, keepdim=True)
    return idx[..., :k], valid


def set_dsa_stage(model: nn.Module, stage: str | None) -> None:
    """Train every indexer of `model` in `stage` (V3.2 §2.1.1), or None: not at all. "warmup" also freezes
    every other parameter (the main model stays as it is while its indexers learn to follow it)."""
    if stage is not None and stage not in STAGES:
        raise ValueError(f"dsa_stage={stage!r} must be one of {', '.join(STAGES)}")
    indexers = [m for m in model.modules() if isinstance(m, Indexer)]
    if stage is not None and not indexers:
        raise ValueError(f"dsa_stage={stage!r} trains the DSA indexer, and this model has none; "
                         "use a model with index_topk > 0 (e.g. --preset tiny-v32)")
    for m in indexers:
        m.stage, m.loss, m._scores = stage, None, None
    if stage == "warmup":
        ours = {id(p) for m in indexers for p in m.parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in ours)


def take_indexer_loss(model: nn.Module) -> torch.Tensor | None:
    """The sum of the indexers' pending losses (each layer's, MTP blocks included), which are cleared;
    None when none is pending (no stage, eval mode, a cached forward)."""
    total = None
    for m in model.modules():
        if isinstance(m, Indexer) and m.loss is not None:
            total = m.loss if total is None else total + m.loss
            m.loss = None
    return total
