"""Compiled decoding of weight-only quantized models: batch-1 GEMVs that read the int8 / int4 codes.

At batch 1 a decode step is bound by the bytes of weight it reads (docs/design/quantization.md). The
eager quantized path (kernels/quantize.py) dequantizes or calls int8pack per matrix; here, inside the
step that kernels/compiled.py traces, each one-row matmul is written as one expression over the codes,
which inductor emits as one fused, vectorised reduction (as GemvLinear does for plain weights):

    int8, a scale per row     y[n] = s[n] * sum_k x[k] q[n, k]                        1 byte a weight
    int8, grouped (q8_0)      y[n] = sum_g s[n, g] sum_j x[32g + j] q[n, 32g + j]     1 + 4/32 bytes
    int4 (q4_0)               y[n] = sum_g d[n, g] sum_j x[32g + j] (c[n, 32g + j] - 8)  0.5 + 2/32 bytes

with the int4 codes unpacked inside the loop (byte & 15, byte >> 4: kernels/int4.py's layout). The
scale multiplies inside the one reduction over all K (not a reduction per group, whose horizontal
sums cost more than the loads), and everything accumulates in fp32.

Why `_unfolded`: with freezing, inductor constant-folds every op whose inputs are all weights, so
`q.to(fp32)` would become an fp32 copy of the matrix (4 bytes a weight read each step, and the memory);
only int8 -> bf16 is exempt, and that conversion ran 2.3x slower than int8 -> fp32 in the loop. So
the codes first pass through `q | 0`, an op marked not-foldable while CompiledDecode compiles
(`no_folding`); it costs one vector OR in the loop. Dequantizing reads elsewhere (MLA's absorbed
path reads wkv_b.weight) do not use it, and are folded into plain constants once, as for a plain model.

Routed experts at batch 1 gather each chosen expert's codes by index inside the same expressions
(kernels/experts.py gathered_experts, quantized); batched steps (and eager calls) dequantize in the
graph / run kernels/quantize.py's path. FP8 codes have no compiled path (kernels/compiled.py refuses).
The reference twins are the eager QuantLinear / QuantExperts; tests/test_quant_compiled.py compares.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch._inductor import constant_folding

from ..model.moe import gated
from . import native
from .experts import dense_experts
from .int4 import GROUP, HALF
from .quantize import SUFFIX, QuantExperts, QuantLinear, dequantize, fmt_of

_MARKER = (torch.ops.aten.bitwise_or.Scalar, torch.ops.aten.bitwise_or.Tensor)
COMPILED_FORMATS = ("int8", "int4")


@contextlib.contextmanager
def no_folding():
    """While compiling: inductor's freezing does not constant-fold `_unfolded` codes (see above)."""
    added = [op for op in _MARKER if op not in constant_folding._dont_constant_fold]
    constant_folding._dont_constant_fold.extend(added)
    try:
        yield
    finally:
        for op in added:
            constant_folding._dont_constant_fold.remove(op)


def _unfolded(q: torch.Tensor) -> torch.Tensor:
    return q | 0


def gemv(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """sum_k x[..., k] W[..., n, k] from codes, fp32: x (..., 1, K) broadcast against the codes
    q (..., N, K) int8 or (..., N, K/2) packed int4, s (..., N) or (..., N, K/32) -> (..., N) fp32.
    The leading dims broadcast (a gathered expert's codes: (tokens, slots, N, K))."""
    xf = x.float()
    if fmt_of(q) == "int4":
        g = _unfolded(q).unflatten(-1, (-1, HALF))  # (..., N, G, 16) bytes
        xg = xf.unflatten(-1, (-1, 2, HALF))  # (..., 1, G, 2, 16): the low and the high nibbles' inputs
        t = xg[..., 0, :] * ((g & 15).float() - 8) + xg[..., 1, :] * ((g >> 4).float() - 8)
        return (t * s.float()[..., None]).sum((-2, -1))
    c = _unfolded(q).float()
    if s.dim() == q.dim():  # grouped int8 (GGUF q8_0): a scale per 32 inputs
        t = xf.unflatten(-1, (-1, GROUP)) * c.unflatten(-1, (-1, GROUP))
        return (t * s.float()[..., None]).sum((-2, -1))
    return (xf * c).sum(-1) * s.float()


def traced_dequantize(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """dequantize(q, s, dtype) inside a traced step, not folded into a constant (batched steps)."""
    return dequantize(_unfolded(q), s, dtype)


def _twin(cls, m):
    """An instance of subclass `cls` over the same buffers (codes, scales) and attributes as `m`."""
    new = cls.__new__(cls)
    new.__dict__.update({k: v for k, v in m.__dict__.items() if k != "_scale_cache"})
    new._buffers, new._parameters, new._modules = dict(m._buffers), dict(m._parameters), dict(m._modules)
    return new


class QuantGemvLinear(QuantLinear):
    """QuantLinear whose one-row calls are, with `isa` set (the plan's int8 activations), kernels/native.py's
    int8-activation GEMV, traced or eager (so an eager step is the compiled step's twin), else, while
    traced, the fused fp32 GEMV over its codes (`gemv`); more rows while traced: dequantize in the graph,
    then F.linear; other eager calls: QuantLinear's."""

    kernel = "compiled-quantized-gemv"
    isa: int | None = None

    @classmethod
    def from_quant(cls, m: QuantLinear) -> "QuantGemvLinear":
        return _twin(cls, m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        one_row = x.numel() == x.shape[-1]
        if one_row and self.isa is not None:
            y = native.qgemv(x.reshape(1, -1), self.qweight, self.weight_scale_inv, None, self.isa)  # eager too
            y = y.reshape(*x.shape[:-1], -1).to(x.dtype)
        elif not torch.compiler.is_compiling():
            return super().forward(x)
        elif one_row:
            y = gemv(x[..., None, :], self.qweight, self.weight_scale_inv).to(x.dtype)
        else:
            y = F.linear(x, traced_dequantize(self.qweight, self.weight_scale_inv, x.dtype))
        return y if self.bias is None else y + self.bias.to(y.dtype)


class QuantStaticExperts(QuantExperts):
    """QuantExperts with static-shape dispatch while traced: at batch 1 (fewer (token, expert) pairs
    than experts) each pair's expert codes gathered into the fused GEMVs (with `isa` set: each pair a
    row of kernels/native.py's GEMV, traced or eager); a batch: every expert densely
    (kernels/experts.py dense_experts) on weights dequantized in the graph."""

    kernel = "compiled-quantized-experts"
    isa: int | None = None

    @classmethod
    def from_quant(cls, m: QuantExperts) -> "QuantStaticExperts":
        return _twin(cls, m)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        pairs = (q1, s1), (q2, s2), (q3, s3) = self._codes()
        few = idx.numel() < q1.shape[0]
        if few and self.isa is not None:
            return self._native(x, weights, idx, pairs)  # eager too
        if not torch.compiler.is_compiling():
            return super().forward(x, weights, idx)
        if not few:
            w1, w2, w3 = (traced_dequantize(q, s, x.dtype) for q, s in pairs)
            return dense_experts(x, weights, idx, w1, w2, w3, self.limit)
        xb = x[:, None, None, :]  # (N, 1, 1, d) against the gathered codes (N, K, I, .)
        h = gated(gemv(xb, q1[idx], s1[idx]), gemv(xb, q3[idx], s3[idx]), self.limit)  # (N, K, I) fp32
        h = h * weights[..., None].float()
        return gemv(h[:, :, None, :], q2[idx], s2[idx]).sum(1).to(x.dtype)  # (N, K, d) summed over K

    def _codes(self) -> tuple:
        """((codes, scales) of w1, of w2, of w3)."""
        return tuple((getattr(self, n), getattr(self, n + SUFFIX)) for n in self.WEIGHTS)

    def _native(self, x, weights, idx, pairs):
        """Batch 1 on kernels/native.py: each (token, slot) pair is a row of the op, its expert by idx."""
        (q1, s1), (q2, s2), (q3, s3) = pairs
        T, K = idx.shape
        flat = idx.reshape(-1)
        xr = x[:, None, :].expand(T, K, x.shape[-1]).reshape(T * K, -1)  # (T K, d)
        h = gated(native.qgemv(xr, q1, s1, flat, self.isa), native.qgemv(xr, q3, s3, flat, self.isa), self.limit)
        h = h * weights.reshape(-1, 1).float()  # (T K, I) fp32
        return native.qgemv(h, q2, s2, flat, self.isa).view(T, K, -1).sum(1).to(x.dtype)


def compilable(m) -> bool:
    """Whether m is a quantized module (or its compiled twin) whose codes the compiled step can run."""
    return isinstance(m, (QuantLinear, QuantExperts)) and m.fmt in COMPILED_FORMATS


def refusal(model) -> str | None:
    """Why the model's quantized modules cannot be compiled (FP8 codes), or None."""
    for name, m in model.named_modules():
        if isinstance(m, (QuantLinear, QuantExperts)) and m.fmt not in COMPILED_FORMATS:
            return (f"{name} holds {m.fmt} weight codes, which compiled decoding does not run (it runs "
                    f"{' and '.join(COMPILED_FORMATS)}): drop --compile, add --dtype bf16 (or fp32) to dequantize "
                    f"them into a plain model that compiles, or quantize to int8 / int4")
    return None


def swap_quantized(model, isa: int | None = None) -> list[str]:
    """Every QuantLinear / QuantExperts of a compiled format becomes its compiled twin, in place (the
    same buffers; kernels/swap.py swap_matmuls offers plain modules only). isa: run batch-1 GEMVs on
    kernels/native.py's int8-activation kernel with that implementation (loaded by the caller), where it
    runs the module's codes (native.supports), or None: the fp32 GEMV over the codes. Returns the names."""
    done = []
    for name, m in list(model.named_modules()):
        twin = {QuantLinear: QuantGemvLinear, QuantExperts: QuantStaticExperts}.get(type(m))
        if twin is not None and m.fmt in COMPILED_FORMATS:
            parent, _, child = name.rpartition(".")
            new = twin.from_quant(m)
            codes = new._codes() if twin is QuantStaticExperts else ((new.qweight, new.weight_scale_inv),)
            new.isa = isa if all(native.supports(q, s) for q, s in codes) else None  # else the fp32 GEMV
            setattr(model.get_submodule(parent) if parent else model, child, new)
            done.append(name)
    return done
