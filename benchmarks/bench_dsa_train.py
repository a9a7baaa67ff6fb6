"""DSA training at a long sequence: loss after N steps and train tokens/s, dense (V3-shaped) vs V3.2 sparse.

Two ordinary training runs (train/trainer.py `train`) in this process, one after the other, on the same
data, seed and steps, both from the same initial weights (a seeded dense model, written once and read
by init_from): --preset at max_seq_len = --seq, once without an indexer (dense MLA) and once with fresh
indexers (index_topk = --topk, index_n_heads / index_head_dim as tiny-v32's) in dsa_stage=sparse (DeepSeek-V3.2 §2.1.1: top-k attention, the indexer trained by its KL to the main
attention, the rest by the LM loss). Reported per run: the median train tokens/s of the steps after the
first, the mean train LM loss of the last 5 steps, the val loss at the end (sparse: as the model runs,
top-k), and the indexer's KL.

The sparse training step is not cheaper than the dense one here: attention builds the full (B, H, S, T)
scores and then masks all but top-k of them (model/attention.py), and it adds the indexer's own (B, S,
H^I, T) scores, the top-k selection and the KL. Only a gathered sparse attention kernel would make a
training step O(S k); decode gathers (docs/design/dsa.md).

    python benchmarks/bench_dsa_train.py [--seq 2048] [--topk 256] [--steps 40] [--batch 2] [--preset tiny]
                                         [--data PATH] [--dtype auto|fp32|bf16] [--save [VARIANT]]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from frugallm.config import PRESETS, get_preset
from frugallm.export import to_hf
from frugallm.model.transformer import Transformer
from frugallm.train.config import TrainConfig
from frugallm.train.trainer import train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _host import add_host_args, print_host_header, save_output  # noqa: E402


def run(name: str, model_cfg, train_cfg: TrainConfig, root: Path) -> dict:
    """Train one configuration into root/name; its figures from metrics.jsonl."""
    t0 = time.perf_counter()
    result = train(model_cfg, train_cfg, root / name, log=lambda line: None)
    rows = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
    last = rows[-5:]
    return {"name": name, "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows[1:] or rows),
            "lm_loss": sum(r["lm_loss"] for r in last) / len(last), "val_loss": result.val_loss,
            "indexer_loss": rows[-1].get("indexer_loss"), "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, default=2048, help="tokens per sequence (default 2048)")
    ap.add_argument("--topk", type=int, default=256, help="keys each query attends to in the sparse run (default 256)")
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per run (default 40)")
    ap.add_argument("--batch", type=int, default=2, help="sequences per step (default 2)")
    ap.add_argument("--preset", default="tiny", help="the model, without its indexer (default tiny)")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of both runs (default 3e-3)")
    ap.add_argument("--data", default="", help="training text (default: the built-in corpus)")
    add_host_args(ap, dtype_help="training precision of both runs (auto: the host's train choice)")
    args = ap.parse_args()
    save_output("bench_dsa_train", args.save)
    print_host_header()
    dense = get_preset(args.preset, max_seq_len=args.seq, index_topk=0)
    v32 = PRESETS["tiny-v32"]
    sparse = dense.replace(index_topk=args.topk, index_n_heads=v32["index_n_heads"],
                           index_head_dim=max(v32["index_head_dim"], dense.qk_rope_head_dim))
    train_cfg = TrainConfig(data=args.data, seq_len=args.seq, batch_size=args.batch, steps=args.steps, lr=args.lr,
                            precision=args.dtype, log_every=1, eval_every=args.steps, eval_batches=4,
                            save_every=args.steps, sample_tokens=0, dsa_stage="sparse")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads | preset {args.preset} | batch "
          f"{args.batch} x {args.seq} tokens | {args.steps} steps | lr {args.lr} | sparse: top-{args.topk}, "
          f"{sparse.index_n_heads} indexer heads of {sparse.index_head_dim}", flush=True)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the init folder has no tokenizer: the runs take the data's
        torch.manual_seed(0)
        train_cfg = dataclasses.replace(train_cfg, init_from=str(to_hf(Transformer(dense), Path(tmp) / "init")))
        rows = [run("dense", dense, train_cfg, Path(tmp)), run("v3.2 sparse", sparse, train_cfg, Path(tmp))]
    print(f"\n{'model':<12}| {'tokens/s':>9} | {'lm loss (last 5)':>16} | {'val loss':>8} | {'indexer KL':>10} | "
          f"{'wall':>6}")
    for r in rows:
        kl = f"{r['indexer_loss']:.4f}" if r["indexer_loss"] is not None else "-"
        print(f"{r['name']:<12}| {r['tokens_per_s']:>9,.0f} | {r['lm_loss']:>16.4f} | {r['val_loss']:>8.4f} | "
              f"{kl:>10} | {r['seconds']:>5.0f}s")
    print(f"sparse / dense tokens/s: {rows[1]['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
