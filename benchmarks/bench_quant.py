"""Weight-only int8 / fp8 (kernels/quantize.py) against fp32 and bf16, on a trained model: bytes per
parameter, decode speed (batch 1, one token per forward over the latent KV cache, absorbed MLA)
and val perplexity, side by side in one table.

Variants: fp32; bf16 (every weight and activation bf16); int8 and fp8 with bf16 activations (the
fast CPU setting; embedding, head and gate high precision, the default skip); int8 with the output
head quantized too; int8 and fp8 with fp32 activations (the weights' quantization error alone).
Timings alternate the variants within one process and report medians, so machine drift hits
them alike. FP8 on a CPU is storage, not speed: no CPU FP8 GEMM exists, each forward
dequantizes (docs/design/fp8.md).

    python benchmarks/bench_quant.py [--run RUN_DIR] [--steps 200] [--speed-preset small] [--prompt 64]
                                     [--new 32] [--rounds 5] [--dtype auto|fp32|bf16] [--save [VARIANT]]

The fp32 / bf16 rows compare the dtypes on purpose; the host's own choice for decoding
(frugallm/host.py choose_dtype("decode")) is printed above the table. "bf16 prepacked" is left out
where the host's oneDNN does not prepack bf16 weights.

Without --run it first trains the `tiny` preset for --steps steps (--dtype: the training precision,
auto = the host's train choice; the built-in corpus). A
second table times decoding on a randomly initialised --speed-preset model (speed does not depend
on the weights' values), where the weights, not per-op overheads, dominate a decode step.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import frugallm
from frugallm.infer import KVCache
from frugallm.kernels.prepack import prepack, unavailable_reason
from frugallm.kernels.quantize import quantize_model, weight_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _host import (add_host_args, host_record, pick_dtype, print_host_header, results_path,  # noqa: E402
                   save_output)


def variants(model: frugallm.Transformer) -> dict[str, frugallm.Transformer]:
    """fp32 model -> the variants (deep copies; the codes come from the fp32 weights)."""
    out = {"fp32": model.float().eval(), "bf16": copy.deepcopy(model).to(torch.bfloat16)}
    if unavailable_reason(out["bf16"]) is None:  # kernels/prepack.py: what `frugallm generate` runs for bf16
        out["bf16 prepacked"] = copy.deepcopy(out["bf16"])
        prepack(out["bf16 prepacked"])
    for fmt in ("int8", "fp8"):
        q = copy.deepcopy(model)
        quantize_model(q, fmt)
        out[f"{fmt} (fp32 act)"] = q
        out[f"{fmt} (bf16 act)"] = copy.deepcopy(q).to(torch.bfloat16)
    q = copy.deepcopy(model)
    quantize_model(q, "int8", skip=("embed", "gate"))
    out["int8 + head (bf16 act)"] = q.to(torch.bfloat16)
    order = ("fp32", "bf16", "bf16 prepacked", "int8 (bf16 act)", "int8 + head (bf16 act)", "fp8 (bf16 act)",
             "int8 (fp32 act)", "fp8 (fp32 act)")
    return {k: out[k] for k in order if k in out}


def decoder(model, prompt: torch.Tensor, new: int):
    """A closure that prefills `prompt` (1, P) into a fresh latent cache, then runs `new`
    single-token forwards (greedy); it returns the seconds spent in the decode forwards."""
    dtype = model.embed.weight.dtype

    @torch.inference_mode()
    def run() -> float:
        cache = KVCache(model.config, 1, prompt.shape[1] + new, dtype=dtype)
        token = model(prompt, cache=cache).logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for _ in range(new):
            token = model(token, cache=cache).logits[:, -1:].argmax(-1)
        return time.perf_counter() - t

    return run


@torch.inference_mode()
def val_loss(model, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    losses = [model(x, targets=y).lm_loss.float().item() * y.numel() for x, y in batches]
    return sum(losses) / sum(y.numel() for _, y in batches)


def val_data(run: Path, n_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from frugallm.train.config import TrainConfig
    from frugallm.train import data

    cfg = TrainConfig.from_json(run / "train_config.json")
    splits = data.prepare(cfg.data, frugallm.load_tokenizer(run), cfg.val_fraction, cfg.text_field)
    batches = data.val_batches(splits.val, cfg.seq_len, min(cfg.batch_size, 8))
    return [batches.get(i) for i in range(min(n_batches, batches.windows // batches.batch_size))]


def train_tiny(out: Path, steps: int, precision: str = "bf16") -> Path:
    from frugallm.train.config import TrainConfig
    from frugallm.train.trainer import train

    cfg = TrainConfig(steps=steps, batch_size=8, seq_len=256, eval_every=10**9, save_every=steps, sample_tokens=0,
                      log_every=50, precision=precision)
    train(frugallm.get_preset("tiny"), cfg, out, log=lambda s: print("  train:", s))
    return out


def time_decode(models: dict, prompt: torch.Tensor, new: int, rounds: int) -> dict[str, float]:
    """Median seconds per decoded token of each model, the models alternated round by round."""
    runs = {name: decoder(m, prompt, new) for name, m in models.items()}
    for run in runs.values():  # warm-up
        run()
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            times[name].append(run() / new)
    return {name: statistics.median(t) for name, t in times.items()}


def print_table(rows: dict) -> None:
    ref = rows["fp32"]
    loss = "val_loss" in ref
    print("| variant | bytes/param (all) | vs fp32 | bytes/param (quantized matrices) | decode ms/token | tokens/s "
          "| vs fp32 |" + (" val loss | ppl | Δloss vs fp32 |" if loss else ""))
    print("|---" * (10 if loss else 7) + "|")
    for name, r in rows.items():
        mbp = f"{r['matrix_bytes_per_param']:.3f}" if r["matrix_bytes_per_param"] else "—"
        line = (f"| {name} | {r['bytes_per_param']:.3f} | {r['bytes_per_param'] / ref['bytes_per_param']:.2f}× | {mbp} "
                f"| {r['decode_ms']:.2f} | {1e3 / r['decode_ms']:.0f} | {ref['decode_ms'] / r['decode_ms']:.2f}× |")
        if loss:
            line += (f" {r['val_loss']:.4f} | {torch.tensor(r['val_loss']).exp():.2f} "
                     f"| {r['val_loss'] - ref['val_loss']:+.4f} |")
        print(line)


def measure(models: dict, prompt, new: int, rounds: int, batches=None) -> dict:
    times = time_decode(models, prompt, new, rounds)
    rows = {}
    for name, m in models.items():
        wb = weight_bytes(m)
        rows[name] = {"bytes_per_param": wb["bytes_per_param"],
                      "matrix_bytes_per_param": wb["quantized_bytes_per_param"] if wb["quantized_params"] else None,
                      "decode_ms": 1e3 * times[name]}
        if batches is not None:
            rows[name]["val_loss"] = val_loss(m, batches)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, help="a trained frugallm run dir (default: train the tiny preset)")
    p.add_argument("--steps", type=int, default=200, help="training steps when no --run is given")
    p.add_argument("--speed-preset", default="small", help="preset of the random-weight speed table ('' = none)")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=32, help="decoded tokens per timed run")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--json", type=Path, help="also write the figures here (with --save: next to the .txt)")
    add_host_args(p, dtype_help="precision of the tiny training run when no --run is given (auto: the host's "
                                "train choice); the table compares dtypes on purpose")
    args = p.parse_args()
    if args.save is not None and args.json is None:
        args.json = results_path("bench_quant", args.save, ".json")
    save_output("bench_quant", args.save)
    print_host_header()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print(f"the host's own decode choice: {pick_dtype('decode').reason}")

    tmp = None
    if args.run is None:
        tmp = tempfile.TemporaryDirectory()
        train_dtype = pick_dtype("train", args.dtype)
        print(f"training the tiny preset for {args.steps} steps ({train_dtype.reason}) ...")
        t = time.perf_counter()
        args.run = train_tiny(Path(tmp.name) / "run", args.steps, train_dtype.name)
        print(f"  trained in {time.perf_counter() - t:.0f} s")
    base = frugallm.load(args.run, dtype=torch.float32, quantized=False)
    batches = val_data(args.run, args.val_batches)
    models = variants(base)
    n_val = sum(y.numel() for _, y in batches)
    print(f"model: {frugallm.count_params(base.config)} | val: {len(batches)} batches, {n_val} tokens | "
          f"decode: prompt {args.prompt}, {args.new} new tokens, batch 1, median of {args.rounds} rounds")

    prompt = batches[0][0][:1, : args.prompt]
    rows = measure(models, prompt, args.new, args.rounds, batches)
    print()
    print_table(rows)
    report = {"host": host_record(), "run": str(args.run), "trained": rows}
    if args.speed_preset:
        cfg = frugallm.get_preset(args.speed_preset).replace(n_mtp=0)
        torch.manual_seed(0)
        models = variants(frugallm.Transformer(cfg))
        print(f"\ndecode speed, random-weight `{args.speed_preset}` preset ({frugallm.count_params(cfg)['active']:,} "
              f"active parameters of {frugallm.count_params(cfg)['total']:,}, no MTP), same protocol:\n")
        report[args.speed_preset] = measure(models, torch.randint(0, cfg.vocab_size, (1, args.prompt)), args.new,
                                            args.rounds)
        print_table(report[args.speed_preset])
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
