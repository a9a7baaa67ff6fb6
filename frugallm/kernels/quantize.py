"""Weight-only quantization for CPU inference: int8 per output channel, int4 in groups of 32 (GGUF
q4_0's codes), FP8 e4m3 in 128x128 blocks.

Only the weights are quantized; activations stay in the model's dtype (bf16 for speed on CPU,
fp32 for exactness checks). Three formats, one storage rule:

    int8  W (N, K) ~= q * s[:, None]      q int8 in [-127, 127], s = amax(|W[n, :]|) / 127  (N,) fp32
          or, grouped, s (N, K / g): one scale per g consecutive inputs of a row (GGUF's q8_0, g = 32,
          read by formats/gguf_read.py; never made by `quantize`, run by dequantizing the weight)
    int4  W (N, K) ~= (c - 8) * s[:, k // 32]  c in [0, 15] packed two a byte, q uint8 (N, K/2), s (N, K/32)
          fp16: GGUF q4_0 (kernels/int4.py; matrices with K % 32 != 0 stay high precision)
    fp8   W (N, K) ~= q * s[i//128, j//128]  q float8_e4m3fn, s (ceil(N/128), ceil(K/128)) fp32
          (docs/design/quantization.md: DeepSeek's `weight_scale_inv`, from kernels/fp8.py's weight_quant)

A quantized weight keeps its own state-dict name and shape, holding the codes, and its scale
(always the DEQUANT multiplier) sits beside it as NAME + "_scale_inv", e.g.
`layers.0.attn.wq_a.weight` + `layers.0.attn.wq_a.weight_scale_inv`, or, for the stacked routed
experts, `layers.1.ffn.w1` (E, I, d) + `layers.1.ffn.w1_scale_inv` ((E, I) int8, (E, ceil(I/128),
ceil(d/128)) fp8). That is DeepSeek's FP8 checkpoint layout, so formats/hf.py maps it to HF keys with
the same table as plain weights.

Modules (swapped in from outside; model/ never imports this file):
    QuantLinear  nn.Linear stand-in; `.weight` dequantizes on access (MLA's absorbed path reads it)
    QuantExperts RoutedExperts twin whose w1/w2/w3 are codes
(both swapped in by kernels/swap.py swap_matmuls)
Kernels, each compared in tests/test_quant.py with its reference (dequantize, then F.linear):
    int8: torch._weight_int8pack_mm for bf16/fp16 activations at up to INT8PACK_MAX_ROWS rows
          and K % 16 == 0 (it crashes or is wrong otherwise, measured on torch 2.13 CPU); else the
          codes are cast (exactly) to the activation dtype and the per-channel scale is applied to
          the GEMM's output. The fp32 int8pack kernel is ~10x slower than dense fp32: not used.
    int4: dequantize, then the GEMM (kernels/int4.py int4_linear).
    Compiled decoding (kernels/compiled_quant.py) runs int8 and int4 batch-1 GEMVs on the codes themselves.
    fp8:  no CPU FP8 GEMM exists (docs/design/fp8.md), so each forward dequantizes the weight. torch's
          e4m3 -> bf16 cast is scalar (~4 ns/element); moving the code bits into bf16/fp32 bit
          positions with three integer passes is ~10x faster (see _e4m3_dequant). FP8 storage
          halves memory against bf16; it is NOT a CPU speed-up (benchmarks/bench_quant.py).

Default skip (as DeepSeek ships V3 and as kernels/fp8.py's convert_to_fp8): the embedding, the
output head (kept high precision: it is one big matrix whose errors hit every logit directly;
DeepSeek keeps it bf16), the MoE gate (routing must stay exact; it is not an nn.Linear anyway),
norms and HC/mHC coefficients. Pass skip=() to quantize the head as well.

Loss change against fp32, measured: tests/test_quant.py's tiny model (100 steps, 2048 val tokens)
int8 +0.00001, fp8 +0.0003 nats with fp32 activations; the tests bound |dloss| by 0.005 (int8) and
0.01 (fp8) nats, +0.005 with bf16 activations. benchmarks/bench_quant.py on the tiny preset (val loss
3.98 after 500 steps): |dloss| <= 0.0002 nats for both (LOG.md). Checkpoints on disk:
formats/quantized.py.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from ..model.moe import RoutedExperts, gated, loop_experts
from .experts import per_expert
from .fp8 import BLOCK, DEFAULT_SKIP, E4M3, _skipped, weight_dequant, weight_quant
from .int4 import dequantize_int4, empty_like_int4, fits, int4_linear, quantize_int4
from .swap import swap_matmuls

FORMATS = ("int8", "int4", "fp8")
SUFFIX = "_scale_inv"
CODE_DTYPE = {"int8": torch.int8, "int4": torch.uint8, "fp8": E4M3}
INT8PACK_MAX_ROWS = 16  # above this, cast + dense GEMM is faster (bf16, 2 cores, 256..4096 wide)


def fmt_of(codes: torch.Tensor) -> str:
    for fmt, dtype in CODE_DTYPE.items():
        if codes.dtype == dtype:
            return fmt
    raise ValueError(f"{codes.dtype} is not a quantized weight dtype ({', '.join(map(str, CODE_DTYPE.values()))})")


# --- quantizers: (..., N, K) weights, leading dims for stacked experts ---------------------------

def quantize(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """W (..., N, K) float -> (codes, scale_inv): int8 (..., N, K) + (..., N) fp32; int4 (..., N, K/2) packed +
    (..., N, K/32) fp16; fp8 (..., N, K) + (..., N/128, K/128) fp32."""
    if fmt == "int4":
        return quantize_int4(w)
    if fmt == "int8":
        amax = w.detach().float().abs().amax(dim=-1)
        s = torch.where(amax > 0, amax / 127, torch.ones_like(amax))  # all-zero rows: q = 0, s = 1
        q = (w.detach().float() / s[..., None]).round_().clamp_(-127, 127).to(torch.int8)  # round half to even
        return q, s
    if fmt == "fp8":
        if w.dim() == 2:
            return weight_quant(w.detach())
        pairs = [quantize(x, fmt) for x in w.flatten(0, -3)]
        q, s = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        return q.view(w.shape), s.view(*w.shape[:-2], *s.shape[-2:])
    raise ValueError(f"unknown quantization format {fmt!r}; choose one of {FORMATS}")


def dequantize(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The reference dequantization, any leading dims: codes + scale_inv -> W in `dtype`."""
    if fmt_of(q) == "int4":
        return dequantize_int4(q, s, dtype)
    if fmt_of(q) == "int8":
        if s.dim() == q.dim():  # grouped: s (..., N, K / g)
            return (q.float().unflatten(-1, (s.shape[-1], -1)) * s.float()[..., None]).flatten(-2).to(dtype)
        return (q.float() * s.float()[..., None]).to(dtype)
    if q.dim() == 2:
        return weight_dequant(q, s, dtype=dtype)
    return torch.stack([dequantize(a, b, dtype) for a, b in zip(q.flatten(0, -3), s.flatten(0, -3))]).view(q.shape)


# --- matmuls: y = x W^T from codes -----------------------------------------------------------------

def int8_linear(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x (..., K), q (N, K) int8, s (N,) fp32 -> (..., N) in x.dtype."""
    if s.dim() == 2:  # grouped scales (GGUF q8_0) do not commute with the GEMM: dequantize first
        return F.linear(x, dequantize(q, s, x.dtype))
    N, K = q.shape
    x2 = x.reshape(-1, K)
    # int8pack's AVX-512 kernel segfaults on codes that are not 64-byte aligned (seen with tensors
    # read from safetensors, which aligns to 8): such codes take the cast path
    if x.dtype in (torch.bfloat16, torch.float16) and x2.shape[0] <= INT8PACK_MAX_ROWS and K % 16 == 0 \
            and q.data_ptr() % 64 == 0:
        y = torch._weight_int8pack_mm(x2.contiguous(), q, s.to(x.dtype))  # scales in x's dtype, as it requires
    else:  # |q| <= 127 is exact in bf16/fp32, and a per-output-channel scale commutes with the GEMM
        y = F.linear(x2, q.to(x.dtype)) * s.to(x.dtype)
    return y.view(*x.shape[:-1], N)


# e4m3 (bias 7) and bf16/fp32 (bias 127): a code's sign, 4 exponent and 3 mantissa bits, placed
# at the top of a bf16/fp32 word, read as code * 2^-120 exactly (e4m3 subnormals become subnormals).
# Sign-extend the byte, shift it into place, mask out the extended sign: 3 vectorised integer passes.
_BITS = {torch.bfloat16: (torch.int16, 4, 0x87F0 - (1 << 16)),
         torch.float32: (torch.int32, 20, 0x87F00000 - (1 << 32))}


def _e4m3_dequant(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight_dequant(q, s, dtype=dtype), fast: bits trick, then one in-place multiply per block by
    s * 2^120 (rounded to dtype first: within one bf16 ulp of the reference). (N, K) view."""
    if dtype not in _BITS or float(s.max()) >= 2.0 ** 7:  # s * 2^120 must stay finite
        return weight_dequant(q, s, dtype=dtype)
    int_dtype, shift, mask = _BITS[dtype]
    N, K = q.shape
    nr, nc = s.shape
    whole = (nr * BLOCK, nc * BLOCK) == (N, K)
    bits = (torch.empty if whole else torch.zeros)(nr * BLOCK, nc * BLOCK, dtype=int_dtype, device=q.device)
    bits[:N, :K].copy_(q.view(torch.int8))  # sign-extending
    bits.bitwise_left_shift_(shift).bitwise_and_(mask)
    w = bits.view(dtype)
    w.view(nr, BLOCK, nc, BLOCK).mul_((s.float() * 2.0 ** 120).to(dtype)[:, None, :, None])
    return w if whole else w[:N, :K]


def fp8_linear(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x (..., K), q (N, K) e4m3, s (ceil(N/128), ceil(K/128)) fp32 -> (..., N): dequantize, then GEMM."""
    return F.linear(x, _e4m3_dequant(q, s, x.dtype))


LINEAR = {"int8": int8_linear, "int4": int4_linear, "fp8": fp8_linear}


def _empty_like_quantized(shape, fmt: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Placeholders with the shapes and dtypes `quantize` would give (meta-device loading)."""
    if fmt == "int4":
        return empty_like_int4(shape, device)
    *lead, N, K = shape
    s_shape = (*lead, N) if fmt == "int8" else (*lead, -(-N // BLOCK), -(-K // BLOCK))
    return (torch.empty(shape, dtype=CODE_DTYPE[fmt], device=device),
            torch.empty(s_shape, dtype=torch.float32, device=device))


def _scale_as(module: nn.Module, name: str, dtype: torch.dtype) -> torch.Tensor:
    """The fp32 scale buffer `name` cast to dtype, cached (int8pack wants scales in x's dtype;
    a cast per call is a measurable share of a small model's decode step). The cache entry is
    keyed by the buffer object and its version, so loads and moves invalidate it."""
    s = getattr(module, name)
    if dtype == s.dtype:
        return s
    cache = module.__dict__.setdefault("_scale_cache", {})
    hit = cache.get((name, dtype))
    if hit is None or hit[0] is not s or hit[1] != s._version:
        hit = cache[(name, dtype)] = (s, s._version, s.to(dtype))
    return hit[2]


def _adopt_grouped(module: nn.Module, state_dict: dict, prefix: str, names) -> None:
    """Before loading: an int8 scale arriving grouped, (..., N, K / g) instead of (..., N), replaces
    the placeholder buffer's shape (load_state_dict(assign=True) then adopts it)."""
    for name in names:
        s, held = state_dict.get(prefix + name), module._buffers.get(name)
        if s is not None and held is not None and s.dim() == held.dim() + 1 and s.shape[:-1] == held.shape:
            module._buffers[name] = torch.empty(s.shape, dtype=held.dtype, device=held.device)


def _apply_keeping(module: nn.Module, fn, recurse: bool, names: tuple[str, ...]) -> nn.Module:
    """Module._apply that only MOVES the named code/scale buffers: model.to(bf16) must neither cast
    e4m3 codes (a floating dtype to torch) nor round the fp32 scales. The dtype such a call asks
    for becomes the module's compute_dtype (what `.weight` dequantizes to)."""
    held = {n: module._buffers.pop(n) for n in names}
    nn.Module._apply(module, fn, recurse)
    probe = fn(torch.empty(0, dtype=module.compute_dtype, device=held[names[0]].device))
    module.compute_dtype = probe.dtype
    module._buffers.update({n: t.to(device=probe.device) for n, t in held.items()})
    return module


class QuantLinear(nn.Module):
    """Inference-only nn.Linear with its weight held as codes + scale_inv (buffers).

    The codes are saved and loaded under the name "weight" (the checkpoint layout) and held as
    `qweight`; the `weight` attribute is the dequantized matrix in `compute_dtype`, computed on
    access (MLA's absorbed decode path reads wkv_b.weight, as DeepSeek's reference does).
    """

    kernel = "weight-only-quantized"

    def __init__(self, in_features: int, out_features: int, fmt: str, bias: torch.Tensor | None = None,
                 device=None, compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.fmt, self.compute_dtype = in_features, out_features, fmt, compute_dtype
        q, s = _empty_like_quantized((out_features, in_features), fmt, device)
        self.register_buffer("qweight", q)
        self.register_buffer("weight_scale_inv", s)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str) -> "QuantLinear":
        w = linear.weight
        new = cls(linear.in_features, linear.out_features, fmt, linear.bias, "meta", w.dtype)
        if not w.is_meta:  # else the meta placeholders stay, for load_state_dict(assign=True)
            new.qweight, new.weight_scale_inv = quantize(w, fmt)
        return new

    @property
    def weight(self) -> torch.Tensor:
        q, s, dtype = self.qweight, self.weight_scale_inv, self.compute_dtype
        return _e4m3_dequant(q, s, dtype).contiguous() if self.fmt == "fp8" else dequantize(q, s, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        per_channel = self.fmt == "int8" and self.weight_scale_inv.dim() == 1  # grouped scales stay fp32
        s = _scale_as(self, "weight_scale_inv", x.dtype) if per_channel else self.weight_scale_inv
        y = LINEAR[self.fmt](x, self.qweight, s)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _apply(self, fn, recurse=True):
        return _apply_keeping(self, fn, recurse, ("qweight", "weight_scale_inv"))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for key, t in (("weight", self.qweight), ("weight_scale_inv", self.weight_scale_inv), ("bias", self.bias)):
            if t is not None:
                destination[prefix + key] = t if keep_vars else t.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        codes = state_dict.get(prefix + "weight")
        if codes is not None and codes.dtype != self.qweight.dtype:  # copy_ would silently convert
            errors.append(f"{prefix}weight holds {codes.dtype}; this {self.fmt} QuantLinear expects {self.qweight.dtype}")
        state = {(prefix + "qweight" if k == prefix + "weight" else k): v for k, v in state_dict.items()}
        if self.fmt == "int8":
            _adopt_grouped(self, state, prefix, ("weight_scale_inv",))
        n = len(missing)
        super()._load_from_state_dict(state, prefix, local_metadata, strict, missing, unexpected, errors)
        missing[n:] = [prefix + "weight" if k == prefix + "qweight" else k for k in missing[n:]]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}"


class QuantExperts(nn.Module):
    """RoutedExperts twin whose stacked w1/w2/w3 are codes (buffers, same names) with
    w1_scale_inv etc. beside them; only the experts that got tokens run."""

    kernel = "weight-only-quantized"
    WEIGHTS = ("w1", "w2", "w3")

    def __init__(self, shapes: dict[str, torch.Size], fmt: str, device=None, compute_dtype=torch.float32):
        super().__init__()
        self.fmt, self.compute_dtype = fmt, compute_dtype
        self.limit = 0.0  # V4's clamped SwiGLU (model/moe.py gated); from_experts copies the model's
        for name in self.WEIGHTS:
            q, s = _empty_like_quantized(shapes[name], fmt, device)
            self.register_buffer(name, q)
            self.register_buffer(name + SUFFIX, s)

    @classmethod
    def from_experts(cls, experts: nn.Module, fmt: str) -> "QuantExperts":
        ws = {n: getattr(experts, n) for n in cls.WEIGHTS}
        new = cls({n: w.shape for n, w in ws.items()}, fmt, "meta", experts.w1.dtype)
        new.limit = getattr(experts, "limit", 0.0)
        if not experts.w1.is_meta:  # else the meta placeholders stay, for load_state_dict(assign=True)
            for n, w in ws.items():
                q, s = quantize(w, fmt)
                setattr(new, n, q)
                setattr(new, n + SUFFIX, s)
        return new

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """RoutedExperts' signature: per expert with tokens (kernels/experts.py per_expert), three
        quantized GEMMs on its contiguous rows (decode: K experts, M = 1)."""
        linear = LINEAR[self.fmt]
        w1, w2, w3 = self.w1, self.w2, self.w3
        s1, s2, s3 = (_scale_as(self, n + SUFFIX, x.dtype if self.fmt == "int8" and getattr(self, n + SUFFIX).dim() == 2
                                else torch.float32) for n in self.WEIGHTS)  # grouped int8 scales stay fp32
        return per_expert(x, weights, idx, w1.shape[0], lambda e, rows: linear(
            gated(linear(rows, w1[e], s1[e]), linear(rows, w3[e], s3[e]), self.limit), w2[e], s2[e]))

    def reference(self, x, weights, idx) -> torch.Tensor:
        """The twin: dequantize all experts into x's dtype, then model/moe.py's loop_experts."""
        w1, w2, w3 = (dequantize(getattr(self, n), getattr(self, n + SUFFIX), x.dtype) for n in self.WEIGHTS)
        return loop_experts(x, weights, idx, w1, w2, w3, self.limit)

    def _apply(self, fn, recurse=True):
        return _apply_keeping(self, fn, recurse, self.WEIGHTS + tuple(n + SUFFIX for n in self.WEIGHTS))

    def _load_from_state_dict(self, state_dict, prefix, *args):
        if self.fmt == "int8":
            _adopt_grouped(self, state_dict, prefix, tuple(n + SUFFIX for n in self.WEIGHTS))
        super()._load_from_state_dict(state_dict, prefix, *args)


# --- the converter -----------------------------------------------------------------------------

def _swap(model: nn.Module, fmt: str, want) -> list[str]:
    """Replace each nn.Linear `name` with want(name + '.weight') and each RoutedExperts `name`
    (e.g. 'layers.1.ffn.experts') with want(name) by its quantized twin, in place
    (kernels/swap.py swap_matmuls). Returns the converted names."""
    def make(name, m, reads_weight):  # QuantLinear's .weight dequantizes on access: wkv_b is fine
        if type(m) is nn.Linear and want(name + ".weight") and (fmt != "int4" or fits(m.weight.shape)):
            return QuantLinear.from_linear(m, fmt)
        if type(m) is RoutedExperts and want(name) and (fmt != "int4" or all(
                fits(getattr(m, n).shape) for n in QuantExperts.WEIGHTS)):
            return QuantExperts.from_experts(m, fmt)
        return None

    return swap_matmuls(model, make)


def quantize_model(model: nn.Module, to: str, skip=DEFAULT_SKIP) -> list[str]:
    """Quantize a model's weights in place for inference (`to` = "int8", "int4" or "fp8"): every nn.Linear
    and every MoE's stacked routed experts whose name no `skip` pattern matches (int4: and whose inputs
    split into groups of 32). Patterns match
    whole dotted components (kernels/fp8.py `_skipped`): "head", "ffn.gate", "mtp", "layers.0";
    routed experts are named "<moe>.experts", so "experts" keeps them all high precision.
    Returns the quantized names. Quantize from the fp32 (or bf16) weights; cast the model with
    .to(dtype) before or after: codes and scales are left as they are."""
    if to not in FORMATS:
        raise ValueError(f"unknown quantization format {to!r}; choose one of {FORMATS}")
    return _swap(model, to, lambda name: not _skipped(name.rsplit(".", 1)[0], skip) and not _skipped(name, skip))


def weight_bytes(model: nn.Module) -> dict:
    """Bytes of the weights a model holds in memory (its state_dict: codes, scales and the tensors
    left high precision), against its parameter count (scales are not parameters)."""
    params = nbytes = qparams = qbytes = 0
    state = model.state_dict()
    for name, t in state.items():
        b = t.numel() * t.element_size()
        nbytes += b
        if name.endswith(SUFFIX):
            qbytes += b
            continue
        params += t.numel()
        if name + SUFFIX in state:
            qparams, qbytes = qparams + t.numel(), qbytes + b
    return {"params": params, "bytes": nbytes, "bytes_per_param": nbytes / max(params, 1),
            "quantized_params": qparams, "quantized_bytes_per_param": qbytes / max(qparams, 1)}


# --- quantized state dicts (the checkpoint layout above) -----------------------------------------

def from_quantized_state_dict(cfg, state: dict[str, torch.Tensor]):
    """A Transformer that keeps the codes of a quantized state dict (no dequantized copy is ever
    made): built on the meta device, quantized modules swapped in where a NAME_scale_inv exists,
    then every tensor adopted as is. The compute dtype is that of the embedding."""
    from ..model.transformer import Transformer

    scaled = {k[: -len(SUFFIX)] for k in state if k.endswith(SUFFIX)}
    fmts = {fmt_of(state[k]) for k in scaled}
    if len(fmts) > 1:
        raise ValueError(f"a checkpoint mixes quantization formats {sorted(fmts)}")
    with torch.device("meta"):
        model = Transformer(cfg)
    if scaled:
        fmt = fmts.pop()

        def want(name):
            if not name.endswith(".experts"):
                return name in scaled
            have = [f"{name}.{w}" in scaled for w in QuantExperts.WEIGHTS]
            if any(have) and not all(have):
                raise ValueError(f"{name}: w1/w2/w3 must be quantized together, found scales for {have}")
            return all(have)

        done = _swap(model, fmt, want)
        if len(done) != len({k.rsplit(".", 1)[0] for k in scaled}):
            raise ValueError(f"scales for weights that are not nn.Linear or MoE experts: {sorted(scaled)[:3]}...")
    # own, 64-byte aligned copies of codes a file left misaligned (int8_linear's fast kernel needs them)
    state = {k: v.clone() if v.data_ptr() % 64 else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.reset_buffers()
    dtype = model.embed.weight.dtype
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantExperts)):
            m.compute_dtype = dtype
    return model.eval()


def dequantize_state_dict(state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> dict:
    """A plain state dict in `dtype` (e.g. to fine-tune): each weight dequantized on its own, by
    channel or 128x128 block; the MoE gate bias stays fp32."""
    out = {}
    for name, t in state.items():
        if name.endswith(SUFFIX):
            continue
        if name + SUFFIX in state:
            out[name] = dequantize(t, state[name + SUFFIX], dtype)
        else:
            out[name] = t.float() if name.endswith("gate.bias") else t.to(dtype)
    return out
