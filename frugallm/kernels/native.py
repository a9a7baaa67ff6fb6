"""frugallm's own C++ kernel: batch-1 GEMVs over int8 / int4 weight codes with int8 activations.

Why: at batch 1 the compiled GEMV over codes (kernels/compiled_quant.py `gemv`) converts every code to
fp32 and multiplies in fp32, 3-4 vector instructions per 16 weights, and so is compute-bound well
below the memory's speed (LOG.md). llama.cpp instead quantizes the activation row to int8, per block
of 32 (dx = amax / 127), and multiplies int8 by int8 (AVX-512 VNNI `vpdpbusd`: 32 products a 256-bit
instruction, exact in int32). `csrc/qgemv.cpp` does the same, registered as the torch op
`torch.ops.frugallm.qgemv`, so a compiled step calls it from C++ (inductor's cpp_wrapper goes through
the dispatcher, no Python) and an eager step calls it like any op:

    qgemv(x (P, K), codes (N, Kc) | (E, N, Kc), scales, idx (P) | None, isa) -> (P, N) fp32

The activation quantization costs accuracy the fp32 GEMV does not have: a relative error of about
2^-8 per block (docs/design/quantization.md gives the measured logit and loss changes), which is why
the plan names it (`activations: int8`) and `qgemv_reference` below is its exact twin: the same
quantized activations, the same integer sums, summed in float64 (tests/test_native.py).

Building: the source is compiled once per (source, torch, compiler) into frugallm's cache
(~/.cache/frugallm/native), by g++ against torch's headers, in ~30 s, then loaded with
torch.ops.load_library. Where no compiler exists, or the build fails, `unavailable_reason` says why and
the plan keeps the compiled fp32 GEMV. `isa`: 0 plain C++, 1 AVX2, 2 AVX-512 VNNI; `host_isa` picks
it from the host profile's flags (FRUGALLM_HOST=no-bf16 plays an AVX2 host), and tests run each one
this CPU can.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import torch

from ..io import cache_root

SOURCE = Path(__file__).with_name("csrc") / "qgemv.cpp"
BLOCK = 32
ISAS = {0: "plain C++", 1: "AVX2", 2: "AVX-512 VNNI"}
ISA_FLAGS = {2: ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"), 1: ("avx2", "fma", "f16c")}


def compiler() -> str | None:
    return next((c for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c and shutil.which(c)), None)


def _library_path(cxx: str) -> Path:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + "".join(version).encode()).hexdigest()[:16]
    return cache_root() / "native" / f"frugallm_qgemv_{key}.so"


def _build(cxx: str, out: Path, log=None) -> None:
    """g++ the source into `out`, atomically (a half-written library is never loaded)."""
    from torch.utils import cpp_extension

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}.so")
    cmd = [cxx, "-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-DNDEBUG", str(SOURCE), "-o", str(tmp),
           *(f"-I{p}" for p in cpp_extension.include_paths()), f"-I{sysconfig.get_paths()['include']}",
           *(f"-L{p}" for p in cpp_extension.library_paths()), "-lc10", "-ltorch_cpu", "-ltorch",
           f"-Wl,-rpath,{cpp_extension.library_paths()[0]}"]
    if log:
        log(f"building frugallm's int8-activation GEMV kernel (once per machine, ~30 s) into {out.parent}")
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"{cxx} failed to build {SOURCE.name}:\n{done.stderr[-3000:]}")
    tmp.replace(out)
    for old in out.parent.glob("frugallm_qgemv_*.so"):  # builds of earlier sources or torch versions
        if old != out:
            old.unlink(missing_ok=True)


def _loaded() -> bool:
    return hasattr(torch.ops, "frugallm") and hasattr(torch.ops.frugallm, "qgemv")


def load(log=None) -> None:
    """Build (if not cached) and load the kernel into this process; raises RuntimeError saying why not."""
    if _loaded():
        return
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++ or clang++) on PATH: install one, e.g. `apt install g++`")
    path = _library_path(cxx)
    if not path.exists():
        _build(cxx, path, log)
    torch.ops.load_library(str(path))
    _register_fake()


def unavailable_reason(log=None) -> str | None:
    """None when the kernel is loaded (building it if needed), else why it cannot be."""
    try:
        load(log)
    except (RuntimeError, OSError) as e:
        return f"frugallm's int8-activation GEMV is unavailable: {e}"
    return None


def _register_fake() -> None:
    @torch.library.register_fake("frugallm::qgemv")
    def _(x, codes, scales, idx, isa):
        return x.new_empty((x.shape[0], codes.shape[-2]), dtype=torch.float32)


def host_isa(flags) -> int:
    """The best implementation for a CPU with these flags (HostProfile.flags)."""
    have = set(flags)
    return next((isa for isa, need in ISA_FLAGS.items() if have.issuperset(need)), 0)


def runnable_isas() -> list[int]:
    """Every implementation this CPU can execute (for tests: each against the reference)."""
    from ..host import _cpuinfo

    return [0] + sorted(isa for isa, need in ISA_FLAGS.items() if _cpuinfo()[1].issuperset(need))


def supports(codes: torch.Tensor, scales: torch.Tensor) -> bool:
    """Whether qgemv runs these codes: int8 (per-row or per-32 fp32 scales) or int4, K a multiple of 32."""
    if codes.dtype == torch.uint8:
        return scales.dtype == torch.float16
    K = codes.shape[-1]
    return codes.dtype == torch.int8 and K % BLOCK == 0 and scales.dtype == torch.float32 and (
        scales.dim() == codes.dim() - 1 or scales.shape[-1] == K // BLOCK)


def qgemv(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, idx: torch.Tensor | None, isa: int) -> torch.Tensor:
    """The op: x (P, K) -> (P, N) fp32 (see the module docstring)."""
    return torch.ops.frugallm.qgemv(x, codes, scales, idx, isa)


# --- the twin ----------------------------------------------------------------------------------

def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (P, K) -> (qx int8 (P, K), dx fp32 (P, K/32)): per block of 32, dx = amax / 127 and
    qx = round-half-even(x * (1 / dx)) in fp32, 0 for an all-zero block (the kernel's rule)."""
    xb = x.float().unflatten(-1, (-1, BLOCK))
    d = xb.abs().amax(-1) / 127
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    return (xb * inv[..., None]).round().to(torch.int8).flatten(-2), d


def qgemv_reference(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel's sums in plain torch, float64: the same int8 activations and integer block dot
    products, so the kernel may differ only by its fp32 accumulation order."""
    from .int4 import unpack_codes

    qx, dx = quantize_activations(x)
    w = codes if idx is None else codes[idx]  # (N, Kc) or (P, N, Kc)
    c = unpack_codes(w).to(torch.int64) - 8 if codes.dtype == torch.uint8 else w.to(torch.int64)
    s = scales if idx is None else scales[idx]
    q = qx.to(torch.int64).unflatten(-1, (-1, BLOCK))  # (P, G, 32)
    cb = c.unflatten(-1, (-1, BLOCK))  # (N, G, 32) or (P, N, G, 32)
    terms = (cb * q[:, None]).sum(-1).double() * dx.double()[:, None, :]  # (P, N, G)
    if s.dim() == c.dim():  # a scale per block
        return (terms * s.double()).sum(-1).float()
    return (terms.sum(-1) * s.double()).float()
