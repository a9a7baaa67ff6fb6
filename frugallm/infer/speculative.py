"""Self-speculative decoding with the model's own MTP modules (V3 §5.4.3; docs/design/mtp.md).

One step: MTP depth k drafts the token k places past the last verified one; the main model
runs over [last verified token, d_1 .. d_D] in ONE forward (D+1 positions), which yields its own
prediction at every draft position plus one more; `accept` keeps the longest agreeing prefix
and adds one token of the main model's, so each step emits 1..D+1 tokens.

Exactness. Greedy: a draft is kept iff it equals the main model's argmax, so the output is
token-identical to plain greedy decoding. Sampling (SpecDec): keep draft x with probability
min(1, p(x)/q(x)), else draw from normalise(max(0, p - q)); every emitted token is then
distributed exactly as p, the main model's sampling distribution.

Batches advance in lockstep: a step emits n+1 tokens for every row, n = the fewest drafts any
row accepted. A row that accepted more still emits a correct token at n+1 (its accepted draft),
so this costs speed, never exactness.

Drafting state. MTP depth k at position i reads h^{k-1}_i and Emb(t_{i+k}); it has its own latent
cache. Its inputs are final only where t_{i+k} is a verified token, i.e. for i < N - k (N tokens
verified), so each depth re-runs from its first not-final position every step. The hidden
states h^{k-1} of every position are kept in `hist` for that.
"""

from __future__ import annotations

import torch

from .caches import new_cache, set_lengths
from .sampling import greedy, probs


def accept(target_logits: torch.Tensor, drafts: torch.Tensor, draft_probs: torch.Tensor | None,
           temperature: float, top_k: int | None, top_p: float | None,
           generator: torch.Generator | None) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Verify D drafts per row against the main model.

    target_logits (B, D+1, V): main-model logits at [last verified, d_1, .., d_D];
    drafts (B, D); draft_probs (B, D, V) the drafts' sampling distributions (None when greedy).
    Returns (n, next_token (B,), accepted (B,)): every row keeps drafts[:, :n] then next_token;
    accepted[b] is how many drafts row b alone would have kept.
    """
    B, D = drafts.shape
    if temperature <= 0:
        target = greedy(target_logits)  # (B, D+1)
        agree = drafts == target[:, :D]
        accepted = agree.long().cumprod(dim=1).sum(dim=1)
        n = int(accepted.min()) if D else 0
        return n, target[:, n], accepted
    p = probs(target_logits, temperature, top_k, top_p)  # (B, D+1, V)
    if D == 0:
        return 0, torch.multinomial(p[:, 0], 1, generator=generator).squeeze(-1), torch.zeros(B, dtype=torch.long)
    p_x = p[:, :D].gather(-1, drafts[..., None]).squeeze(-1)  # (B, D)
    q_x = draft_probs.gather(-1, drafts[..., None]).squeeze(-1)
    u = torch.rand(B, D, generator=generator, device=p.device)
    keep = u * q_x < p_x  # u < p/q without dividing by a zero q
    accepted = keep.long().cumprod(dim=1).sum(dim=1)
    n = int(accepted.min())
    if n == D:  # every row kept every draft: the bonus token comes from p at the last position
        return n, torch.multinomial(p[:, D], 1, generator=generator).squeeze(-1), accepted
    residual = (p[:, n] - draft_probs[:, n]).clamp(min=0)
    mass = residual.sum(dim=-1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p[:, n])  # p == q exactly: nothing to fix
    resampled = torch.multinomial(residual, 1, generator=generator).squeeze(-1)
    return n, torch.where(accepted > n, drafts[:, n], resampled), accepted


class Drafter:
    """Per-depth MTP caches and hidden-state history for one batch of B sequences."""

    def __init__(self, model, batch_size: int, max_len: int, dtype: torch.dtype, device, mtp_step=None):
        """mtp_step: runs the MTP modules instead of `model.mtp_step` (e.g. a compiled one)."""
        cfg = model.config
        self.mtp_step, self.D = mtp_step or model.mtp_step, cfg.n_mtp
        # depth k's block is block n_layers + k of the config (V4: its own kind in layer_types)
        self.caches = [new_cache(model, batch_size, max_len, n_layers=1, first=cfg.n_layers + k, rewindable=True)
                       for k in range(self.D)]
        # hist[k] (B, max_len, d): h^k at every position, the input of depth k+1 (hist[0]: main model)
        self.hist = [torch.zeros(batch_size, max_len, cfg.dim, dtype=dtype, device=device) for _ in range(self.D)]
        self.final = [torch.zeros(batch_size, dtype=torch.long, device=device) for _ in range(self.D)]

    def record(self, positions: torch.Tensor, hidden: torch.Tensor) -> None:
        """Store the main model's hidden states (B, S, d) at positions (B, S)."""
        rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
        self.hist[0][rows, positions] = hidden

    def draft(self, seq: torch.Tensor, n_verified: torch.Tensor, n_drafts: int, temperature: float,
              top_k: int | None, top_p: float | None, generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Write drafts d_1..d_n into seq at positions N..N+n-1 (N = n_verified (B,)); return them (B, n)
        and their sampling distributions (B, n, V) (None when greedy).

        Depth k (1-based) runs over positions [final_k, N-2]; its output at N-2 drafts the token at
        N-1+k. Windows are equally wide for every row (ragged only on the first call, after a
        prefill of prompts of different lengths: shorter rows then run a few junk positions past
        N-2, whose outputs are ignored and whose cache slots are overwritten later).
        """
        rows = torch.arange(seq.shape[0], device=seq.device)[:, None]
        drafts, dists = [], []
        for k in range(1, n_drafts + 1):
            cache, start = self.caches[k - 1], self.final[k - 1]
            width = int((n_verified - 1 - start).max())
            idx = start[:, None] + torch.arange(width, device=seq.device)  # (B, W)
            set_lengths(cache, start)
            h, logits = self.mtp_step(k - 1, self.hist[k - 1][rows, idx], seq.gather(1, idx + k), cache,
                                      absorb=width <= self.D + 1,
                                      logits_at=(n_verified - 2 - start)[:, None])  # at position N-2
            if k < self.D:
                self.hist[k][rows, idx] = h
            last = logits[:, 0]  # (B, V)
            if temperature <= 0:
                token, dist = greedy(last), None
            else:
                dist = probs(last, temperature, top_k, top_p)
                token = torch.multinomial(dist, 1, generator=generator).squeeze(-1)
                dists.append(dist)
            seq[rows[:, 0], n_verified - 1 + k] = token
            drafts.append(token)
            self.final[k - 1] = n_verified - k  # positions < N-k had verified inputs only
        return torch.stack(drafts, dim=1), (torch.stack(dists, dim=1) if dists else None)
