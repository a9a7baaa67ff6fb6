"""A compiled decode step: the whole model forward for a few new tokens per row, as one graph.

Eager decoding of a ~100M DeepSeek-style model at batch 1 on a CPU is bound by per-op overhead,
not by memory bandwidth: a step runs ~1,500 small ops (norms, RoPE, gate, ~150 GEMVs of 0.2-0.8
MB, oneDNN's fixed cost on each). torch.compile (inductor) turns the step into fused C++ loops
around packed GEMMs, and with `cpp_wrapper` drives them from C++ as well.

What makes the step traceable as one graph with no data-dependent shapes:
  - the cache is `KVCache.over(...)` (static): attention over all of its slots under a mask,
    no host sync; the buffer length is a dynamic dimension, so no cache size recompiles (the
    cost: a step attends over the whole buffer, prompt + max_new_tokens for `generate`);
    each layer's buffers are graph inputs of their own, so the new latents are written in place
    (slices of one stacked buffer made the graph copy each layer's buffer every step);
  - routed experts are `StaticExperts` (kernels/experts.py static_experts): per-pair gathered GEMVs at
    batch 1, every expert densely for a batch; no sort, no per-expert split;
  - freezing treats the weights as constants, so inductor prepacks them itself (the eager
    `kernels/prepack.py` is not applied to a model that is compiled).
What keeps the per-step overhead down (a batch-1 step takes ~3.2 ms on the 100M model of
benchmarks/bench_generate.py, one thread):
  - at batch 1, every linear is an inductor multiply-and-sum GEMV (`GemvLinear`): 0.49 vs 0.97
    ms for oneDNN over the 55 matrices (0.2-0.6 MB) of 11 layers in a microbenchmark, as a oneDNN
    call carries ~9 us of fixed cost (3.9 -> 3.2 ms a step). The output head too: oneDNN's
    batch-1 GEMM took 435 us a step for the tiny preset's 4 MB head (30 % of the step, in
    torch.profiler with inductor's kernel profile), and as a GEMV the step is faster in every
    case measured (LOG.md, alternated in one process, zen4): tiny fp32 2 threads 710 -> 1138
    tokens/s; the 100M model of benchmarks/bench_llamacpp.py fp32 101 -> 131 (2 threads), 95 -> 115
    (1 thread), bf16 191 -> 210 (2 threads). (An earlier measurement had kept the head on oneDNN.)
  - batched steps concatenate linears that share an input into one GEMM (fewer oneDNN calls);
  - at batch 1, the attention's batched matmuls (absorbed W^UK / W^UV per head, scores and
    values over the one latent head) become multiply-and-sum that inductor fuses with the
    mask and softmax, instead of ~15 us oneDNN calls on a few hundred KB each (-0.35 ms a step);
    at batch 8 the rewrite measured no better, so only batch-1 graphs take it;
  - dynamo checks no guards on the model's modules (hundreds, ~0.3 ms a step): the model is
    frozen into the graph anyway. Each decoder traces its own copy of the step's code, so its
    graphs (kept per code object) are never matched against another model's.
One graph is compiled per (batch, new tokens) shape, tens of seconds each for a ~100M model.
A later process loads it from inductor's on-disk FX graph cache (plan.py points it at
~/.cache/frugallm/inductor) instead of generating and compiling the C++ again; dynamo and AOTAutograd
still trace the step (AOTAutograd caches no frozen graph). `frugallm generate` on the tiny preset,
2 idle cores, 16 tokens, whole command: 32 s the first start, 12 s a later one (26 s while freezing's
weight packing kept the graph out of that cache; eager decoding: 4 s). The MTP modules' drafting
windows are compiled the same way (`mtp_step`); prefill stays eager.

The reference twin is the eager model on a dynamic cache; tests/test_compiled.py compares them.
A model holding int8 / int4 weight codes compiles too: its GEMVs read the codes (kernels/compiled_quant.py).
"""

from __future__ import annotations

import contextlib
import sys
import types

import torch
from torch import nn
from torch._inductor.fx_passes import decompose_mem_bound_mm

from ..model.moe import RoutedExperts
from ..model.transformer import ModelOutput
from . import native
from .compiled_quant import COMPILED_FORMATS, compilable, no_folding, refusal, swap_quantized
from .experts import over_same_weights, static_experts
from .swap import converted, swap_matmuls
from ..model.kv_cache import KVCache


def planned_unavailable_reason(config=None, quantized: bool = False, device: str = "cpu") -> str | None:
    """Why a model of `config` (None: any) cannot compile here, known before its weights are read, or None:
    what plan.resolve's compile="auto" asks. quantized: the model will hold weight codes (True, or their
    format: "fp8" has no compiled path; kernels/compiled_quant.py runs int8 and int4)."""
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile is not supported by this Python / PyTorch build"
    if config is not None and config.attention == "hybrid":  # HybridCache grows by concatenation: no static shapes
        return ("the compiled step traces MLA's static latent cache, and this model has V4 hybrid attention "
                "(attention='hybrid', model/hybrid_cache.py): run it without --compile (eager decode)")
    if device == "cpu" and native.compiler() is None:
        return "torch.compile's CPU backend needs a C++ compiler (g++ or clang++): install one, e.g. `apt install g++`"
    if isinstance(quantized, str) and quantized not in COMPILED_FORMATS:  # int8 / int4 codes compile
        return (f"the compiled step runs {' and '.join(COMPILED_FORMATS)} weight codes and this model holds "
                f"{quantized}: add --dtype bf16 (or fp32) to dequantize them into a plain model that compiles")
    return None


def unavailable_reason(model) -> str | None:
    """Why `compile_decode` cannot apply to this model on this machine, or None."""
    if reason := planned_unavailable_reason(model.config, device=model.embed.weight.device.type):
        return reason
    if reason := refusal(model):
        return reason
    done = [name for name in converted(model)
            if not (isinstance(m := model.get_submodule(name), (GemvLinear, StaticExperts)) or compilable(m))]
    if done:
        return (f"compiled decoding takes a plain model, and {done[0]} was converted "
                f"({type(model.get_submodule(done[0])).kernel}): load the model without that kernel "
                f"(frugallm.load_for_inference(path, prepack=False); `--compile` on the command line does)")
    return None


class GemvLinear(nn.Linear):
    """nn.Linear whose one-row calls, while torch.compile traces them, are written as a multiply
    and a sum that inductor emits as one fused fp32-accumulating reduction: a bandwidth-bound
    GEMV with no library call. Eager calls (and traced calls on several rows) are nn.Linear's.
    `CompiledDecode` swaps it in for a model's linears (same parameters, same state dict)."""

    kernel = "compiled-gemv"

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "GemvLinear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias  # the same Parameter objects
        new.train(linear.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and x.numel() == x.shape[-1] and self.bias is None:
            acc = torch.promote_types(x.dtype, torch.float32)  # bf16 in, fp32 accumulation
            return (x[..., None, :] * self.weight).sum(-1, dtype=acc).to(x.dtype)  # (..., out)
        return super().forward(x)


class StaticExperts(RoutedExperts):
    """RoutedExperts with static-shape dispatch while traced (kernels/experts.py static_experts: gathered
    GEMVs at batch 1, every expert densely for a batch); eager calls (prefill) keep the grouped path."""

    kernel = "compiled-static-experts"

    @classmethod
    def from_experts(cls, experts: RoutedExperts) -> "StaticExperts":
        return over_same_weights(cls, experts)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return static_experts(x, weights, idx, self.w1, self.w2, self.w3, self.limit)


class CompiledDecode:
    """`decoder(tokens, cache)` == `model(tokens, cache=cache, absorb=True)` for a
    cached decode or verify step, compiled, and `decoder.mtp_step` == `model.mtp_step` for the
    speculative drafts. Pass it to `generate(..., decoder=)`.

    The model must stay frozen afterwards (its weights are compiled in) and in inference mode.
    """

    def __init__(self, model, cpp_wrapper: bool = True, log=None, qgemv_isa: int | None = None):
        reason = unavailable_reason(model)
        if reason:
            raise RuntimeError(f"cannot compile the decode step: {reason}")
        self.model = model
        self.log = log or _stderr
        self._shapes = set()  # (step, batch, tokens) already compiled: a new one is a wait worth saying
        self._calls = set()  # what _settings has seen a call of (a later one skips the guards)

        def make(name, m, reads_weight):  # eager calls (prefill, the first draft window) are unchanged
            if type(m) is nn.Linear:  # the output head included (see above)
                return GemvLinear.from_linear(m)
            return StaticExperts.from_experts(m) if type(m) is RoutedExperts else None

        swap_matmuls(model, make)  # kernels/swap.py: the one mechanism
        swap_quantized(model, qgemv_isa)  # int8 / int4 codes: GEMVs over the codes (kernels/compiled_quant.py)
        # Set around every call, not passed as torch.compile(options=): dynamo reads `freezing` too,
        # while tracing (to keep the weights as constants instead of graph inputs), and options
        # only reach inductor; without it the step ran ~1.6x slower. Costs ~16 us a call.
        # cpp.enable_concat_linear: linears that read the same input (wq_a and wkv_a; a SwiGLU's w1
        # and w3) become one GEMM each: 56 instead of 78 oneDNN calls a step on the 100M
        # model, ~9 us of fixed cost each at batch 1 (-0.3 ms a step, five of six alternated runs).
        # cpp.weight_prepack off: freezing's oneDNN packing leaves mkldnn tensors among the graph's
        # constants, which inductor's on-disk FX graph cache cannot pickle, so every start compiled
        # again. Off, a later process loads the compiled graph (a tiny-preset start 26 -> 12 s, above),
        # and a step costs the same (medians of alternated runs in one process, one thread): 6.94 vs
        # 6.79 ms (packed vs not) at batch 1 on the 100M model (a busy host), 0.94 vs 0.96 ms at batch 1
        # and 3.74 vs 3.70 ms at batch 4 on the tiny preset.
        self._config = {"freezing": True, "cpp_wrapper": cpp_wrapper, "cpp.enable_concat_linear": True,
                        "cpp.weight_prepack": False}
        self._config_batch1 = {**self._config, "post_grad_fusion_options": {"decompose_mm_pass": {}}}
        no_module_guards = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
        self._step = torch.compile(_own_code(self._forward), dynamic=False, options=no_module_guards)
        self._mtp = torch.compile(_own_code(self._mtp_forward), dynamic=False, options=no_module_guards)

    def _forward(self, tokens, c_kv, k_pe, index_k, lengths):
        out = self.model(tokens, cache=KVCache.over(c_kv, k_pe, lengths, index_k=index_k), absorb=True)
        return out.logits, out.hidden

    def _mtp_forward(self, depth: int, h_prev, next_ids, c_kv, k_pe, index_k, lengths, logits_at):
        cache = KVCache.over(c_kv, k_pe, lengths, index_k=index_k)
        return self.model.mtp_step(depth, h_prev, next_ids, cache, absorb=True, logits_at=logits_at)

    def __call__(self, tokens: torch.Tensor, cache: KVCache) -> ModelOutput:
        """tokens (B, S) at positions lengths[b]..+S-1 of `cache` (a dynamic KVCache); its lengths
        advance by S, as with the eager model."""
        buffers = self._window(cache, tokens.shape[1])
        with self._settings("decode step", *tokens.shape, cache):
            logits, hidden = self._step(tokens, *buffers, cache.lengths)
        return ModelOutput(logits=logits, hidden=hidden)

    def mtp_step(self, depth: int, h_prev: torch.Tensor, next_ids: torch.Tensor, cache: KVCache,
                 absorb: bool | None = None, logits_at: torch.Tensor | None = None):
        """`model.mtp_step`, compiled for speculative drafting windows (absorbed attention over a
        few positions, one graph per width and depth); other calls (the first window after a
        prefill, naive attention) run eager."""
        if absorb is not True:
            return self.model.mtp_step(depth, h_prev, next_ids, cache, absorb, logits_at)
        buffers = self._window(cache, next_ids.shape[1])
        more = (None if logits_at is None else tuple(logits_at.shape), tuple(h_prev.shape))
        with self._settings(f"MTP draft step {depth}", *next_ids.shape, cache, *more):
            return self._mtp(depth, h_prev, next_ids, *buffers, cache.lengths, logits_at)

    @contextlib.contextmanager
    def _settings(self, step: str, batch_size: int, n_tokens: int, cache: KVCache, *more):
        """Around a step's call. A shape's first call compiles (tens of seconds: said on the log first;
        the ~30 s is the tiny preset on 2 cores, inductor's on-disk cache makes a later process quicker)
        under inductor's settings: at batch 1, its `decompose_mm_pass` rewrites every bmm whose batch
        dimension is at most this model's head count (the pass reads that limit from a module constant,
        so it is set here too). A later call of a compiled shape skips both the settings (~16 us) and
        dynamo's guard evaluation (~0.1 ms a step on the 100M model): only the guards that tell this
        step's compiled shapes apart run (set_stance(skip_guard_eval_unsafe=True)). That is safe here
        because nothing else a guard checks changes: the weights are frozen into the graph, and the
        inputs differ only in shape (LOG.md). A call is "later" when it matches an earlier one in
        everything a guard could tell apart: the step, its shape, the cache's size, the grad modes, `more`."""
        key = (step, batch_size, n_tokens, cache.max_len, torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
               *more)
        if key in self._calls:
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                yield
            return
        self._calls.add(key)
        if (step, batch_size, n_tokens) not in self._shapes:  # else at most a guard's recompile: not said
            self._shapes.add((step, batch_size, n_tokens))
            rows = f"batch {batch_size}, {n_tokens} token{'s' if n_tokens > 1 else ''}"
            self.log(f"compiling the {step} for {rows} (first use, ~30 s) ...")
        limit = decompose_mem_bound_mm.cpu_max_first_dimension_decomposition
        if batch_size == 1:
            decompose_mem_bound_mm.cpu_max_first_dimension_decomposition = self.model.config.n_heads
        try:
            with torch._inductor.config.patch(self._config_batch1 if batch_size == 1 else self._config), no_folding():
                yield
        finally:
            decompose_mem_bound_mm.cpu_max_first_dimension_decomposition = limit

    def _window(self, cache: KVCache, S: int) -> tuple[list, list, list | None]:
        """The cache's whole buffers (c_kv, k_pe, and index_k with DSA, else None), their length marked
        dynamic: one graph serves every cache size (with DSA, one more once the buffer holds more slots
        than index_topk, where the indexer starts to narrow and the attention to gather the top-k rows).
        Not the first max(lengths) + S slots: a view's strides would depend on the buffer length,
        and the first graph would be specialised to it."""
        T = int(cache.lengths.max()) + S
        if T > cache.max_len or T > self.model.config.max_seq_len:
            raise ValueError(f"writing {S} tokens after position {T - S} needs {T} slots; the cache holds "
                             f"{cache.max_len} and the context is {self.model.config.max_seq_len}")
        for buffers in cache.buffers():
            for buffer in buffers:
                torch._dynamo.maybe_mark_dynamic(buffer, 1)
        return cache.c_kv, cache.k_pe, cache.index_k

    @torch.inference_mode()
    def warmup(self, batch_size: int = 1, n_tokens: int = 1) -> None:
        """Compile the graph for (batch_size, n_tokens) now, on a throwaway cache."""
        cfg = self.model.config
        cache = KVCache(cfg, batch_size, n_tokens + 2, dtype=self.model.embed.weight.dtype,
                        device=self.model.embed.weight.device)
        cache.lengths.fill_(2)
        self(torch.zeros(batch_size, n_tokens, dtype=torch.long, device=cache.lengths.device), cache)


def _own_code(method):
    """The bound method on a copy of its code object: dynamo keeps compiled graphs per code object."""
    f = method.__func__
    return types.MethodType(types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__,
                                               f.__closure__), method.__self__)


def _stderr(line: str) -> None:
    print(f"frugallm: {line}", file=sys.stderr, flush=True)


def compile_decode(model, cpp_wrapper: bool = True, warmup: bool = False, speculative: bool = False,
                   log=None, qgemv_isa: int | None = None) -> CompiledDecode:
    """The model's decode step, compiled (see the module docstring); the model's routed experts
    become `StaticExperts` and its linears `GemvLinear` (kernels/swap.py swap_matmuls), for
    traced calls; eager calls behave as before. This returns at once: the compiling happens on
    each shape's first call (the first `generate`), tens of seconds, or here with warmup.
    warmup: compile batch 1's decode step now (and, with `speculative`, its D+1-token verify step)
    rather than on the first request.
    log(line): told before each compile ("compiling the decode step for batch 1, 1 token (first use,
    ~30 s) ..."); default: stderr.
    qgemv_isa: quantized codes' batch-1 GEMVs on kernels/native.py's int8-activation kernel with that
    implementation (built here if needed; where it cannot be, said on log and not used), or None."""
    if qgemv_isa is not None and (why := native.unavailable_reason(log or _stderr)):
        (log or _stderr)(f"{why}; the compiled fp32 GEMV over the codes runs instead")
        qgemv_isa = None
    decoder = CompiledDecode(model, cpp_wrapper=cpp_wrapper, log=log, qgemv_isa=qgemv_isa)
    for n_tokens in ([1] + ([model.config.n_mtp + 1] if speculative else [])) if warmup else []:
        decoder.warmup(1, n_tokens)
    return decoder
