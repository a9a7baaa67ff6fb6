"""Training at equal wall time: a tiny V3-shaped model vs a tiny V4-shaped one, on the same data; and mHC's
step overhead (V4 with the release's mHC vs the same V4 with a plain residual).

Issue 27, item 6. Three ordinary training runs (train/trainer.py `train`, as `frugallm train` runs them) in
this process, one after the other, each with the same time budget (--budget, set-up and the final eval
included: the trainer plans the steps that fit, and its learning-rate schedule ends on the last one), the
same data, seed, batch and sequence length:

  V3-shaped   preset `tiny`: MLA, sigmoid group-limited routing, plain residual, MTP
  V4          preset `tiny-v4`: the same width (dim 256, 4 layers, 16 routed experts), V4's hybrid attention
              (sliding / CSA / HCA), hash-routed first MoE layer, sqrtsoftplus, clamped SwiGLU, release mHC x4, MTP
  V4, no mHC  tiny-v4 with residual = plain: what mHC costs per step (and gains per step) at this size

Reported per run: steps done, median train tokens/s (the steps after the first), mean train LM loss of the
last 5 steps, and the val loss at the end (the same val split and batches for all three). mHC's step
overhead is V4's step time over V4-no-mHC's, from their tokens/s.

    python benchmarks/bench_v4_train.py [--budget 150s] [--data PATH] [--dtype auto|fp32|bf16] [--save [VARIANT]]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from frugallm.config import get_preset
from frugallm.model.count import count_params
from frugallm.train.config import TrainConfig
from frugallm.train.trainer import train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _host import add_host_args, print_host_header, save_output  # noqa: E402


def run(name: str, model_cfg, train_cfg: TrainConfig, root: Path) -> dict:
    """Train one configuration into root/<n>; its figures from metrics.jsonl."""
    t0 = time.perf_counter()
    result = train(model_cfg, train_cfg, root / name.replace(" ", "_").replace(",", ""), log=lambda line: None)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    last = rows[-5:]
    return {"name": name, "steps": rows[-1]["step"], "params": count_params(model_cfg)["total"],
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows[1:] or rows),
            "lm_loss": sum(r["lm_loss"] for r in last) / len(last), "val_loss": result.val_loss,
            "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", default="150s", help="each run's time budget, set-up included (default 150s)")
    ap.add_argument("--data", default="", help="training text (default: the built-in corpus)")
    add_host_args(ap, dtype_help="training precision of all runs (auto: the host's train choice)")
    args = ap.parse_args()
    save_output("bench_v4_train", args.save)
    print_host_header()
    v4 = get_preset("tiny-v4")
    models = [("V3-shaped (tiny)", get_preset("tiny")), ("V4 (tiny-v4, mHC)", v4),
              ("V4, no mHC", v4.replace(residual="plain", hc_form="paper"))]
    train_cfg = TrainConfig(data=args.data, steps=100_000, time_budget=args.budget, precision=args.dtype,
                            log_every=1, eval_every=100_000, save_every=100_000, sample_tokens=0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads | batch {train_cfg.batch_size} x "
          f"{train_cfg.seq_len} tokens | budget {args.budget} per run | lr {train_cfg.lr}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for name, cfg in models:
            torch.manual_seed(0)
            rows.append(run(name, cfg, train_cfg, Path(tmp)))
            print(f"  {name}: done in {rows[-1]['seconds']:.0f}s", flush=True)
    print(f"\n| model | params (main) | steps | tokens/s | lm loss (last 5) | val loss | wall |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['params'] / 1e6:.2f}M | {r['steps']} | {r['tokens_per_s']:,.0f} | "
              f"{r['lm_loss']:.4f} | {r['val_loss']:.4f} | {r['seconds']:.0f}s |")
    v3, with_hc, without = rows
    print(f"\nV4 / V3 tokens/s: {with_hc['tokens_per_s'] / v3['tokens_per_s']:.2f}x; val loss V4 - V3: "
          f"{with_hc['val_loss'] - v3['val_loss']:+.4f}")
    print(f"mHC step overhead (V4 step time / V4-no-mHC step time - 1): "
          f"{without['tokens_per_s'] / with_hc['tokens_per_s'] - 1:+.1%}; val loss with - without mHC: "
          f"{with_hc['val_loss'] - without['val_loss']:+.4f}")


if __name__ == "__main__":
    main()
