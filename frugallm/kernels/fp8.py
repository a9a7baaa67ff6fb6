"""Fine-grained FP8 (V3 §3.3; docs/design/fp8.md): the quantisers.

Every tensor is E4M3 (max 448) with an fp32 scale per group, from the current max-abs (online
scaling: no amax history). The scale is the DEQUANT multiplier, as in DeepSeek's kernels and
checkpoints:

    s = max(amax, 1e-4) / 448          (ue8m0: s = 2^ceil(log2 s), a power of two rounded UP)
    q = e4m3(clamp(x / s, -448, 448))  round-to-nearest-even;  x ~= q * s

The 1e-4 floor makes an all-zero group give s = 1e-4/448 and q = 0: never inf or NaN. The clamp
is explicit (docs/design/fp8.md: do not rely on the cast saturating).

Groups, with their shapes:
    act_quant     x (..., K)   1 x 128 tiles along the LAST dim   -> s (..., ceil(K/128))
    weight_quant  W (N, K)     128 x 128 blocks                   -> s (ceil(N/128), ceil(K/128))
Ragged edges (K or N not a multiple of 128) are zero-padded to a full group before the max-abs
(zeros never raise it, so the scale is that of the real elements) and the padding is dropped
from the codes: q keeps the input's shape. This is the layout of DeepSeek's `weight_scale_inv`
(docs/design/hf-interop.md); the reference act_quant instead requires K % 128 == 0.

A 128 x 1 group (a column tile along tokens, for the Wgrad GEMM) is act_quant of the
transposed tensor.

Below the quantisers: the three GEMMs of a Linear (fp8_gemm, reference emulation on any device,
cuBLASLt block-scaled GEMM on SM90+), Fp8Linear (an nn.Linear whose forward and backward run
those GEMMs), fp8_experts (the same for MoE's stacked routed experts) and convert_to_fp8, the
converter applied from outside the model (docs/design/kernels.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.moe import RoutedExperts, gated
from .experts import over_same_weights, sort_by_expert, unsort
from .swap import swap_matmuls

BLOCK = 128
E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
AMAX_FLOOR = 1e-4  # the reference kernel's clamp: all-zero groups quantise to 0


def _scale(amax: torch.Tensor, scale_fmt: str | None) -> torch.Tensor:
    """fp32 amax per group -> fp32 dequant scale s = max(amax, 1e-4) / 448 (ue8m0: rounded up to 2^k)."""
    s = amax.float().clamp_min(AMAX_FLOOR) / E4M3_MAX
    if scale_fmt == "ue8m0":
        # frexp is exact: s = m * 2^e with m in [0.5, 1). s is already 2^(e-1) when m == 0.5,
        # else the next power of two up is 2^e. (log2 + ceil can round the wrong way near 2^k.)
        m, e = torch.frexp(s)
        s = torch.ldexp(torch.ones_like(s), torch.where(m == 0.5, e - 1, e))
    elif scale_fmt is not None:
        raise ValueError(f"scale_fmt={scale_fmt!r} must be None or 'ue8m0'")
    return s


def _cast(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> e4m3fn: explicit clamp, then the round-to-nearest-even cast."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def _tiles(x: torch.Tensor, block: int) -> torch.Tensor:
    """(..., K) -> fp32 (..., ceil(K/block), block), zero-padding a ragged last tile (a view when
    K is whole tiles and x is fp32 and contiguous: no copy)."""
    K = x.shape[-1]
    nb = -(-K // block)
    x = x.float()
    if nb * block != K:
        x = F.pad(x, (0, nb * block - K))
    return x.unflatten(-1, (nb, block))


def act_quant(x: torch.Tensor, block: int = BLOCK, scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) any float dtype -> (q (..., K) e4m3fn, s (..., ceil(K/block)) fp32), 1 x block tiles."""
    K = x.shape[-1]
    xt = _tiles(x, block)  # (..., nb, block)
    s = _scale(xt.abs().amax(dim=-1), scale_fmt)  # (..., nb)
    q = _cast(xt / s[..., None]).flatten(-2)
    return (q if q.shape[-1] == K else q[..., :K].contiguous()), s


def act_dequant(q: torch.Tensor, s: torch.Tensor, block: int = BLOCK,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q (..., K) e4m3fn, s (..., ceil(K/block)) fp32 -> x (..., K) in `dtype`."""
    K = q.shape[-1]
    if s.shape[-1] != -(-K // block) or s.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"act scale shape {tuple(s.shape)} does not match codes {tuple(q.shape)} in 1x{block} tiles")
    x = (_tiles(q, block) * s.float()[..., None]).flatten(-2)  # broadcast: no repeated scale tensor
    return x[..., :K].to(dtype)


def weight_quant(w: torch.Tensor, block: int = BLOCK, scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """W (N, K) any float dtype -> (q (N, K) e4m3fn, scale_inv (ceil(N/block), ceil(K/block)) fp32)."""
    if w.dim() != 2:
        raise ValueError(f"weight_quant takes a 2-D (out, in) weight, got shape {tuple(w.shape)}")
    N, K = w.shape
    nr, nc = -(-N // block), -(-K // block)
    wf = F.pad(w.float(), (0, nc * block - K, 0, nr * block - N)).view(nr, block, nc, block)
    s = _scale(wf.abs().amax(dim=(1, 3)), scale_fmt)  # (nr, nc)
    q = _cast(wf / s[:, None, :, None]).view(nr * block, nc * block)[:N, :K].contiguous()
    return q, s


def weight_dequant(q: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q (M, N) float8_e4m3fn, scale_inv (ceil(M/block), ceil(N/block)) fp32 -> W (M, N) in `dtype`."""
    M, N = q.shape
    rows, cols = -(-M // block), -(-N // block)
    if tuple(scale_inv.shape) != (rows, cols):
        raise ValueError(f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected ({rows}, {cols}) "
                         f"for a ({M}, {N}) weight in {block}x{block} blocks")
    if not q.is_contiguous() and q.t().is_contiguous():  # a transposed view (Dgrad's W^T): no copy
        return weight_dequant(q.t(), scale_inv.t(), block, dtype).t()
    qf = F.pad(q.float(), (0, cols * block - N, 0, rows * block - M)).view(rows, block, cols, block)
    return (qf * scale_inv.float()[:, None, :, None]).view(rows * block, cols * block)[:M, :N].to(dtype)


# --- the three FP8 GEMMs ---------------------------------------------------------------------
#
# Every GEMM below is C = A . B^T with both operands quantised along the contraction dim k (the
# groups lie along each GEMM's contraction dimension, V3 §3.3.2), and fp32 accumulation:
#
#     GEMM            A (m, k), 1x128 tiles        B (n, k)                      C (m, n)
#     Fprop  X W^T    X    (M, K)  along K         W    (N, K)  128x128 blocks   Y  (M, N)
#     Dgrad  dY W     dY   (M, N)  along N         W^T  (K, N)  128x128 blocks   dX (M, K)
#     Wgrad  dY^T X   dY^T (N, M)  along tokens    X^T  (K, M)  1x128 along M    dW (N, K)
#                                                  (= X in 128x1 column tiles)
# M tokens, K in-features, N out-features. Activation gradients (dY) are only ever tiled 1x128,
# never in 128x128 blocks (V3 App. B.2: block-quantised Dgrad diverged).

def _fast_path_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    """CUDA block-scaled GEMM (cuBLASLt, SM90+, CUDA >= 12.9): only for whole 128-groups."""
    if not (a.is_cuda and _FAST["enabled"]) or torch.cuda.get_device_capability(a.device) < (9, 0):
        return False
    return all(d % BLOCK == 0 for d in (*a.shape, *b.shape))


_FAST = {"enabled": True}  # switched off for the process after the first failure (with a warning)


def fp8_gemm(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor,
             b_blocks: bool, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """C (m, n) fp32 = dequant(A) . dequant(B)^T. a_q (m, k) e4m3 with a_s (m, ceil(k/128));
    b_q (n, k) e4m3 with b_s (ceil(n/128), ceil(k/128)) if b_blocks else (n, ceil(k/128)).

    Reference path (any device): dequantise each group into `dtype`, then one matmul. In fp32 that
    is the reference kernel's sum over k-blocks of dot(a_blk, b_blk) * a_s * b_s, up to the fp32
    rounding of q * s and of the summation order. In bf16 (the host's choice where bf16 GEMMs are
    clearly faster, host.py) q * s is rounded to 8 significant bits (e4m3 codes carry 4) and the
    product comes back as bf16, accumulated in fp32 inside the GEMM: what the CUDA path emits too.
    """
    if _fast_path_ok(a_q, b_q):
        try:
            return _scaled_mm_blockwise(a_q, a_s, b_q, b_s, b_blocks)
        except (RuntimeError, ValueError, NotImplementedError) as e:  # an older CUDA/cuBLAS build
            import warnings

            _FAST["enabled"] = False
            warnings.warn(f"FP8 block-scaled GEMM unavailable ({e}); using the dequantise + matmul emulation")
    a = act_dequant(a_q, a_s, dtype=dtype)
    b = weight_dequant(b_q, b_s, dtype=dtype) if b_blocks else act_dequant(b_q, b_s, dtype=dtype)
    return (a @ b.T).float()


def _scaled_mm_blockwise(a_q, a_s, b_q, b_s, b_blocks):
    """torch._scaled_mm with 1x128 x 128x128 (or 1x128 x 1x128) fp32 block scales. cuBLASLt wants
    A row-major and B column-major, A's scales outer-dim-major (stride (1, m)), and B's scales
    laid out along its (k, n) view. Block-scaled modes only emit bf16 (upcast here for fp32 grads)."""
    scale_a = a_s.t().contiguous().t()  # (m, k/128), stride (1, m)
    scale_b = b_s.contiguous().t() if b_blocks else b_s.t().contiguous()  # (k/128, n/128) | (k/128, n)
    # B^T must be column-major: Dgrad's B = W^T is a transposed view, made contiguous first
    out = torch._scaled_mm(a_q.contiguous(), b_q.contiguous().t(), scale_a, scale_b, out_dtype=torch.bfloat16)
    return out.float()


class _Fp8LinearFn(torch.autograd.Function):
    """y = x W^T (+ b) with all three GEMMs in FP8; saves x as FP8 codes + 1x128 scales only."""

    @staticmethod
    def forward(ctx, x, weight, bias, out_dtype, scale_fmt, gemm_dtype):
        with torch.autocast(x.device.type, enabled=False):  # the dtypes here are explicit
            x2 = x.reshape(-1, x.shape[-1])  # (M, K): leading batch dims flattened
            qx, sx = act_quant(x2, scale_fmt=scale_fmt)
            qw, sw = weight_quant(weight, scale_fmt=scale_fmt)
            y = fp8_gemm(qx, sx, qw, sw, b_blocks=True, dtype=gemm_dtype)  # (M, N) fp32
            if bias is not None:
                y = y + bias.float()
        ctx.save_for_backward(qx, sx, weight)  # x as 1 byte + 4/128 bytes per element
        ctx.meta = (x.shape, x.dtype, bias is not None, scale_fmt, gemm_dtype)
        return y.to(out_dtype).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        qx, sx, weight = ctx.saved_tensors
        x_shape, x_dtype, has_bias, scale_fmt, gemm_dtype = ctx.meta
        with torch.autocast(dy.device.type, enabled=False):
            dy2 = dy.reshape(-1, dy.shape[-1]).float()  # (M, N)
            dx = dw = db = None
            if ctx.needs_input_grad[0]:  # Dgrad: dY 1x128 along N; W^T in the same 128x128 blocks
                qw, sw = weight_quant(weight, scale_fmt=scale_fmt)  # recomputed: nothing saved for W
                qd, sd = act_quant(dy2, scale_fmt=scale_fmt)
                dx = fp8_gemm(qd, sd, qw.t(), sw.t(), b_blocks=True, dtype=gemm_dtype).to(x_dtype).view(x_shape)
            if ctx.needs_input_grad[1]:  # Wgrad: both operands tiled along the tokens
                qdt, sdt = act_quant(dy2.t(), scale_fmt=scale_fmt)  # dY^T (N, M)
                # X comes back from its saved 1x128 codes and is re-tiled 128x1 (along tokens):
                # a second rounding, the price of caching X in FP8 (V3 does the same).
                qxt, sxt = act_quant(act_dequant(qx, sx).t(), scale_fmt=scale_fmt)  # X^T (K, M)
                dw = fp8_gemm(qdt, sdt, qxt, sxt, b_blocks=False, dtype=gemm_dtype).to(weight.dtype)
            if has_bias and ctx.needs_input_grad[2]:
                db = dy2.sum(0).to(weight.dtype)
        return dx, dw, db, None, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               scale_fmt: str | None = None, gemm_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """F.linear with FP8 GEMMs. Under autocast the output has the autocast dtype (as F.linear's
    would); otherwise x's dtype. Weight and bias stay in their own (master) precision. gemm_dtype:
    what the CPU emulation dequantises to and multiplies in (fp8_gemm)."""
    device = x.device.type
    out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    return _Fp8LinearFn.apply(x, weight, bias, out_dtype, scale_fmt, gemm_dtype)


class Fp8Linear(nn.Linear):
    """nn.Linear whose forward runs in FP8. Same parameters, same names, same state_dict: the
    master weight stays high precision, so checkpoints are plain and load into a plain model."""

    kernel = "fp8"
    scale_fmt: str | None = None
    gemm_dtype: torch.dtype = torch.float32

    @classmethod
    def from_linear(cls, linear: nn.Linear, scale_fmt: str | None = None,
                    gemm_dtype: torch.dtype = torch.float32) -> "Fp8Linear":
        with torch.device("meta"):  # no allocation: the original parameters are adopted below
            new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        new.weight, new.bias, new.scale_fmt, new.gemm_dtype = linear.weight, linear.bias, scale_fmt, gemm_dtype
        new.train(linear.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.bias, self.scale_fmt, self.gemm_dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fp8=e4m3, scale_fmt={self.scale_fmt}"


def fp8_experts(x, weights, idx, w1, w2, w3, scale_fmt: str | None = None,
                gemm_dtype: torch.dtype = torch.float32, limit: float = 0.0) -> torch.Tensor:
    """Routed experts in FP8, with the signature of model/moe.py's loop_experts (kernels/experts.py grouped_experts):
    x (N, d), weights / idx (N, K), stacked w1, w3 (E, I, d) and w2 (E, d, I). Tokens are sorted
    by expert as in the grouped path, then each expert runs three Fp8 GEMMs on its contiguous rows,
    its weights in their own 128x128 blocks (no block straddles two experts)."""
    N, K = idx.shape
    xs, w, order, counts = sort_by_expert(x, weights, idx, w1.shape[0])  # (N*K, d), rows of one expert contiguous
    sizes = counts.tolist()
    outs = []
    for e, (chunk, w_e) in enumerate(zip(xs.split(sizes), w.split(sizes))):
        if chunk.shape[0]:
            h = gated(fp8_linear(chunk, w1[e], None, scale_fmt, gemm_dtype),
                      fp8_linear(chunk, w3[e], None, scale_fmt, gemm_dtype), limit)
            # the routing weight scales the (n, I) hidden, not the (n, d) output: the same sum, and
            # autograd keeps the narrower tensor for the weight's gradient (as grouped_experts)
            outs.append(fp8_linear(h * w_e.to(h.dtype), w2[e], None, scale_fmt, gemm_dtype))
    if not outs:  # no tokens at all
        return torch.zeros_like(x)
    out = torch.cat(outs)  # (N*K, d), in expert order
    # un-sort by gathering with the inverse permutation: its backward keeps only the index, where
    # a scatter-copy's would keep this whole (N*K, d) output alive for its shape
    return unsort(out, order, N, K, gather=True).to(x.dtype)


# --- the converter -----------------------------------------------------------------------------

# V3 keeps these out of FP8 (V3 §3.3.1): the embedding, the output head, the MoE gate, norms
# and the HC / mHC coefficients. Only nn.Linear is ever swapped, so the embedding, norms and HC
# parameters are never candidates anyway; they are listed so a future Linear under those names
# stays high precision too.
DEFAULT_SKIP = ("embed", "head", "gate", "norm", "q_norm", "kv_norm", "enorm", "hnorm",
                "attn_conn", "ffn_conn")


def _skipped(name: str, skip) -> bool:
    """A pattern matches a run of whole dotted components: 'head' matches 'head' but not
    'heads_proj'; 'ffn.gate' matches 'layers.3.ffn.gate'; 'mtp' matches all of 'mtp.0.*'."""
    return any(f".{p}." in f".{name}." for p in skip)


class Fp8Experts(RoutedExperts):
    """RoutedExperts whose forward runs `fp8_experts`. Same parameters (the high-precision masters),
    same names, same state dict, as Fp8Linear is to nn.Linear."""

    kernel = "fp8"
    scale_fmt: str | None = None
    gemm_dtype: torch.dtype = torch.float32

    @classmethod
    def from_experts(cls, experts: RoutedExperts, scale_fmt: str | None = None,
                     gemm_dtype: torch.dtype = torch.float32) -> "Fp8Experts":
        new = over_same_weights(cls, experts)
        new.scale_fmt, new.gemm_dtype = scale_fmt, gemm_dtype
        return new

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return fp8_experts(x, weights, idx, self.w1, self.w2, self.w3, self.scale_fmt, self.gemm_dtype, self.limit)


def convert_to_fp8(model: nn.Module, skip=DEFAULT_SKIP, experts: bool = True,
                   scale_fmt: str | None = None, gemm_dtype="auto") -> list[str]:
    """Swap every nn.Linear not matched by `skip` for an Fp8Linear, and with `experts` every
    RoutedExperts (named '<moe>.experts') for an Fp8Experts, in place (kernels/swap.py
    swap_matmuls). The twins hold the same parameter objects, so an optimizer built before still
    holds them. gemm_dtype: what the CPU emulation dequantises to, "auto" = the host's training
    choice (host.py), or a dtype. Returns the converted names."""
    from ..host import choose_dtype

    gemm_dtype = choose_dtype("train", gemm_dtype).dtype
    def make(name, m, reads_weight):  # Fp8Linear keeps its master weight: reading it is free
        if _skipped(name, skip):
            return None
        if type(m) is nn.Linear:
            return Fp8Linear.from_linear(m, scale_fmt, gemm_dtype)
        if type(m) is RoutedExperts and experts:
            return Fp8Experts.from_experts(m, scale_fmt, gemm_dtype)
        return None

    return swap_matmuls(model, make)
