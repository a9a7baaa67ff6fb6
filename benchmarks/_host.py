"""What every benchmark prints first and names its results by: the host (frugallm/host.py).

    import sys; from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent))   # works from any cwd
    from _host import add_host_args, pick_dtype, print_host_header, save_output

    print_host_header()             # host_profile().describe(), the host kind, torch's threads
    pick_dtype("train", "auto")     # choose_dtype: the profile's choice, or the one asked for
    save_output("bench_model", "")  # tee stdout to benchmarks/results/bench_model_<host-kind>.txt

`host_kind()` names the host in result files: the CPU's microarchitecture (or a short model
name) and its best bf16 path from the flags, e.g. `zen4-avx512bf16`, `zen3-avx2`,
`sapphirerapids-amx`, `neoversev1-neon-bf16`, plus `-forced-no-bf16` / `-forced-bf16` when
FRUGALLM_HOST forces the profile (frugallm's choices then play another host; the kernels that
run are still this machine's). `python benchmarks/_host.py` prints the header; `--kind` only the kind.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import sys
from pathlib import Path

import torch

from frugallm.host import choose_dtype, host_profile

RESULTS = Path(__file__).resolve().parent / "results"
DTYPE_CHOICES = ("auto", "fp32", "bf16")

# AMD family -> (microarchitecture by model range); x86 family/model from /proc/cpuinfo (CPUID)
_AMD = {
    0x17: lambda m: "zen" if m < 0x30 else "zen2",
    0x19: lambda m: "zen4" if (0x10 <= m <= 0x1F or 0x60 <= m <= 0x7F or 0xA0 <= m <= 0xAF) else "zen3",
    0x1A: lambda m: "zen5",
}
_INTEL_FAM6 = {
    0x3F: "haswell", 0x4F: "broadwell", 0x56: "broadwell", 0x55: "skylakex", 0x4E: "skylake", 0x5E: "skylake",
    0x8E: "kabylake", 0x9E: "kabylake", 0xA5: "cometlake", 0x6A: "icelakex", 0x6C: "icelakex", 0x7D: "icelake",
    0x7E: "icelake", 0x8C: "tigerlake", 0x8D: "tigerlake", 0x8F: "sapphirerapids", 0xCF: "emeraldrapids",
    0xAD: "graniterapids", 0xAE: "graniterapids", 0xAF: "sierraforest", 0x97: "alderlake", 0x9A: "alderlake",
    0xB7: "raptorlake", 0xBA: "raptorlake", 0xBF: "raptorlake", 0xAA: "meteorlake", 0xAC: "meteorlake",
    0xC5: "arrowlake", 0xC6: "arrowlake", 0xBD: "lunarlake",
}
_ARM = {  # (implementer, part) from /proc/cpuinfo on aarch64
    (0x41, 0xD0C): "neoversen1", (0x41, 0xD40): "neoversev1", (0x41, 0xD49): "neoversen2",
    (0x41, 0xD4F): "neoversev2", (0x41, 0xD8E): "neoversen3", (0x41, 0xD84): "neoversev3",
    (0x41, 0xD0B): "cortexa76", (0x41, 0xD41): "cortexa78", (0xC0, 0xAC3): "ampereone",
    (0x48, 0xD01): "kunpeng920", (0x46, 0x001): "a64fx",
}


def _cpuinfo_fields() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (lower-case keys), {} where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip().lower()
        if sep and key not in fields:
            fields[key] = value.strip()
    return fields


def _int(value: str | None) -> int | None:
    try:
        return int(value, 16 if value.lower().startswith("0x") else 10) if value else None
    except ValueError:
        return None


def _slug(text: str) -> str:
    text = re.sub(r"\(r\)|\(tm\)|processor|cpu @.*|\d+-core.*|with .*", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")[:24] or "unknown"


def microarch(fields: dict[str, str] | None = None, model_name: str | None = None) -> str:
    """A short name for the CPU: its microarchitecture where CPUID / the part number says it,
    else a slug of the model name (e.g. `amd-epyc`)."""
    f = _cpuinfo_fields() if fields is None else fields
    vendor = f.get("vendor_id", "")
    family, model = _int(f.get("cpu family")), _int(f.get("model"))
    if vendor == "AuthenticAMD" and family in _AMD and model is not None:
        return _AMD[family](model)
    if vendor == "GenuineIntel" and family == 6 and model in _INTEL_FAM6:
        return _INTEL_FAM6[model]
    arm = (_int(f.get("cpu implementer")), _int(f.get("cpu part")))
    if arm in _ARM:
        return _ARM[arm]
    name = model_name or f.get("model name") or platform.processor() or platform.machine()
    unnamed = not re.search(r"xeon|core", name, re.I)
    if vendor == "GenuineIntel" and family is not None and model is not None and unnamed:
        return f"intel-f{family}m{model:x}"
    return _slug(name)


def isa_tag(flags, arch: str) -> str:
    """The best bf16 path the flags show: amx > avx512bf16 > avx512 > avx2 (x86); neon[-bf16] (arm)."""
    flags = set(flags)
    if arch.lower() in ("aarch64", "arm64"):
        return "neon-bf16" if "bf16" in flags else "neon"
    for flag, tag in (("amx_bf16", "amx"), ("avx512_bf16", "avx512bf16"), ("avx512f", "avx512"), ("avx2", "avx2")):
        if flag in flags:
            return tag
    return arch.lower().replace("_", "") or "cpu"


def host_kind(profile=None) -> str:
    """`<microarch>-<isa>[-forced-<kind>]`, e.g. zen4-avx512bf16: the name results are filed under."""
    p = profile or host_profile()
    kind = f"{microarch(model_name=p.cpu_model)}-{isa_tag(p.flags, p.arch)}"
    if p.source.startswith("forced:"):
        kind += "-forced-" + p.source.split(":", 1)[1]
    return kind


def threads_line() -> str:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return (f"torch threads: {torch.get_num_threads()} (interop {torch.get_num_interop_threads()}) | "
            f"cores available: {cores} | OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")


def print_host_header() -> str:
    """Print the host profile, the host kind and the thread count (call it after setting threads);
    returns the host kind."""
    kind = host_kind()
    print(host_profile().describe())
    print(f"  host kind: {kind} | {threads_line()}", flush=True)
    return kind


def dtype_name(dtype: torch.dtype) -> str:
    """fp32 / bf16 / ..., as the rows print it."""
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float64: "fp64"}.get(dtype, str(dtype))


def pick_dtype(purpose: str, requested: str = "auto"):
    """choose_dtype(purpose, requested): a DtypeChoice (.dtype, .name, .reason)."""
    return choose_dtype(purpose, requested)


def add_host_args(parser, dtype_help: str | None = None, save: bool = True) -> None:
    """--dtype auto|fp32|bf16 and --save [VARIANT], the same in every benchmark."""
    if dtype_help is not None:
        parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help=dtype_help)
    if save:
        parser.add_argument("--save", nargs="?", const="", default=None, metavar="VARIANT",
                            help="also write this output to benchmarks/results/<bench>[_VARIANT]_<host-kind>.txt")


def results_path(bench: str, variant: str = "", suffix: str = ".txt", kind: str | None = None) -> Path:
    """benchmarks/results/<bench>[_<variant>]_<host-kind><suffix> (see results/README.md)."""
    parts = [bench] + ([variant] if variant else []) + [kind or host_kind()]
    return RESULTS / ("_".join(parts) + suffix)


class _Tee:
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self):
        for s in self.streams:
            s.flush()

    def isatty(self):
        return False

    def __getattr__(self, name):
        return getattr(self.streams[0], name)


def save_output(bench: str, variant: str | None) -> Path | None:
    """With variant not None (the --save option): copy everything printed from now on to
    results_path(bench, variant), after a first line with the command and the date."""
    if variant is None:
        return None
    path = results_path(bench, variant)
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "w", buffering=1)  # noqa: SIM115  (open for the rest of the process)
    argv = " ".join(shlex.quote(a) for a in sys.argv)
    env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "FRUGALLM_HOST") if k in os.environ)
    f.write(f"# {env + ' ' if env else ''}python {argv}   ({datetime.date.today()}, host kind {host_kind()})\n")
    sys.stdout = _Tee(sys.stdout, f)
    print(f"(writing this output to {path})")
    return path


def host_record() -> dict:
    """The host, for a results JSON: kind, description, threads."""
    return {"kind": host_kind(), "describe": host_profile().describe(), "torch_threads": torch.get_num_threads()}


if __name__ == "__main__":
    if "--kind" in sys.argv[1:]:
        print(host_kind())
    else:
        print_host_header()
