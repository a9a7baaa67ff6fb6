"""The host profile: what this CPU's kernels support, measured, and the dtype `auto` picks from it.

Why measured, not assumed: the same torch build runs bf16 matmuls at ~4.5x fp32 on a Zen 5 with
AVX-512-BF16 and at ~1/100 of fp32 on a Zen 3 with AVX2 only (a scalar fallback), and oneDNN's
bf16 weight prepacking raises an error there. A GEMV (decode at batch 1) is bound by memory, not
by arithmetic, so bf16 can win at decode on a host where it loses 100x at GEMMs. So the profile
holds two measured ratios, bf16 / fp32 throughput:

    gemm   a training-sized matmul (GEMM_SHAPE), in GFLOP/s        -> training, prefill
    gemv   one token through weight matrices (GEMV_SHAPE), in GFLOP/s -> decode

and `choose_dtype(purpose)` takes bf16 only where the ratio for that purpose is at least
BF16_MIN_SPEEDUP (a clear win; below it fp32 is as fast and exact). Inference (one dtype for
prefill and decode) needs the decode win AND a prefill that is not slower.

The micro-benchmark takes ~0.1-0.5 s and is cached per machine under the frugallm cache
directory, keyed by CPU model, flags and torch version. FRUGALLM_HOST overrides it:
    FRUGALLM_HOST=no-bf16   play a host without native bf16 (a Zen 3 / Intel client chip):
                            no bf16 prepacking, bf16 GEMMs 100x slower, GEMVs 0.8x
    FRUGALLM_HOST=bf16      play a host with native bf16 (AVX-512-BF16 / AMX)
    FRUGALLM_HOST=measure   measure again, ignoring the cache
so tests can exercise both kinds of choice on any machine. A forced profile changes frugallm's
choices only; the kernels that then run are this machine's (`frugallm info --host` says so).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import platform
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .io import cache_root

BF16_MIN_SPEEDUP = 1.5  # bf16 must be this much faster than fp32 to be chosen by `auto`
GEMM_SHAPE = (64, 512, 512)  # (M, K, N): a training micro-batch slice through a projection
GEMV_SHAPE = (2048, 2048)  # (N, K) weight of one decode GEMV ...
GEMV_MATRICES = 8  # ... swept over 8 of them: 128 MB fp32 / 64 MB bf16, past a last-level cache
MIN_SECONDS = 0.02  # each timing takes at least 3 calls and this long
# what the CPU flags say about bf16 (x86 /proc/cpuinfo names; aarch64 'bf16')
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "avx_ne_convert", "bf16")
SHOWN_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
               "amx_bf16", "amx_int8", "avx_ne_convert", "asimd", "sve", "bf16", "i8mm")
PURPOSES = ("train", "prefill", "decode", "inference")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp64": torch.float64, "float64": torch.float64}
ENV = "FRUGALLM_HOST"
VERSION = 2  # of the measurement: part of the cache key, so a changed benchmark is measured again


@dataclass
class HostProfile:
    cpu_model: str
    arch: str
    capability: str  # torch.backends.cpu.get_cpu_capability(): the ISA torch's own kernels use
    flags: list[str]  # the SHOWN_FLAGS this CPU has
    bf16_native: bool  # the CPU has bf16 instructions (flags)
    bf16_prepack: bool  # oneDNN packs bf16 weights here (kernels/prepack.py, inductor's freezing)
    torch_version: str
    gemm_gflops: dict[str, float]  # {"fp32": ..., "bf16": ...}
    gemv_gflops: dict[str, float]  # GEMV FLOP/s: 2 per weight element read
    source: str = "measured"  # measured | cached | forced:no-bf16 | forced:bf16

    @property
    def gemm_speedup(self) -> float:
        return self.gemm_gflops["bf16"] / self.gemm_gflops["fp32"]

    @property
    def gemv_speedup(self) -> float:
        return self.gemv_gflops["bf16"] / self.gemv_gflops["fp32"]

    def describe(self) -> str:
        """Several lines for `frugallm info --host` and the top of every benchmark."""
        return "\n".join([
            f"host: {self.cpu_model} ({self.arch}), torch {self.torch_version}, ISA {self.capability}, "
            f"flags {' '.join(self.flags) or '-'}",
            f"  native bf16: {'yes' if self.bf16_native else 'no'} | oneDNN bf16 prepacking: "
            f"{'yes' if self.bf16_prepack else 'no'} | profile: {self.source}",
            f"  one thread: GEMM {'x'.join(map(str, GEMM_SHAPE))}: fp32 {self.gemm_gflops['fp32']:.1f}, bf16 "
            f"{self.gemm_gflops['bf16']:.1f} GFLOP/s (bf16 {self.gemm_speedup:.2f}x)",
            f"  one thread: GEMV {GEMV_MATRICES}x{'x'.join(map(str, GEMV_SHAPE))}: fp32 {self.gemv_gflops['fp32']:.1f} "
            f"GFLOP/s ({self.gemv_gflops['fp32'] * 2:.1f} GB/s of weights), bf16 {self.gemv_gflops['bf16']:.1f} "
            f"GFLOP/s ({self.gemv_gflops['bf16']:.1f} GB/s) (bf16 {self.gemv_speedup:.2f}x)",
            "  auto: " + "; ".join(f"{p} {_name(choose_dtype(p, profile=self).dtype)}" for p in PURPOSES),
        ])


@dataclass
class DtypeChoice:
    dtype: torch.dtype
    reason: str  # one line: what was chosen and why, with the measured figures

    @property
    def name(self) -> str:
        return _name(self.dtype)


def _name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float64: "fp64"}.get(dtype, str(dtype))


# --- what the machine says about itself ----------------------------------------------------------

def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and value.strip() and model in ("", platform.machine()):
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return model, flags


def _bf16_prepack_ok() -> bool:
    """oneDNN bf16 weight prepacking works here: torch's own check, then one real tiny pack."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        torch.ops.mkldnn._reorder_linear_weight(torch.ones(16, 16, dtype=torch.bfloat16), 1)
        return True
    except (RuntimeError, AttributeError):
        return False


def _time(fn) -> float:
    """Seconds per call of fn: one warm-up call, then the fastest of at least 3 calls and
    MIN_SECONDS (the minimum: other work on the machine only ever adds time)."""
    fn()
    times: list[float] = []
    while len(times) < 3 or sum(times) < MIN_SECONDS:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _measure(bf16_prepack: bool) -> tuple[dict[str, float], dict[str, float]]:
    """GFLOP/s of a GEMM and of GEMVs, fp32 and bf16, through the kernels frugallm
    runs (2 FLOPs per weight element; a GEMV's time is the reading of its weights): F.linear, and for a bf16 GEMV with prepacking available, the packed oneDNN call
    (kernels/prepack.py), since an unpacked bf16 F.linear reorders its weight on every call.
    The GEMVs sweep GEMV_MATRICES weights (128 MB in fp32), more than a last-level cache holds,
    as a decode step's weights are: one repeated 16 MB matrix would be served from L3."""
    F = torch.nn.functional
    gemm, gemv = {}, {}
    M, K, N = GEMM_SHAPE
    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per core: the ratio is what counts, and one thread is not derailed
    try:                      # by a busy machine (a late OpenMP thread stalls a whole parallel GEMM)
        _sweep_kernels(F, gemm, gemv, g, bf16_prepack)
    finally:
        torch.set_num_threads(threads)
    return gemm, gemv


def _sweep_kernels(F, gemm, gemv, g, bf16_prepack: bool) -> None:
    M, K, N = GEMM_SHAPE
    with torch.no_grad():
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            a = torch.randn(M, K, generator=g).to(dtype)
            b = torch.randn(N, K, generator=g).to(dtype)
            gemm[name] = 2 * M * K * N / _time(lambda: F.linear(a, b)) / 1e9
            # zeros: memset-fast to allocate, and as fast as any values to multiply (no denormals)
            ws = list(torch.zeros(GEMV_MATRICES, *GEMV_SHAPE, dtype=dtype).unbind())
            x = torch.randn(1, GEMV_SHAPE[1], generator=g).to(dtype)
            if dtype == torch.bfloat16 and bf16_prepack:
                ws = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in ws]
                sweep = lambda: [torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "") for w in ws]  # noqa
            else:
                sweep = lambda: [F.linear(x, w) for w in ws]  # noqa: E731
            gemv[name] = 2 * GEMV_MATRICES * GEMV_SHAPE[0] * GEMV_SHAPE[1] / _time(sweep) / 1e9


def _identity() -> dict:
    model, flags = _cpuinfo()
    return {"cpu_model": model, "arch": platform.machine(), "capability": torch.backends.cpu.get_cpu_capability(),
            "flags": sorted(f for f in SHOWN_FLAGS if f in flags), "all_flags": flags,
            "torch_version": torch.__version__}


def cache_dir() -> Path:
    return cache_root() / "host"


def measure() -> HostProfile:
    """Measure this machine now (no cache)."""
    ident = _identity()
    flags = ident.pop("all_flags")
    prepack = _bf16_prepack_ok()
    gemm, gemv = _measure(prepack)
    return HostProfile(**ident, bf16_native=any(f in flags for f in BF16_FLAGS), bf16_prepack=prepack,
                       gemm_gflops=gemm, gemv_gflops=gemv)


def forced(kind: str, base: HostProfile | None = None) -> HostProfile:
    """A profile that plays a host of `kind` ('no-bf16' or 'bf16') with this machine's identity (no-bf16
    also drops the AVX-512 / AMX / bf16 flags, so kernel choices made by flag play an AVX2 host).
    The ratios are typical of such hosts (no-bf16: a Zen 3 measured in issue 14, 0.9 vs 120
    GFLOP/s; bf16: a Zen 5 with AVX-512-BF16, ~4.5x), not measured here."""
    ident = _identity()
    ident.pop("all_flags")
    if kind == "no-bf16":  # and no AVX-512 or AMX: the AVX2 laptop's flags (what kernels/native.py picks by)
        ident["flags"] = [f for f in ident["flags"] if not f.startswith(("avx512", "amx")) and f not in BF16_FLAGS]
        return HostProfile(**ident, bf16_native=False, bf16_prepack=False, gemm_gflops={"fp32": 120.0, "bf16": 0.9},
                           gemv_gflops={"fp32": 10.0, "bf16": 8.0}, source="forced:no-bf16")
    if kind == "bf16":
        return HostProfile(**ident, bf16_native=True, bf16_prepack=_bf16_prepack_ok(),
                           gemm_gflops={"fp32": 150.0, "bf16": 675.0}, gemv_gflops={"fp32": 10.0, "bf16": 18.0},
                           source="forced:bf16")
    raise ValueError(f"{ENV}={kind!r} must be one of: no-bf16, bf16, measure (or unset)")


@functools.lru_cache(maxsize=None)
def _profile(setting: str, cache_root_str: str) -> HostProfile:
    if setting not in ("", "measure"):
        return forced(setting)  # no-bf16 | bf16, else an error naming the variable and its values
    ident = _identity()
    ident.pop("all_flags")
    key = hashlib.sha256(json.dumps({**ident, "version": VERSION}, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_root_str) / f"{key}.json"
    if setting != "measure" and path.exists():
        try:
            return dataclasses.replace(HostProfile(**json.loads(path.read_text())), source="cached")
        except (ValueError, TypeError):
            pass  # a damaged or older cache file: measure again
    profile = measure()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(dataclasses.asdict(profile), indent=2) + "\n")
        tmp.replace(path)
    except OSError:
        pass  # a read-only cache: the profile is simply measured again next time
    return profile


def host_profile() -> HostProfile:
    """This machine's profile: FRUGALLM_HOST if set, else the cached measurement (measured once)."""
    return _profile(os.environ.get(ENV, "").strip().lower(), str(cache_dir()))


# --- choices -------------------------------------------------------------------------------------

def choose_dtype(purpose: str, requested="auto", profile: HostProfile | None = None) -> DtypeChoice:
    """The compute dtype for `purpose` (train | prefill | decode | inference). `requested` is
    'auto', a name (fp32, bf16, float32, bfloat16, fp64) or a torch.dtype; an explicit choice is
    honoured, and an explicit bf16 where it measures slower than fp32 warns with the ratio."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose={purpose!r} must be one of {PURPOSES}")
    p = profile or host_profile()
    gemm = f"bf16 {p.gemm_speedup:.2f}x fp32 at GEMMs ({p.gemm_gflops['bf16']:.0f} vs {p.gemm_gflops['fp32']:.0f} GFLOP/s)"
    gemv = f"bf16 {p.gemv_speedup:.2f}x fp32 at GEMVs ({p.gemv_gflops['bf16']:.1f} vs {p.gemv_gflops['fp32']:.1f} GFLOP/s)"
    figures = {"train": gemm, "prefill": gemm, "decode": gemv, "inference": f"{gemm}, {gemv}"}[purpose]
    where = f"on {p.cpu_model} [{p.source}]"
    # inference runs prefill and decode in one dtype: bf16 must win at decode and not lose at prefill
    speedup = {"train": p.gemm_speedup, "prefill": p.gemm_speedup, "decode": p.gemv_speedup,
               "inference": p.gemv_speedup if p.gemm_speedup >= 1.0 else p.gemm_speedup}[purpose]
    if requested is None or requested == "auto":
        dtype = torch.bfloat16 if speedup >= BF16_MIN_SPEEDUP else torch.float32
        why = "clearly faster" if dtype == torch.bfloat16 else f"not >= {BF16_MIN_SPEEDUP}x faster"
        return DtypeChoice(dtype, f"{purpose} dtype auto -> {_name(dtype)}: bf16 {why} ({figures}) {where}")
    dtype = requested if isinstance(requested, torch.dtype) else DTYPES.get(str(requested).lower())
    if dtype is None:
        raise ValueError(f"dtype {requested!r} must be auto or one of {', '.join(DTYPES)}")
    reason = f"{purpose} dtype {_name(dtype)} (asked for; {figures}) {where}"
    if dtype == torch.bfloat16 and speedup < 1.0:
        warnings.warn(f"bf16 was asked for, but on this host it measures slower than fp32 ({figures}); "
                      f"auto would choose fp32", stacklevel=2)
    return DtypeChoice(dtype, reason)
