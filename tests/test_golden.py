"""Golden outputs of every execution plan in use, recorded from the code before the package restructure.

What is recorded (tests/data/golden.json), per host fingerprint (torch version, torch's CPU capability,
the CPU model, avx512_bf16), in two variants of the host profile (frugallm/host.py):

  host     the profile of this CPU's kind: FRUGALLM_HOST=bf16 where its flags have native bf16
           (avx512_bf16, amx_bf16, ...), else FRUGALLM_HOST=no-bf16. Not the measured profile: its GEMV
           ratio (1.8x here, against a 1.5x threshold) flipped `auto` to fp32 under load while recording.
  no-bf16  FRUGALLM_HOST=no-bf16: frugallm plays an AVX2-only host (auto -> fp32, no bf16 prepacking)

  training (the real trainer, a tiny MLA + MoE + MTP model on a generated corpus of
  grammar sentences, one thread):
    train_fp32, train_bf16 (autocast), train_fp8 (fine-grained FP8 GEMMs, auto precision, bf16 AdamW
    moments), distill (student on the train_fp32 run as teacher, auto precision and teacher dtype):
    every logged number of every step, and the precision the trainer resolved
  inference on the train_fp32 run (80 steps): prefill logits on fixed ids, the logits of one cached
  decode step (each as a sha256 of the whole tensor, a 64-entry sample of the last position, sum |x|
  and the argmax of every position), 12 greedy tokens of two ragged prompts, and speculative greedy tokens with their counters:
    eager_fp32, eager_bf16, eager_bf16_prepacked, auto (load_for_inference's own choice), compiled (the
    decode step through torch.compile, in the auto dtype, as `--compile` runs it), int8 and fp8
    (weight-only checkpoints written by `frugallm quantize`, loaded as generate loads them)
  the `auto` dtype choices (train / prefill / decode / inference) and the matmul kernels of each model

Comparison: on the recorded host (same fingerprint), every number, token and name must be equal bit for
bit. On another host, against any recorded one: floats within tolerances (fp32 1e-4 relative, bf16 and
quantized 3e-2, fp8 training 1e-1); each plan's "tokens" test (tokens, argmaxes, speculative and routing-derived counters)
is skipped there with the reason, and dtype / kernel names are compared only where the host plays the
record's profile. A host without a record of its own falls back to tolerance mode. EP / PP are compared against one process in tests/test_parallel.py, not here.

    FRUGALLM_RECORD_GOLDEN=1 pytest tests/test_golden.py      (re)record this host's entry
    FRUGALLM_GOLDEN_FINGERPRINT=x pytest tests/test_golden.py  pretend to be host "x" (tolerance mode)

After moving frugallm's modules, edit only the ADAPTER section below.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import random
import struct
import warnings
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).parent / "data" / "golden.json"
RECORD = os.environ.get("FRUGALLM_RECORD_GOLDEN", "") not in ("", "0")


# ======================================================================================================
# ADAPTER: every call into frugallm goes through these functions. After a refactor that moves modules,
# this section is the only one to edit; what the functions return must not change.
# ======================================================================================================

def train_run(pairs: list[str], out_dir: Path) -> list[dict]:
    """Train the tiny preset with `key=value` overrides through the real trainer; the metrics.jsonl lines."""
    from frugallm.config import get_preset
    from frugallm.train.config import TrainConfig, apply_overrides
    from frugallm.train.trainer import train

    model_cfg, train_cfg = apply_overrides(get_preset("tiny"), TrainConfig(), pairs)
    train(model_cfg, train_cfg, out_dir, log=lambda line: None)
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def auto_choices() -> dict:
    """The dtype `auto` takes for each purpose under the current FRUGALLM_HOST."""
    from frugallm.host import choose_dtype

    return {purpose: choose_dtype(purpose, "auto").name for purpose in ("train", "prefill", "decode", "inference")}


def bf16_prepack_supported() -> bool:
    from frugallm.host import host_profile

    return host_profile().bf16_prepack


def load_tokenizer(run: Path):
    import frugallm

    return frugallm.load_tokenizer(run)


def load_plain(run: Path, dtype: str = "auto", prepack: bool = True):
    """What generate / chat / serve load: frugallm.load_for_inference (quantized runs keep codes under auto)."""
    import frugallm

    return frugallm.load_for_inference(run, dtype=dtype, prepack=prepack)


def dtype_name(model) -> str:
    return str(model.embed.weight.dtype).removeprefix("torch.")


def kernels(model) -> str:
    """The model's matmul modules by kernel, e.g. 'prepacked-bf16 x30, plain x4'. The record counts the
    routed experts as 'plain': their grouped path was then RoutedExperts' own; since the restructure it
    is a twin of its own (kernels/experts.py, 'grouped'), counted here as the record did."""
    from frugallm.kernels.swap import kernels_in_use

    counts = dict(part.rsplit(" x", 1) for part in kernels_in_use(model).split(", "))
    grouped = int(counts.pop("grouped", 0))
    if grouped:
        counts["plain"] = str(int(counts.get("plain", 0)) + grouped)
    return ", ".join(f"{kind} x{n}" for kind, n in counts.items())


def quantize_run(run: Path, fmt: str, out: Path) -> Path:
    """A weight-only int8 / fp8 checkpoint of `run`, as `frugallm quantize RUN --to FMT --out OUT` writes it."""
    from frugallm.cli import main

    with contextlib.redirect_stdout(open(os.devnull, "w")):
        assert main(["quantize", str(run), "--to", fmt, "--out", str(out)]) == 0
    return out


def compile_unavailable(model) -> str | None:
    from frugallm.kernels.compiled import unavailable_reason

    return unavailable_reason(model)


def compile_decoder(model):
    from frugallm.kernels.compiled import compile_decode

    return compile_decode(model)


def generate(model, prompts, n: int, **kwargs):
    import frugallm

    return frugallm.generate(model, prompts, n, temperature=0.0, **kwargs)


@torch.inference_mode()
def prefill_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


@torch.inference_mode()
def decode_step_logits(model, ids: torch.Tensor, next_ids: torch.Tensor, decoder=None) -> torch.Tensor:
    """Prefill `ids` (B, T) into a KV cache, then the logits of one cached decode step on `next_ids` (B, 1),
    through the eager absorbed path or the compiled decoder."""
    from frugallm.model.kv_cache import KVCache

    cache = KVCache(model.config, ids.shape[0], ids.shape[1] + 4, dtype=model.embed.weight.dtype)
    model(ids, cache=cache)
    return (decoder(next_ids, cache) if decoder else model(next_ids, cache=cache, absorb=True)).logits


# ======================================================================================================
# end of ADAPTER
# ======================================================================================================

# a corpus with structure (random words would leave greedy decoding one repeated token): sentences of a
# small grammar, seeded, with a few non-ASCII characters for the byte-level tokenizer
SUBJECTS = ["the cat", "a dog", "the old bird", "my friend", "a small child", "the teacher ✓"]
VERBS = ["sat on", "ran to", "looked at", "walked past", "jumped over", "found"]
OBJECTS = ["the mat.", "a ball.", "the park.", "the café.", "a red car.", "the über tree."]
MODEL = ["dim=32", "n_layers=2", "n_dense_layers=1", "n_heads=2", "q_lora_rank=0", "kv_lora_rank=16",
         "qk_nope_head_dim=8", "qk_rope_head_dim=8", "v_head_dim=8", "n_routed_experts=4", "n_expert_groups=1",
         "n_limited_groups=1", "n_activated_experts=2", "moe_inter_dim=16", "inter_dim=64", "vocab_size=300",
         "max_seq_len=64"]
TRAIN = ["seq_len=32", "batch_size=4", "lr=0.01", "tokenizer_train_chars=50000", "warmup_steps=2", "eval_batches=1",
         "log_every=1", "sample_tokens=0", "threads=1", "seed=0"]
STEPS = {"train_fp32": 80, "train_bf16": 5, "train_fp8": 5, "distill": 4}
NEW_TOKENS = 12
UNTIMED = ("tokens_per_s", "mfu")  # wall-clock figures in metrics.jsonl

TRAIN_PLANS = ("train_fp32", "train_bf16", "train_fp8", "distill")
INFER_PLANS = ("eager_fp32", "eager_bf16", "eager_bf16_prepacked", "auto", "compiled", "int8", "fp8")
# the no-bf16 variant runs the plans whose choices the host profile makes
VARIANTS = {"host": ("choices", *TRAIN_PLANS, *INFER_PLANS),
            "no-bf16": ("choices", "train_fp8", "distill", "eager_bf16_prepacked", "auto", "compiled", "int8", "fp8")}
# each plan is two tests: its numbers ("values") and its discrete outputs ("tokens": generated tokens,
# argmaxes, speculative counters; in training, the routing-derived balance figures and top-1 agreement),
# which are exact on the recorded host and not compared on another one
CASES = [(v, p, part) for v, plans in VARIANTS.items() for p in plans
         for part in (("values",) if p == "choices" else ("values", "tokens"))]

# tolerance mode (another host): relative tolerances by the plan's arithmetic
# fp8: a host whose kernels sum in another order moves a value across an e4m3 rounding boundary now
# and then, one code step = 2^-3 relative for that element; after a few optimizer steps the runs differ
# by a few percent (measured: grad norm 3.2 %, val perplexity 3e-4 with AVX2 kernels on the recording CPU)
TOL = {"fp32": 1e-4, "bf16": 3e-2, "fp8": 1e-1}
# discrete values (or values derived from routing decisions) that another host may legitimately change
DISCRETE_METRICS = {"max_violation", "max_violation_mean", "agreement"}
DISCRETE_OUTPUTS = {"tokens", "speculative_tokens", "speculative_stats", "argmax"}


def split(record: dict, part: str) -> dict:
    """The "values" or the "tokens" part of a plan's record (a step's number in both, to name it)."""
    def keep(key: str, discrete: set) -> bool:
        return key in ("step", "dtype", "shape") or (key in discrete) == (part == "tokens")

    if "metrics" in record:
        return {"metrics": [{k: v for k, v in m.items() if keep(k, DISCRETE_METRICS)} for m in record["metrics"]]}
    return {k: split(v, part) if isinstance(v, dict) and "sha256" in v else v
            for k, v in record.items() if keep(k, DISCRETE_OUTPUTS) or (isinstance(v, dict) and "sha256" in v)}


# --- the host fingerprint -----------------------------------------------------------------------------

BF16_FLAGS = ("avx512_bf16", "amx_bf16", "avx_ne_convert", "bf16")  # as frugallm/host.py reads them


def cpu_flags() -> set[str]:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip().lower() in ("flags", "features"):
                return set(value.split())
    return set()


def variant_profile(variant: str) -> str:
    """The FRUGALLM_HOST value a variant runs under."""
    if variant == "host":
        return "bf16" if cpu_flags() & set(BF16_FLAGS) else "no-bf16"
    return variant


def fingerprint() -> tuple[str, dict]:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip().lower() in ("model name", "hardware", "cpu model") and value.strip():
                model = value.strip()
                break
    info = {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_model": model, "avx512_bf16": "avx512_bf16" in cpu_flags()}
    key = "|".join(f"{k}={v}" for k, v in info.items())
    return os.environ.get("FRUGALLM_GOLDEN_FINGERPRINT", key), info


# --- what is recorded ---------------------------------------------------------------------------------

LOGIT_SAMPLE = 64  # logits kept as numbers: the last position's first 64 vocabulary entries, every row


def tensor_record(t: torch.Tensor) -> dict:
    """Exact and compact: a sha256 of the whole tensor's bytes (bit-for-bit on the recorded host), a
    sample of its values (float64 of them: they round-trip through JSON exactly), its float64 sum of
    |x| (tolerance mode), and the argmax of every position."""
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
            "last": t[:, -1, :LOGIT_SAMPLE].double().tolist(), "argmax": t.argmax(-1).tolist(),
            "sha256": hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest(),
            "abs_sum": t.double().abs().sum().item()}


def write_corpus(folder: Path) -> Path:
    """8 documents of 400 sentences drawn (seeded) from the grammar above."""
    folder.mkdir()
    rng = random.Random(0)
    for d in range(8):
        sentences = (f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}" for _ in range(400))
        (folder / f"d{d}.txt").write_text(" ".join(sentences))
    return folder


def train_record(lines: list[dict]) -> dict:
    return {"metrics": [{k: v for k, v in m.items() if k not in UNTIMED} for m in lines]}


def inference_record(model, tok, decoder=None, speculative: bool = True) -> dict:
    bos = [tok.bos_id] if tok.bos_id is not None else []
    prompts = [bos + tok.encode("the cat sat on"), bos + tok.encode("a dog ran")]
    ids = torch.tensor([(bos + tok.encode("the dog sat on a mat with a ball"))[:8],
                        (bos + tok.encode("a cat ran to the park and"))[:8]])
    torch.manual_seed(0)
    out = {"dtype": dtype_name(model), "kernels": kernels(model), "prompts": prompts, "ids": ids.tolist()}
    if decoder is None:
        out["prefill_logits"] = tensor_record(prefill_logits(model, ids))
    out["decode_logits"] = tensor_record(decode_step_logits(model, ids, ids[:, -1:].flip(0), decoder))
    out["tokens"] = generate(model, prompts, NEW_TOKENS, decoder=decoder).tolist()
    if speculative:
        stats = {}
        out["speculative_tokens"] = generate(model, prompts[:1], NEW_TOKENS, speculative=True, stats=stats,
                                             decoder=decoder).tolist()
        out["speculative_stats"] = {k: stats[k] for k in ("forwards", "drafted", "accepted")}
    return out


def steps(plan: str) -> list[str]:
    n = STEPS[plan]
    return [f"steps={n}", f"save_every={n}", f"eval_every={n}"]


def collect(root: Path) -> dict:
    """Every plan of every variant: {variant: {plan: record or {"skipped": reason}}}."""
    mp = pytest.MonkeyPatch()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # results independent of the core count; the trainer runs threads=1 too
    try:
        mp.setenv("FRUGALLM_CACHE", str(root / "cache"))  # tokenizer and data shards
        corpus = write_corpus(root / "corpus")
        results = {}
        for variant, plans in VARIANTS.items():
            mp.setenv("FRUGALLM_HOST", variant_profile(variant))
            results[variant] = {plan: run_plan(plan, variant, root, corpus) for plan in plans}
        return results
    finally:
        torch.set_num_threads(threads)
        mp.undo()


def run_plan(plan: str, variant: str, root: Path, corpus: Path) -> dict:
    base = [*MODEL, *TRAIN, f"data={corpus}"]
    teacher = root / "train_fp32"  # the fp32 run: the teacher, and the model every inference plan loads
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="bf16 was asked for")  # eager_bf16_prepacked under no-bf16
        if plan == "choices":
            return {"FRUGALLM_HOST": variant_profile(variant), "auto": auto_choices(),
                    "bf16_prepack": bf16_prepack_supported()}
        if plan == "train_fp32":
            return train_record(train_run([*base, *steps(plan), "precision=fp32"], teacher))
        if plan == "train_bf16":
            return train_record(train_run([*base, *steps(plan), "precision=bf16"], root / variant / plan))
        if plan == "train_fp8":  # as the README runs it: --set fp8=true --set optim_state_dtype=bf16, auto precision
            pairs = [*base, *steps(plan), "precision=auto", "fp8=true", "optim_state_dtype=bf16"]
            return train_record(train_run(pairs, root / variant / plan))
        if plan == "distill":  # as `frugallm distill --teacher RUN` sets it up; a student without MTP
            pairs = [*base, *steps(plan), "precision=auto", f"teacher={teacher}", f"tokenizer={teacher}",
                     "n_mtp=0", "inter_dim=48", "kd_loss=fkl", "kd_weight=0.5"]
            return train_record(train_run(pairs, root / variant / plan))
        return infer_plan(plan, teacher, root)


def infer_plan(plan: str, run: Path, root: Path) -> dict:
    tok = load_tokenizer(run)
    if plan == "eager_fp32":
        return inference_record(load_plain(run, "fp32", prepack=False), tok)
    if plan == "eager_bf16":
        return inference_record(load_plain(run, "bf16", prepack=False), tok)
    if plan == "eager_bf16_prepacked":  # asked for; where the host profile says oneDNN cannot pack bf16, plain
        if not bf16_prepack_supported() and os.environ["FRUGALLM_HOST"] != "no-bf16":
            return {"skipped": "this host cannot prepack bf16 weights for oneDNN (host_profile().bf16_prepack)"}
        return inference_record(load_plain(run, "bf16", prepack=True), tok)
    if plan == "auto":
        return inference_record(load_plain(run), tok)
    if plan == "compiled":  # as `frugallm generate --compile`: the auto dtype, unpacked, then compiled
        model = load_plain(run, prepack=False)
        reason = compile_unavailable(model)
        if reason:
            return {"skipped": f"compiled decode unavailable: {reason}"}
        decoder = compile_decoder(model)
        return inference_record(model, tok, decoder=decoder, speculative=False)
    if plan in ("int8", "fp8"):
        out = root / "quantized" / plan
        if not out.exists():
            quantize_run(run, plan, out)
        return inference_record(load_plain(out), tok)
    raise ValueError(plan)


def dump(obj, indent: str = "") -> str:
    """JSON, one key a line, lists of numbers on one line (floats as repr: exact round trip)."""
    if isinstance(obj, dict) and obj:
        inner = indent + " "
        return "{\n" + ",\n".join(f"{inner}{json.dumps(k, ensure_ascii=False)}: {dump(v, inner)}"
                                   for k, v in obj.items()) + "\n" + indent + "}"
    return json.dumps(obj, ensure_ascii=False)


# --- comparison ---------------------------------------------------------------------------------------

def bits(x: float) -> str:
    return struct.pack(">d", x).hex()


def exact_diffs(got, want, path="") -> list[str]:
    if isinstance(want, dict) and isinstance(got, dict):
        diffs = [f"{path}.{k}: missing" for k in want if k not in got]
        diffs += [f"{path}.{k}: not recorded" for k in got if k not in want]
        return diffs + [d for k in want if k in got for d in exact_diffs(got[k], want[k], f"{path}.{k}")]
    if isinstance(want, list) and isinstance(got, list):
        if len(got) != len(want):
            return [f"{path}: length {len(got)} != recorded {len(want)}"]
        return [d for i, (g, w) in enumerate(zip(got, want)) for d in exact_diffs(g, w, f"{path}[{i}]")]
    if isinstance(want, float) or isinstance(got, float):
        if not (isinstance(got, (int, float)) and isinstance(want, (int, float))) or \
                bits(float(got)) != bits(float(want)) or type(got) is not type(want):
            return [f"{path}: {got!r} != recorded {want!r}"]
        return []
    return [] if got == want and type(got) is type(want) else [f"{path}: {got!r} != recorded {want!r}"]


def rel(got: list, want: list) -> float:
    g, w = torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64)
    return ((g - w).norm() / w.norm().clamp_min(1e-30)).item()


def tolerance_diffs(got: dict, want: dict, tol: float, compare_names: bool) -> list[str]:
    """What differs beyond tolerance in one plan's "values" part on another host. Dtype, precision and
    kernel names only where compare_names (the host plays the record's profile)."""
    bad = []
    if "metrics" in want:
        if len(got["metrics"]) != len(want["metrics"]):
            return [f"{len(got['metrics'])} logged steps, recorded {len(want['metrics'])}"]
        for g, w in zip(got["metrics"], want["metrics"]):
            for k, wv in w.items():
                gv = g.get(k)
                if k == "precision":
                    if compare_names and gv != wv:
                        bad.append(f"step {w['step']} precision: {gv!r} != recorded {wv!r}")
                elif isinstance(wv, float):
                    if not isinstance(gv, (int, float)) or not math.isclose(gv, wv, rel_tol=tol, abs_tol=tol * 1e-2):
                        bad.append(f"step {w['step']} {k}: {gv!r} vs recorded {wv!r} (rel tol {tol})")
                elif gv != wv:
                    bad.append(f"step {w['step']} {k}: {gv!r} != recorded {wv!r}")
        return bad
    if "auto" in want:  # the choices
        return [f"choices {got} != recorded {want}"] if compare_names and got != want else []
    for key in ("prompts", "ids"):
        if got[key] != want[key]:
            bad.append(f"{key}: {got[key]} != recorded {want[key]} (the tokenizer changed?)")
    for key in ("dtype", "kernels"):
        if compare_names and got[key] != want[key]:
            bad.append(f"{key}: {got[key]!r} != recorded {want[key]!r}")
    for key in ("prefill_logits", "decode_logits"):
        if (key in want) != (key in got):
            bad.append(f"{key}: {'missing' if key in want else 'not recorded'}")
        elif key in want:
            g, w = got[key], want[key]
            if g["shape"] != w["shape"]:
                bad.append(f"{key} shape {g['shape']} != recorded {w['shape']}")
                continue
            r = rel(g["last"], w["last"])
            if not r <= tol:
                bad.append(f"{key}: relative error {r:.3g} > {tol} against the recorded last-position logits")
            if not math.isclose(g["abs_sum"], w["abs_sum"], rel_tol=tol):
                bad.append(f"{key}: sum |logits| {g['abs_sum']!r} vs recorded {w['abs_sum']!r} (rel tol {tol})")
    return bad


def precisions(result: dict) -> set[str]:
    """The dtypes a plan's result ran in: its dtype (inference) and its metrics' precision (training)."""
    return ({str(result["dtype"])} if "dtype" in result else set()) | {
        str(m["precision"]) for m in result.get("metrics", []) if "precision" in m}


def plan_tolerance(got: dict, want: dict) -> float:
    names = {str(d.get("dtype")) for d in (got, want)} | {str(m.get("precision")) for d in (got, want)
                                                          for m in d.get("metrics", [])}
    quantized = any("quant" in str(d.get("kernels", "")) for d in (got, want))
    return TOL["bf16"] if quantized or names & {"bf16", "bfloat16"} else TOL["fp32"]


# --- the fixture and the test -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    key, info = fingerprint()
    saved = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {"format": 1, "records": {}}
    got = collect(tmp_path_factory.mktemp("golden"))
    if RECORD:
        saved["records"][key] = {"fingerprint": info, "variants": got}
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(dump(saved) + "\n")
    records = saved["records"]
    if key in records:
        return got, records[key], "exact", key
    if not records:
        pytest.skip(f"no golden record in {GOLDEN}; record one with FRUGALLM_RECORD_GOLDEN=1")
    # another host: the record of the closest host (same torch, then same ISA), within tolerances
    near = max(records, key=lambda k: (records[k]["fingerprint"]["torch"] == info["torch"],
                                       records[k]["fingerprint"]["cpu_capability"] == info["cpu_capability"]))
    return got, records[near], "tolerance", near


@pytest.mark.parametrize("variant,plan,part", CASES, ids=[f"{v}-{p}-{part}" for v, p, part in CASES])
def test_golden(golden, variant, plan, part):
    got_all, record, mode, key = golden
    got, want = got_all[variant][plan], record["variants"].get(variant, {}).get(plan)
    if want is None:
        pytest.fail(f"{variant}/{plan} is not in the record for {key}; re-record with FRUGALLM_RECORD_GOLDEN=1")
    if "skipped" in got:
        pytest.skip(got["skipped"])
    if "skipped" in want:
        if mode == "exact":
            pytest.fail(f"{variant}/{plan} ran here but the record for this host says: {want['skipped']}")
        pytest.skip(f"not recorded on {key}: {want['skipped']}")
    if plan != "choices":
        got, want = split(got, part), split(want, part)
    if mode == "exact":
        diffs = exact_diffs(got, want, f"{variant}/{plan}")
        assert not diffs, f"{len(diffs)} values differ from the golden record (bit for bit, same host {key}):\n" \
            + "\n".join(diffs[:20])
        return
    if part == "tokens":
        pytest.skip(f"another host than the record's ({key}): tokens, argmaxes and routing-derived figures are "
                    "compared only on the recorded host (rounding may legitimately flip a close decision)")
    # another host: dtype and kernel names are compared where it plays the same profile as the record's
    same_profile = got_all[variant]["choices"] == record["variants"][variant]["choices"]
    if plan == "choices" and not same_profile:
        pytest.skip(f"this host plays another profile than the record's ({key}): {got} vs {want}")
    here, there = (precisions(d[variant][plan]) for d in (got_all, record["variants"]))
    if not same_profile and here != there:  # e.g. an AVX2 host's fp32 against a record's bf16
        pytest.skip(f"this host runs {variant}/{plan} in {sorted(here)} and the record ({key}) in {sorted(there)}: "
                    "another computation (the forced no-bf16 variant compares values across hosts)")
    tol = TOL["fp8"] if "fp8" in plan else plan_tolerance(got, want)
    bad = tolerance_diffs(got, want, tol, compare_names=same_profile)
    assert not bad, f"{variant}/{plan} differs beyond tolerance from the record of {key}:\n" + "\n".join(bad[:20])
