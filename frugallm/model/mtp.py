"""Multi-token prediction (MTP): V3 §2.2 eqs. 21-25; docs/design/mtp.md.

D sequential modules; module k predicts the token k+1 steps ahead of the main head.
Module k at position i combines the previous depth's hidden state h^{k-1}_i with the embedding
of t_{i+k}, runs one Transformer block, and feeds the shared output head:

    h'^k_i = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)])   embedding FIRST, as in the
                                                                 released V3 weights (docs/design/mtp.md)
    h^k    = TRM_k(h'^k)                                         causal, RoPE positions i
    logits = head(norm_k(h^k))                                   predicts t_{i+k+1}

h^0 is the main model's last hidden state BEFORE its final norm (hnorm expects pre-norm input,
as ports of the released weights do). The embedding and head are the main model's own
parameter objects, passed in, never copied.

Alignment (FlagScale PR #337 pitfall): inputs AND labels shift by k together. Running TRM_k over
all S positions is exact for positions < S-k because attention is causal; the tail is masked.
Loss: L_MTP = (lambda / D) * sum_k L_k, each L_k a mean over its valid tokens (docs/design/mtp.md).

With residual = hc / mhc, TRM_k is a block of the same kind as the main model's, with its own
connections: h'^k (B, S, d) is expanded to n streams before it and collapsed (mean) after it,
exactly as the main model does around its stack (hyperconn.py). At init that is the plain block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .hyperconn import collapse_streams, expand_streams
from .norm import RMSNorm


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig, block: nn.Module):
        super().__init__()
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)  # M_k
        self.block = block  # one Transformer block (a MoE block for V3)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)  # HF shared_head.norm
        self.streams = cfg.hc_streams if cfg.residual != "plain" else 0

    def forward(self, h_prev: torch.Tensor, emb: torch.Tensor, **block_kwargs):
        """h_prev, emb (B, S, d) -> (h (B, S, d), balance loss or None)."""
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))
        if self.streams:  # hc / mhc block: (B, S, d) -> (B, S, n, d) -> block -> mean -> (B, S, d)
            h, balance = self.block(expand_streams(x, self.streams), **block_kwargs)
            return collapse_streams(h), balance
        return self.block(x, **block_kwargs)


def shift_left(t: torch.Tensor, k: int, fill: int) -> torch.Tensor:
    """t (B, S) -> t[:, k:] padded on the right with `fill` to length S."""
    return F.pad(t[:, k:], (0, k), value=fill)


def mtp_logits(modules: nn.ModuleList, embed: nn.Embedding, head: nn.Linear, h0: torch.Tensor,
               input_ids: torch.Tensor, **block_kwargs) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """[(logits_k (B, S, vocab), balance loss or None) for k = 1..D]; logits_k[:, i] predicts t_{i+k+1}.

    Depth k's input at position i is Emb(t_{i+k}) = Emb(input_ids[i+k]); positions i >= S-k have
    no such token (filled with id 0) and must be masked by the caller.
    """
    h, out = h0, []
    for k, module in enumerate(modules, start=1):
        h, bal = module(h, embed(shift_left(input_ids, k, fill=0)), **block_kwargs)
        out.append((head(module.norm(h)), bal))
    return out


def mtp_loss(modules: nn.ModuleList, embed: nn.Embedding, head: nn.Linear, h0: torch.Tensor,
             input_ids: torch.Tensor, targets: torch.Tensor, mtp_lambda: float, **block_kwargs):
    """Returns ((lambda / D) * sum_k L_k, summed balance losses of the MTP blocks or None).

    targets[i] = t_{i+1} (the main head's labels, -100 = ignore), so depth k's label at
    position i is t_{i+k+1} = targets[i+k]: inputs and labels shift by k together.
    """
    total, balance = 0.0, None
    for k, (logits, bal) in enumerate(mtp_logits(modules, embed, head, h0, input_ids, **block_kwargs), start=1):
        total = total + cross_entropy(logits, shift_left(targets, k, fill=-100))
        if bal is not None:
            balance = bal if balance is None else balance + bal
    return mtp_lambda / len(modules) * total, balance


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy in float32 over labels != -100; 0 (not NaN) when none is valid."""
    labels = labels.flatten()
    total = F.cross_entropy(logits.flatten(0, 1).float(), labels, ignore_index=-100, reduction="sum")
    return total / (labels != -100).sum().clamp(min=1)
