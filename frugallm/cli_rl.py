"""The `frugallm grpo` command's handler and flags (rl/trainer.py, rl/tasks.py), in cli.py's table
form; beside cli.py so that it stays within the file size the architecture allows."""

from __future__ import annotations

import argparse

from .cli_args import MAX_NEW, arg, positive_int, temperature


GRPO_FLAGS = {"init_from": "init_from", "task": "task", "group": "group", "prompts_per_step": "prompts_per_step",
              "max_new_tokens": "max_new_tokens", "steps": "steps", "time": "time_budget", "beta": "beta",
              "lr": "lr", "mu": "mu", "seed": "seed", "save_every": "save_every"}


def grpo(args: argparse.Namespace) -> int:
    """`frugallm grpo`: GRPO from --init-from on --task (rl/trainer.py); `grpo tasks` writes toy tasks."""
    if args.grpo_command == "tasks":
        from .rl.tasks import generate, write_tasks

        path = write_tasks(generate(args.kind, args.n, args.seed, args.digits), args.out)
        print(f"wrote {path} ({args.n} {args.kind} records)")
        return 0
    from .rl.config import VARIANTS, parse_sets, with_variant
    from .rl.trainer import train_grpo

    fields = {dest: getattr(args, flag) for flag, dest in GRPO_FLAGS.items() if getattr(args, flag) is not None}
    if args.reward:
        fields["rewards"] = ",".join(args.reward)
    fields |= parse_sets(args.set or [])
    given = set(fields) | (set(VARIANTS[args.variant]) | {"variant"} if args.variant else set())
    if not args.resume and not args.task:
        raise ValueError("grpo needs --task FILE.jsonl or a built-in task (arithmetic, countdown, sorting)")
    result = train_grpo(with_variant(args.variant or "grpo", **fields), args.out, resume=args.resume, given=given)
    return 130 if result.interrupted else 0


def eval_task(args: argparse.Namespace) -> int:
    """`frugallm eval RUN --task FILE`: accuracy and pass@k as one JSON line (rl/evaluate.py)."""
    import json

    from .rl.evaluate import evaluate_task

    print(json.dumps(evaluate_task(args.run, args.task, args.samples, args.temperature, args.max_new_tokens,
                                   args.seed, args.limit)))
    return 0


EVAL_TASK_FLAGS = [  # `frugallm eval`'s, beside its --data and --batches (cli.py)
        arg("--task", help="instead: accuracy and pass@k on this task file (JSONL, or arithmetic, countdown, "
           "sorting) under its records' verifiers, printed as JSON (default: none, the val loss)"),
        arg("--samples", type=positive_int, default=1, help="with --task: completions per problem; pass@k for "
           "k = 1, 2, 4, ... up to it (Chen et al.'s unbiased estimator)"),
        arg("--temperature", type=temperature, help="with --task: sampling temperature (default: 0, greedy, for "
           "one sample; 1 for several)"),
        arg("--max-new-tokens", type=positive_int, default=32, help="with --task: " + MAX_NEW),
        arg("--seed", type=int, default=0, help="with --task: the samples' seed"),
        arg("--limit", type=positive_int, help="with --task: only the first N records (default: all)"),
]

GRPO_COMMANDS = [
    (("grpo",), "reinforcement learning with verifiable rewards (GRPO, Dr. GRPO, DAPO) from a run; "
                "`grpo tasks` writes toy tasks", grpo, [
        arg("--init-from", metavar="RUN|HF_DIR|GGUF", help="the policy to start from, also the frozen reference "
           "(required for a new run; default: none)"),
        arg("--task", help="a JSONL task file (prompt, answer, verifier per record) or a built-in task: "
           "arithmetic, countdown, sorting (default: none, required for a new run)"),
        arg("--reward", action="append", metavar="NAME", help="a reward, repeatable, summed: verifier (the "
           "record's own), exact, numeric, countdown, format, code, module:function or FILE.py:function "
           "(default: verifier)"),
        arg("--variant", choices=["grpo", "dr_grpo", "dapo"], help="the loss's normalisation, std scaling, "
           "clip and dynamic sampling as published (default grpo; see docs/design/grpo.md)"),
        arg("--group", type=positive_int, help="G, completions per prompt (default 8)"),
        arg("--prompts-per-step", type=positive_int, help="prompts per step (default 8)"),
        arg("--max-new-tokens", type=positive_int, help="the longest completion (default 32)"),
        arg("--steps", type=positive_int, help="the run's length (default 200)"),
        arg("--time", help="a time budget, e.g. 8m: stop after the last step that fits (default: none)"),
        arg("--beta", type=float, help="KL weight to the reference (default 0.04; 0: no reference model)"),
        arg("--lr", type=float, help="AdamW's learning rate, constant (default 2e-5)"),
        arg("--mu", type=positive_int, help="policy updates per batch of rollouts (default 1)"),
        arg("--seed", type=int, help="seed of the prompt order and the rollouts (default 0)"),
        arg("--save-every", type=positive_int, help="checkpoint every N steps, and at the end (default 10)"),
        arg("--out", default="runs/grpo", help="run directory"),
        arg("--resume", action="store_true", help="continue the run in --out from its last good checkpoint"),
        arg("--set", action="append", metavar="KEY=VALUE", help="any GRPOConfig field (rl/config.py), e.g. "
           "eps_high=0.28, loss_norm=token, temperature=0.9, micro_batch=16, overlong_buffer=8 (DAPO's length "
           "penalty), max_sample_rounds=3 (dynamic sampling's refill) (default: none)"),
    ]),
    (("grpo", "tasks"), "write a verifiable toy task as JSONL (with a right completion per record, for SFT)",
     None, [
        arg("--kind", required=True, choices=["arithmetic", "countdown", "sorting"], help="the task"),
        arg("--n", type=positive_int, default=1000, help="records"),
        arg("--digits", type=positive_int, default=2, help="digits of each number"),
        arg("--seed", type=int, default=0, help="the same seed, the same records"),
        arg("--out", required=True, help="the JSONL file to write (atomically)"),
    ]),
]
