"""How a matmul runs on this host: one mechanism, and one place that chooses.

Every matmul of the model sits in one of three module types (MATMUL_TYPES): nn.Linear, the SwiGLU
MLP (dense FFN, shared experts; its w1 and w3 read the same input, so a kernel may fuse them) and
RoutedExperts (model/moe.py: the stacked routed experts). A kernel or precision is a *twin* of such
a module: the same forward signature, the same state-dict names, a class attribute `kernel` that
names it. `swap_matmuls(model, make)` is the one mechanism that puts twins in, from outside the
model (model/ never imports kernels/):

    kernels/fp8.py       Fp8Linear, Fp8Experts                fine-grained FP8 training
    kernels/quantize.py  QuantLinear, QuantExperts            weight-only int8 / fp8 codes
    kernels/prepack.py   PackedLinear, PackedMLP, PackedExperts  oneDNN-packed bf16 weights
    kernels/compiled.py     GemvLinear, StaticExperts            traced decode steps (torch.compile)

A module whose weight the model reads directly (MLA's absorbed decode path reads
`wkv_b.weight`, declared by the model in `MLA.reads_weight`) is offered to `make` with
reads_weight=True, so a twin whose weight is costly to rebuild (a packed one) leaves it plain.

Which twins a model gets is decided by the execution plan (plan.py), never here: bf16 weights are
prepacked only where the host profile (host.py) says oneDNN packs bf16; fp32 weights stay plain
(MKL's fp32 GEMM/GEMV reads an (N, K) weight as it is: no per-call reorder to save).
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from ..model.moe import MLP, RoutedExperts

MATMUL_TYPES = (nn.Linear, MLP, RoutedExperts)

# make(name, module, reads_weight) -> a twin, or None to leave the module (and look inside it)
Make = Callable[[str, nn.Module, bool], "nn.Module | None"]


def swap_matmuls(model: nn.Module, make: Make) -> list[str]:
    """Offer every plain matmul module (exactly one of MATMUL_TYPES: twins are not offered again)
    to `make`, and put the twin it returns in its place. Returns the swapped names. A module left
    as it is has its children offered in turn (an MLP's three Linears). A twin marked `replaceable`
    (the grouped experts, kernels/experts.py: the default fast path, not a precision) is offered as
    its plain self (`as_plain()`), so that expert parallelism, prepacking or compiled decode, whose
    converters take plain modules, still replace it; kept when `make` returns None."""
    done: list[str] = []

    def visit(module: nn.Module, prefix: str) -> None:
        reads = getattr(type(module), "reads_weight", ())
        for name, child in list(module.named_children()):
            full = prefix + name
            offered = child.as_plain() if getattr(type(child), "replaceable", False) else child
            new = make(full, offered, name in reads) if type(offered) in MATMUL_TYPES else None
            if new is None:
                visit(child, full + ".")
            else:
                setattr(module, name, new)
                done.append(full)
                visit(new, full + ".")  # a twin's own plain children (none today) are offered too

    visit(model, "")
    return done


def kernels_in_use(model: nn.Module) -> str:
    """The model's matmul modules by kernel, e.g. 'prepacked-bf16 x30, plain x4' (for the CLI's line)."""
    counts: dict[str, int] = {}
    for m in model.modules():
        kind = getattr(type(m), "kernel", None) or ("plain" if type(m) in (nn.Linear, RoutedExperts) else None)
        if kind:
            counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(f"{kind} x{n}" for kind, n in counts.items())


# each kernel in a few words, for a person reading the set-up line of generate, chat and serve
KERNEL_WORDS = {
    "plain": "plain PyTorch",
    "grouped": "grouped experts (one GEMM per weight for all experts)",
    "prepacked-bf16": "bf16 weights prepacked for oneDNN",
    "compiled-gemv": "compiled GEMVs",
    "compiled-static-experts": "compiled experts",
    "fp8": "FP8 (128-blocks)",
    "weight-only-quantized": "quantized weights (int8/fp8, dequantized as they run)",
    "expert-parallel": "experts sharded over ranks",
}


def kernels_in_words(model: nn.Module) -> str:
    """kernels_in_use for a person: '16 bf16 weights prepacked for oneDNN, 3 plain PyTorch (of the 19
    matmul modules: linear layers and expert groups)'."""
    counts = [part.rsplit(" x", 1) for part in kernels_in_use(model).split(", ") if part]
    total = sum(int(n) for _, n in counts)
    return (", ".join(f"{n} {KERNEL_WORDS.get(kind, kind)}" for kind, n in counts)
            + f" (of the {total} matmul modules: linear layers and expert groups)")


def converted(model: nn.Module) -> list[str]:
    """Names of the modules already swapped for a twin (a replaceable one, still offered as plain,
    is not counted)."""
    return [name for name, m in model.named_modules()
            if getattr(type(m), "kernel", None) and not getattr(type(m), "replaceable", False)]

