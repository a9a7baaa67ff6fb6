"""Plain vs HC vs mHC (n = 4) residuals: the same tiny MoE, the same bytes, two learning rates.

The stability evidence for issue 3 (docs/design/hyper-connections.md). For each learning rate (a normal one and an
aggressive one) it trains three models that start from identical shared weights (HC/mHC add only
their connection coefficients) on identical batches:
  * data: the Python standard library's own *.py sources (sysconfig's stdlib path), byte-level
    tokens (vocab 256: no tokenizer), split by file with crc32(path) % 20 == 0 -> validation;
  * model: the `tiny` preset (4 layers, 1 dense + 3 MoE, 16 experts top-4) with vocab 256 and no
    MTP; AdamW (0.9, 0.95), weight decay 0.1 on matrices except the static HC/mHC coefficients,
    warm-up then cosine to 10 %, clip 1.0, the aux-loss-free bias update after every step;
and reports the final validation loss, loss spikes (a step whose loss exceeds 1.2x the median of
the 20 before it, after the warm-up), the composite Amax gains over training (forward = max row
sum, backward = max column sum of the product of H_res over depth; hyperconn.composite_gains),
the step time (alternated rounds after training, median) and the activation memory of a
training step (bytes of the distinct storages autograd saves), each against plain.
Writes <out>/bench_mhc[_seedN]_<host-kind>.json and <out>/bench_mhc_gains[_seedN]_<host-kind>.png
(gains per depth, HC vs mHC). Every model trains in fp32 whatever the host (a stability comparison,
not a speed one; the header prints the host and its own dtype choices).

    python benchmarks/bench_mhc.py [--steps 400] [--lrs 3e-3,2e-2] [--seed 0] [--modes plain,hc,mhc]
                                   [--threads 1] [--out benchmarks/results]

Timings on a shared 2-core machine are noisy; one thread by default keeps the runs off the
other core (and off another job's parallel regions, which stall small ops badly).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import torch

import frugallm
from frugallm.model.hyperconn import composite_gains, static_parameters
from frugallm.train.optim import ExpertBiasUpdate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _host import host_record, print_host_header  # noqa: E402  (benchmarks/_host.py)

MODES = ("plain", "hc", "mhc")


# --- data -----------------------------------------------------------------------------------

def load_stdlib_bytes(max_train: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) uint8 token tensors from the stdlib sources, in sorted path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, val, n_train = [], [], 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if "site-packages" in rel or "__pycache__" in rel:
            continue
        data = path.read_bytes()
        if zlib.crc32(rel.encode()) % 20 == 0:
            val.append(data)
        elif n_train < max_train:
            train.append(data)
            n_train += len(data)
    as_tensor = lambda parts: torch.frombuffer(bytearray(b"\n".join(parts)), dtype=torch.uint8)
    return as_tensor(train), as_tensor(val)


def windows(tokens: torch.Tensor, starts: torch.Tensor, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) (B, seq) from windows of seq + 1 bytes starting at `starts`."""
    idx = starts[:, None] + torch.arange(seq + 1)
    w = tokens[idx].long()
    return w[:, :-1], w[:, 1:]


# --- one run --------------------------------------------------------------------------------

def build(mode: str, base_state: dict, seq: int):
    cfg = frugallm.get_preset("tiny", vocab_size=256, max_seq_len=seq, n_mtp=0, residual=mode, hc_streams=4)
    model = frugallm.Transformer(cfg)
    missing, unexpected = model.load_state_dict(base_state, strict=False)  # the same shared weights
    assert not unexpected and all("_conn." in k for k in missing), (missing, unexpected)
    return model


def make_optimizer(model, lr: float, wd: float = 0.1) -> torch.optim.AdamW:
    static = {id(p) for p in static_parameters(model)}
    decay = [p for p in model.parameters() if p.dim() >= 2 and id(p) not in static]
    rest = [p for p in model.parameters() if not (p.dim() >= 2 and id(p) not in static)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), eps=1e-8)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - 1 - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def val_loss(model, val: torch.Tensor, starts: torch.Tensor, seq: int, batch: int) -> float:
    model.eval()
    losses = [model(*windows(val, starts[i:i + batch], seq)).loss.item() for i in range(0, len(starts), batch)]
    model.train()
    return statistics.fmean(losses)


def spikes(losses: list[float], after: int, window: int = 20, ratio: float = 1.2) -> tuple[int, float]:
    """(number of steps whose loss > ratio x median of the `window` before, the largest such ratio)."""
    count, worst = 0, 0.0
    for t in range(max(after, window), len(losses)):
        r = losses[t] / statistics.median(losses[t - window:t])
        worst = max(worst, r)
        count += r > ratio
    return count, worst


def train_run(mode, lr, args, base_state, train, val, batch_starts, val_starts, gain_ids) -> dict:
    torch.manual_seed(0)
    model = build(mode, base_state, args.seq).train()
    opt = make_optimizer(model, lr)
    ExpertBiasUpdate(model, gamma=1e-3).attach(opt)
    losses, times, gains, evals = [], [], [], []
    diverged = None
    for step in range(args.steps):
        if mode != "plain" and step % args.gain_every == 0:
            gains.append({"step": step, **composite_gains(model, gain_ids)})
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, lr, args.warmup)
        x, y = windows(train, batch_starts[step], args.seq)
        t0 = time.perf_counter()
        out = model(x, targets=y)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(out.lm_loss.item())
        if not math.isfinite(losses[-1]):
            diverged = step
            break
        if (step + 1) % args.eval_every == 0:
            evals.append((step + 1, val_loss(model, val, val_starts[:64], args.seq, args.batch)))
    if mode != "plain" and diverged is None:
        gains.append({"step": args.steps, **composite_gains(model, gain_ids)})
    final = val_loss(model, val, val_starts, args.seq, args.batch) if diverged is None else float("nan")
    n_spikes, worst = spikes(losses, after=args.warmup)
    result = {"mode": mode, "lr": lr, "final_val_loss": final, "diverged_at": diverged, "spikes": n_spikes,
              "worst_spike_ratio": worst, "median_step_s": statistics.median(times[5:] or times), "losses": losses,
              "evals": evals, "gains": gains}
    if gains:
        result["max_gain_fwd"] = max(g["hc_gain_fwd"] for g in gains)
        result["max_gain_bwd"] = max(g["hc_gain_bwd"] for g in gains)
    return result


# --- overheads ------------------------------------------------------------------------------

def saved_bytes(model, x, y) -> int:
    """Activation memory of a training step: bytes of the distinct storages autograd saves."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x, targets=y).loss
    loss.backward()
    return sum(seen.values())


def overheads(base_state, x, y, seq: int, rounds: int) -> dict:
    """Step time (alternated rounds, median) and activation memory per mode, same batch."""
    models = {m: build(m, base_state, seq).train() for m in MODES}
    opts = {m: make_optimizer(model, 1e-3) for m, model in models.items()}

    def step(m):
        opts[m].zero_grad(set_to_none=True)
        models[m](x, targets=y).loss.backward()
        opts[m].step()

    for m in MODES:
        step(m)
        step(m)
    times = {m: [] for m in MODES}
    for _ in range(rounds):
        for m in MODES:
            t0 = time.perf_counter()
            step(m)
            times[m].append(time.perf_counter() - t0)
    out = {}
    for m, model in models.items():
        model.zero_grad(set_to_none=True)
        out[m] = {"step_s": statistics.median(times[m]), "saved_bytes": saved_bytes(model, x, y),
                  "params": sum(p.numel() for p in model.parameters())}
    return out


# --- report ---------------------------------------------------------------------------------

def _round(o):
    """Floats to 6 significant digits, for a small JSON."""
    if isinstance(o, float):
        return float(f"{o:.6g}")
    if isinstance(o, (list, tuple)):
        return [_round(v) for v in o]
    return {k: _round(v) for k, v in o.items()} if isinstance(o, dict) else o


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    styles = {"hc": ("tab:red", "HC"), "mhc": ("tab:blue", "mHC")}
    lrs = sorted({r["lr"] for r in results})
    for r in results:
        if r["mode"] == "plain" or not r["gains"]:
            continue
        color, name = styles[r["mode"]]
        ls = "-" if r["lr"] == lrs[0] else "--"
        label = f"{name}, lr {r['lr']:g}"
        last = r["gains"][-1]
        depth = range(1, len(last["fwd_per_depth"]) + 1)
        for col, key in enumerate(("fwd", "bwd")):
            axes[0, col].plot(depth, last[f"{key}_per_depth"], ls, color=color, marker="o", label=label)
            steps = [g["step"] for g in r["gains"]]
            axes[1, col].plot(steps, [g[f"hc_gain_{key}"] for g in r["gains"]], ls, color=color, label=label)
    for col, key in enumerate(("forward (max row sum)", "backward (max col. sum)")):
        axes[0, col].set(title=f"{key}, per depth, end of training", xlabel="sub-layer depth l (2 per block)",
                         ylabel="Amax gain of H_res_l ... H_res_1", yscale="log")
        axes[1, col].set(title=f"{key}, max over depth, during training", xlabel="step",
                         ylabel="gain", yscale="log")
        for ax in axes[:, col]:
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle("Composite residual gain: HC vs mHC (n = 4), tiny MoE, stdlib bytes")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lrs", default="3e-3,2e-2", help="comma-separated peak learning rates (normal, aggressive)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--gain-every", type=int, default=20)
    ap.add_argument("--val-windows", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=15, help="alternated timing rounds per mode")
    ap.add_argument("--seed", type=int, default=0, help="initial weights and batch order")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--no-overheads", dest="overheads", action="store_false", help="skip the timing/memory rounds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kind = print_host_header()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lrs = [float(v) for v in args.lrs.split(",")]

    train, val = load_stdlib_bytes(max_train=16 << 20)
    g = torch.Generator().manual_seed(1234 + args.seed)
    batch_starts = torch.randint(0, len(train) - args.seq - 1, (args.steps, args.batch), generator=g)
    val_starts = torch.linspace(0, len(val) - args.seq - 2, args.val_windows).long()
    gain_ids = windows(val, val_starts[:4], args.seq)[0]
    torch.manual_seed(args.seed)
    base = frugallm.Transformer(frugallm.get_preset("tiny", vocab_size=256, max_seq_len=args.seq, n_mtp=0))
    base_state = base.state_dict()
    print(f"torch {torch.__version__}, {args.threads} thread(s) | stdlib bytes: train {len(train):,}, val {len(val):,} "
          f"| tiny MoE, vocab 256, no MTP | {args.steps} steps x {args.batch} x {args.seq} tokens | lrs {lrs} "
          f"| seed {args.seed}")

    t_start = time.time()
    results = []
    modes = args.modes.split(",")
    for lr in lrs:
        for mode in modes:
            t0 = time.time()
            r = train_run(mode, lr, args, base_state, train, val, batch_starts, val_starts, gain_ids)
            results.append(r)
            gains = (f" | max gain fwd {r['max_gain_fwd']:.4g} bwd {r['max_gain_bwd']:.4g}" if "max_gain_fwd" in r
                     else "")
            print(f"  lr {lr:g} {mode:5s}: val {r['final_val_loss']:.4f}, spikes {r['spikes']} "
                  f"(worst x{r['worst_spike_ratio']:.2f}){gains} | {time.time() - t0:.0f} s", flush=True)
    x, y = windows(train, batch_starts[0], args.seq)
    over = overheads(base_state, x, y, args.seq, args.rounds) if args.overheads else None
    total = time.time() - t_start

    print(f"\n{'lr':>7} {'mode':<6}| {'val loss':>8} | {'vs plain':>8} | {'spikes':>6} | {'worst':>5} | "
          f"{'max gain fwd':>12} | {'max gain bwd':>12} | {'train step s':>12}")
    for r in results:
        plain = next((p for p in results if p["lr"] == r["lr"] and p["mode"] == "plain"), r)
        gf = f"{r['max_gain_fwd']:12.4g}" if "max_gain_fwd" in r else f"{'-':>12}"
        gb = f"{r['max_gain_bwd']:12.4g}" if "max_gain_bwd" in r else f"{'-':>12}"
        print(f"{r['lr']:7g} {r['mode']:<6}| {r['final_val_loss']:8.4f} | {r['final_val_loss'] - plain['final_val_loss']:+8.4f} "
              f"| {r['spikes']:6d} | {r['worst_spike_ratio']:5.2f} | {gf} | {gb} | {r['median_step_s']:12.3f}")
    for m in MODES if over else ():
        p, o = over["plain"], over[m]
        if m == "plain":
            print(f"\noverhead vs plain (same batch, {args.rounds} alternated rounds, median; activation memory = "
                  f"bytes autograd saves in one step):")
        print(f"  {m:5s}: step {o['step_s']:.3f} s (x{o['step_s'] / p['step_s']:.3f}), activations "
              f"{o['saved_bytes'] / 2**20:.1f} MiB (x{o['saved_bytes'] / p['saved_bytes']:.3f}), "
              f"params {o['params']:,} (+{o['params'] - p['params']:,})")
    print(f"total wall time {total / 60:.1f} min")

    tag = ("" if args.seed == 0 else f"_seed{args.seed}") + f"_{kind}"
    report = _round({"host": host_record(), "args": vars(args), "results": results, "overheads": over})
    (out / f"bench_mhc{tag}.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(results, out / f"bench_mhc_gains{tag}.png")
    print(f"wrote {out / f'bench_mhc{tag}.json'} and {out / f'bench_mhc_gains{tag}.png'}")


if __name__ == "__main__":
    main()
