"""Batch-1 greedy decode against llama.cpp on the same weights (issue 28 item 4), with transformers beside.

One run, one host: llama.cpp (llama-cpp-python), frugallm eager and compiled, and transformers decode the
same prompt from the same weights. frugallm writes the GGUF files (formats/gguf.py) that llama.cpp reads,
and frugallm reads those very files back (docs/design/gguf.md):
  f32     llama.cpp f32 | frugallm fp32 (eager; compiled: kernels/compiled.py) | transformers fp32
          (a to_hf folder of the same weights) | frugallm with default flags (what `frugallm generate` runs)
  8-bit   llama.cpp q8_0 | frugallm int8 codes read from that q8_0 file. The file is written from
          frugallm's per-channel int8 codes (kernels/quantize.py, the output head included), so every
          32-block of a row shares the row's scale: llama.cpp reads ordinary q8_0 blocks, frugallm keeps
          per-row codes. One more row: frugallm on a per-block q8_0 file (as llama.cpp's converter writes).
  4-bit   llama.cpp q4_0 | frugallm int4: the q4_0 file's codes where frugallm's GGUF reader keeps them,
          else frugallm's own int4 of the f32 weights (said so), else "not available: <why>".
          Compiled 8- and 4-bit sides run the plan's int8 activations where a compiler builds
          kernels/native.py (as llama.cpp quantizes its activations for q8_0 / q4_0 dot products).
Each side runs in its own warm process (spawned, loaded once, warmed up; a compiled side compiles then,
timed and reported as start-up cost), all at --threads threads; the rounds then alternate the sides, so
drift of the shared machine hits them all, and the tables give medians. Decode tokens/s counts the
new - 1 tokens after the first (prefill, up to the first token, is reported apart). Every side decodes
exactly --new tokens: nobody stops at EOS (frugallm and llama.cpp take the plain argmax with no stop
token; transformers gets no eos_token_id).

Weight bandwidth: bytes of weights one decoded token reads (everything but the routed experts, those
by the top-k share K/E, one embedding row) x tokens/s, as a share of this host's read bandwidth
(bench_generate.py's bandwidth(), at the same thread count, measured in every round).

    python benchmarks/bench_llamacpp.py [--models tiny,100m] [--run runs/tiny] [--prompt 64] [--new 128]
        [--rounds 3] [--threads 2] [--qdtype auto|fp32|bf16] [--skip hf,compiled,...] [--save [VARIANT]]

Models: `tiny` = the trained run at --run (random weights when there is none: greedy agreement then
means little), `100m` = `small` widened to hidden 768, 8 layers, 16 experts of 256, top-4 (105.6M
parameters, random weights). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

import frugallm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _host import add_host_args, print_host_header, save_output  # noqa: E402
from bench_generate import bandwidth  # noqa: E402

T0 = time.perf_counter()
SKIPS = ("llama", "eager", "compiled", "defaults", "hf", "int8", "int4", "blocks")
PROMPT_TEXT = ("import os\nimport sys\n\n\ndef main(argv):\n    total = 0\n    for name in argv[1:]:\n"
               "        with open(name) as f:\n            for line in f:\n                total += len(line)\n"
               "    print(total)\n    return 0\n\n\nclass Counter:\n    def __init__(self):\n        self.n = 0\n")


def log(line: str) -> None:
    print(f"[{time.perf_counter() - T0:6.0f} s] {line}", file=sys.stderr, flush=True)


# --- the sides: (label, kind, file, options, skip tags, precision group) -------------------------

def sides(qdtype: str) -> list[dict]:
    q = dict(dtype=qdtype, codes=True)
    rows = [("llama.cpp f32", "llama", "f32", {}, {"llama"}, "f32"),
            ("frugallm fp32 eager", "frugallm", "f32", dict(dtype="fp32", compile=False), {"eager"}, "f32"),
            ("frugallm fp32 compiled", "frugallm", "f32", dict(dtype="fp32", compile=True), {"compiled"}, "f32"),
            ("frugallm default flags", "frugallm", "f32", dict(defaults=True), {"defaults"}, "f32"),
            ("transformers fp32", "hf", "hf", {}, {"hf"}, "f32"),
            ("llama.cpp q8_0", "llama", "q8_0", {}, {"llama", "int8"}, "8-bit"),
            ("frugallm int8 eager", "frugallm", "q8_0", dict(q, compile=False), {"eager", "int8"}, "8-bit"),
            ("frugallm int8 compiled", "frugallm", "q8_0", dict(q, compile=True), {"compiled", "int8"}, "8-bit"),
            ("frugallm int8 eager, per-block q8_0", "frugallm", "q8_0-blocks", dict(q, compile=False),
             {"eager", "int8", "blocks"}, "8-bit"),
            ("llama.cpp q4_0", "llama", "q4_0", {}, {"llama", "int4"}, "4-bit"),
            ("frugallm int4 eager", "frugallm", "q4_0", dict(q, compile=False, fallback="int4"), {"eager", "int4"},
             "4-bit"),
            ("frugallm int4 compiled", "frugallm", "q4_0", dict(q, compile=True, fallback="int4"),
             {"compiled", "int4"}, "4-bit")]
    return [dict(label=a, kind=b, file=c, opts=d, tags=e, group=f) for a, b, c, d, e, f in rows]


LLAMA_OF = {"f32": "llama.cpp f32", "8-bit": "llama.cpp q8_0", "4-bit": "llama.cpp q4_0"}


class Unavailable(Exception):
    """A side this build or this machine cannot run: its row says why instead of the run stopping."""


def active_bytes(named, cfg, experts_key: str, embed_key: str) -> int:
    """Bytes of weights one batch-1 token reads: (name, tensor) pairs, routed experts (name holds
    experts_key) by K/E, the embedding (name == embed_key) by one row, MTP modules excluded."""
    share = cfg.n_activated_experts / max(cfg.n_routed_experts, 1)
    total = 0.0
    for name, t in named:
        b = t.numel() * t.element_size()
        if name.startswith("mtp."):
            continue
        total += b / t.shape[0] if name == embed_key else b * share if experts_key in name else b
    return int(total)


def gguf_active_bytes(path, cfg) -> int:
    """Bytes of one token's weights as the GGUF file stores them (what llama.cpp reads)."""
    import gguf

    share = cfg.n_activated_experts / max(cfg.n_routed_experts, 1)
    total = 0.0
    for t in gguf.GGUFReader(str(path)).tensors:
        b = int(t.n_bytes)
        total += b / cfg.vocab_size if t.name == "token_embd.weight" else b * share if "_exps." in t.name else b
    return int(total)


class LlamaSide:
    def __init__(self, spec):
        try:
            import llama_cpp
        except (ImportError, OSError, RuntimeError) as e:
            raise Unavailable(f"llama-cpp-python is not importable ({e}); build it: "
                              f"CMAKE_ARGS='-DGGML_NATIVE=ON' pip install llama-cpp-python") from e
        n = spec["threads"]
        # f32 KV cache (ggml type 0) as frugallm's latent cache; at 192 positions it is < 1% of the reads
        self.llm = llama_cpp.Llama(model_path=spec["path"], n_ctx=spec["ctx"], n_batch=max(spec["prompt_len"], 32),
                                   n_threads=n, n_threads_batch=n, type_k=0, type_v=0, logits_all=False,
                                   verbose=False)
        self.n_vocab = self.llm.n_vocab()
        self.note = f"llama-cpp-python {llama_cpp.__version__}, f32 KV cache"
        self.dtype = spec["file"]
        self.weight_bytes = gguf_active_bytes(spec["path"], _gguf_config(spec["path"]))

    def _argmax(self) -> int:
        return int(np.argmax(np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.n_vocab,))))

    def run(self, prompt, new):
        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        tokens = [self._argmax()]
        t1 = time.perf_counter()
        for _ in range(new - 1):
            llm.eval(tokens[-1:])
            tokens.append(self._argmax())
        return dict(tokens=tokens, prefill_s=t1 - t0, decode_s=time.perf_counter() - t1)


def _gguf_config(path):
    from frugallm.formats.gguf_read import config_from_gguf, reader

    return config_from_gguf(reader(path))


class FrugalSide:
    """frugallm's public path: plan.prepare_inference (default flags or an explicit dtype), or, for weights
    kept as codes, plan.resolve(quantized=True) + plan.apply with the activation dtype asked for."""

    def __init__(self, spec):
        from frugallm import plan as plans

        o, path, marks = spec["opts"], spec["path"], {}
        mark = lambda *_: marks.setdefault("before_compile", time.perf_counter())
        t0 = time.perf_counter()
        if o.get("defaults"):
            applied, plan = plans.prepare_inference(path, before_compile=mark)
        elif not o.get("codes"):
            applied, plan = plans.prepare_inference(path, o["dtype"], compile=o["compile"], before_compile=mark)
        else:
            model, self.note = self._codes_model(spec)
            try:
                plan = plans.resolve("inference", dtype=o["dtype"], compile=o["compile"], quantized=True)
            except ValueError as e:
                raise Unavailable(str(e)) from e
            applied = plans.apply(model, plan, before_compile=mark)
        self.model, self.decoder = applied.model, applied.decoder
        t1 = marks.get("before_compile", time.perf_counter())
        self.load_s, self.compile_s = t1 - t0, (time.perf_counter() - t1) if self.decoder else None
        self.dtype = plan.dtype_name
        if not o.get("codes"):
            self.note = plan.describe().splitlines()[0]  # e.g. "inference: float32 + cast + compile"
        elif not any(k.endswith("_scale_inv") for k in self.model.state_dict()):
            raise Unavailable("the model holds no quantized codes after loading")
        self.weight_bytes = active_bytes(self.model.state_dict().items(), self.model.config, ".ffn.experts.",
                                         "embed.weight")

    @staticmethod
    def _codes_model(spec):
        """The model with its weight codes: from the file where the reader keeps them, else (`fallback`)
        frugallm's own quantization of the f32 file's weights, else Unavailable."""
        from frugallm.formats.open import open as open_model
        from frugallm.kernels import quantize as q

        if open_model(spec["path"]).quantization is not None:
            return frugallm.load(spec["path"]), f"codes read from the {spec['file']} file"
        fmt = spec["opts"].get("fallback")
        if fmt not in q.FORMATS:
            raise Unavailable(f"frugallm reads the {spec['file']} file's weights as floats (no codes kept) and "
                              f"`quantize` has no {fmt} (formats: {', '.join(q.FORMATS)})")
        model = frugallm.load(spec["f32_path"], dtype=torch.float32)
        q.quantize_model(model, fmt, skip=tuple(p for p in q.DEFAULT_SKIP if p != "head"))
        return model, f"not the {spec['file']} file's weights: frugallm's own {fmt} of the f32 weights"

    def run(self, prompt, new):
        stats = {}
        out = frugallm.generate(self.model, [prompt], new, decoder=self.decoder, stats=stats)
        return dict(tokens=out[0].tolist(), prefill_s=stats["prefill_s"], decode_s=stats["decode_s"])


class HFSide:
    def __init__(self, spec):
        try:
            import transformers
        except ImportError as e:
            raise Unavailable(f"transformers is not importable ({e})") from e
        transformers.utils.logging.disable_progress_bar()
        self.hf = transformers.AutoModelForCausalLM.from_pretrained(spec["path"], dtype=torch.float32).eval()
        self.hf.generation_config.eos_token_id = None  # decode exactly `new` tokens
        self.dtype = "fp32"
        self.weight_bytes = active_bytes(self.hf.named_parameters(), _gguf_config(spec["f32_path"]), "mlp.experts.",
                                         "model.embed_tokens.weight")
        impls = ["eager"]
        try:
            from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

            impls += [i for i in ("grouped_mm", "batched_mm") if i in ALL_EXPERTS_FUNCTIONS]
        except ImportError:
            pass
        short = spec["prompt"][:16]
        speed = {}
        for impl in impls:  # its fastest CPU experts implementation at batch 1, on a short warm run
            self.hf.set_experts_implementation(impl)
            self.run(short, 4)
            r = self.run(short, 12)
            speed[impl] = 11 / r["decode_s"]
        best = max(speed, key=speed.get)
        self.hf.set_experts_implementation(best)
        self.note = f"transformers {transformers.__version__}, experts_implementation={best} (of {', '.join(impls)})"

    def run(self, prompt, new):
        from transformers.generation.streamers import BaseStreamer

        class Clock(BaseStreamer):  # put(): the prompt first, then each new token
            def __init__(self):
                self.times = []

            def put(self, value):
                self.times.append(time.perf_counter())

            def end(self):
                self.times.append(time.perf_counter())

        ids = torch.tensor([prompt])
        clock = Clock()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                   do_sample=False, use_cache=True, pad_token_id=0, streamer=clock)
        first = clock.times[1]
        return dict(tokens=out[0, len(prompt):].tolist(), prefill_s=first - t0, decode_s=clock.times[-1] - first)


KINDS = {"llama": LlamaSide, "frugallm": FrugalSide, "hf": HFSide}


def worker(conn, spec) -> None:
    """One side's process: load, warm up, report ("ready", info) or ("unavailable", why), then answer
    ("run", prompt, new) with the run's tokens and times until ("quit",)."""
    sys.stdout = sys.stderr  # the parent's stdout is the results file
    torch.set_num_threads(spec["threads"])
    try:
        t0 = time.perf_counter()
        side = KINDS[spec["kind"]](spec)
        load_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        side.run(spec["prompt"], 8)
        info = dict(load_s=getattr(side, "load_s", load_s), compile_s=getattr(side, "compile_s", None),
                    warm_s=time.perf_counter() - t1, dtype=side.dtype, note=getattr(side, "note", ""),
                    weight_bytes=side.weight_bytes)
    except Unavailable as e:
        conn.send(("unavailable", str(e)))
        return
    except Exception as e:  # noqa: BLE001  (a row says what failed; the other sides still run)
        traceback.print_exc()
        conn.send(("unavailable", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]))
        return
    conn.send(("ready", info))
    while (msg := conn.recv())[0] == "run":
        conn.send(side.run(msg[1], msg[2]))


# --- the models and their files -------------------------------------------------------------------

def m100_config() -> frugallm.ModelConfig:
    """The 100M V3-shaped model of issue 28: `small` at hidden 768, 8 layers, 16 routed experts of 256, top-4."""
    return frugallm.get_preset("small").replace(dim=768, n_layers=8, moe_inter_dim=256, n_mtp=0)


def random_model(cfg) -> frugallm.Transformer:
    torch.manual_seed(0)
    model = frugallm.Transformer(cfg).eval()
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("gate.bias"):
                b.normal_(std=0.01)  # routing stays token-dependent, the selection bias is exercised
    return model


def fallback_tokenizer():
    """A small BPE trained on the repository's own docs and code, for models without a run."""
    from frugallm.tokenizer import train_tokenizer

    root = Path(__file__).resolve().parent.parent
    texts = [p.read_text(errors="replace") for p in sorted([*root.glob("docs/**/*.md"), *root.glob("frugallm/*.py")])]
    return train_tokenizer(iter(texts), 1024)


def build_model(name: str, run: Path):
    """(fp32 model, tokenizer, description, trained?) of `tiny` or `100m`."""
    have_run = run.exists()  # a run that exists but does not load stops here, with frugallm's own error
    tok = frugallm.load_tokenizer(run) if have_run else fallback_tokenizer()
    if name == "tiny" and have_run:
        return frugallm.load(run, dtype=torch.float32).eval(), tok, f"tiny, the trained run {run}", True
    if name == "tiny":
        return (random_model(frugallm.get_preset("tiny").replace(n_mtp=0)), tok,
                f"tiny, random weights (no run at {run}: `frugallm train --steps 50 --out {run}` gives one)", False)
    return random_model(m100_config()), tok, "100m: `small` at hidden 768, 8 layers, 16 experts of 256, top-4, " \
                                             "random weights", False


def write_files(model, tok, folder: Path, need: set) -> dict:
    """The GGUF files and the Hugging Face folder the sides read, all from the same fp32 weights."""
    from frugallm.formats.gguf import write_gguf
    from frugallm.kernels.fp8 import DEFAULT_SKIP
    from frugallm.kernels.quantize import quantize_model

    files = {"f32": write_gguf(model, tok, folder / "m-f32.gguf", "f32")}
    if "q8_0" in need:  # frugallm's per-channel int8 codes, the head included, written as q8_0 blocks
        m8 = copy.deepcopy(model)
        quantize_model(m8, "int8", skip=tuple(p for p in DEFAULT_SKIP if p != "head"))
        files["q8_0"] = write_gguf(m8, tok, folder / "m-q8_0.gguf", "q8_0")
    if "q8_0-blocks" in need:
        files["q8_0-blocks"] = write_gguf(model, tok, folder / "m-q8_0-blocks.gguf", "q8_0")
    if "q4_0" in need:
        files["q4_0"] = write_gguf(model, tok, folder / "m-q4_0.gguf", "q4_0")
    if "hf" in need:  # from the f32 file: its weights bit for bit, without the MTP modules
        files["hf"] = frugallm.to_hf(frugallm.load(files["f32"], dtype=torch.float32), folder / "hf", tokenizer=tok)
    return {k: str(v) for k, v in files.items()}


def prompt_ids(tok, n: int) -> list[int]:
    ids = tok.encode(PROMPT_TEXT)
    while len(ids) < n:
        ids = ids + ids
    return [tok.bos_id, *ids[: n - 1]]


# --- the runs -------------------------------------------------------------------------------------

def start(side: dict, spec: dict):
    """Spawn a side's process and wait until it is loaded and warm: (process, pipe, info) or (.., why)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=worker, args=(child, {**side, **spec}), daemon=True)
    proc.start()
    while not parent.poll(1.0):
        if not proc.is_alive():
            return proc, None, f"its process exited with code {proc.exitcode} while loading"
    status, info = parent.recv()
    return proc, parent if status == "ready" else None, info


def stop(procs) -> None:
    for proc, conn in procs:
        if conn is not None:
            try:
                conn.send(("quit",))
            except (BrokenPipeError, OSError):
                pass
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()


def measure(name: str, args, todo: list[dict]) -> dict:
    """Every side of one model: start-up, then `rounds` alternated runs; the raw results."""
    with tempfile.TemporaryDirectory(prefix="bench_llamacpp_") as tmp:
        log(f"{name}: building the model and writing its files")
        model, tok, desc, trained = build_model(name, Path(args.run))
        counts = frugallm.count_params(model.config)
        files = write_files(model, tok, Path(tmp), {s["file"] for s in todo})
        sizes = {k: _size(v) for k, v in files.items()}
        del model
        prompt = prompt_ids(tok, args.prompt)
        spec = dict(threads=args.threads, prompt=prompt, prompt_len=len(prompt), ctx=len(prompt) + args.new + 16,
                    f32_path=files["f32"])
        info, live, procs = {}, {}, []
        for side in todo:
            log(f"{name}: starting {side['label']}")
            proc, conn, got = start(side, dict(spec, path=files[side["file"]]))
            procs.append((proc, conn))
            info[side["label"]] = got
            if conn is None:
                log(f"{name}: {side['label']} not available: {got}")
            else:
                live[side["label"]] = conn
        runs = {label: [] for label in live}
        bw = []
        try:
            for r in range(args.rounds):
                bw.append(bandwidth(reps=3))
                for label, conn in list(live.items()):
                    if r and runs[label][0]["prefill_s"] + runs[label][0]["decode_s"] > args.slow:
                        continue  # far off the pace: one round says so, more would only spend the budget
                    log(f"{name}: round {r + 1}/{args.rounds}: {label}")
                    try:
                        conn.send(("run", prompt, args.new))
                        runs[label].append(conn.recv())
                    except (EOFError, OSError) as e:  # its process died: the row says so, the others go on
                        info[label] = f"its process died in round {r + 1} ({type(e).__name__})"
                        del live[label], runs[label]
        finally:
            stop(procs)
    return dict(name=name, desc=desc, trained=trained, counts=counts, info=info, runs=runs, bw=statistics.median(bw),
                sizes=sizes, prompt=len(prompt))


def _size(path: str) -> int:
    p = Path(path)
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size


# --- the report -----------------------------------------------------------------------------------

def speeds(runs: list[dict], new: int) -> tuple[float, float, float, float]:
    """(median, min, max decode tokens/s, median prefill ms) of a side's rounds."""
    tps = [(new - 1) / r["decode_s"] for r in runs]
    return statistics.median(tps), min(tps), max(tps), statistics.median(r["prefill_s"] for r in runs) * 1e3


def l3_bytes() -> int | None:
    """The last-level cache of CPU 0 (sysfs), or None where it does not say."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        sizes.append(int(text[:-1]) * {"K": 2**10, "M": 2**20}.get(text[-1], 1) if text[-1] in "KM" else int(text))
    return max(sizes) if sizes else None


def agreement(a: list[int], b: list[int], n: int = 32) -> str:
    a, b = a[:n], b[:n]
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"{same}/{min(len(a), len(b))}"


def report(res: dict, args, todo: list[dict]) -> list[tuple]:
    """Print one model's tables; returns its target rows (model, group, llama.cpp, best frugallm, ratio)."""
    c, info, runs = res["counts"], res["info"], res["runs"]
    print(f"\n## {res['desc']}\n{c['total']:,} parameters ({c['active']:,} active per token); prompt {res['prompt']} "
          f"tokens, {args.new} new, batch 1, greedy, {args.threads} threads per side, median of {args.rounds} "
          f"alternated rounds; host read bandwidth {res['bw'] / 1e9:.1f} GB/s ({args.threads} threads, median "
          f"over the rounds)")
    print("files: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in res["sizes"].items()))
    print(f"\nstart-up (each side's own process){'':8}{'load s':>8}{'compile s':>11}{'warm-up s':>11}  dtype / note")
    for s in todo:
        got = info[s["label"]]
        if isinstance(got, str):
            print(f"  {s['label']:40} not available: {got}")
            continue
        comp = f"{got['compile_s']:11.1f}" if got["compile_s"] is not None else f"{'-':>11}"
        print(f"  {s['label']:40}{got['load_s']:8.1f}{comp}{got['warm_s']:11.1f}  {got['dtype']}; {got['note']}")
    if any(not isinstance(g, str) and g["compile_s"] for g in info.values()):
        print("  (compile: once per process; inductor's on-disk cache shortens it after a host's first run)")
    print(f"\n{'decode':42}{'tok/s':>8}{'(min-max)':>18}{'vs llama.cpp':>14}{'prefill ms':>12}{'MB/token':>10}"
          f"{'GB/s':>7}{'of bw':>7}")
    med = {label: speeds(r, args.new) for label, r in runs.items()}
    targets, llc, cached = [], l3_bytes(), False
    for s in todo:
        if s["label"] not in med:
            continue
        tps, lo, hi, pre = med[s["label"]]
        ref = med.get(LLAMA_OF[s["group"]])
        vs = f"{tps / ref[0]:13.2f}x" if ref and s["kind"] != "llama" else f"{'':14}"
        wb = info[s["label"]]["weight_bytes"]
        spread = f"({lo:.1f}-{hi:.1f})" if len(runs[s["label"]]) == args.rounds else f"1 run (> {args.slow:.0f} s)"
        print(f"  {s['label']:40}{tps:8.1f}{spread:>18}{vs}{pre:12.1f}{wb / 1e6:10.2f}"
              f"{wb * tps / 1e9:7.1f}{wb * tps / res['bw']:7.0%}" + ("*" if llc and wb < llc else ""))
        cached |= bool(llc and wb < llc)
    if cached:
        print(f"  * a token's weights fit in the {llc / 2**20:.0f} MiB last-level cache: read from the cache, not "
              f"from memory, so the share of memory bandwidth can pass 100%")
    for group, llama in LLAMA_OF.items():
        ours = [(med[s["label"]][0], s["label"]) for s in todo  # the explicit-precision rows only
                if s["group"] == group and s["kind"] == "frugallm" and s["label"] in med
                and "defaults" not in s["tags"]]
        if llama in med and ours:
            best, label = max(ours)
            targets.append((res["name"], group, med[llama][0], label, best, best / med[llama][0]))
    ref = next((label for label in ("frugallm fp32 eager", "frugallm fp32 compiled") if label in runs), None)
    if ref and len(runs) > 1:
        base = runs[ref][0]["tokens"]
        print(f"\ngreedy tokens against {ref} (equal leading tokens of the first 32; "
              f"{'trained weights' if res['trained'] else 'random weights: near-ties, quantized rows differ anyway'}):")
        print("  " + "; ".join(f"{label} {agreement(r[0]['tokens'], base)}"
                               for label, r in runs.items() if label != ref))
    same = [(s["label"], LLAMA_OF[s["group"]]) for s in todo if s["kind"] == "frugallm" and s["label"] in runs
            and LLAMA_OF[s["group"]] in runs]
    if same:
        print("against llama.cpp at the row's own precision (the same file): " + "; ".join(
            f"{label} {agreement(runs[label][0]['tokens'], runs[llama][0]['tokens'])}" for label, llama in same))
    return targets


def print_targets(rows: list[tuple]) -> None:
    print("\n## targets: batch-1 greedy decode, best frugallm row >= 1.0x llama.cpp on the same weights")
    for name, group, llama, label, best, ratio in rows:
        print(f"  {name:5} {group:6} llama.cpp {llama:8.1f} tok/s | {label} {best:8.1f} tok/s | {ratio:5.2f}x  "
              f"{'met' if ratio >= 1.0 else 'NOT met'}")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,100m", help="comma-separated: tiny, 100m")
    parser.add_argument("--run", default="runs/tiny", help="the trained tiny run (default runs/tiny)")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens, bos included")
    parser.add_argument("--new", type=int, default=128, help="new tokens every side decodes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="threads of every side (torch and llama.cpp)")
    parser.add_argument("--qdtype", default="auto", choices=("auto", "fp32", "bf16"),
                        help="frugallm's activation dtype over int8/int4 codes (auto: the host's inference dtype)")
    parser.add_argument("--slow", type=float, default=20.0,
                        help="a side whose first run takes longer than this (s) runs no more rounds")
    parser.add_argument("--skip", action="append", default=[], help=f"comma-separated rows to leave out: {SKIPS}")
    add_host_args(parser)
    args = parser.parse_args()
    args.skip = {t for s in args.skip for t in s.split(",") if t}
    args.models = [m for m in args.models.split(",") if m]
    if bad := (args.skip - set(SKIPS)) | (set(args.models) - {"tiny", "100m"}):
        parser.error(f"unknown --skip or --models value(s): {sorted(bad)}; skips: {SKIPS}; models: tiny, 100m")
    if args.new < 2 or args.prompt < 2:
        parser.error("--new and --prompt must be at least 2")
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    save_output("bench_llamacpp", args.save)
    print_host_header()
    if forced := os.environ.get("FRUGALLM_HOST"):
        print(f"  FRUGALLM_HOST={forced}: frugallm's dtype choices play that host; the instructions that run (torch's "
              f"kernels, llama.cpp's) are this CPU's")
    todo = [s for s in sides(args.qdtype) if not s["tags"] & args.skip]
    targets = []
    for name in args.models:
        targets += report(measure(name, args, todo), args, todo)
    print_targets(targets)
    log("done")


if __name__ == "__main__":
    main()
