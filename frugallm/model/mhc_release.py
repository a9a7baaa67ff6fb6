"""mHC as DeepSeek-V4 ships it (`hc_form = "release"`): docs/design/hyper-connections.md, "As V4 ships it".

The release keeps the paper's fused coefficients (one RMSNorm over the flattened n*C streams, no
weight, and one projection split into [pre | post | res]; mHC eqs. 14-15) and changes the maps and
the end of the stack. With z = alpha * (x phi^T / r) + b, hc_eps = `hc_eps` (1e-6):

    H_pre  = sigmoid(z_pre) + hc_eps                      (B, T, n)     in (eps, 1 + eps)
    H_post = 2 sigmoid(z_post)                            (B, T, n)     in (0, 2), no eps
    H_res  = Sinkhorn_eps(z_res)                          (B, T, n, n)

    Sinkhorn_eps, in this file's orientation H_res[destination j, source i]:
        M = softmax over destinations (each column) + hc_eps    the first column normalisation
        M = M / (row sum + hc_eps)
        hc_sinkhorn_iters - 1 times: M = M / (column sum + hc_eps); M = M / (row sum + hc_eps)

So the release runs the paper's column-then-row order for the same number of rounds (mHC eq. 9),
with its first column normalisation done by the softmax, hc_eps added after the softmax and to
every denominator, and no logit range cap (the softmax subtracts each column's max). The release
writes its mixing as `In @ Comb` with Comb[source, destination]: the res logits (b_res and phi's
res rows, stored in that order so the release's tensors copy unchanged) are transposed into
H_res = Comb^T before Sinkhorn, and the last step (a row normalisation here, a column one there)
makes the forward gain exact up to hc_eps, as in the paper form.

The stack ends in a hyper head instead of the mean: h = sum_i (sigmoid(alpha x phi_h^T / r + b)_i
+ hc_eps) x_i with its own phi_h (n, nC), b (n) and a single alpha, then the final norm.

Init (transformers' DeepseekV4 `_init_weights`; the release paper gives none): phi ~ N(0, init_std),
alpha = 1, b = 0, for every connection and the head. hc_alpha_init is the paper form's only. Streams
stay distinct from step 0 because phi's rows differ. Numerics: coefficients in fp32 as the release;
the stream mixing also in fp32 (the release casts post and Comb to the model dtype first), so fp32
models match it exactly and bf16 ones within bf16 rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .hyperconn import (HyperConnection, ManifoldHyperConnection, Residual, StreamConnection, _no_autocast,
                        _ScaledProjection, _tokens_last)
from .norm import upcast


# --- Sinkhorn as released -------------------------------------------------------------------

def sinkhorn_release_loop(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """(..., n, n) logits [destination, source] -> H_res (..., n, n): Sinkhorn_eps above, by plain
    autograd (the reference twin of `sinkhorn_release`). Layout (n, n, N) as hyperconn's loop."""
    m = torch.softmax(_tokens_last(logits), dim=0) + eps  # columns: softmax over destinations j
    m = m / (m.sum(dim=1, keepdim=True) + eps)  # rows: sum over sources i
    for _ in range(iters - 1):
        m = m / (m.sum(dim=0, keepdim=True) + eps)
        m = m / (m.sum(dim=1, keepdim=True) + eps)
    return m.permute(2, 0, 1).reshape(logits.shape)


class _ReleaseSinkhornRecompute(torch.autograd.Function):
    """`sinkhorn_release_loop` keeping only its logits; backward replays the loop (as hyperconn's
    _SinkhornRecompute). For out = m / (s + eps), s = sum_dim m: dL/dm = (g - sum_dim(g * out)) / (s + eps);
    through the softmax p: dL/dz = p (g - sum_0(g p)); the added eps passes g unchanged."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
        ctx.iters, ctx.eps = iters, eps
        ctx.save_for_backward(logits)
        return sinkhorn_release_loop(logits, iters, eps)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (logits,) = ctx.saved_tensors
        eps = ctx.eps
        p = torch.softmax(_tokens_last(logits), dim=0)
        m, steps = p + eps, []
        for dim in (1,) + (0, 1) * (ctx.iters - 1):
            s = m.sum(dim=dim, keepdim=True) + eps
            m = m / s
            steps.append((dim, m, s))
        g = _tokens_last(grad)
        for dim, out, s in reversed(steps):
            g = (g - (g * out).sum(dim=dim, keepdim=True)) / s
        g = p * (g - (g * p).sum(dim=0, keepdim=True))
        return g.permute(2, 0, 1).reshape(logits.shape), None, None


def sinkhorn_release(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """The release's doubly stochastic map of (..., n, n) logits [destination, source]; memory-light backward."""
    return _ReleaseSinkhornRecompute.apply(logits, iters, eps)


# --- connections ------------------------------------------------------------------------------

class ReleaseManifoldHyperConnection(ManifoldHyperConnection):
    """mHC with the release's maps (header). The paper form's parameters, in the release's layout:
    phi (n^2 + 2n, nC) = `fn`, alpha (3,) = `scale`, [b_pre | b_post | b_res.flatten()] = `base`,
    with b_res and phi's res rows in the release's [source, destination] order."""

    def __init__(self, cfg: ModelConfig, k: int):
        super().__init__(cfg, k)
        self.hc_eps = cfg.hc_eps

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        self.b_pre.zero_()
        self.b_post.zero_()
        self.b_res.zero_()
        if self.dynamic:
            nn.init.normal_(self.phi, std=std)
            self.alpha.fill_(1.0)

    def coefficients(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, n, C) fp32 -> H_pre (B, T, n), H_post (B, T, n), H_res (B, T, n, n) [destination, source]."""
        pre, post, res = self.logits(x)
        h_res = sinkhorn_release(res.transpose(-1, -2), self.iters, self.hc_eps)
        return torch.sigmoid(pre) + self.hc_eps, 2 * torch.sigmoid(post), h_res


class HyperHead(StreamConnection):
    """The release's final collapse (B, T, n, C) -> (B, T, C), before the final norm: a read with
    no sub-layer after it, so it has no write. phi (n, nC) = `hc_fn`, b_pre (n,) = `hc_base`,
    alpha (1,) = `hc_scale`; with hc_dynamic off only b_pre."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n, self.dynamic, self.eps, self.hc_eps = cfg.hc_streams, cfg.hc_dynamic, cfg.norm_eps, cfg.hc_eps
        self.b_pre = nn.Parameter(torch.empty(n))
        if self.dynamic:
            self.phi = nn.Parameter(torch.empty(n, n * cfg.dim))
            self.alpha = nn.Parameter(torch.empty(1))

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        self.b_pre.zero_()
        if self.dynamic:
            nn.init.normal_(self.phi, std=std)
            self.alpha.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, n, C = x.shape
        with _no_autocast(x):
            xs = upcast(x).contiguous().view(-1, n, C)  # (BT, n, C)
            z = upcast(self.b_pre)
            if self.dynamic:
                z = upcast(self.alpha) * _ScaledProjection.apply(xs.view(-1, n * C), upcast(self.phi), self.eps) + z
            pre = torch.sigmoid(z) + self.hc_eps  # (BT, n), or (n,) static
            h = torch.bmm(pre.expand(B * T, n).unsqueeze(1), xs)  # (BT, 1, C)
        return h.view(B, T, C).type_as(x)

    def write(self, mix, y):
        raise TypeError("the hyper head ends the stack: it reads the streams and writes none")


# --- the model's choice -------------------------------------------------------------------------

CONNECTIONS = {"hc": HyperConnection, "mhc": ManifoldHyperConnection}


def make_connection(cfg: ModelConfig, k: int) -> nn.Module:
    """The connection around sub-layer k (attention of block l is k = 2l, its FFN k = 2l + 1)."""
    if cfg.residual == "plain":
        return Residual()
    if cfg.residual == "mhc" and cfg.hc_form == "release":
        return ReleaseManifoldHyperConnection(cfg, k)
    return CONNECTIONS[cfg.residual](cfg, k)


def make_hyper_head(cfg: ModelConfig) -> HyperHead | None:
    """The release's final collapse, or None where the stack ends in the mean (hyperconn.collapse_streams)."""
    return HyperHead(cfg) if cfg.residual == "mhc" and cfg.hc_form == "release" else None


__all__ = ["sinkhorn_release", "sinkhorn_release_loop", "ReleaseManifoldHyperConnection", "HyperHead",
           "make_connection", "make_hyper_head"]
