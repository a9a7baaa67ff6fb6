"""Distillation on the CPU: does a small teacher make a tiny student better than plain CE, and at what cost?

One teacher, one student size, the same student steps / batch / seq_len / seeds for every mode:
  * ce          `frugallm train` with the teacher's tokenizer (no teacher at all): the baseline;
  * kd          token-level KD, online: the teacher runs every step (`frugallm distill --loss L`);
  * topk8/64    offline KD: the teacher's top-k log-probs cached once over the train split (`--topk K`);
  * onpolicy    GKD-style: a fraction of the micro-batches are the student's own samples (`--on-policy F`);
  * seqkd       sequence-level KD (the R1 recipe): `frugallm distill generate` on prompts cut from the
                train split, then SFT on those samples (`frugallm train --data samples.jsonl`).

The teacher is the `small` preset (53M) trained on the built-in corpus (the Python stdlib) for
--teacher-steps, then --teacher-finetune-steps more on the students' train split (a teacher that
saw only the stdlib at this budget was worse on the subset's val split than the CE student, so
there was no gap to close); both are reused from --work. Students train on a subset of the stdlib
(--subset-kb of .py files copied to --work/data): the offline cache covers the whole train split, which for the full
stdlib (~8.4M tokens) would take hours to build here. Every run, the teacher included, is evaluated
by this script on the SAME val split of that subset (the seqkd student trains on other text, so its
own val loss would not compare), with the same windows, in the host's prefill dtype.

Per mode it prints the val loss (mean and half the spread of the seeds), the fraction of the
teacher-student gap closed, (CE val - mode val) / (CE val - teacher val), and the training speed:
the median tokens/s of the run's metrics lines (student tokens; eval time excluded) and wall time of
the whole command, both as ratios to the CE run. Runs are launched as the CLI would be (subprocesses);
a run already complete under --work is reused, so a rerun only fills in what is missing.

    python benchmarks/bench_distill.py [--work DIR] [--teacher-steps 320] [--teacher-finetune-steps 120]
                                       [--steps 150] [--seeds 0 1] [--modes ce kd seqkd topk8 topk64 onpolicy]
                                       [--max-minutes M] [--save [VARIANT]]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _host import add_host_args, pick_dtype, print_host_header, save_output  # noqa: E402

START = time.perf_counter()
MODES = ("ce", "kd", "topk8", "topk64", "onpolicy", "seqkd")
CLI = [sys.executable, "-c", "import sys; from frugallm.cli import main; sys.exit(main())"]


def run_cli(argv: list[str], log: Path) -> tuple[str, float]:
    """Run `frugallm ARGV`, its output to `log`; returns (output, wall seconds). Raises on failure."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ frugallm " + " ".join(repr(a) if " " in a or not a else a for a in argv) + "\n")
        f.flush()
        rc = subprocess.run(CLI + argv, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    text = log.read_text()
    if rc != 0:
        raise RuntimeError(f"frugallm {' '.join(argv[:2])} failed (rc {rc}); see {log}:\n{text[-2000:]}")
    return text, wall


def complete(run: Path, steps: int | None = None) -> bool:
    """A run whose metrics reached its planned last step (and that has a checkpoint)."""
    m = run / "metrics.jsonl"
    if not m.exists() or not (run / "checkpoints").exists():
        return False
    lines = [json.loads(x) for x in m.read_text().splitlines() if x.strip()]
    if not lines:
        return False
    if steps is None:
        return "val_loss" in lines[-1]
    return lines[-1]["step"] >= steps


def make_subset(work: Path, kb: int) -> Path:
    """Copy stdlib .py files (every n-th of those between 1 and 20 KB, in sorted order) until ~kb KB."""
    from frugallm.train.data import stdlib_files

    out = work / "data"
    if (out / ".done").exists():
        return out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    files = [p for p in stdlib_files() if 1_000 <= p.stat().st_size <= 20_000]
    mean = sum(p.stat().st_size for p in files) / len(files)
    stride = max(1, int(len(files) / (kb * 1000 / mean)))
    total = 0
    for i, p in enumerate(files[::stride]):
        if total >= kb * 1000:
            break
        (out / f"{i:05d}_{p.name}").write_bytes(p.read_bytes())
        total += p.stat().st_size
    (out / ".done").write_text(str(total))
    return out


def make_prompts(work: Path, data: Path, teacher: Path, n: int, prompt_tokens: int, val_fraction: float) -> Path:
    """n prompts of `prompt_tokens` teacher tokens, cut every 512 tokens from the subset's train documents."""
    from frugallm import load_tokenizer
    from frugallm.train.data import is_val, iter_documents

    path = work / f"prompts_{n}x{prompt_tokens}.jsonl"
    if path.exists():
        return path
    tok = load_tokenizer(teacher)
    prompts = []
    for doc_id, text in iter_documents(str(data)):
        if is_val(doc_id, val_fraction):
            continue  # the val split stays unseen by every student, seqkd's included
        ids = tok.encode(text)
        for start in range(0, max(1, len(ids) - prompt_tokens), 512):
            prompts.append(tok.decode(ids[start:start + prompt_tokens]))
    step = max(1, len(prompts) // n)
    prompts = prompts[::step][:n]
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def metrics_speed(run: Path) -> float:
    """Median tokens/s over the run's metrics lines, the first (warm-up) left out."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    tps = [m["tokens_per_s"] for m in lines[1:]] or [lines[0]["tokens_per_s"]]
    return statistics.median(tps)


def common_val_loss(run: Path, data: Path, tokenizer_dir: Path, val_fraction: float, seq: int, batch: int,
                    n_batches: int) -> float:
    """The run's loss on the subset's val split: the same windows for every run, the host's prefill dtype."""
    from frugallm import load, load_tokenizer
    from frugallm.train import data as fdata
    from frugallm.train.telemetry import evaluate

    model, tok = load(run), load_tokenizer(tokenizer_dir)
    splits = fdata.prepare(str(data), tok, val_fraction)
    batches = fdata.val_batches(splits.val, seq, batch, mask=splits.val_mask)
    choice = pick_dtype("prefill", "auto")
    autocast = (lambda: torch.autocast("cpu", dtype=choice.dtype)) if choice.dtype == torch.bfloat16 \
        else contextlib.nullcontext
    return evaluate(model, batches, n_batches, autocast)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/bench_distill_work", help="runs, data subset, caches (reused)")
    ap.add_argument("--teacher-preset", default="small")
    ap.add_argument("--teacher-steps", type=int, default=320, help="the teacher's steps on the built-in corpus "
                    "(fixed steps: a --time plan made from the first 10 steps is fragile under other load)")
    ap.add_argument("--teacher-batch", type=int, default=8)
    ap.add_argument("--teacher-finetune-steps", type=int, default=120,
                    help="then this many steps on the students' train split (0: none): the stdlib-trained teacher "
                         "alone was worse on the subset's val split than the CE student (5.08 vs 4.60)")
    ap.add_argument("--teacher-finetune-lr", type=float, default=1e-3)
    ap.add_argument("--student-preset", default="tiny")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--subset-kb", type=int, default=600)
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--eval-batches", type=int, default=1000, help="val batches (default: all of the split)")
    ap.add_argument("--loss", default="fkl")
    ap.add_argument("--tau", type=float, default=1.0)
    ap.add_argument("--kd-weight", type=float, default=0.5)
    ap.add_argument("--on-policy", type=float, default=0.5)
    ap.add_argument("--prompts", type=int, default=300)
    ap.add_argument("--max-minutes", type=float, default=0, help="start no new run after this many minutes "
                    "(0: no limit); the table then shows the runs that finished and lists the ones skipped")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=96)
    add_host_args(ap)
    args = ap.parse_args()

    kind = print_host_header()
    save_output("bench_distill", args.save)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    # --- the teacher
    teacher = work / "teacher"
    if not complete(teacher):
        _, wall = run_cli(["train", "--preset", args.teacher_preset, "--data", "", "--out", str(teacher),
                           "--steps", str(args.teacher_steps), "--no-sample", "--set", f"seq_len={args.seq}",
                           "--set", f"batch_size={args.teacher_batch}", "--set", "eval_every=100", "--set", "seed=0"],
                          work / "teacher.log")
    tm = [json.loads(x) for x in (teacher / "metrics.jsonl").read_text().splitlines() if x.strip()]
    tcfg = json.loads((teacher / "train_config.json").read_text())
    from frugallm import load_tokenizer
    vocab = load_tokenizer(teacher).vocab_size
    base_teacher = teacher

    data = make_subset(work, args.subset_kb)
    if args.teacher_finetune_steps:  # the teacher continues on the students' train split (see --help)
        teacher = work / "teacher_ft"
        if not complete(teacher):
            run_cli(["train", "--config", str(base_teacher / "config.json"), "--data", str(data), "--out", str(teacher),
                     "--steps", str(args.teacher_finetune_steps), "--no-sample", "--set", f"init_from={base_teacher}",
                     "--set", f"tokenizer={base_teacher}", "--set", f"seq_len={args.seq}",
                     "--set", f"batch_size={args.teacher_batch}", "--set", f"val_fraction={args.val_fraction}",
                     "--set", f"lr={args.teacher_finetune_lr}", "--set", "warmup_steps=10",
                     "--set", f"eval_every={args.teacher_finetune_steps}", "--set", "seed=0"], work / "teacher_ft.log")
    n_files = sum(1 for p in data.iterdir() if not p.name.startswith("."))
    common = ["--steps", str(args.steps), "--no-sample", "--set", f"seq_len={args.seq}",
              "--set", f"batch_size={args.batch}", "--set", f"val_fraction={args.val_fraction}",
              "--set", f"eval_every={args.steps}", "--set", "log_every=10"]
    kd = ["--loss", args.loss, "--temperature", str(args.tau), "--kd-weight", str(args.kd_weight)]

    def argv(mode: str, seed: int, out: Path, sft_data: Path | None = None) -> list[str]:
        seed_set = ["--set", f"seed={seed}", "--out", str(out)]
        plain = ["train", "--preset", args.student_preset, "--set", f"tokenizer={teacher}",
                 "--set", f"vocab_size={vocab}"]
        distill = ["distill", "--teacher", str(teacher), "--student-preset", args.student_preset,
                   "--data", str(data)]
        if mode == "ce":
            return plain + ["--data", str(data)] + common + seed_set
        if mode == "kd":
            return distill + kd + common + seed_set
        if mode.startswith("topk"):
            return distill + kd + ["--topk", mode[4:]] + common + seed_set
        if mode == "onpolicy":
            return distill + kd + ["--on-policy", str(args.on_policy)] + common + seed_set
        if mode == "seqkd":
            return plain + ["--data", str(sft_data)] + common + seed_set
        raise ValueError(mode)

    sft_data, gen_line = None, ""
    if "seqkd" in args.modes:
        prompts = make_prompts(work, data, teacher, args.prompts, args.prompt_tokens, args.val_fraction)
        sft_data = work / f"samples_{args.prompts}x{args.new_tokens}.jsonl"
        if not (work / "generate.done").exists():
            text, wall = run_cli(["distill", "generate", "--teacher", str(teacher), "--prompts", str(prompts),
                                  "--samples", "1", "--out", str(sft_data), "--max-new-tokens", str(args.new_tokens),
                                  "--batch-size", "16"], work / "generate.log")
            (work / "generate.done").write_text(json.dumps({"wall": wall, "line": text.strip().splitlines()[-1]}))
        g = json.loads((work / "generate.done").read_text())
        gen_line = f"{g['line']} (command {g['wall']:.0f}s)"

    rows: dict[str, list[dict]] = {m: [] for m in args.modes}
    offline: dict[str, str] = {}
    # the order: every seed of the first two modes (CE and its main rival: the spread), then the rest seed by
    # seed, so a --max-minutes cut leaves one seed of every mode rather than two of a few
    first = args.modes[:2]
    jobs = [(m, s) for m in first for s in args.seeds] + \
        [(m, s) for s in args.seeds for m in args.modes if m not in first]
    skipped = []
    for mode, seed in jobs:
        out = work / "runs" / f"{mode}_s{seed}"
        log = work / "runs" / f"{mode}_s{seed}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        timing = out / "bench_wall.json"
        if not (complete(out, args.steps) and timing.exists()):
            if args.max_minutes and time.perf_counter() - START > args.max_minutes * 60:
                skipped.append(f"{mode} seed {seed}")
                continue
            if out.exists():
                shutil.rmtree(out)
            text, wall = run_cli(argv(mode, seed, out, sft_data), log)
            out.joinpath("bench_wall.json").write_text(json.dumps({"wall": wall}))
        text = log.read_text()
        m = re.search(r"offline teacher: .*", text)
        if m:
            offline.setdefault(mode, m.group(0))
        val = common_val_loss(out, data, teacher, args.val_fraction, args.seq, args.batch, args.eval_batches)
        rows[mode].append({"seed": seed, "val": val, "tps": metrics_speed(out),
                           "wall": json.loads(timing.read_text())["wall"]})
        print(f"  {mode:<9} seed {seed}: common val {val:.4f}, {rows[mode][-1]['tps']:,.0f} tok/s, "
              f"command {rows[mode][-1]['wall']:.0f}s", flush=True)
    teacher_val = common_val_loss(teacher, data, teacher, args.val_fraction, args.seq, args.batch, args.eval_batches)
    base_val = teacher_val if teacher == base_teacher else \
        common_val_loss(base_teacher, data, base_teacher, args.val_fraction, args.seq, args.batch, args.eval_batches)
    teacher_tps = statistics.median(m["tokens_per_s"] for m in tm[1:])

    # --- the table
    print()
    print(f"teacher: {args.teacher_preset} preset, {tm[-1]['step']} steps x {args.teacher_batch}x{args.seq} tokens "
          f"({tm[-1]['tokens']:,} tokens, {tcfg['precision']}, {teacher_tps:,.0f} tok/s) on the built-in corpus; "
          f"own val {[m['val_loss'] for m in tm if 'val_loss' in m][-1]:.4f}; on the common val split "
          f"{base_val:.4f}")
    if teacher != base_teacher:
        print(f"teacher used: that one + {args.teacher_finetune_steps} steps x {args.teacher_batch}x{args.seq} on the "
              f"students' train split (lr {args.teacher_finetune_lr:g}): common val {teacher_val:.4f}")
    print(f"students: {args.student_preset} preset, vocab {vocab} (the teacher's tokenizer), {args.steps} steps x "
          f"{args.batch}x{args.seq} tokens, seeds {args.seeds}, data: {n_files} stdlib files "
          f"({int((data / '.done').read_text()) / 1e6:.2f} MB), val_fraction {args.val_fraction}")
    print(f"KD: loss {args.loss}, tau {args.tau}, w {args.kd_weight}; on-policy fraction {args.on_policy}")
    for mode, line in offline.items():
        print(f"{mode}: {line}")
    if gen_line:
        print(f"seqkd: {args.prompts} prompts of {args.prompt_tokens} tokens, 1 sample, <= {args.new_tokens} new "
              f"tokens: {gen_line}")
    print()
    ce = statistics.mean(r["val"] for r in rows["ce"]) if "ce" in rows else None
    ce_tps = statistics.mean(r["tps"] for r in rows["ce"]) if "ce" in rows else None
    ce_wall = statistics.mean(r["wall"] for r in rows["ce"]) if "ce" in rows else None
    head = (f"{'mode':<10} {'val loss (mean ± half-spread)':>29} {'per seed':>17} {'gap closed':>10} "
            f"{'tok/s':>7} {'x CE':>6} {'wall s':>7} {'x CE':>6}")
    print(head)
    print("-" * len(head))
    print(f"{'teacher':<10} {teacher_val:>29.4f}")
    for mode, rs in rows.items():
        if not rs:
            continue
        vals = [r["val"] for r in rs]
        mean, half = statistics.mean(vals), (max(vals) - min(vals)) / 2  # half-spread: 0 with one seed
        gap = (ce - mean) / (ce - teacher_val) if ce is not None and ce != teacher_val else math.nan
        tps, wall = statistics.mean(r["tps"] for r in rs), statistics.mean(r["wall"] for r in rs)
        print(f"{mode:<10} {f'{mean:.4f} ± {half:.4f}':>29} {' '.join(f'{v:.4f}' for v in vals):>17} "
              f"{gap:>10.2f} {tps:>7,.0f} {tps / ce_tps if ce_tps else math.nan:>6.2f} {wall:>7.0f} "
              f"{wall / ce_wall if ce_wall else math.nan:>6.2f}")
    if skipped:
        print(f"not run (--max-minutes {args.max_minutes:g}): {', '.join(skipped)}")
    print(f"\nhost kind {kind}; gap closed = (CE val - mode val) / (CE val - teacher val); tok/s = median of the "
          "run's metrics lines (student tokens); wall = the whole command (set-up, teacher load, offline build "
          "included)")


if __name__ == "__main__":
    main()
