"""Hyper-connections (HC) and manifold-constrained hyper-connections (mHC): docs/design/hyper-connections.md.

The residual stream is widened into n parallel streams x (B, T, n, C). Around every sub-layer F
(attention or FFN; F keeps its own pre-norm over C) a connection reads the streams, runs F once,
and writes back (mHC eq. 3, with H_pre, H_post of shape (1, n) and H_res of shape (n, n)):

    read    h  = H_pre x                       (B, T, C)    a weighted sum of the streams, F's input
    write   x' = H_res x + H_post^T F(h)       (B, T, n, C) streams mixed, F's output added to each

Orientation: H_res[j, i] moves source stream i into destination stream j (rows = destinations).

    plain  x' = x + F(x): n = 1 and every coefficient 1; no parameters, the same ops as ever.
    hc     Hyper-Connections (Zhu et al., arXiv 2409.19606 §2): H_pre = A_m^T, H_res = A_r^T, H_post = B,
           unconstrained. Static part + (optional) dynamic part s * tanh(norm(x) W) per stream.
           Init A_m = e_{k mod n}, A_r = I, B = 1, W = 0: exactly the pre-norm residual.
    mhc    mHC (Xie et al., arXiv 2512.24880): coefficients from ONE RMSNorm over the flattened n*C
           vector (eq. 7), H_pre = sigmoid, H_post = 2 sigmoid, H_res = Sinkhorn-Knopp(exp(.))
           (eq. 8-9): doubly stochastic, so every product of H_res over depth has row and column
           sums 1 and the composite gain stays ~1 where HC's can explode. DeepSeek-V4's variant
           (hc_form = "release") and the dispatch over all forms (make_connection): mhc_release.py.

Streams (docs/design/hyper-connections.md): `expand_streams` replicates the embedding n times (a stride-0 view, no copy);
`collapse_streams` takes the mean of the streams before the final norm. HC sums; the final
RMSNorm makes sum and mean equal up to its eps, and the mean keeps `hidden` (and MTP's h^0) on the
plain model's scale. With H_post = 1 and a row-stochastic (or identity) H_res, every stream stays
equal to the plain residual stream at init, whatever n (mHC: up to eps, as sum(H_pre) != 1 only
rescales F's input, which F's norm undoes). Consequences: the first sub-layer's H_res acts on
equal copies and the last one's is averaged away by the mean (its columns sum to 1), so in mHC
those two never affect the loss and their res coefficients learn nothing.

Numerics: the coefficient math and the stream mixing run in fp32 with autocast off (a bf16 H_res
has row sums off by ~4e-3, which compounds over depth; docs/design/hyper-connections.md, Megatron PR #4483).
Shapes: B batch, T tokens, n streams, C model dim; k = sub-layer index (2 per block).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .norm import upcast

# mHC bias init (docs/design/hyper-connections.md; the paper gives only alpha = 0.01). All three keep the model equal to the
# plain residual at init (identical streams), break the symmetry between streams, and keep every
# projection away from saturation so phi, alpha and b all learn:
MHC_PRE_LOGIT = 1.0  # b_pre = +1 on stream k mod n, -1 elsewhere: H_pre = 0.731 / 0.269, HC's
#                      A_m = e_{k mod n} softened. Symmetric b_pre would leave the streams identical
#                      forever (each H_res then maps equal streams to equal streams: no gradient).
MHC_RES_LOGIT = 2.0  # b_res = 2 I: Sinkhorn(exp(2I)) is exact at once, diagonal e^2/(e^2+n-1) =
#                      0.711 for n = 4: mostly identity, as HC's A_r = I, while the softmax-like
#                      slope p(1-p) = 0.21 stays near its 0.25 maximum. b_res = 8-10 I would be
#                      ~I but saturated (tokenbender/mHC #2: "H_res stays at identity").
#                      b_post = 0: H_post = 2 sigmoid(0) = 1, F's output added to every stream as in
#                      the plain residual, at sigmoid's steepest point.
LOGIT_RANGE_CAP = 40.0  # Sinkhorn: logits more than 40 below their matrix's max are raised to it


# --- Sinkhorn-Knopp -------------------------------------------------------------------------

def _tokens_last(t: torch.Tensor) -> torch.Tensor:
    """(..., n, n) -> contiguous (n, n, N): the 2 * iters reductions over n = 4 then run along
    contiguous memory, ~5x faster on CPU than reducing a trailing dim of size 4."""
    n = t.shape[-1]
    return t.reshape(-1, n, n).permute(1, 2, 0).contiguous()


def _exp_shifted(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z (n, n, N) -> (exp(z - max) with the range capped, the mask of uncapped entries).

    Subtracting each matrix's max changes nothing (the first column normalisation cancels any
    common factor) but keeps exp from overflowing. Capping the range at 40 keeps every entry of
    every iterate >= e^-80 / n^3 > fp32's smallest normal (Sinkhorn preserves the cross-ratios
    M_ji M_kl / (M_jl M_ki) of exp(z)), so no sum below can be 0 and the loop needs no guard; an
    entry e^-40 below the max is 4e-18 of it, so the cap changes nothing measurable.
    """
    z = z - z.detach().amax(dim=(0, 1), keepdim=True)
    return torch.exp(z.clamp_min(-LOGIT_RANGE_CAP)), z >= -LOGIT_RANGE_CAP


def sinkhorn_loop(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """(..., n, n) logits -> doubly stochastic (..., n, n): M = exp(logits), then `iters` times
    column-normalise, row-normalise (mHC eq. 9, linear domain). Plain autograd: the reference twin.

    The last step normalises rows, so row sums are exact; column sums converge with iters, and how
    fast depends on the logit scale. n = 4, 20 iters, 2000 random matrices per row, fp32 (fp64
    within 2x), max |column sum - 1| (median):
        logit std   0.01       1              2              4              8
        column err  1e-7 (0)   1e-3 (<1e-6)   3e-2 (1e-6)    7e-2 (3e-3)    2e-1 (3e-2)
    mHC's logits start at b_res = 2I (exact at once) and move by alpha * x'phi, alpha ~ 0.01.
    """
    m, _ = _exp_shifted(_tokens_last(logits))  # (n, n, N): [destination j, source i, token]
    for _ in range(iters):
        m = m / m.sum(dim=0, keepdim=True)  # T_c: every column (sum over destinations j) is 1
        m = m / m.sum(dim=1, keepdim=True)  # T_r: every row (sum over sources i) is 1
    return m.permute(2, 0, 1).reshape(logits.shape)


class _SinkhornRecompute(torch.autograd.Function):
    """Sinkhorn whose backward recomputes the iterations instead of storing them.

    Autograd through the loop keeps 2 * iters matrices and their sums per sub-layer per token until
    backward: 20 iterations store ~40 n x n matrices, about the bytes of the n * C streams
    themselves at C = 256. Here only the logits are kept; backward replays the loop for one
    sub-layer at a time (transient memory) and runs the chain rule by hand: for out = m / s with
    s = sum_dim m, dL/dm = (g - sum_dim(g * out)) / s. Same gradient as autograd through
    `sinkhorn_loop` (tests: gradcheck in fp64, and against the loop), ~2x faster on CPU.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, iters: int) -> torch.Tensor:
        ctx.iters = iters
        ctx.save_for_backward(logits)
        return sinkhorn_loop(logits, iters)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (logits,) = ctx.saved_tensors
        m0, live = _exp_shifted(_tokens_last(logits))
        m, steps = m0, []
        for _ in range(ctx.iters):
            for dim in (0, 1):
                s = m.sum(dim=dim, keepdim=True)
                m = m / s
                steps.append((dim, m, s))
        g = _tokens_last(grad)
        for dim, out, s in reversed(steps):
            g = (g - (g * out).sum(dim=dim, keepdim=True)) / s
        g = g * m0 * live  # through exp and the range cap; the max shift is a constant
        return g.permute(2, 0, 1).reshape(logits.shape), None


def sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Doubly stochastic projection of exp(logits) (..., n, n); memory-light backward."""
    return _SinkhornRecompute.apply(logits, iters)


# --- streams ---------------------------------------------------------------------------------

def expand_streams(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, T, C) -> (B, T, n, C): n copies of the embedding (HC's H^0), a view without a copy."""
    return x.unsqueeze(-2).expand(*x.shape[:-1], n, x.shape[-1])


def collapse_streams(x: torch.Tensor) -> torch.Tensor:
    """(B, T, n, C) -> (B, T, C): the mean of the streams, fed to the final norm (see header)."""
    return x.mean(dim=-2)


class Mix(NamedTuple):
    """What a connection's read hands to its write (and what the gain instrumentation records)."""

    h: torch.Tensor  # (B, T, C) the sub-layer input H_pre x, in the model dtype
    x: torch.Tensor  # (B, T, n, C) the streams as they came in; plain: (B, T, C)
    h_res: torch.Tensor | None  # (B, T, n, n) or (n, n) when static; [destination, source]
    h_post: torch.Tensor | None  # (B, T, n) or (n,)
    xs: torch.Tensor | None = None  # (B*T, n, C) the streams in fp32, contiguous, shared by read and write


def _no_autocast(x: torch.Tensor):
    return torch.autocast(x.device.type, enabled=False)


def _per_token(c: torch.Tensor, lead: torch.Size) -> torch.Tensor:
    """Coefficients (B, T, p, q), or static (p, q), as contiguous (B*T, p, q) for torch.bmm."""
    return c.expand(*lead, *c.shape[-2:]).reshape(-1, *c.shape[-2:]).contiguous()


class _StreamWrite(torch.autograd.Function):
    """out = H_res x + H_post y for every token, (N, n, n) (N, n, 1) (N, n, C) (N, 1, C) -> (N, n, C).

    Autograd would build the (N, n, C) product H_post * y and reduce it twice more in backward; the
    streams are the widest tensors here, so on CPU each pass over them costs about as much as the
    arithmetic. This keeps every pass a bmm: two forward, four backward, and saves only tensors
    that are saved anyway (x, shared with the read) or small (y is one stream wide).
    """

    @staticmethod
    def forward(ctx, h_res, h_post, x, y):
        ctx.save_for_backward(h_res, h_post, x, y)
        return torch.bmm(h_res, x).baddbmm_(h_post, y)  # the rank-1 update is in place

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        h_res, h_post, x, y = ctx.saved_tensors
        need = ctx.needs_input_grad
        return (torch.bmm(g, x.transpose(1, 2)) if need[0] else None,
                torch.bmm(g, y.transpose(1, 2)) if need[1] else None,
                torch.bmm(h_res.transpose(1, 2), g) if need[2] else None,
                torch.bmm(h_post.transpose(1, 2), g) if need[3] else None)


class _ScaledProjection(torch.autograd.Function):
    """mHC eqs. 14-15: (x phi^T) / rms(x), x (N, nC), phi (m, nC) -> (N, m), multiplying first so
    that no normalised copy of x exists. Backward in two passes over x (autograd: ~five), from
    d rms^-1 / dx = -x rms^-3 / nC."""

    @staticmethod
    def forward(ctx, x, phi, eps: float):
        lin = x @ phi.t()  # (N, m)
        inv_rms = torch.rsqrt(torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() / x.shape[-1] + eps)
        ctx.save_for_backward(x, phi, lin, inv_rms)
        return lin * inv_rms

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, phi, lin, inv_rms = ctx.saved_tensors
        g_lin = g * inv_rms  # (N, m)
        s = (g * lin).sum(-1, keepdim=True) * inv_rms.pow(3) / -x.shape[-1]  # (N, 1)
        grad_x = (x * s).addmm_(g_lin, phi) if ctx.needs_input_grad[0] else None  # in place: no copy
        grad_phi = g_lin.t() @ x if ctx.needs_input_grad[1] else None
        return grad_x, grad_phi, None


class Residual(nn.Module):
    """The plain pre-norm residual as a connection: read x, write x + F(x). No parameters."""

    def forward(self, x: torch.Tensor) -> Mix:
        return Mix(x, x, None, None)

    def write(self, mix: Mix, y: torch.Tensor) -> torch.Tensor:
        return mix.x + y


class StreamConnection(nn.Module):
    """Base of HC and mHC: the shared read/write arithmetic; each subclass computes coefficients
    in forward and initialises them in reset_parameters (called by Transformer.init_weights)."""

    def reset_parameters(self, std: float) -> None:
        raise NotImplementedError

    def write(self, mix: Mix, y: torch.Tensor) -> torch.Tensor:
        B, T, n, C = mix.x.shape
        with _no_autocast(y):
            out = _StreamWrite.apply(_per_token(mix.h_res, (B, T)), _per_token(mix.h_post.unsqueeze(-1), (B, T)),
                                     mix.xs, upcast(y).reshape(-1, 1, C))  # (BT, n, C)
        return out.view(B, T, n, C).to(torch.promote_types(y.dtype, mix.x.dtype))  # as plain's x + y

    @staticmethod
    def _read(x, xs, h_pre, h_res, h_post) -> Mix:
        """x (B, T, n, C) as given, xs its contiguous fp32 copy (the same tensor for fp32 x)."""
        B, T, n, C = x.shape
        xs = xs.view(-1, n, C)  # (BT, n, C)
        h = torch.bmm(_per_token(h_pre.unsqueeze(-2), (B, T)), xs).view(B, T, C)  # H_pre x
        return Mix(h.type_as(x), x, h_res, h_post, xs)


class HyperConnection(StreamConnection):
    """HC (HC §2.1-2.2): h_0 = A_m^T H;  H' = A_r^T H + B^T F(h_0).

    Static: A_m (n,), A_r (n, n) [source, destination], B (n,). Dynamic, per stream i from
    H_bar = RMSNorm(H) over C (the paper's pseudo-code uses a LayerNorm; RMSNorm is this model's
    norm, and without a weight, which W would absorb): A_m[i] += s_alpha tanh(H_bar_i W_m),
    A_r[i, :] += s_alpha tanh(H_bar_i W_r), B[i] += s_beta tanh(H_bar_i W_beta), where
    W = [W_beta | W_m | W_r] (C, 2 + n) is one matmul. Parameters per connection: static n(n + 2),
    dynamic C(n + 2) + n(n + 2) + 2 (docs/design/hyper-connections.md).
    Static parts are usually trained without weight decay, dynamic parts with (HC §4).
    """

    def __init__(self, cfg: ModelConfig, k: int):
        super().__init__()
        n, self.k, self.dynamic = cfg.hc_streams, k, cfg.hc_dynamic
        self.alpha_init, self.eps = cfg.hc_alpha_init, cfg.norm_eps
        self.a_m = nn.Parameter(torch.empty(n))
        self.a_r = nn.Parameter(torch.empty(n, n))
        self.b = nn.Parameter(torch.empty(n))
        if self.dynamic:
            self.w = nn.Parameter(torch.empty(cfg.dim, 2 + n))
            self.s_alpha = nn.Parameter(torch.empty(()))
            self.s_beta = nn.Parameter(torch.empty(()))

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        """HC §2.3: A_m = e_{k mod n}, A_r = I, B = 1, W = 0, s = alpha_init: exactly pre-norm.
        No sqrt(n) rescaling of the output layers (docs/design/hyper-connections.md): with replicated streams and a mean
        collapse this network at init IS the plain one, so plain's init std is the baseline std."""
        n = self.a_m.numel()
        self.a_m.copy_(F.one_hot(torch.tensor(self.k % n), n).float())
        self.a_r.copy_(torch.eye(n))
        self.b.fill_(1.0)
        if self.dynamic:
            self.w.zero_()
            self.s_alpha.fill_(self.alpha_init)
            self.s_beta.fill_(self.alpha_init)

    def forward(self, x: torch.Tensor) -> Mix:
        """x (B, T, n, C) -> Mix with h (B, T, C)."""
        with _no_autocast(x):
            xs = upcast(x).contiguous()  # copies only bf16 streams or the stride-0 embedding view
            a_m, a_r, b = upcast(self.a_m), upcast(self.a_r), upcast(self.b)
            if self.dynamic:
                # tanh(RMSNorm(H_i) W) per stream i, fused as mHC's (the norm over C, one row per stream)
                proj = _ScaledProjection.apply(xs.view(-1, xs.shape[-1]), upcast(self.w).t(), self.eps)
                d = torch.tanh(proj).view(*xs.shape[:-1], -1)  # (B, T, n, 2 + n), row i from stream i
                b = b + self.s_beta * d[..., 0]  # (B, T, n)
                a_m = a_m + self.s_alpha * d[..., 1]  # (B, T, n)
                a_r = a_r + self.s_alpha * d[..., 2:]  # (B, T, n, n) [source i, destination j]
            return self._read(x, xs, a_m, a_r.transpose(-1, -2), b)


class ManifoldHyperConnection(StreamConnection):
    """mHC (mHC eqs. 7-9), in the fused form of eqs. 14-16:

        r = ||vec(x)||_2 / sqrt(nC)                           RMSNorm over all n*C entries; its
        [pre | post | res] = (vec(x) phi^T) / r                weight is absorbed into phi
        H_pre  = sigmoid(alpha_pre * pre + b_pre)              (B, T, n)     in (0, 1)
        H_post = 2 sigmoid(alpha_post * post + b_post)         (B, T, n)     in (0, 2)
        H_res  = Sinkhorn(alpha_res * mat(res) + b_res)        (B, T, n, n)  doubly stochastic

    phi (n^2 + 2n, nC) is stored as a Linear weight, the paper's phi transposed; alpha = (alpha_pre,
    alpha_post, alpha_res). With hc_dynamic off there is no phi and no alpha: static mHC, H = f(b).
    Init (docs/design/hyper-connections.md): phi ~ N(0, init_std) like every matrix, alpha = hc_alpha_init, b as
    MHC_PRE_LOGIT / MHC_RES_LOGIT above.
    """

    def __init__(self, cfg: ModelConfig, k: int):
        super().__init__()
        n, self.n, self.k, self.dynamic = cfg.hc_streams, cfg.hc_streams, k, cfg.hc_dynamic
        self.iters, self.eps, self.alpha_init = cfg.hc_sinkhorn_iters, cfg.norm_eps, cfg.hc_alpha_init
        self.b_pre = nn.Parameter(torch.empty(n))
        self.b_post = nn.Parameter(torch.empty(n))
        self.b_res = nn.Parameter(torch.empty(n, n))
        if self.dynamic:
            self.phi = nn.Parameter(torch.empty(n * n + 2 * n, n * cfg.dim))
            self.alpha = nn.Parameter(torch.empty(3))

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        n = self.n
        self.b_pre.copy_(torch.where(torch.arange(n) == self.k % n, MHC_PRE_LOGIT, -MHC_PRE_LOGIT))
        self.b_post.zero_()
        self.b_res.copy_(MHC_RES_LOGIT * torch.eye(n))
        if self.dynamic:
            nn.init.normal_(self.phi, std=std)
            self.alpha.fill_(self.alpha_init)

    def coefficients(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, n, C) fp32 -> H_pre (B, T, n), H_post (B, T, n), H_res (B, T, n, n); static: (n,), (n,), (n, n)."""
        pre, post, res = self.logits(x)
        return torch.sigmoid(pre), 2 * torch.sigmoid(post), sinkhorn(res, self.iters)

    def logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, n, C) fp32 -> alpha * (x phi^T / r) + b, split: pre (B, T, n), post (B, T, n), res (B, T, n, n)."""
        n = self.n
        pre, post, res = upcast(self.b_pre), upcast(self.b_post), upcast(self.b_res)
        if self.dynamic:
            mix = _ScaledProjection.apply(x.flatten(-2).flatten(0, -2), upcast(self.phi), self.eps)  # (BT, n^2 + 2n)
            mix = mix.view(*x.shape[:-2], -1)
            d_pre, d_post, d_res = mix.split([n, n, n * n], dim=-1)
            alpha = upcast(self.alpha)
            pre = alpha[0] * d_pre + pre
            post = alpha[1] * d_post + post
            res = alpha[2] * d_res.unflatten(-1, (n, n)) + res
        return pre, post, res

    def forward(self, x: torch.Tensor) -> Mix:
        """x (B, T, n, C) -> Mix with h (B, T, C)."""
        with _no_autocast(x):
            xs = upcast(x).contiguous()  # copies only bf16 streams or the stride-0 embedding view
            h_pre, h_post, h_res = self.coefficients(xs)
            return self._read(x, xs, h_pre, h_res, h_post)


STATIC_NAMES = ("a_m", "a_r", "b", "b_pre", "b_post", "b_res")


def static_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The static coefficients (HC's A_m, A_r, B; mHC's b): train them without weight decay (HC
    §4), which would pull A_r = I toward 0 (a vanishing residual) and b_res toward uniform mixing."""
    return [p for m in model.modules() if isinstance(m, StreamConnection)
            for name, p in m.named_parameters() if name in STATIC_NAMES]


# --- instrumentation ---------------------------------------------------------------------------

@torch.no_grad()
def composite_gains(model: nn.Module, input_ids: torch.Tensor) -> dict:
    """Amax gain magnitude of the composite residual mapping (mHC §3.1, Fig. 3).

    One forward over input_ids (B, T) records H_res of every sub-layer of the main model (the
    attention and the FFN of each block count as two depths; the MTP blocks are left out). At depth
    l the composite is P_l = H_res_l ... H_res_2 H_res_1 (B, T, n, n), in float64; per token,
    forward gain = max_j sum_i |P_l[j, i]| (max absolute row sum, how much a signal can grow on the
    way up) and backward gain = max_i sum_j |P_l[j, i]| (max absolute column sum, the same for
    gradients), each averaged over the B * T tokens. Returns

        {"hc_gain_fwd": max over depth, "hc_gain_bwd": max over depth,
         "fwd_per_depth": [2 * n_layers floats], "bwd_per_depth": [...]}

    The forward runs in eval mode (so MoE load counters are not touched) and restores the modes.
    """
    if model.config.residual == "plain":
        raise ValueError("composite gains need residual='hc' or 'mhc'; the plain residual's is 1 by construction")
    conns = [c for layer in model.layers for c in (layer.attn_conn, layer.ffn_conn)]
    mats: list[torch.Tensor] = []
    hooks = [c.register_forward_hook(lambda mod, args, out: mats.append(out.h_res)) for c in conns]
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        model(input_ids)
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes:
            m.training = mode
    B, T = input_ids.shape
    n = model.config.hc_streams
    prod = torch.eye(n, dtype=torch.float64, device=input_ids.device).expand(B, T, n, n)
    fwd, bwd = [], []
    for h_res in mats:
        prod = h_res.double().expand(B, T, n, n) @ prod  # later sub-layers multiply on the left
        a = prod.abs()
        fwd.append(a.sum(-1).amax(-1).mean().item())
        bwd.append(a.sum(-2).amax(-1).mean().item())
    return {"hc_gain_fwd": max(fwd), "hc_gain_bwd": max(bwd), "fwd_per_depth": fwd, "bwd_per_depth": bwd}


__all__ = ["sinkhorn", "sinkhorn_loop", "expand_streams", "collapse_streams", "Mix", "Residual", "StreamConnection",
           "HyperConnection", "ManifoldHyperConnection", "static_parameters", "composite_gains"]
