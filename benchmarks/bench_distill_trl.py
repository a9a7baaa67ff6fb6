"""frugallm's token-level KD side by side with TRL's GKDTrainer (lmbda=0): same teacher, student, data, loss, steps.

Both trainers get:
  * the SAME teacher: bench_distill.py's fine-tuned `small` teacher (--work/teacher_ft), exported once with
    `frugallm.to_hf` (fp32) for TRL; frugallm reads the run itself. Both run it in fp32 (frugallm's
    teacher would otherwise pick the host's prefill dtype, bf16 here: its subprocess gets FRUGALLM_HOST=no-bf16,
    which changes frugallm's dtype choices only). The script prints the max |logit difference| of the two.
  * the SAME student start: a `tiny` frugallm model (the teacher's vocabulary, n_mtp=0, made with
    torch.manual_seed(seed)) exported with to_hf; TRL loads the export with AutoModelForCausalLM and frugallm
    starts from it (`--init-from`), so the weights are bit-identical (checked).
  * the SAME windows in the same order: frugallm's own batches (train/data.py Batches, seed = the run's seed)
    over bench_distill's data subset; TRL gets each window of seq+1 tokens as one row of a datasets.Dataset
    (input_ids, attention_mask of ones, labels = input_ids), read in order (train_sampling_strategy=sequential),
    batch --batch, no gradient accumulation. TRL's compute_loss shifts by one (logits[:, :-1] vs labels[:, 1:]),
    so it scores exactly frugallm's seq targets per row; every position is a target on both sides.
  * the SAME loss: TRL's generalized_jsd_loss(beta) (mean over unmasked tokens; beta=0 is forward KL(p||q),
    beta=1 reverse KL) and frugallm `--loss jsd --beta B --kd-weight 1` (pure KD: GKD has no CE term) at
    temperature 1. (GKDTrainer's `temperature` is its SAMPLING temperature: its compute_loss never passes it
    to the loss, so only tau = 1 can be compared.) frugallm's MoE balance loss and MTP are off
    (balance_loss_alpha=0, n_mtp=0) and its aux-loss-free bias update too (bias_gamma=0): HF's DeepseekV3
    has none of them, so with them on the two would not optimise the same objective.
  * the SAME optimisation: AdamW (torch's, fp32 states) with frugallm's lr / betas (0.9, 0.95) / eps / weight
    decay 0.1 on matrices only (TRL's own optimizer; HF's rule, no decay on norms and biases, picks the same
    tensors here: checked), clip 1.0, fp32 weights and compute, and frugallm's schedule (linear warmup from
    lr/warmup, cosine to min_lr_ratio * lr at the last step, train/optim.py lr_at) given to TRL as a LambdaLR
    (HF's built-in `cosine_with_min_lr` differs slightly: its warmup starts at 0 and its cosine ends one step
    later). The per-step learning rates of the two runs are compared.

What differs (printed again with the results): the model implementations (frugallm's MLA / grouped MoE vs
transformers' DeepseekV3 modules, so float rounding differs from the first step on); TRL runs both models on
seq+1 tokens per row (the last position's logits are unused), 1/seq more forward work; TRL's trainer loop
(accelerate, callbacks, logging every step) vs frugallm's; frugallm also computes the (zero-weighted) CE.
The seed sets the student's initial weights and the data order; both sides get the same pair per seed, so
the seed-to-seed difference of one trainer is the "seed noise" the cross-trainer difference is compared with.

Per run it records the KD loss of every step (frugallm: metrics.jsonl "kd" with log_every=1; TRL:
trainer.state.log_history "loss" with logging_steps=1) and the wall time between consecutive step ends
(set-up, teacher loading and the final eval excluded); tokens/s = the step's target tokens (batch x seq) /
that time. Both final students are then evaluated here the same way on bench_distill's val split
(frugallm's evaluate, fp32: CE against the next token; and the KD divergence to the teacher), TRL's loaded
back with `frugallm.from_hf`.

Needs bench_distill.py's work dir (teacher_ft and the data subset); build them first with e.g.
    python benchmarks/bench_distill.py --modes ce --max-minutes 0.01      (teacher, fine-tune, subset; no students)

TRL is a benchmark-only dependency (not in pyproject). Install it without moving torch or the HF stack:
    . .venv/bin/activate
    pip install -c constraints.txt \\
        -c <(pip freeze | grep -E '^(torch|transformers|accelerate|datasets|numpy|safetensors|tokenizers|huggingface[-_]hub)==') \\
        trl==1.16.0
(measured with trl 1.16.0, transformers 5.24.0, accelerate 1.15.0, datasets 5.2.0, torch 2.13.0+cpu.)

    python benchmarks/bench_distill_trl.py [--work /tmp/bench_distill_work] [--steps 100] [--seeds 0 1]
                                           [--betas 0.5] [--batch 8] [--seq 128] [--save [VARIANT]]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _host import add_host_args, print_host_header, save_output  # noqa: E402

CLI = [sys.executable, "-c", "import sys; from frugallm.cli import main; sys.exit(main())"]
SHOW_STEPS = (1, 10, 25, 50, 75, 100, 150, 200, 300)
SMOOTH = 10  # steps in the moving average the curves are also compared on


# --- the TRL side (a subprocess of this script: `--trl-worker SPEC.json`) --------------------------------------

def trl_worker(spec_path: str) -> None:
    """Train spec["student"] on spec["teacher"] with TRL's GKDTrainer; write result.json (+ final/) to spec["out"]."""
    import datasets
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from frugallm.train.optim import lr_at

    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    t_setup = time.perf_counter()
    rows = torch.load(spec["windows"], weights_only=True)  # {"input_ids": (N, S+1), "labels": (N, S+1)} int64, in training order
    ids, labels = rows["input_ids"], rows["labels"]
    ds = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                                     "labels": labels.tolist()})

    def collate(examples):
        return {k: torch.tensor([e[k] for e in examples], dtype=torch.long)
                for k in ("input_ids", "attention_mask", "labels")}

    student = AutoModelForCausalLM.from_pretrained(spec["student"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(spec["teacher"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(spec["student"])
    o = spec["optim"]

    class Trainer(GKDTrainer):
        def create_scheduler(self, num_training_steps, optimizer=None):  # frugallm's schedule, step for step
            if self.lr_scheduler is None:
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer or self.optimizer,
                    lambda s: lr_at(s, spec["steps"], o["lr"], o["warmup_steps"], o["min_lr_ratio"], o["schedule"],
                                    o["decay_fraction"]) / o["lr"])
                self._created_lr_scheduler = True
            return self.lr_scheduler

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends, self.lrs = [], []

        def on_train_begin(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kw):
            self.lrs.append(optimizer.param_groups[0]["lr"])

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

    cfg = GKDConfig(
        output_dir=str(out / "trainer"), lmbda=0.0, seq_kd=False, beta=spec["beta"], temperature=1.0,
        max_steps=spec["steps"], per_device_train_batch_size=spec["batch"], gradient_accumulation_steps=1,
        learning_rate=o["lr"], weight_decay=o["weight_decay"], adam_beta1=o["beta1"], adam_beta2=o["beta2"],
        adam_epsilon=o["adam_eps"], max_grad_norm=o["grad_clip"], optim="adamw_torch",
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True, seed=spec["seed"],
        data_seed=spec["seed"], train_sampling_strategy="sequential", dataloader_num_workers=0,
        dataloader_pin_memory=False, max_length=None)
    clock = Clock()
    trainer = Trainer(model=student, teacher_model=teacher, args=cfg, train_dataset=ds, data_collator=collate,
                      processing_class=tokenizer, callbacks=[clock])
    trainer.create_optimizer()
    decayed = set(trainer.get_decay_parameter_names(trainer.model))
    matrices = {n for n, p in trainer.model.named_parameters() if p.dim() >= 2}
    setup = time.perf_counter() - t_setup
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    times = [b - a for a, b in zip(clock.ends, clock.ends[1:])]
    trainer.save_model(str(out / "final"))
    result = {"loss": losses, "step_seconds": times, "lr": clock.lrs, "setup_seconds": setup,
              "decay_is_matrices": decayed == matrices, "decayed": len(decayed), "matrices": len(matrices),
              "versions": {"trl": trl.__version__, "transformers": transformers.__version__,
                           "datasets": datasets.__version__, "torch": torch.__version__},
              "attn_implementation": student.config._attn_implementation,
              "sampler": type(trainer._get_train_sampler(ds)).__name__}
    (out / "result.json").write_text(json.dumps(result))


# --- helpers of the main process -------------------------------------------------------------------------------

def spec_key(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def run_logged(cmd: list[str], log: Path, env: dict | None = None) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed (rc {rc}); see {log}:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - t0


def export_student(path: Path, seed: int, preset: str, teacher_run: Path) -> None:
    import frugallm
    from frugallm import Transformer, get_preset, load_tokenizer

    if (path / "manifest.json").exists():
        return
    tok = load_tokenizer(teacher_run)
    cfg = get_preset(preset, vocab_size=tok.vocab_size, n_mtp=0, balance_loss_alpha=0.0)
    torch.manual_seed(seed)
    frugallm.to_hf(Transformer(cfg), path, dtype=torch.float32, files=[teacher_run / "tokenizer.json"])


def max_logit_diff(a_model, b_hf, x: torch.Tensor) -> float:
    """max |frugallm logits - HF logits| on x (B, S), both in eval mode, fp32."""
    with torch.no_grad():
        a = a_model.eval()(x).logits
        b = b_hf.eval()(input_ids=x).logits
    return (a.float() - b.float()).abs().max().item()


def step_times_frugallm(run: Path, step_tokens: int) -> tuple[list[float], list[float], list[float]]:
    """(kd loss per step, seconds per step, lr per step) from metrics.jsonl written with log_every=1."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    lines.sort(key=lambda m: m["step"])
    return ([m["kd"] for m in lines], [step_tokens / m["tokens_per_s"] for m in lines], [m["lr"] for m in lines])


def moving(xs: list[float], k: int) -> list[float]:
    """Trailing mean over k steps (fewer at the start)."""
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= k:
            acc -= xs[i - k]
        out.append(acc / min(i + 1, k))
    return out


def diff_stats(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """(max |a-b| per step, mean |a-b| per step, max |a-b| of the SMOOTH-step moving averages)."""
    n = min(len(a), len(b))
    d = [abs(x - y) for x, y in zip(a[:n], b[:n])]
    ds = [abs(x - y) for x, y in zip(moving(a[:n], SMOOTH), moving(b[:n], SMOOTH))]
    return max(d), statistics.mean(d), max(ds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trl-worker", help=argparse.SUPPRESS)
    ap.add_argument("--work", default="/tmp/bench_distill_work", help="bench_distill.py's work dir (teacher, data)")
    ap.add_argument("--teacher", default="teacher_ft", help="the teacher run under --work")
    ap.add_argument("--student-preset", default="tiny")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--betas", type=float, nargs="+", default=[0.5], help="GKD beta (jsd); 0 = forward KL")
    ap.add_argument("--lr", type=float, default=None, help="peak lr (default: TrainConfig's)")
    ap.add_argument("--warmup", type=int, default=None, help="warmup steps (default: TrainConfig's)")
    ap.add_argument("--val-fraction", type=float, default=0.1, help="as bench_distill.py (the same split)")
    ap.add_argument("--eval-batches", type=int, default=1000, help="val batches (default: the whole split)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads of every process (0: torch's default, "
                    "all cores); on a machine shared with another busy job, 1 avoids OpenMP oversubscription")
    add_host_args(ap)
    args = ap.parse_args()
    if args.trl_worker:
        trl_worker(args.trl_worker)
        return

    import importlib.util

    if importlib.util.find_spec("trl") is None:
        raise SystemExit("TRL is not installed (a benchmark-only dependency); install it as this script's docstring "
                         "says (pinning torch and the HF stack), then rerun")
    if args.threads:
        torch.set_num_threads(args.threads)
    kind = print_host_header()
    save_output("bench_distill_trl", args.save)
    print("note: a shared machine (another job may have been running on these cores): tokens/s are indicative; the "
          "two trainers of one seed run back to back, so their ratio is the steadier number", flush=True)

    from frugallm import from_hf, load, load_tokenizer
    from frugallm.train.config import TrainConfig
    from frugallm.train.schedule import Schedule
    from frugallm.distill.losses import kd_divergence
    from frugallm.train import data as fdata
    from frugallm.train.telemetry import evaluate

    work = Path(args.work)
    teacher_run, data_dir = work / args.teacher, work / "data"
    if not (teacher_run / "checkpoints").exists() or not (data_dir / ".done").exists():
        raise SystemExit(f"{teacher_run} (a trained teacher run) or {data_dir} (the data subset) is missing: build them "
                         f"with bench_distill.py first, e.g.\n    python benchmarks/bench_distill.py --work {work} "
                         "--modes ce --max-minutes 0.01\n(it trains the teacher, fine-tunes it on the subset and "
                         "starts no student run after 0.01 minutes)")
    tc = TrainConfig()
    # the warm-up frugallm's trainer runs for args.steps steps (train/schedule.py: 30, or a quarter of a shorter run)
    warmup = Schedule.for_run(TrainConfig(steps=args.steps)).warmup if args.warmup is None else args.warmup
    optim = {"lr": args.lr or tc.lr, "warmup_steps": warmup,
             "min_lr_ratio": tc.min_lr_ratio, "schedule": tc.schedule, "decay_fraction": tc.decay_fraction,
             "weight_decay": tc.weight_decay, "beta1": tc.beta1, "beta2": tc.beta2, "adam_eps": tc.adam_eps,
             "grad_clip": tc.grad_clip}
    root = work / "trl_compare"
    root.mkdir(parents=True, exist_ok=True)
    teacher_hf = root / "teacher_hf"
    if not (teacher_hf / "manifest.json").exists():
        import frugallm

        frugallm.to_hf(load(teacher_run, dtype=torch.float32), teacher_hf, dtype=torch.float32,
                       files=[teacher_run / "tokenizer.json"])

    # --- the data, as frugallm reads it
    tok = load_tokenizer(teacher_run)
    splits = fdata.prepare(str(data_dir), tok, args.val_fraction)
    S, B = args.seq, args.batch
    step_tokens = S * B

    # --- sanity: identical teacher and student starts
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    probe = fdata.Batches(splits.train, S, B, 0, mask=splits.train_mask).get(0)[0][:2]
    teacher_f = load(teacher_run, dtype=torch.float32).eval()
    teacher_h = AutoModelForCausalLM.from_pretrained(teacher_hf, dtype=torch.float32)
    t_diff = max_logit_diff(teacher_f, teacher_h, probe)
    del teacher_h
    print(f"teacher: {teacher_run} ({sum(p.numel() for p in teacher_f.parameters()):,} parameters) -> {teacher_hf}; "
          f"max |logit diff| frugallm vs transformers, fp32, 2x{S} tokens: {t_diff:.2e}")

    runs: dict[tuple[float, int, str], dict] = {}
    env = dict(os.environ, FRUGALLM_HOST="no-bf16")  # frugallm's teacher in fp32 (its prefill "auto" is bf16 here)
    for seed in args.seeds:
        student_hf = root / f"student_{args.student_preset}_s{seed}_hf"
        export_student(student_hf, seed, args.student_preset, teacher_run)
        s_f = from_hf(student_hf)
        s_h = AutoModelForCausalLM.from_pretrained(student_hf, dtype=torch.float32)
        same = all(torch.equal(a, b) for a, b in zip(s_f.state_dict().values(),
                                                     load(student_hf).state_dict().values()))
        print(f"student seed {seed}: {args.student_preset} preset, n_mtp 0, "
              f"{sum(p.numel() for p in s_f.parameters()):,} parameters -> {student_hf}; to_hf/from_hf round trip "
              f"bit-identical: {same}; max |logit diff| frugallm vs transformers: {max_logit_diff(s_f, s_h, probe):.2e}",
              flush=True)
        del s_f, s_h

        # the windows frugallm's run reads (seed = the run's seed), as TRL rows of seq + 1 tokens
        batches = fdata.Batches(splits.train, S, B, seed, mask=splits.train_mask)
        rows_ids, rows_labels = [], []
        for i in range(args.steps):
            x, y = batches.get(i)
            starts = [w * S for w in batches.window_ids(i)]
            window = torch.stack([torch.from_numpy(splits.train[a:a + S + 1].astype("int64")) for a in starts])
            labels = window.clone()
            labels[:, 1:] = y  # -100 where frugallm masks a target (nowhere for plain text)
            labels[:, 0] = -100  # never scored (TRL shifts by one)
            assert torch.equal(window[:, :-1], x)
            rows_ids.append(window)
            rows_labels.append(labels)
        windows_file = root / f"windows_s{seed}_{args.steps}x{B}x{S}.pt"
        torch.save({"input_ids": torch.cat(rows_ids), "labels": torch.cat(rows_labels)}, windows_file)

        for beta in args.betas:
            spec = {"beta": beta, "seed": seed, "steps": args.steps, "batch": B, "seq": S, "optim": optim,
                    "student": str(student_hf), "teacher": str(teacher_hf), "teacher_run": str(teacher_run),
                    "data": str(data_dir), "val_fraction": args.val_fraction, "threads": args.threads}
            key = spec_key(spec)
            # frugallm
            run = root / f"frugallm_b{beta:g}_s{seed}_{key}"
            reused = {"frugallm": (run / "bench_wall.json").exists()}
            if not reused["frugallm"]:
                if run.exists():
                    shutil.rmtree(run)
                sets = {"seq_len": S, "batch_size": B, "val_fraction": args.val_fraction, "eval_every": args.steps,
                        "log_every": 1, "save_every": args.steps, "seed": seed, "precision": "fp32",
                        "bias_gamma": 0, "balance_loss_alpha": 0, "threads": args.threads,
                        **{k: v for k, v in optim.items()}}
                cmd = CLI + ["distill", "--teacher", str(teacher_run), "--init-from", str(student_hf),
                             "--data", str(data_dir), "--loss", "jsd", "--beta", str(beta), "--temperature", "1.0",
                             "--kd-weight", "1.0", "--steps", str(args.steps), "--no-sample", "--out", str(run)]
                for k, v in sets.items():
                    cmd += ["--set", f"{k}={v}"]
                wall = run_logged(cmd, root / f"{run.name}.log", env)
                (run / "bench_wall.json").write_text(json.dumps({"wall": wall}))
            loss, secs, lrs = step_times_frugallm(run, step_tokens)
            cfg = json.loads((run / "config.json").read_text())
            assert cfg["n_mtp"] == 0 and cfg["balance_loss_alpha"] == 0, cfg
            runs[(beta, seed, "frugallm")] = {"loss": loss, "secs": secs, "lr": lrs, "dir": run,
                                              "wall": json.loads((run / "bench_wall.json").read_text())["wall"]}
            print(f"  frugallm beta {beta:g} seed {seed}: {len(loss)} steps, last kd {loss[-1]:.4f}, "
                  f"{step_tokens / statistics.median(secs[1:] or secs):,.0f} tok/s"
                  f"{' (run reused from ' + str(run) + ')' if reused['frugallm'] else ''}", flush=True)
            # TRL
            out = root / f"trl_b{beta:g}_s{seed}_{key}"
            reused["trl"] = (out / "result.json").exists()
            if not reused["trl"]:
                if out.exists():
                    shutil.rmtree(out)
                out.mkdir(parents=True)
                spec_file = out / "spec.json"
                spec_file.write_text(json.dumps({**spec, "windows": str(windows_file), "out": str(out)}))
                wall = run_logged([sys.executable, str(Path(__file__).resolve()), "--trl-worker", str(spec_file)],
                                  root / f"{out.name}.log", dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1"))
                (out / "bench_wall.json").write_text(json.dumps({"wall": wall}))
            r = json.loads((out / "result.json").read_text())
            if len(r["loss"]) != args.steps or len(loss) != args.steps:
                raise RuntimeError(f"expected {args.steps} logged steps, got frugallm {len(loss)}, TRL {len(r['loss'])}")
            runs[(beta, seed, "trl")] = {"loss": r["loss"], "secs": r["step_seconds"], "lr": r["lr"],
                                         "dir": out / "final", "result": r,
                                         "wall": json.loads((out / "bench_wall.json").read_text())["wall"]}
            print(f"  TRL      beta {beta:g} seed {seed}: {len(r['loss'])} steps, last kd {r['loss'][-1]:.4f}, "
                  f"{step_tokens / statistics.median(r['step_seconds'][1:] or r['step_seconds']):,.0f} tok/s"
                  f"{' (run reused from ' + str(out) + ')' if reused['trl'] else ''}", flush=True)

    # --- the same eval for every final student: frugallm's evaluate (CE) and the KD divergence to the teacher
    val = fdata.val_batches(splits.val, S, B, mask=splits.val_mask)
    n_val = min(args.eval_batches, val.windows // val.batch_size)
    teacher_val_logits = []
    with torch.no_grad():
        for i in range(n_val):
            teacher_val_logits.append(teacher_f(val.get(i)[0]).logits.float())
    teacher_ce = evaluate(teacher_f, val, n_val, contextlib.nullcontext)

    def val_metrics(model, beta: float) -> tuple[float, float]:
        model = model.float().eval()
        ce = evaluate(model, val, n_val, contextlib.nullcontext)
        total, count = 0.0, 0
        with torch.no_grad():
            for i in range(n_val):
                x, y = val.get(i)
                keep = (y != -100).reshape(-1)
                V = teacher_val_logits[i].shape[-1]
                s = model(x).logits.float().reshape(-1, V)[keep]
                t = teacher_val_logits[i].reshape(-1, V)[keep]
                total += kd_divergence(s, t, "jsd", beta, 1.0).sum().item()
                count += int(keep.sum())
        return ce, total / max(count, 1)

    for (beta, seed, side), r in runs.items():
        model = load(r["dir"], dtype=torch.float32) if side == "frugallm" else from_hf(r["dir"])
        r["val_ce"], r["val_kd"] = val_metrics(model, beta)

    # --- the report
    trl_r = next(r["result"] for (_, _, side), r in runs.items() if side == "trl")
    print()
    print(f"versions: {', '.join(f'{k} {v}' for k, v in trl_r['versions'].items())}; transformers attention "
          f"{trl_r['attn_implementation']}; TRL sampler {trl_r['sampler']}")
    print(f"setup: {args.steps} steps x {B}x{S} tokens ({step_tokens:,} target tokens/step), seeds {args.seeds} (student "
          f"init + data order, the same pair on both sides), GKD lmbda 0, seq_kd off, tau 1; AdamW lr {optim['lr']:g} "
          f"betas ({optim['beta1']}, {optim['beta2']}) eps {optim['adam_eps']:g} wd {optim['weight_decay']} "
          f"(matrices), clip {optim['grad_clip']}, {optim['schedule']} schedule, warmup {optim['warmup_steps']}, "
          f"min lr x{optim['min_lr_ratio']}; fp32 everywhere")
    print(f"TRL's weight-decay set (HF's rule) == frugallm's (every matrix): {trl_r['decay_is_matrices']} "
          f"({trl_r['decayed']} of {trl_r['matrices']} matrices)")
    for beta in args.betas:
        for seed in args.seeds:
            f, t = runs[(beta, seed, "frugallm")], runs[(beta, seed, "trl")]
            n = min(len(f["lr"]), len(t["lr"]))
            lr_diff = max(abs(a - b) for a, b in zip(f["lr"][:n], t["lr"][:n]))
            print(f"beta {beta:g} seed {seed}: per-step lr max |diff| {lr_diff:.1e}; step-1 kd loss frugallm "
                  f"{f['loss'][0]:.6f} vs TRL {t['loss'][0]:.6f} (same weights, batch and loss: "
                  f"|diff| {abs(f['loss'][0] - t['loss'][0]):.1e})")
    print(f"data: {data_dir} ({int((data_dir / '.done').read_text()) / 1e6:.2f} MB of stdlib .py), "
          f"{splits.manifest['tokens']['train']:,} train / {splits.manifest['tokens']['val']:,} val tokens; "
          f"val: {n_val} batches of {val.batch_size}x{S}; teacher val CE {teacher_ce:.4f}")

    show = [s for s in SHOW_STEPS if s <= args.steps]
    if args.steps not in show:
        show.append(args.steps)
    for beta in args.betas:
        print()
        print(f"training KD loss, generalised JSD(beta={beta:g}) per step (frugallm: metrics 'kd'; TRL: log_history 'loss')")
        cols = [(seed, side) for seed in args.seeds for side in ("frugallm", "trl")]
        head = f"{'step':>5} " + " ".join(f"{(side if side == 'frugallm' else 'TRL') + ' s' + str(seed):>12}"
                                         for seed, side in cols)
        print(head)
        print("-" * len(head))
        for s in show:
            cells = []
            for seed, side in cols:
                loss = runs[(beta, seed, side)]["loss"]
                cells.append(f"{loss[s - 1]:>12.4f}" if s <= len(loss) else f"{'-':>12}")
            print(f"{s:>5} " + " ".join(cells))
        tail = lambda xs: statistics.mean(xs[-SMOOTH:])
        print(f"{'last' + str(SMOOTH):>5} " + " ".join(f"{tail(runs[(beta, seed, side)]['loss']):>12.4f}"
                                                    for seed, side in cols) + f"   (mean of the last {SMOOTH} steps)")
        print()
        print(f"curve differences (beta {beta:g}): max |diff| per step, mean |diff| per step, max |diff| of the "
              f"{SMOOTH}-step moving averages")
        cross, noise = [], []
        for seed in args.seeds:
            d = diff_stats(runs[(beta, seed, "frugallm")]["loss"], runs[(beta, seed, "trl")]["loss"])
            cross.append(d)
            print(f"  frugallm vs TRL, seed {seed}:{'':<14} {d[0]:.4f}  {d[1]:.4f}  {d[2]:.4f}")
        for side in ("frugallm", "trl"):
            for i, a in enumerate(args.seeds):
                for b in args.seeds[i + 1:]:
                    d = diff_stats(runs[(beta, a, side)]["loss"], runs[(beta, b, side)]["loss"])
                    noise.append(d)
                    print(f"  seed {a} vs seed {b}, {side + ':':<9} (noise) {d[0]:.4f}  {d[1]:.4f}  {d[2]:.4f}")
        if noise:
            within = all(max(c[j] for c in cross) <= min(n[j] for n in noise) for j in range(3))
            ratio = max(c[1] for c in cross) / min(n[1] for n in noise)
            print(f"  -> the two trainers' curves {'agree within' if within else 'do NOT agree within'} seed noise "
                  f"on all three measures (cross-trainer mean |diff| = {ratio:.2f} x the smallest seed-to-seed one)")
        print()
        print(f"final students (beta {beta:g}) on the val split, evaluated alike (fp32): CE to the next token, and "
              f"JSD(beta) to the teacher")
        for seed in args.seeds:
            f, t = runs[(beta, seed, "frugallm")], runs[(beta, seed, "trl")]
            print(f"  seed {seed}: frugallm CE {f['val_ce']:.4f} kd {f['val_kd']:.4f} | TRL CE {t['val_ce']:.4f} "
                  f"kd {t['val_kd']:.4f} | |diff| CE {abs(f['val_ce'] - t['val_ce']):.4f} "
                  f"kd {abs(f['val_kd'] - t['val_kd']):.4f}")
        for side in ("frugallm", "trl"):
            for i, a in enumerate(args.seeds):
                for b in args.seeds[i + 1:]:
                    ra, rb = runs[(beta, a, side)], runs[(beta, b, side)]
                    print(f"  seed {a} vs seed {b}, {side + ':':<9} (noise) |diff| CE {abs(ra['val_ce'] - rb['val_ce']):.4f} "
                          f"kd {abs(ra['val_kd'] - rb['val_kd']):.4f}")

    print()
    head = (f"{'speed':<22} {'tok/s (median step)':>19} {'tok/s (all steps)':>17} {'train s':>8} {'command s':>9}")
    print(head)
    print("-" * len(head))
    speed = {}
    for (beta, seed, side), r in runs.items():
        med = step_tokens / statistics.median(r["secs"][1:] or r["secs"])
        allv = step_tokens * len(r["secs"]) / sum(r["secs"])
        speed.setdefault(side, []).append(med)
        print(f"{side + f' b{beta:g} s{seed}':<22} {med:>19,.0f} {allv:>17,.0f} {sum(r['secs']):>8.0f} "
              f"{r['wall']:>9.0f}")
    if len(speed) == 2:
        f, t = statistics.mean(speed["frugallm"]), statistics.mean(speed["trl"])
        print(f"mean of the medians: frugallm {f:,.0f} tok/s, TRL {t:,.0f} tok/s: frugallm x{f / t:.2f}")
    print(f"\nhost kind {kind}; tok/s = target tokens per step ({step_tokens:,}) / wall time between step ends (teacher "
          "forward, student forward+backward, optimizer, logging; set-up and final eval excluded); 'command s' "
          "includes process start, model loading and (frugallm) its data prep and end-of-run eval/checkpoint. The "
          "machine may have been shared with other jobs while this ran.")
    print("not matched: the model code (frugallm's modules vs transformers' DeepseekV3: fp32 rounding differs from "
          "step 1), TRL's rows of seq+1 tokens (one unused extra position), the trainers' loops; frugallm also "
          "computes a zero-weighted CE. MTP, the MoE balance loss and the bias update are off on the frugallm side "
          "(HF's DeepseekV3 trains none of them).")


if __name__ == "__main__":
    main()
