"""GRPO on this CPU (issue 29, item 3): SFT teaches a small model the task's format, then GRPO, against
more SFT for the same extra time (docs/design/grpo.md).

  python benchmarks/bench_grpo.py [--sft 3m] [--extra 3m] [--seeds 0 1] [--out benchmarks/results/grpo]

1. tasks: 2-digit arithmetic ("37+48=" -> "85", `frugallm grpo tasks`), 8,000 training records with
   their right completions and 300 held-out problems none of which is in the training set;
2. SFT from scratch: `frugallm train --data train.jsonl --time SFT` (a 0.2M-parameter MLA + MoE model,
   byte tokens: vocab 262, so every digit is a token);
3. per seed, side by side (two processes at once, so that both see the same load on a shared host):
   `frugallm grpo --init-from SFT --time EXTRA` and `frugallm train --init-from SFT --time EXTRA` (more
   SFT on the same records, for the same wall time);
4. held-out accuracy of each, greedy (`frugallm eval RUN --task heldout.jsonl`), and pass@8 at
   temperature 1; curves: `frugallm plot` per GRPO run, and both seeds in one figure (grpo_curves.png).

Every process runs with OMP_NUM_THREADS=1 under `nice -n 5`. Results (the default --out):
benchmarks/results/grpo/results.json and benchmarks/results/grpo/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from frugallm.rl.tasks import generate, write_tasks  # noqa: E402

MODEL = ["dim=64", "n_layers=2", "n_dense_layers=1", "n_heads=4", "q_lora_rank=0", "kv_lora_rank=32",
         "qk_nope_head_dim=16", "qk_rope_head_dim=8", "v_head_dim=16", "n_routed_experts=4", "n_expert_groups=1",
         "n_limited_groups=1", "n_activated_experts=2", "moe_inter_dim=64", "inter_dim=256", "vocab_size=262",
         "max_seq_len=128", "n_mtp=1"]
SFT = ["seq_len=64", "batch_size=32", "tokenizer_train_chars=100000", "warmup_steps=20", "eval_every=100",
       "eval_batches=2", "log_every=10", "sample_tokens=0", "precision=fp32", "threads=1", "save_every=100000",
       "val_fraction=0.01"]
GRPO = ["--group", "8", "--prompts-per-step", "16", "--max-new-tokens", "8", "--save-every", "20",
        "--set", "threads=1"]
MAX_NEW = "8"


def frugallm(*args: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = ["nice", "-n", "5", sys.executable, "-m", "frugallm.cli", *args]
    print("$", " ".join(cmd[3:]), flush=True)
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=REPO)


def wait(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"failed ({p.returncode}): {' '.join(map(str, p.args))}; see its log")


def evaluate(run: Path, heldout: Path, work: Path) -> dict:
    """Greedy accuracy, then pass@1..8 at temperature 1 (8 samples of each held-out problem)."""
    out = {}
    for name, extra in (("greedy", []), ("sampled", ["--samples", "8", "--temperature", "1"])):
        log = work / f"eval_{run.name}_{name}.log"
        wait(frugallm("eval", str(run), "--task", str(heldout), "--max-new-tokens", MAX_NEW, *extra, log=log))
        out[name] = json.loads(log.read_text().strip().splitlines()[-1])
    return {"accuracy": out["greedy"]["accuracy"], "sampled_accuracy": out["sampled"]["accuracy"],
            "pass@8": out["sampled"]["pass@8"]}


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def curves(runs: dict[int, Path], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for (key, title), ax in zip((("reward_mean", "mean reward"), ("accuracy", "accuracy (training prompts)"),
                                 ("kl", "KL to the SFT model (k3, per token)"),
                                 ("length_mean", "completion length (tokens)")), axes.flat):
        for seed, run in runs.items():
            rows = metrics(run)
            ys = [r[key] or 0 for r in rows]  # a 50-step moving average: one step's 128 rewards are noisy
            smooth = [sum(ys[max(0, i - 49):i + 1]) / len(ys[max(0, i - 49):i + 1]) for i in range(len(ys))]
            ax.plot([r["step"] for r in rows], smooth, label=f"seed {seed} (50-step mean)")
        ax.set_title(title)
        ax.set_xlabel("GRPO step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sft", default="3m", help="the first SFT's time budget")
    ap.add_argument("--extra", default="3m", help="GRPO's time budget, and the extra SFT's")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--lr", default="2e-5", help="GRPO's learning rate")
    ap.add_argument("--beta", default="0.04", help="GRPO's KL weight")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/grpo"))
    ap.add_argument("--work", default=str(REPO / "runs/bench_grpo"), help="run directories (replaced)")
    args = ap.parse_args()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    if work.exists():
        import shutil

        shutil.rmtree(work)
    work.mkdir(parents=True)
    t0 = time.time()
    train = generate("arithmetic", 8000, seed=0, digits=2)
    seen = {r["prompt"] for r in train}
    heldout = [r for r in generate("arithmetic", 1000, seed=1, digits=2) if r["prompt"] not in seen][:300]
    write_tasks(train, work / "train.jsonl")
    write_tasks(heldout, work / "heldout.jsonl")
    env = {"FRUGALLM_CACHE": str(work / "cache")}
    os.environ.update(env)
    sets = [a for s in MODEL + SFT for a in ("--set", s)]
    sft = work / "sft"
    wait(frugallm("train", "--data", str(work / "train.jsonl"), "--out", str(sft), "--time", args.sft, "--steps",
                  "100000", "--no-sample", *sets, log=work / "sft.log"))
    results = {"host": f"{platform.node()} {platform.processor() or platform.machine()}, "
                       f"{os.cpu_count()} cores shared with other jobs, OMP_NUM_THREADS=1, nice 5",
               "sft_budget": args.sft, "extra_budget": args.extra, "grpo_lr": args.lr, "grpo_beta": args.beta,
               "sft": {"steps": metrics(sft)[-1]["step"], **evaluate(sft, work / "heldout.jsonl", work)}}
    print("SFT:", results["sft"], flush=True)
    grpo_runs = {}
    for seed in args.seeds:
        g, m = work / f"grpo_s{seed}", work / f"sft_more_s{seed}"
        wait(frugallm("grpo", "--init-from", str(sft), "--task", str(work / "train.jsonl"), "--time", args.extra,
                      "--steps", "100000", "--lr", args.lr, "--beta", args.beta, "--seed", str(seed), "--out", str(g),
                      *GRPO, log=work / f"grpo_s{seed}.log"),
             frugallm("train", "--init-from", str(sft), "--data", str(work / "train.jsonl"), "--out", str(m),
                      "--time", args.extra, "--steps", "100000", "--no-sample", "--set", f"seed={seed}",
                      *[a for s in SFT for a in ("--set", s)], log=work / f"sft_more_s{seed}.log"))
        grpo_runs[seed] = g
        rows = metrics(g)
        results[f"grpo_s{seed}"] = {"steps": rows[-1]["step"], "final_kl": rows[-1]["kl"],
                                    "rollout_tokens_per_s": sum(r["rollout_tokens_per_s"] for r in rows) / len(rows),
                                    **evaluate(g, work / "heldout.jsonl", work)}
        results[f"sft_more_s{seed}"] = {"steps": metrics(m)[-1]["step"], **evaluate(m, work / "heldout.jsonl", work)}
        print(f"seed {seed}: grpo", results[f"grpo_s{seed}"], "| sft_more", results[f"sft_more_s{seed}"], flush=True)
        wait(frugallm("plot", str(g), log=work / f"plot_s{seed}.log"))
        for name in ("reward", "kl", "length"):
            (out / f"grpo_s{seed}_{name}.png").write_bytes((g / f"{name}.png").read_bytes())
    curves(grpo_runs, out / "grpo_curves.png")
    results["wall_s"] = round(time.time() - t0)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = [f"# GRPO vs more SFT (benchmarks/bench_grpo.py)\n", f"host: {results['host']}\n",
             f"SFT {args.sft} from scratch, then {args.extra} of GRPO (lr {args.lr}, beta {args.beta}) or of more SFT; "
             f"held-out 2-digit arithmetic ({len(heldout)} problems)\n",
             "| model | steps | greedy accuracy | sampled accuracy (T=1) | pass@8 |", "|---|---|---|---|---|"]
    for name in ["sft"] + [f"{k}_s{s}" for s in args.seeds for k in ("grpo", "sft_more")]:
        r = results[name]
        lines.append(f"| {name} | {r['steps']} | {r['accuracy']:.3f} | {r['sampled_accuracy']:.3f} | {r['pass@8']:.3f} |")
    (out / "results.md").write_text("\n".join(lines) + f"\n\nwall {results['wall_s']} s\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
