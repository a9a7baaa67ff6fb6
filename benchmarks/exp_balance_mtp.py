"""Experiments of the training issue, on the `small` preset, same data and tokens for every arm:

  balance: aux-loss-free bias (gamma 1e-3, alpha 1e-4: the V3 recipe; and gamma 1e-2, for runs of a few
           hundred steps, where 1e-3 moves a bias by at most 0.15) vs no balancing at all
           vs the classic auxiliary loss alone (alpha 3e-3, no bias: V2's expert-level alpha_1)
  mtp:     MTP on (D=1, lambda 0.3 -> 0.1) vs off, judged by the MAIN head's val loss

Prints one table: val loss, MaxVio (mean over MoE layers, averaged over the last quarter of logged
steps), tokens/s and the precision each arm trained in, per arm. Runs go to --out (one run directory
per arm; delete it to rerun); a run trained on another host kind is flagged, its tokens/s are that
host's. Precision: --dtype (auto = the host profile's train choice, frugallm/host.py).

    python benchmarks/exp_balance_mtp.py [--steps 150] [--out runs/exp] [--dtype auto|fp32|bf16] [--save [VARIANT]]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from frugallm.config import get_preset
from frugallm.train.config import TrainConfig
from frugallm.train.trainer import train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _host import add_host_args, host_kind, pick_dtype, print_host_header, save_output  # noqa: E402

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
    add_host_args(ap, dtype_help="training precision of new runs (auto: the host's train choice)")
    args = ap.parse_args()
    save_output("exp_balance_mtp", args.save)
    kind = print_host_header()
    precision = pick_dtype("train", args.dtype)
    print(precision.reason)
    rows = []
    for name in args.arms.split(";"):
        arm = ARMS[name]
        run = Path(args.out) / "".join(c if c.isalnum() or c in "-." else "_" for c in name)
        model_cfg = get_preset("small", **arm["model"])
        train_cfg = TrainConfig(steps=args.steps, batch_size=args.batch, seq_len=args.seq, lr=2e-3, warmup_steps=15,
                                eval_every=args.steps, eval_batches=16, log_every=5, save_every=args.steps,
                                sample_tokens=0, precision=precision.name, **arm["train"])
        if not (run / "metrics.jsonl").exists() or not any((run / "checkpoints").glob("step_*")):
            print(f"--- {name}: {run}", flush=True)
            train(model_cfg, train_cfg, run, log=lambda line: None)
            (run / "host_kind.txt").write_text(kind + "\n")
        trained_on = (run / "host_kind.txt").read_text().strip() if (run / "host_kind.txt").exists() else None
        if trained_on != kind:
            print(f"note: {run} was trained on {f'host kind {trained_on}' if trained_on else 'an unrecorded host'}, "
                  f"not {kind}: its tokens/s are that host's")
        saved = run / "train_config.json"
        ran_in = json.loads(saved.read_text()).get("precision", "?") if saved.exists() else "?"
        metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
        tail = metrics[-max(1, len(metrics) // 4):]
        rows.append((name, metrics[-1]["val_loss"], sum(m["max_violation_mean"] for m in tail) / len(tail),
                     sum(m["tokens_per_s"] for m in tail) / len(tail), ran_in))
    tokens = args.steps * args.batch * args.seq
    print(f"\nsmall preset, {args.steps} steps x {args.batch} x {args.seq} = {tokens:,} tokens per arm, built-in corpus")
    print(f"{'arm':<20}| {'val loss (main head)':>20} | {'MaxVio (last 1/4)':>17} | {'tokens/s':>8} | precision")
    for name, val, vio, tps, ran_in in rows:
        print(f"{name:<20}| {val:>20.4f} | {vio:>17.3f} | {tps:>8,.0f} | {ran_in}")


if __name__ == "__main__":
    main()
