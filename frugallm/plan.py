"""How a model runs: decided once (`resolve`), applied once (`apply`). See docs/architecture.md.

A model is loaded as the paper defines it (model/, from formats/). Everything about *how* it then runs
on this machine is an execution plan, and every rule that combines the options lives here:

    option        decided from                                   applied as
    dtype         the host profile (host.py) or the user's flag  model.to(dtype), or bf16 autocast (train)
    fp8           --set fp8=true (V3 §3.3 fine-grained FP8)       kernels/fp8.py convert_to_fp8
    experts       always: sorted, grouped GEMMs                  kernels/experts.py use_grouped_experts
    prepack       bf16 weights on a host whose oneDNN packs them  kernels/prepack.py prepack
    compile       --compile (auto: where it works here)          torch.compile (train) / kernels/compiled.py
    parallel      --ep/--pp/--dp under torchrun (parallel/)       world.parallelize: EP, then PP or FSDP2

The rules: a model whose weights are quantized codes runs them as they are (they dequantize to the plan's
dtype as they run), so it gets no other kernel; a compiled decode packs its own weights, so compile and
prepack exclude each other; prepacking needs bf16 weights and a host that packs them; fp8, compile, an
online teacher and bf16 optimizer moments run in one process (`one_process_refusals`, which
parallel/layout.py reports with the layout's own problems before launch). `apply` is the only
caller of model.to(dtype) for execution, swap_matmuls' converters, parallelize and torch.compile, and it
applies them in one order (as torchtitan's parallelize does): dtype, numerics (fp8), grouped experts,
parallelism, prepacking, compile. The grouped experts replace model/moe.py's reference loop for every
plan; a later twin (expert parallelism, prepacking, compiled decode) may still take their place. `frugallm info --plan` prints a plan with the reason for each part.

The format layer may read weights in a storage dtype the caller asked for (`load(path, dtype)`); that is
a loading choice, not an execution one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass

import torch
from torch import nn

from .formats.open import open as open_model
from .host import DtypeChoice, HostProfile, choose_dtype, host_profile
from .io import cache_root
from .kernels import compiled as compiled_decode
from .kernels import native
from .kernels import prepack as prepacking
from .kernels.experts import use_grouped_experts
from .kernels.fp8 import convert_to_fp8
from .kernels.swap import converted, kernels_in_words

# train: fp32 master weights, bf16 by autocast; inference: generate / chat / serve (weights cast);
# prefill: a distillation teacher's logits (weights cast); eval: validation loss (autocast over fp32 weights)
PURPOSES = ("train", "inference", "prefill", "eval")


@dataclass(frozen=True)
class Plan:
    purpose: str
    dtype: torch.dtype
    reasons: tuple[str, ...]  # one line per decision, the dtype's first
    cast: bool = False  # inference / prefill: the weights cast to dtype; train keeps fp32 masters
    autocast: bool = False  # train / eval in bf16 over fp32 weights
    fp8: bool = False  # train: V3's fine-grained FP8 GEMMs (kernels/fp8.py)
    prepack: bool = False  # inference: bf16 weights packed for oneDNN (kernels/prepack.py)
    compile: bool = False  # train: torch.compile(model); inference: the decode step (kernels/compiled.py)
    speculative: bool = False  # inference + compile: the verify step's shapes compiled too
    qgemv_isa: int | None = None  # inference + compile + codes: int8 activations on kernels/native.py (its isa)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def precision(self) -> str:
        """The dtype's short name (fp32, bf16): what a run's train_config.json and metrics record."""
        return DtypeChoice(self.dtype, self.reasons[0]).name

    def autocast_context(self):
        """A context for the forward passes: bf16 autocast where the plan says so, else nothing."""
        return torch.autocast("cpu", dtype=self.dtype) if self.autocast else contextlib.nullcontext()

    def describe(self) -> str:
        parts = [f"{self.purpose}: {self.dtype_name}"] + [name for name in ("cast", "autocast", "fp8", "prepack",
                                                                           "compile") if getattr(self, name)]
        return " + ".join(parts) + "\n" + "\n".join(f"  - {r}" for r in self.reasons)


@dataclass
class Applied:
    """What `apply` returns: the model, what to call for a forward (compiled or not), and for a
    compiled inference plan the decoder to pass to generate(decoder=)."""

    model: nn.Module
    forward: nn.Module
    decoder: object | None = None


def one_process_refusals(ranks: int, *, fp8: bool = False, compile: bool = False, teacher: bool = False,
                         optim_state_dtype: str = "fp32") -> list[str]:
    """What a training run on `ranks` processes cannot combine, one message each (none on one process).
    Each part below is built for one process: the FP8 converters are not wired for FSDP2's sharded
    parameters, EP's twins or pipeline stages; the compiled model and the online teacher are whole-model
    objects; the bf16 optimizer moments are not sharded. parallel/layout.py reports these with the
    layout's own problems before any process starts; `resolve` refuses them again where the plan is made."""
    if ranks <= 1:
        return []
    out = []
    if teacher:
        out.append("distillation (teacher) runs in one process; drop --nproc / torchrun or the teacher")
    if fp8:
        out.append("fp8 training runs in one process for now (its converters are not built for FSDP2, EP "
                   "or pipeline stages); drop --set fp8=true, or run it without --nproc / torchrun")
    if compile:
        out.append("compile runs in one process only; drop --set compile=true")
    if optim_state_dtype != "fp32":
        out.append("optim_state_dtype=bf16 runs in one process only; use fp32 with several ranks")
    return out


COMPILE_ENV = "FRUGALLM_COMPILE"  # the default of --compile / compile=None: auto, on or off
COMPILE_MODES = ("auto", "on", "off")


def compile_choice(compile: bool | str | None = None) -> str:
    """"auto", "on" or "off" for a compile flag: True / False are on / off (the old on/off flag);
    None is the user's default, $FRUGALLM_COMPILE, else auto."""
    if compile is None:
        compile = os.environ.get(COMPILE_ENV) or "auto"
        if compile not in COMPILE_MODES:
            raise ValueError(f"{COMPILE_ENV}={compile!r} must be one of {', '.join(COMPILE_MODES)}; "
                             f"unset it for auto")
    if isinstance(compile, bool):
        return "on" if compile else "off"
    if compile not in COMPILE_MODES:
        raise ValueError(f"compile={compile!r} must be True, False or one of {', '.join(COMPILE_MODES)}")
    return compile


def resolve(purpose: str, profile: HostProfile | None = None, *, dtype="auto", compile: bool | str | None = False,
            prepack: bool = True, fp8: bool = False, quantized: bool = False, speculative: bool = False,
            ranks: int = 1, config=None, int8_activations: bool = True) -> Plan:
    """Every rule in one place. quantized: the model holds int8/fp8 weight codes (kernels/quantize.py);
    int8_activations: a compiled step over int8 / int4 codes quantizes its batch-1 GEMVs' activations
    (kernels/native.py) where a compiler can build that kernel; False keeps them fp32 (exact to the eager path);
    ranks: the processes a training plan runs on. compile: `compile_choice`'s on, off or auto; auto
    compiles an inference plan's decode step where kernels/compiled.py says it works here for a
    model of `config` (a ModelConfig; None: any), else stays eager with the reason as a plan line;
    a training plan compiles only when asked (on)."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose={purpose!r} must be one of {PURPOSES}")
    mode = compile_choice(compile)
    compile = mode == "on"
    if errors := one_process_refusals(ranks, fp8=fp8, compile=compile):
        raise ValueError("; ".join(errors))
    profile = profile or host_profile()
    choice: DtypeChoice = choose_dtype("prefill" if purpose == "eval" else purpose, dtype, profile)
    reasons = [choice.reason]
    if purpose == "train":
        bf16 = choice.dtype == torch.bfloat16
        if bf16:
            reasons.append("bf16 autocast over fp32 master weights")
        if fp8:
            reasons.append(f"fp8: V3's 1x128 / 128x128 scaled GEMMs, emulated in {choice.name}")
        if compile:
            reasons.append("compile: torch.compile of the whole model")
        return Plan(purpose, choice.dtype, tuple(reasons), autocast=bf16, fp8=fp8, compile=compile)
    if fp8:
        raise ValueError("fp8 is a training plan (V3's FP8 GEMMs); for FP8 inference weights, quantize: "
                         "`frugallm quantize RUN --to fp8`")
    if purpose == "prefill":
        return Plan(purpose, choice.dtype, tuple(reasons), cast=True)
    if purpose == "eval":
        return Plan(purpose, choice.dtype, tuple(reasons), autocast=choice.dtype == torch.bfloat16)
    auto_off = None  # compile auto -> off: why
    if mode == "auto" and purpose == "inference":
        auto_off = compiled_decode.planned_unavailable_reason(config, quantized=quantized)
        compile = auto_off is None
    if quantized and compile and (why := compiled_decode.planned_unavailable_reason(config, quantized=quantized)):
        raise ValueError(f"cannot compile the decode step: {why}")  # fp8 codes; int8 / int4 compile
    isa = None
    if quantized and compile:
        reasons.append("quantized weights kept as codes: the compiled step's batch-1 GEMVs read them "
                       "(kernels/compiled_quant.py)")
        if int8_activations and native.compiler():
            isa = native.host_isa(profile.flags)
            reasons.append(f"int8 activations: batch-1 GEMVs quantize the activation row per block of 32 and "
                           f"multiply int8 by int8 as llama.cpp does ({native.ISAS[isa]}, kernels/native.py; "
                           f"int8_activations=False keeps fp32 activations)")
    elif quantized:
        reasons.append(f"quantized weights kept as codes, dequantized to {choice.name} as they run: no other kernel")
        reasons += [f"compile auto -> off: {auto_off}"] if auto_off else []
        return Plan(purpose, choice.dtype, tuple(reasons), cast=True)
    packs = prepack and not compile and choice.dtype == torch.bfloat16 and profile.bf16_prepack
    if compile:
        reasons.append(f"compile{' auto -> on' if mode == 'auto' else ''}: the decode step as one torch.compile "
                       f"graph, ~2x faster decoding after compiling at start-up (it packs its own weights: no "
                       f"prepack; compiled graphs are cached in {inductor_cache_dir()})")
    elif packs:
        reasons.append("prepack: bf16 weights packed once for oneDNN (the same outputs, faster GEMVs)")
    elif prepack and choice.dtype == torch.bfloat16:
        reasons.append(f"no prepack: this host's oneDNN does not pack bf16 weights ({profile.capability})")
    reasons += [f"compile auto -> off: {auto_off}"] if auto_off else []
    return Plan(purpose, choice.dtype, tuple(reasons), cast=True, prepack=packs, compile=compile,
                speculative=speculative, qgemv_isa=isa)


def inductor_cache_dir() -> str:
    """Where torch.compile's on-disk caches (inductor's FX graphs and compiled C++, AOTAutograd's graphs)
    live: $TORCHINDUCTOR_CACHE_DIR where the user set it, else frugallm's cache (FRUGALLM_CACHE)/inductor,
    which outlives a reboot (inductor's own default is a folder in /tmp)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")  # torch sets it to its default itself once it asks
    return chosen if chosen and chosen != default_cache_dir() else str(cache_root() / "inductor")


def apply(model: nn.Module, plan: Plan, world=None, before_compile=None) -> Applied:
    """Apply `plan` to `model` in place, in the documented order: dtype, numerics, grouped experts,
    parallelism, prepacking, compile. world: a parallel runtime (parallel/runtime.py) for training, else None.
    before_compile(model): called once the model's kernels are chosen and before any compile (a
    compiled decode swaps its linears, so what runs eagerly is reported there)."""
    if plan.cast:
        model.to(plan.dtype)
    if plan.fp8:  # before parallelism and compile; parameters stay fp32 masters
        convert_to_fp8(model, gemm_dtype=plan.dtype)  # the emulation multiplies in the run's dtype
    use_grouped_experts(model)  # before parallelism: FSDP2 holds on to the modules it wraps
    if world is not None:
        model = world.parallelize(model)  # EP, then FSDP2 or pipeline stages; one process: unchanged
    if plan.prepack and not converted(model):
        prepacking.prepack(model)
    forward, decoder = model, None
    if before_compile is not None:
        before_compile(model)
    if plan.compile:  # inductor reads the variable on each cache access (later shapes compile later)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache_dir()
    if plan.compile and plan.purpose == "train":
        forward = torch.compile(model)
    elif plan.compile:
        decoder = compiled_decode.compile_decode(model, warmup=True, speculative=plan.speculative,
                                                 qgemv_isa=plan.qgemv_isa)
    return Applied(model, forward, decoder)


# --- opening a model for a purpose ----------------------------------------------------------------

def load(path, dtype: torch.dtype | None = None, quantized: bool | None = None):
    """A model from a frugallm run directory (its last good checkpoint), a checkpoint, a quantized
    export or a Hugging Face DeepSeek directory (formats/open.py). Quantized weights keep their
    codes when no dtype is asked for; a dtype, or quantized=False, gives a plain model with the
    weights dequantized into it (formats/hf.py keep_quantized)."""
    return open_model(path).model(dtype=dtype, quantized=quantized)


def inference_dtype(dtype="auto") -> DtypeChoice:
    """The host's dtype for generation (host.py `choose_dtype("inference")`), with its reason."""
    return choose_dtype("inference", dtype)


def prepare_inference(path, dtype="auto", *, prepack: bool = True, compile: bool | str | None = None,
                      speculative: bool = False, log=None, before_compile=None) -> tuple[Applied, Plan]:
    """Open `path` and apply the inference plan: what generate, chat and serve run.
    compile: "auto" (None: $FRUGALLM_COMPILE, else auto) compiles the decode step where it works here
    for this model, "on" / True compiles it or fails saying why, "off" / False decodes eagerly.
    log(line): told the dtype's reason before the weights are read, then the compile decision and
    `matmul kernels: ...` once they are chosen; before_compile(): called after that line when the
    decode step is to compile."""
    log = log or (lambda line: None)
    explicit = dtype not in (None, "auto")
    choice = inference_dtype(dtype)
    log(choice.reason)
    opened = open_model(path)
    codes, config = _keeps_codes(opened, explicit), opened.config
    plan = resolve("inference", dtype=dtype, prepack=prepack, compile=compile, config=config,
                   quantized=codes, speculative=speculative)
    if codes == "int4" and not plan.compile:  # eager int4 unpacks every weight on every call
        why_not = tuple(line for line in plan.reasons if line.startswith("compile"))  # auto -> off: why
        plan = resolve("inference", dtype=dtype, prepack=prepack, compile="off", config=config,
                       speculative=speculative)
        plan = dataclasses.replace(plan, reasons=plan.reasons + why_not + (
            "int4 codes dequantized once at load: only the compiled step reads them fast (eager int4 decoded "
            "the 100M bench model at ~0.26x its plain weights' speed, LOG.md)",))
        explicit = True
        log(plan.reasons[-1])
    # an explicit dtype reads (and dequantizes) the weights into it; auto keeps quantized codes
    model = opened.model(dtype=plan.dtype, quantized=False) if explicit else opened.model()
    if explicit:
        plan = dataclasses.replace(plan, cast=False)  # already read in that dtype
    for line in plan.reasons:
        if line.startswith("compile"):
            log(line)

    def chosen(model):
        log(f"matmul kernels: {kernels_in_words(model)}")
        if plan.compile and before_compile is not None:
            before_compile()

    return apply(model, plan, before_compile=chosen), plan


def explain(purpose: str, path=None, **flags) -> Plan:
    """The plan `purpose` would get here (`frugallm info --plan`); with `path`, for that model: an
    inference plan keeps quantized weight codes unless an explicit dtype dequantizes them."""
    explicit = flags.get("dtype", "auto") not in (None, "auto")
    opened = open_model(path) if path else None
    quantized = bool(path) and purpose == "inference" and _keeps_codes(opened, explicit)
    return resolve(purpose, quantized=quantized, config=opened.config if opened else None, **flags)


def _keeps_codes(opened, explicit_dtype: bool) -> str | bool:
    """The format of the weight codes the loaded model holds ("int8", "int4", "fp8"), or False: a declared
    quantization, read without an explicit dtype (formats/hf.py keep_quantized's rule), from the metadata
    alone. The format lets the plan refuse compiling fp8 codes before any weight is read."""
    if explicit_dtype or opened.quantization is None:
        return False
    q = opened.quantization  # frugallm's quantization.json, or an HF quantization_config (DeepSeek's fp8)
    return q.get("format") or ("fp8" if q.get("quant_method") == "fp8" else True)


def load_for_inference(path, dtype="auto", prepack: bool = True):
    """`load` for generation on this machine: the inference plan's dtype (auto: bf16 only where it
    measures clearly faster here) and, for bf16 weights on a host whose oneDNN packs them,
    prepacked matmuls. Pass prepack=False for a model to compile (kernels/compiled.py); this model
    is never compiled itself (prepare_inference's compiled decoder is what compiles)."""
    return prepare_inference(path, dtype, prepack=prepack, compile="off")[0].model

