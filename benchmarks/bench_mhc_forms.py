"""mHC's paper form vs DeepSeek-V4's release form (hc_form; docs/design/hyper-connections.md), trained from scratch.

Issue 27 item 1's measurement. Two models with the same shared weights (only the connection
coefficients differ, each initialised as its form prescribes) train on the same batches:
  * data, optimizer and schedule exactly as benchmarks/bench_mhc.py (stdlib bytes, vocab 256;
    AdamW (0.9, 0.95), weight decay 0.1 on matrices except static coefficients, warm-up + cosine,
    clip 1.0, the aux-loss-free bias update);
  * model: the `tiny` preset with residual = mhc, n = 4 streams, 20 Sinkhorn iterations and no MTP:
    V4-shaped in its residual (V4 ships n = 4, 20 iterations); its attention and MoE stay V3's
    until issue 27's items 2-3 exist.
Reports per form the final validation loss, the training loss at the end (mean of the last 10
steps), the composite Amax gains over training (hyperconn.composite_gains: max row / column sum of
the product of H_res over depth, sampled every --gain-every steps, max over those samples and the
value at the end) and the median step time, side by side, after the host header. Writes
<out>/bench_mhc_forms_<host-kind>.json.

    python benchmarks/bench_mhc_forms.py [--steps 300] [--lr 3e-3] [--threads 1] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import frugallm
from frugallm.model.hyperconn import composite_gains
from frugallm.train.optim import ExpertBiasUpdate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _host import host_record, print_host_header  # noqa: E402  (benchmarks/_host.py)
from bench_mhc import _round, load_stdlib_bytes, lr_at, make_optimizer, val_loss, windows  # noqa: E402

FORMS = ("paper", "release")


def build(form: str, base_state: dict, seq: int):
    cfg = frugallm.get_preset("tiny", vocab_size=256, max_seq_len=seq, n_mtp=0, residual="mhc", hc_streams=4,
                              hc_sinkhorn_iters=20, hc_form=form)
    model = frugallm.Transformer(cfg)
    missing, unexpected = model.load_state_dict(base_state, strict=False)  # the same shared weights
    assert not unexpected and all("_conn." in k or k.startswith("hc_head.") for k in missing), (missing, unexpected)
    return model


def train_run(form: str, args, base_state, train, val, batch_starts, val_starts, gain_ids) -> dict:
    torch.manual_seed(0)
    model = build(form, base_state, args.seq).train()
    opt = make_optimizer(model, args.lr)
    ExpertBiasUpdate(model, gamma=1e-3).attach(opt)
    losses, times, gains = [], [], []
    for step in range(args.steps):
        if step % args.gain_every == 0:
            gains.append({"step": step, **composite_gains(model, gain_ids)})
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        x, y = windows(train, batch_starts[step], args.seq)
        t0 = time.perf_counter()
        out = model(x, targets=y)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(out.lm_loss.item())
    gains.append({"step": args.steps, **composite_gains(model, gain_ids)})
    return {"form": form, "final_val_loss": val_loss(model, val, val_starts, args.seq, args.batch),
            "final_train_loss": statistics.fmean(losses[-10:]), "losses": losses,
            "max_gain_fwd": max(g["hc_gain_fwd"] for g in gains), "max_gain_bwd": max(g["hc_gain_bwd"] for g in gains),
            "end_gain_fwd": gains[-1]["hc_gain_fwd"], "end_gain_bwd": gains[-1]["hc_gain_bwd"],
            "median_step_s": statistics.median(times[5:] or times),
            "params": sum(p.numel() for p in model.parameters()), "gains": gains}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--gain-every", type=int, default=20)
    ap.add_argument("--val-windows", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0, help="initial weights and batch order")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kind = print_host_header()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    train, val = load_stdlib_bytes(max_train=16 << 20)
    g = torch.Generator().manual_seed(1234 + args.seed)
    batch_starts = torch.randint(0, len(train) - args.seq - 1, (args.steps, args.batch), generator=g)
    val_starts = torch.linspace(0, len(val) - args.seq - 2, args.val_windows).long()
    gain_ids = windows(val, val_starts[:4], args.seq)[0]
    torch.manual_seed(args.seed)
    base = frugallm.Transformer(frugallm.get_preset("tiny", vocab_size=256, max_seq_len=args.seq, n_mtp=0))
    print(f"torch {torch.__version__}, {args.threads} thread(s) | tiny MoE, mhc n = 4, 20 Sinkhorn iterations, vocab "
          f"256, no MTP | {args.steps} steps x {args.batch} x {args.seq} tokens | lr {args.lr:g} | seed {args.seed}")
    results = []
    for form in FORMS:
        t0 = time.time()
        results.append(train_run(form, args, base.state_dict(), train, val, batch_starts, val_starts, gain_ids))
        print(f"  {form}: done in {time.time() - t0:.0f} s", flush=True)

    print(f"\n{'form':<8}| {'val loss':>8} | {'train loss':>10} | {'max gain fwd':>12} | {'max gain bwd':>12} | "
          f"{'end fwd':>8} | {'end bwd':>8} | {'step s':>7} | {'params':>9}")
    for r in results:
        print(f"{r['form']:<8}| {r['final_val_loss']:8.4f} | {r['final_train_loss']:10.4f} | {r['max_gain_fwd']:12.4g} "
              f"| {r['max_gain_bwd']:12.4g} | {r['end_gain_fwd']:8.4g} | {r['end_gain_bwd']:8.4g} "
              f"| {r['median_step_s']:7.3f} | {r['params']:9,}")
    path = out / f"bench_mhc_forms{'' if args.seed == 0 else f'_seed{args.seed}'}_{kind}.json"
    path.write_text(json.dumps(_round({"host": host_record(), "args": vars(args), "results": results}), indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
