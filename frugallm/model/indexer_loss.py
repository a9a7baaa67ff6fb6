"""The lightning indexer's training loss: DeepSeek-V3.2 §2.1.1 (continued pre-training); docs/design/dsa.md.

The indexer learns to score keys as the main attention weighs them. For query token t of one layer:

    p[t, :] = sum_h P[h, t, :] / || sum_h P[h, t, :] ||_1       the main attention's distribution, summed
                                                                over its heads and L1-normalised (a target:
                                                                detached, it trains nothing)
    L^I     = sum_t KL( p[t, S_t] || Softmax(I[t, S_t]) )

S_t is the set of keys the main attention ran over: in the dense warm-up every key query t may see (the
causal mask), in the sparse stage only its top-k keys (the indexer's own selection), where the attention
probabilities P are already 0 outside S_t. Both stages are one function of (P, I, mask).

Here the sum over t is a mean over the B * S query tokens (one layer's loss does not grow with the batch
or the sequence, like the LM loss beside it); the model sums the layers' losses (transformer.py).

Shapes: B batch, H heads, S queries, T keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

STAGES = ("warmup", "sparse")  # V3.2 §2.1.1: the dense warm-up, then sparse training


def attention_target(probs: torch.Tensor) -> torch.Tensor:
    """probs (B, H, S, T), each row a softmax -> p (B, S, T) float32: summed over heads, L1-normalised
    per query, detached. Rows of masked keys hold exact zeros, and stay 0."""
    p = probs.detach().float().sum(dim=1)
    return p / p.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)


def indexer_kl(target: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over queries of KL(target[b, t, S_t] || Softmax(scores[b, t, S_t])), a float32 scalar.

    target (B, S, T): a distribution per query over S_t (attention_target), 0 outside it; scores (B, S, T)
    the indexer's I, with autograd; mask (S, T) or (B, S, T) bool, True on S_t (None: every key).
    KL = sum_s p log p - p log q, with 0 log 0 = 0: masked keys (p = 0, log q = -inf) add nothing.
    Its gradient with respect to I[t, s] is Softmax(I)[t, s] - p[t, s] on S_t and 0 elsewhere.
    """
    scores = scores.float()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    log_q = F.log_softmax(scores, dim=-1)
    if mask is not None:  # -inf there; p is 0 there, and 0 * -inf would be NaN
        log_q = log_q.masked_fill(~mask, 0.0)
    kl = torch.xlogy(target, target) - target * log_q  # (B, S, T)
    return kl.sum(dim=-1).mean()
