"""Experiments of the training issue, on the `small` preset, same data and tokens for every arm:

  balance: aux-loss-free bias (gamma 1e-3, alpha 1e-4: the V3 recipe; and gamma 1e-2, for runs of a few
           hundred steps, where 1e-3 moves a bias by at most 0.15) vs no balancing at all
           vs the classic auxiliary loss alone (alpha 3e-3, no bias: V2's expert-level alpha_1)
  mtp:     MTP on (D=1, lambda 0.3 -> 0.1) vs off, judged by the MAIN head's val loss

Prints one table: val loss, MaxVio (mean over MoE layers, averaged over the last quarter of logged
steps), and tokens/s, per arm. Runs go to --out (one run directory per arm; delete it to rerun).

    python benchmarks/exp_balance_mtp.py [--steps 150] [--out runs/exp]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from frugallm.config import TrainConfig, get_preset
from frugallm.train.trainer import train

ARMS = {
    "aux-free (V3)": dict(model={}, train=dict(bias_gamma=1e-3)),
    "aux-free gamma 1e-2": dict(model={}, train=dict(bias_gamma=1e-2)),
    "no balancing": dict(model=dict(balance_loss_alpha=0.0), train=dict(bias_gamma=0.0)),
    "aux loss only": dict(model=dict(balance_loss_alpha=3e-3), train=dict(bias_gamma=0.0)),
    "MTP off (aux-free)": dict(model=dict(n_mtp=0), train=dict(bias_gamma=1e-3)),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--out", default="runs/exp")
    ap.add_argument("--arms", default=";".join(ARMS), help="arm names separated by ;")
    args = ap.parse_args()
    rows = []
    for name in args.arms.split(";"):
        arm = ARMS[name]
        run = Path(args.out) / "".join(c if c.isalnum() or c in "-." else "_" for c in name)
        model_cfg = get_preset("small", **arm["model"])
        train_cfg = TrainConfig(steps=args.steps, batch_size=args.batch, seq_len=args.seq, lr=2e-3, warmup_steps=15,
                                eval_every=args.steps, eval_batches=16, log_every=5, save_every=args.steps,
                                sample_tokens=0, **arm["train"])
        if not (run / "metrics.jsonl").exists() or not any((run / "checkpoints").glob("step_*")):
            print(f"--- {name}: {run}", flush=True)
            train(model_cfg, train_cfg, run, log=lambda line: None)
        metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
        tail = metrics[-max(1, len(metrics) // 4):]
        rows.append((name, metrics[-1]["val_loss"], sum(m["max_violation_mean"] for m in tail) / len(tail),
                     sum(m["tokens_per_s"] for m in tail) / len(tail)))
    tokens = args.steps * args.batch * args.seq
    print(f"\nsmall preset, {args.steps} steps x {args.batch} x {args.seq} = {tokens:,} tokens per arm, built-in corpus")
    print(f"{'arm':<20}| {'val loss (main head)':>20} | {'MaxVio (last 1/4)':>17} | {'tokens/s':>8}")
    for name, val, vio, tps in rows:
        print(f"{name:<20}| {val:>20.4f} | {vio:>17.3f} | {tps:>8,.0f}")


if __name__ == "__main__":
    main()
