"""Fine-grained FP8 training (issue 6) vs bf16 and fp32: loss gap, memory, CPU emulation cost.

Part 1, the loss gap: the same model, seed, data order and token count trained three ways with the
trainer's public API (frugallm.train.trainer.train), built-in corpus:
    fp32   precision=fp32, AdamW moments fp32
    bf16   bf16 autocast over fp32 master weights, AdamW moments fp32 (the trainer's default)
    fp8    the V3 recipe: bf16 autocast + every Linear and routed expert in FP8 (convert_to_fp8:
           1x128 activation tiles, 128x128 weight blocks, E4M3, all three GEMMs) + bf16 AdamW moments
The relative gap (fp8 - bf16) / bf16 is reported for the final val loss and for the train loss
averaged over the last 10 % of steps (single batches are noisy).

Part 2, memory and step time on `small` (one batch of --mem-batch x --seq, one thread as the runs):
bytes per parameter of weights, gradients and optimizer state, measured from the tensors after one
step; activation memory = bytes of the tensors autograd saves for backward during one forward
(torch.autograd.graph.saved_tensors_hooks, each storage counted once, parameters excluded), with the
FP8 part of it, and apart from it autocast's bf16 copies of the weights (also held for the backward).

On CPU FP8 is an emulation (quantise, dequantise per group, fp32 GEMM), so it is SLOWER than
bf16: the step-time ratio is printed as measured, never as a speed-up.

The arms compare precisions on purpose (each row is named by its recipe); the host's own train
choice (frugallm/host.py) is printed in the header. Training runs are reused across invocations
(--out): a run trained on another host kind is flagged, since its tok/s are that host's.

    OMP_NUM_THREADS=1 python benchmarks/bench_fp8.py [--preset tiny] [--steps 250] [--arms fp32,bf16,fp8] [--seeds 0,1]
                                                     [--save [VARIANT]]
The JSON goes to benchmarks/results/bench_fp8[_<preset>]_<host-kind>.json unless --json says otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

from frugallm.config import get_preset
from frugallm.train.config import TrainConfig
from frugallm.model.transformer import Transformer
from frugallm.kernels.fp8 import convert_to_fp8
from frugallm.train.optim import build_optimizer
from frugallm.train.trainer import train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _host import (add_host_args, host_kind, host_record, pick_dtype, print_host_header,  # noqa: E402
                   results_path, save_output)

RECIPES = {  # TrainConfig fields of each arm
    "fp32": dict(precision="fp32", fp8=False, optim_state_dtype="fp32"),
    "bf16": dict(precision="bf16", fp8=False, optim_state_dtype="fp32"),
    "fp8": dict(precision="bf16", fp8=True, optim_state_dtype="bf16"),
}


def run_arm(name: str, seed: int, args) -> dict:
    run = Path(args.out) / f"{args.preset}-{args.steps}-{name}" if seed == 0 else \
        Path(args.out) / f"{args.preset}-{args.steps}-{name}-seed{seed}"
    if not any((run / "checkpoints").glob("step_*")):
        if (run / "metrics.jsonl").exists():  # another process is training it, or one crashed: never share a run
            raise SystemExit(f"{run} holds an unfinished run (in progress elsewhere, or crashed); wait for it "
                             f"or delete it, then run again")
        train_cfg = TrainConfig(steps=args.steps, batch_size=args.batch, seq_len=args.seq, eval_every=args.eval_every,
                                eval_batches=args.eval_batches, log_every=1, save_every=args.steps, sample_tokens=0,
                                threads=1, seed=seed, **RECIPES[name])
        print(f"--- {name} seed {seed}: training into {run}", flush=True)
        train(get_preset(args.preset), train_cfg, run, log=lambda line: None)
        (run / "host_kind.txt").write_text(host_kind() + "\n")
    trained_on = (run / "host_kind.txt").read_text().strip() if (run / "host_kind.txt").exists() else None
    if trained_on != host_kind():
        print(f"note: {run} was trained on {f'host kind {trained_on}' if trained_on else 'an unrecorded host'}, "
              f"not this one ({host_kind()}): its tok/s are that host's; delete the run to measure here", flush=True)
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    tail = rows[-max(1, len(rows) // 10):]
    timed = rows[len(rows) // 10:]  # skip the first 10 % (allocator and cache warm-up)
    return {"val": rows[-1]["val_loss"], "train_tail": sum(r["lm_loss"] for r in tail) / len(tail),
            "val_curve": {r["step"]: r["val_loss"] for r in rows if "val_loss" in r},
            "tok_s": sum(r["tokens_per_s"] for r in timed) / len(timed)}


def memory_and_time(name: str, args) -> dict:
    recipe = RECIPES[name]
    cfg = get_preset(args.mem_preset)
    torch.manual_seed(0)
    model = Transformer(cfg)
    if recipe["fp8"]:
        convert_to_fp8(model)
    opt = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), 1e-8, recipe["optim_state_dtype"])
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if recipe["precision"] == "bf16" \
        else contextlib.nullcontext
    ids = torch.randint(0, cfg.vocab_size, (args.mem_batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, tuple[int, str]] = {}

    def is_weight_copy(t) -> bool:
        """A cast of a parameter (autocast's bf16 weight), maybe seen through a view (t(), [e], ...):
        ToCopyBackward0 -> AccumulateGrad, behind at most three single-input view functions."""
        fn = t.grad_fn
        for _ in range(4):
            if fn is None:
                return False
            nxt = [f for f, _ in fn.next_functions if f is not None]
            if type(fn).__name__ == "ToCopyBackward0":
                return len(nxt) == 1 and type(nxt[0]).__name__ == "AccumulateGrad"
            if len(nxt) != 1 or not any(v in type(fn).__name__ for v in ("TBackward", "Transpose", "View", "Select",
                                                                           "Permute", "Expand", "Unsqueeze")):
                return False
            fn = nxt[0]
        return False

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            kind = "weight_copy" if is_weight_copy(t) else "fp8" if t.dtype == torch.float8_e4m3fn else "other"
            saved[st.data_ptr()] = (st.nbytes(), kind)
        return t

    times = []
    for i in range(3):  # step 0 measures activations (and warms up); steps 1-2 are timed
        t0 = time.perf_counter()
        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if i == 0 else contextlib.nullcontext()
        with hooks, autocast():
            loss = model(ids[:, :-1], targets=ids[:, 1:]).loss
        loss.backward()
        if i == 0:
            grads = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    n = sum(p.numel() for p in model.parameters())
    state = sum(v.nbytes for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    return {"params": n, "weights": sum(p.nbytes for p in model.parameters()) / n, "grads": grads / n,
            "optim": state / n, "act_mb": sum(b for b, k in saved.values() if k != "weight_copy") / 2**20,
            "fp8_mb": sum(b for b, k in saved.values() if k == "fp8") / 2**20,
            "weight_copy_mb": sum(b for b, k in saved.values() if k == "weight_copy") / 2**20,
            "step_s": min(times[1:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", help="model of the loss-gap runs")
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-batches", type=int, default=16)
    ap.add_argument("--arms", default="fp32,bf16,fp8")
    ap.add_argument("--seeds", default="0", help="comma-separated; each seed is a full bf16/fp8 pair")
    ap.add_argument("--seed-arms", default="bf16,fp8", help="arms run for the seeds after the first")
    ap.add_argument("--mem-preset", default="small")
    ap.add_argument("--mem-batch", type=int, default=8)
    ap.add_argument("--out", default="runs/bench_fp8")
    ap.add_argument("--json", default=None, help="default benchmarks/results/bench_fp8[_<preset>]_<host-kind>.json")
    add_host_args(ap)
    args = ap.parse_args()
    if args.json is None:
        args.json = str(results_path("bench_fp8", "" if args.preset == "tiny" else args.preset, ".json"))
    torch.set_num_threads(1)
    save_output("bench_fp8", args.save)
    print_host_header()
    print(f"(the arms compare recipes on purpose; the host's own choice: {pick_dtype('train').reason})")
    arms = args.arms.split(",")
    seeds = [int(x) for x in args.seeds.split(",")]
    t0 = time.perf_counter()
    # Seed 0 runs every arm; further seeds only --seed-arms (fp32 is the slow one and not the comparison asked for).
    runs = {(name, seed): run_arm(name, seed, args) for seed in seeds
            for name in (arms if seed == seeds[0] else [a for a in args.seed_arms.split(",") if a in arms])}
    mem = {name: memory_and_time(name, args) for name in RECIPES}  # cheap (3 steps): always all recipes
    tokens = args.steps * args.batch * args.seq
    print(f"\nPart 1: `{args.preset}` preset, {args.steps} steps x {args.batch} x {args.seq} = {tokens:,} tokens per arm, "
          f"built-in corpus, seeds {args.seeds} (init and data order), 1 thread")
    print(f"{'arm':<6}| {'seed':>4} | {'val loss':>9} | {'train loss (last 10%)':>21} | {'val gap vs bf16':>15} | "
          f"{'train gap vs bf16':>17} | {'tok/s':>6} | {'time vs bf16':>12}")
    gaps: dict[str, list[tuple[float, float]]] = {}
    for (name, seed), r in runs.items():
        base = runs.get(("bf16", seed))
        rel = (lambda k: (r[k] - base[k]) / base[k]) if base else None
        if rel:
            gaps.setdefault(name, []).append((rel("val"), rel("train_tail")))
        gap = (lambda k: f"{100 * rel(k):+.2f} %") if rel else (lambda k: "-")
        slow = f"{base['tok_s'] / r['tok_s']:.2f}x" if base else "-"
        print(f"{name:<6}| {seed:>4} | {r['val']:>9.4f} | {r['train_tail']:>21.4f} | {gap('val'):>15} | "
              f"{gap('train_tail'):>17} | {r['tok_s']:>6,.0f} | {slow:>12}")
    for name, g in gaps.items():
        if name != "bf16":
            v, t = [sum(x[i] for x in g) / len(g) for i in (0, 1)]
            print(f"{name:<6}| mean over {len(g)} seed(s): val gap {100 * v:+.2f} %, train gap {100 * t:+.2f} %")
    if len(seeds) > 1:  # the seed-to-seed spread of bf16 itself: the noise floor the gaps are read against
        vals = [runs[("bf16", s)]["val"] for s in seeds if ("bf16", s) in runs]
        print(f"bf16  | val loss across seeds: {min(vals):.4f} .. {max(vals):.4f} "
              f"(spread {100 * (max(vals) - min(vals)) / min(vals):.2f} %)")
    n = next(iter(mem.values()))["params"]
    print(f"\nPart 2: `{args.mem_preset}` preset ({n:,} parameters), one step of {args.mem_batch} x {args.seq} tokens, "
          f"1 thread")
    print(f"{'recipe':<6}| {'weights B/param':>15} | {'grads B/param':>13} | {'optim B/param':>13} | "
          f"{'total B/param':>13} | {'activations MiB':>15} | {'of which FP8':>12} | {'+ bf16 weight copies MiB':>24} | "
          f"{'step s':>6} | {'time vs bf16':>12}")
    for name, m in mem.items():
        slow = f"{m['step_s'] / mem['bf16']['step_s']:.2f}x" if "bf16" in mem else "-"
        print(f"{name:<6}| {m['weights']:>15.2f} | {m['grads']:>13.2f} | {m['optim']:>13.2f} | "
              f"{m['weights'] + m['grads'] + m['optim']:>13.2f} | {m['act_mb']:>15.1f} | {m['fp8_mb']:>12.1f} | "
              f"{m['weight_copy_mb']:>24.1f} | {m['step_s']:>6.2f} | {slow:>12}")
    print(f"\n(total wall time {time.perf_counter() - t0:.0f} s)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"host": host_record(), "args": vars(args),
                                           "runs": {f"{n}-seed{s}": r for (n, s), r in runs.items()},
                                           "memory": mem}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
