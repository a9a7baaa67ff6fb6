"""Training throughput: tokens/s and MFU of a full optimizer step, side by side.

Rows: the `tiny` and `small` presets (MTP on, as trained) x fp32 / bf16 autocast x eager / torch.compile,
each a full step (forward with loss, backward, clip, AdamW, bias update) on random token batches. MFU =
tokens/s x train FLOPs per token (telemetry.train_flops_per_token) / a measured matmul peak in that dtype.
The fp32 / bf16 rows compare the two precisions on purpose (--precisions picks them); the one the
host profile's `auto` takes for training (frugallm/host.py choose_dtype("train")) is marked.
Then frugallm vs transformers training the same config (tiny, n_mtp=0) on the same weights, both in
the same dtype (--dtype; auto = the host profile's train choice), with AdamW on both sides: the
ratio. Runs alternate between the compared sides; medians are reported.

    python benchmarks/bench_train.py [--batch 8] [--seq 256] [--rounds 5] [--presets tiny,small]
                                     [--precisions fp32,bf16] [--dtype auto|fp32|bf16] [--no-compile]
                                     [--save [VARIANT]]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

import torch
import transformers

import frugallm
from frugallm.model.moe import update_expert_bias
from frugallm.train.optim import build_optimizer
from frugallm.train.telemetry import matmul_peak, train_flops_per_token

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _host import add_host_args, pick_dtype, print_host_header, save_output  # noqa: E402
from bench_model import alternate, load_hf, write_checkpoint  # noqa: E402  (same folder: one way to build and time)


def frugallm_step(model, forward, opt, ids, targets, autocast):
    def step():
        with autocast():
            loss = forward(ids, targets=targets).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_expert_bias(model, 1e-3)
    return step


def hf_step(model, opt, ids):
    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--precisions", default="fp32,bf16", help="rows of the precision table (fp32 weights; bf16 = "
                    "autocast)")
    add_host_args(ap, dtype_help="dtype of both sides of frugallm vs transformers (auto: the host's train choice)")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    args = ap.parse_args()
    save_output("bench_train", args.save)
    print_host_header()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    tokens = args.batch * args.seq
    precisions = args.precisions.split(",")
    auto = pick_dtype("train").name
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    autocasts = {"fp32": contextlib.nullcontext, "bf16": bf16}
    peaks = {p: matmul_peak({"fp32": torch.float32, "bf16": torch.bfloat16}[p]) for p in precisions}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads | batch {args.batch} x {args.seq} | "
          f"matmul peak " + ", ".join(f"{p} {v / 1e9:.0f}" for p, v in peaks.items()) + " GFLOP/s")
    print(f"\n{'preset':<7}| {'precision':<9}| {'mode':<8}| {'tokens/s':>9} | {'MFU':>6} | vs {precisions[0]} eager"
          f"   (* = the host's auto choice for training: {auto})")
    for preset in args.presets.split(","):
        cfg = frugallm.get_preset(preset, max_seq_len=max(args.seq, 512))
        flops = train_flops_per_token(cfg, args.seq)
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
        targets = ids.roll(-1, 1)
        steps, labels = {}, {}
        for precision in precisions:
            autocast = autocasts[precision]
            for mode in ("eager", "compiled") if args.compile else ("eager",):
                torch.manual_seed(0)
                model = frugallm.Transformer(cfg).train()
                forward = torch.compile(model) if mode == "compiled" else model
                opt = build_optimizer(model, 1e-4, 0.1, (0.9, 0.95), 1e-8)
                steps[(precision, mode)] = frugallm_step(model, forward, opt, ids, targets, autocast)
        result = alternate(steps, warmup=2, rounds=args.rounds)
        base = tokens / result[(precisions[0], "eager")]
        for (precision, mode), t in result.items():
            tps = tokens / t
            mark = precision + ("*" if precision == auto else "")
            print(f"{preset:<7}| {mark:<9}| {mode:<8}| {tps:>9,.0f} | {tps * flops / peaks[precision]:>6.1%} "
                  f"| {tps / base:.2f}x")

    # frugallm vs transformers: same config and weights (tiny, n_mtp=0), same dtype, AdamW both sides
    choice = pick_dtype("train", args.dtype)
    print(f"\n{choice.reason}")
    with tempfile.TemporaryDirectory() as tmp:
        path = write_checkpoint(Path(tmp) / "hf", args.seq)
        fl, hf = frugallm.from_hf(path, dtype=choice.dtype).train(), load_hf(path, choice.dtype).train()
    ids = torch.randint(0, fl.config.vocab_size, (args.batch, args.seq))
    targets = ids.roll(-1, 1)
    targets[:, -1] = -100
    pair = {"frugallm": frugallm_step(fl, fl, build_optimizer(fl, 1e-4, 0.1, (0.9, 0.95), 1e-8), ids, targets,
                                      contextlib.nullcontext),
            "transformers": hf_step(hf, torch.optim.AdamW(hf.parameters(), lr=1e-4), ids)}
    if args.compile:
        pair["frugallm compiled"] = frugallm_step(fl, torch.compile(fl), build_optimizer(
            fl, 1e-4, 0.1, (0.9, 0.95), 1e-8), ids, targets, contextlib.nullcontext)
    result = alternate(pair, warmup=2, rounds=args.rounds)
    print(f"frugallm vs transformers, tiny (n_mtp=0), {choice.name} weights on both sides, full AdamW step:")
    for name, t in result.items():
        print(f"  {name:<18} {tokens / t:>9,.0f} tok/s   ratio vs transformers {result['transformers'] / t:.2f}")


if __name__ == "__main__":
    main()
