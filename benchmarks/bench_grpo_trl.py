"""frugallm's GRPO beside TRL's GRPOTrainer (issue 29, item 4): the same model, task, reward, group size,
learning rate and steps; reward and KL curves, and tokens/s, on this host.

  pip install -c constraints.txt trl          # not a frugallm dependency
  python benchmarks/bench_grpo_trl.py [--sft runs/bench_grpo/sft] [--steps 100] [--seeds 0 1] [--lr 1e-4]

The model is benchmarks/bench_grpo.py's SFT run (run that first), exported with `frugallm.to_hf` and loaded by
transformers' DeepseekV3ForCausalLM. Both sides: 8 prompts x G = 8 completions a step of 2-digit
arithmetic, reward = frugallm's `numeric` verifier, temperature 1 (no top-k / top-p), at most 8 new
tokens, GRPO's per-sequence loss normalisation (TRL loss_type="grpo"), rewards scaled by the group's std,
clip 0.2, beta 0.04 (k3), mu = 1, AdamW (0.9, 0.99), no weight decay, constant lr, grad clip 1.0, fp32, one
thread. tokens/s: completion tokens sampled / the whole step's wall time (rollouts + reference + update).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from frugallm.rl.rewards import numeric  # noqa: E402

G, PROMPTS, MAX_NEW, BETA = 8, 8, 8, 0.04


def run_frugallm(sft: Path, task: Path, steps: int, lr: float, seed: int, out: Path) -> dict:
    from frugallm.rl.config import with_variant
    from frugallm.rl.trainer import train_grpo

    cfg = with_variant("grpo", init_from=str(sft), task=str(task), group=G, prompts_per_step=PROMPTS,
                       max_new_tokens=MAX_NEW, lr=lr, beta=BETA, steps=steps, save_every=10_000, seed=seed,
                       threads=1, rewards="numeric")
    t0 = time.perf_counter()
    train_grpo(cfg, out, log=lambda line: None)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step_s = sum(r["rollout_s"] + r["update_s"] for r in rows)
    return {"reward": [r["reward_mean"] for r in rows], "kl": [r["kl"] for r in rows],
            "length": [r["length_mean"] for r in rows], "tokens_per_s": rows[-1]["tokens"] / step_s,
            "rollout_tokens_per_s": rows[-1]["tokens"] / sum(r["rollout_s"] for r in rows), "wall_s": wall}


def run_trl(hf_dir: Path, task: Path, steps: int, lr: float, seed: int, out: Path) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    records = [json.loads(line) for line in task.read_text().splitlines()]
    data = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in records])

    def reward(prompts, completions, answer, **kwargs):
        return [numeric(p, c, {"answer": a}) for p, c, a in zip(prompts, completions, answer)]

    args = GRPOConfig(output_dir=str(out), per_device_train_batch_size=PROMPTS * G, num_generations=G,
                      max_completion_length=MAX_NEW, learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0,
                      beta=BETA, epsilon=0.2, loss_type="grpo", scale_rewards="group", num_iterations=1,
                      steps_per_generation=1, gradient_accumulation_steps=1, max_steps=steps, temperature=1.0,
                      top_k=0, top_p=1.0, adam_beta1=0.9, adam_beta2=0.99, weight_decay=0.0, max_grad_norm=1.0,
                      logging_steps=1, report_to="none", save_strategy="no", seed=seed, use_cpu=True, bf16=False,
                      disable_dropout=True, model_init_kwargs={"dtype": torch.float32})
    trainer = GRPOTrainer(model=str(hf_dir), reward_funcs=reward, args=args, train_dataset=data)
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    logs = [h for h in trainer.state.log_history if "reward" in h]
    tokens = sum(h["completions/mean_length"] * PROMPTS * G for h in logs)
    return {"reward": [h["reward"] for h in logs], "kl": [h.get("kl") for h in logs],
            "length": [h["completions/mean_length"] for h in logs], "tokens_per_s": tokens / wall, "wall_s": wall}


def window_means(xs: list[float], parts: int = 3) -> list[float]:
    n = max(len(xs) // parts, 1)
    return [round(sum(xs[i:i + n]) / len(xs[i:i + n]), 4) for i in range(0, len(xs), n)][:parts]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sft", default=str(REPO / "runs/bench_grpo/sft"), help="the SFT run (bench_grpo.py's)")
    ap.add_argument("--task", default=str(REPO / "runs/bench_grpo/train.jsonl"))
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/grpo"))
    ap.add_argument("--work", default=str(REPO / "runs/bench_grpo_trl"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    sft, work, out = Path(args.sft), Path(args.work), Path(args.out)
    if not (sft / "checkpoints").exists():
        raise SystemExit(f"{sft} is not a run: run benchmarks/bench_grpo.py first (it trains the SFT model)")
    if work.exists():
        import shutil

        shutil.rmtree(work)
    work.mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    import frugallm
    import transformers
    import trl

    hf_dir = work / "hf"
    frugallm.to_hf(frugallm.load(sft), hf_dir, tokenizer=sft)
    results = {"host": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores shared with other jobs, "
                       "one torch thread each, sequential",
               "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
               "steps": args.steps, "lr": args.lr, "group": G, "prompts_per_step": PROMPTS, "beta": BETA}
    for seed in args.seeds:
        for name, fn, src in (("frugallm", run_frugallm, sft), ("trl", run_trl, hf_dir)):
            print(f"{name} seed {seed} ...", flush=True)
            r = fn(src, Path(args.task), args.steps, args.lr, seed, work / f"{name}_s{seed}")
            results[f"{name}_s{seed}"] = r
            print(f"{name} seed {seed}: reward by thirds {window_means(r['reward'])}, kl by thirds "
                  f"{window_means([k or 0 for k in r['kl']])}, {r['tokens_per_s']:.0f} tokens/s, {r['wall_s']:.0f} s",
                  flush=True)
    (out / "trl_results.json").write_text(json.dumps(results, indent=1) + "\n")
    _plot(results, args.seeds, out / "trl_curves.png")
    lines = ["| run | reward (thirds of the run) | KL (thirds) | tokens/s | wall s |", "|---|---|---|---|---|"]
    for seed in args.seeds:
        for name in ("frugallm", "trl"):
            r = results[f"{name}_s{seed}"]
            lines.append(f"| {name} seed {seed} | {window_means(r['reward'])} | "
                         f"{window_means([k or 0 for k in r['kl']])} | {r['tokens_per_s']:.0f} | {r['wall_s']:.0f} |")
    (out / "trl_results.md").write_text(f"host: {results['host']}\n{results['versions']}\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


def _plot(results: dict, seeds: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for key, ax in zip(("reward", "kl", "length"), axes):
        for seed in seeds:
            for name, style in (("frugallm", "-"), ("trl", "--")):
                ys = results[f"{name}_s{seed}"][key]
                ax.plot(range(1, len(ys) + 1), [y or 0 for y in ys], style, label=f"{name} seed {seed}")
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
