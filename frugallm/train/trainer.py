"""The training loop: data -> model -> AdamW, with exact resume, telemetry and safe checkpoints.

One optimizer step = `grad_accum` micro-batches. Per step, in order:
  lr from the schedule; MTP lambda from its schedule; forward/backward of each micro-batch
  (bf16 autocast or fp32); a non-finite loss stops the run (or skips the step); clip at 1.0;
  AdamW step; the aux-loss-free bias update from the whole step's expert load; logging;
  eval; checkpoint. Nothing random happens after initialisation and the data position is a
  pure function of the step, so a resumed run repeats the uninterrupted one bit for bit (fp32).

Precision `auto` is resolved once, by host.py's measured bf16/fp32 GEMM ratio (bf16 is ~100x
slower than fp32 on CPUs without native bf16), and the run records the dtype it chose, so a
resume repeats it on any host.

A time budget (`time_budget="8m"`, train/budget.py) plans `steps` from the first steps' measured time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.profiler import record_function

from ..config import ModelConfig, TrainConfig, duration_seconds
from ..host import choose_dtype
from ..model.count import count_params
from ..model.transformer import Transformer
from ..tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from ..io import write_file
from . import budget, data
from ..formats import checkpoint
from .optim import ExpertBiasUpdate, build_optimizer, lr_at
from .telemetry import Progress, eval_batch_count, evaluate, matmul_peak, train_flops_per_token
from ..parallel import layout as parallel_layout
from ..parallel import timeline
from ..parallel.runtime import runtime_for


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class RunResult:
    run_dir: Path
    step: int
    val_loss: float | None
    unigram_loss: float
    interrupted: bool
    last_checkpoint: Path | None


def _silent(line: str) -> None:
    pass


def _tokenizer_for(run_dir: Path, model_cfg: ModelConfig, train_cfg: TrainConfig, log, write: bool = True) -> Tokenizer:
    if (run_dir / "tokenizer.json").exists():
        tok = load_tokenizer(run_dir)
    elif train_cfg.tokenizer:
        tok = load_tokenizer(train_cfg.tokenizer)
    else:  # train one on the run's data; cached per (data, vocab)
        key = f"{data.fingerprint(train_cfg.data)}-{model_cfg.vocab_size}-{train_cfg.tokenizer_train_chars}"
        cached = data.cache_root() / "tokenizers" / key
        if (cached / "tokenizer.json").exists():
            tok = load_tokenizer(cached)
        else:
            log(f"training a {model_cfg.vocab_size}-token byte-level BPE on {train_cfg.data or 'the built-in corpus'}")
            tok = train_tokenizer(_sample_texts(train_cfg), model_cfg.vocab_size)
            cached.mkdir(parents=True, exist_ok=True)
            tok.save(cached)
    if tok.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
                         f"{model_cfg.vocab_size}; raise vocab_size (--set vocab_size={tok.vocab_size})")
    if write:
        tok.save(run_dir)
    return tok


def _sample_texts(train_cfg: TrainConfig):
    budget = train_cfg.tokenizer_train_chars
    for doc_id, text in data.iter_documents(train_cfg.data, train_cfg.text_field):
        if budget <= 0:
            return
        if not data.is_val(doc_id, train_cfg.val_fraction):  # never fit the tokenizer on val text
            yield text[:budget]
            budget -= len(text)


def _print(line: str) -> None:
    print(line, flush=True)  # progress must reach a pipe or CI log as it happens


# what a run directory holds (a run that stopped before its first checkpoint may be started again)
RUN_FILES = {"config.json", "train_config.json", "tokenizer.json", "metrics.jsonl", "checkpoints"}


def _run_file(name: str) -> bool:
    return name in RUN_FILES or name.endswith(".png") or name.startswith(".")  # plots, interrupted temp files


# what a resumed run may change: its length and its cadence, nothing its numbers depend on
RESUMABLE = ("steps", "time_budget", "save_every", "eval_every", "log_every", "keep_last", "skip_nonfinite",
             "sample_tokens", "sample_prompt", "threads", "ep", "pp", "dp", "pp_schedule",
             "trace_step", "overlap")


def resume_conflicts(saved_model: ModelConfig, saved_train: TrainConfig, model_cfg: ModelConfig,
                     train_cfg: TrainConfig) -> list[str]:
    """'key: run has A, asked B' for every setting the caller asks to change that a resume may not."""
    out = [f"{f.name}: run has {getattr(saved_model, f.name)!r}, asked {getattr(model_cfg, f.name)!r}"
           for f in dataclasses.fields(ModelConfig) if getattr(saved_model, f.name) != getattr(model_cfg, f.name)]
    for f in dataclasses.fields(TrainConfig):
        have, asked = getattr(saved_train, f.name), getattr(train_cfg, f.name)
        if f.name not in RESUMABLE and have != asked and not (f.name == "precision" and asked == "auto"):
            out.append(f"{f.name}: run has {have!r}, asked {asked!r}")
    return out


def train(model_cfg: ModelConfig, train_cfg: TrainConfig, run_dir: str | Path, resume: bool = False,
          log: Callable[[str], None] = _print) -> RunResult:
    """Train into `run_dir` (created), or continue the run there with resume=True."""
    t0 = budget.now()  # a time budget covers the whole call, set-up included
    run_dir = Path(run_dir)
    t_setup = time.perf_counter()
    ckpt = None
    if resume:
        ckpt = checkpoint.latest(run_dir)
        if ckpt is None:
            raise FileNotFoundError(f"--resume: {run_dir} holds no valid checkpoint")
        saved_train = TrainConfig.from_json(ckpt / "train_config.json")
        saved_model = ModelConfig.from_json(ckpt / "config.json")
        # a resumed run keeps everything that shapes the computation (its precision included); only its
        # length and cadence may change, and asking for any other change is refused, not ignored. The
        # length changes only when the caller gives steps and no time budget (the CLI's --steps): a
        # caller with a budget resumes to the run's own end, a budgeted run's saved plan included, and
        # never plans again.
        conflicts = resume_conflicts(saved_model, saved_train, model_cfg, train_cfg)
        if conflicts:
            raise ValueError(f"--resume: {run_dir} was started with other settings, and a resumed run keeps what "
                             f"shapes its computation: {'; '.join(conflicts)}. Drop those flags to continue the run "
                             f"as it was, or start a new run with another --out (only {', '.join(RESUMABLE)} "
                             "may change on resume)")
        model_cfg = saved_model
        changes = {k: getattr(train_cfg, k) for k in RESUMABLE if k not in ("steps", "time_budget")}
        if not train_cfg.time_budget:
            changes |= {"steps": train_cfg.steps, "time_budget": ""}
        train_cfg = dataclasses.replace(saved_train, **changes)
    elif checkpoint.checkpoints(run_dir):
        raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    elif run_dir.is_dir() and (strangers := sorted(p.name for p in run_dir.iterdir() if not _run_file(p.name))):
        # a run only writes its own files: never config.json over somebody's project (`--out .`)
        raise FileExistsError(f"{run_dir} holds files that are not a frugallm run ({', '.join(strangers[:3])}"
                              f"{', ...' if len(strangers) > 3 else ''}); choose a new or empty --out")
    # several ranks (torchrun): checked before the process group starts (parallel/layout.py); rank 0
    # alone logs and writes, and the others follow it through the set-up that fills shared caches
    world = runtime_for(parallel_layout.resolve(model_cfg, train_cfg, parallel_layout.world_from_env()),
                        train_cfg.fp8_dispatch, dict(schedule=train_cfg.pp_schedule, n_microbatches=train_cfg.grad_accum,
                                                     micro_shape=(train_cfg.batch_size, train_cfg.seq_len),
                                                     overlap=train_cfg.overlap))
    if not world.is_main:
        log = _silent
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(train_cfg.threads or torch.get_num_threads())
    choice = choose_dtype("train", train_cfg.precision)  # a resumed run's is already resolved: honoured
    if world.world > 1 and not world.is_main:  # every rank computes in rank 0's choice (and rank 0 says why)
        choice = choose_dtype("train", ("fp32", "bf16")[world.broadcast(int(choice.name == "bf16"))])
    elif world.world > 1:
        world.broadcast(int(choice.name == "bf16"))
        log(f"{world.layout} ({'gloo' if world.device == 'cpu' else 'nccl'}); micro-batches per rank per step: "
            f"{train_cfg.grad_accum // world.data_ranks}")
    log(choice.reason)
    train_cfg = dataclasses.replace(train_cfg, precision=choice.name)  # recorded: a resume repeats it
    if not world.is_main:
        world.barrier()  # rank 0 first: it trains or caches the tokenizer and the data shards once
    else:
        model_cfg.to_json(run_dir / "config.json")
        train_cfg.to_json(run_dir / "train_config.json")
    tokenizer = _tokenizer_for(run_dir, model_cfg, train_cfg, log, write=world.is_main)
    splits = data.prepare(train_cfg.data, tokenizer, train_cfg.val_fraction, train_cfg.text_field)
    if world.is_main:
        world.barrier()
    m = splits.manifest
    if m["replaced_bytes"]:
        log(f"warning: {m['replaced_bytes']:,} bytes of the data were not UTF-8 and were replaced by U+FFFD")
    log(f"data: {m['source']} | {sum(m['documents'].values()):,} documents, {m['tokens']['train']:,} train / "
        f"{m['tokens']['val']:,} val tokens | cache {splits.directory}")
    micro = train_cfg.batch_size
    train_batches = data.Batches(splits.train, train_cfg.seq_len, micro, train_cfg.seed, mask=splits.train_mask)
    val_batches = data.val_batches(splits.val, train_cfg.seq_len, micro, mask=splits.val_mask)
    eval_batch_count(val_batches, train_cfg.eval_batches)  # too little val data: say so now, not at the first eval
    unigram = data.unigram_loss(splits.train, splits.val, model_cfg.vocab_size, splits.train_mask, splits.val_mask)

    torch.manual_seed(train_cfg.seed)
    model = Transformer(model_cfg)
    if train_cfg.fp8:  # applied from outside the model, before compile; parameters stay fp32 masters
        from ..kernels.fp8 import convert_to_fp8

        convert_to_fp8(model, gemm_dtype=choice.dtype)  # the emulation multiplies in the run's dtype
    if train_cfg.init_from and ckpt is None:  # the student starts from existing weights
        from ..plan import load as load_model

        model.load_state_dict(load_model(train_cfg.init_from).float().state_dict())
        log(f"student initialised from {train_cfg.init_from}")
    if ckpt is not None:  # full tensors into the whole model, before any sharding
        state = checkpoint.load(ckpt, model, None)
    model = world.parallelize(model)  # EP, then FSDP2 (parallel/runtime.py); one process: unchanged
    optimizer = build_optimizer(model, train_cfg.lr, train_cfg.weight_decay, (train_cfg.beta1, train_cfg.beta2),
                                train_cfg.adam_eps, train_cfg.optim_state_dtype)
    balance = ExpertBiasUpdate(model, train_cfg.bias_gamma, train_cfg.bias_freeze_tokens or None,
                               world.all_reduce_load if world.world > 1 else None)
    distill = None
    if train_cfg.teacher:  # the student learns from a teacher (frugallm/distill/objective.py)
        from ..distill.objective import Distillation

        distill = Distillation(train_cfg, tokenizer, model_cfg.vocab_size, splits, log)
    start, tokens = 0, 0
    if ckpt is not None:
        checkpoint.load(ckpt, None, optimizer, world.shard, params_of=model)
        start, tokens, balance.tokens_seen = state["step"], state["tokens"], state["bias_tokens_seen"]
        if world.is_main:
            _truncate_metrics(run_dir / "metrics.jsonl", start)
        log(f"resumed from {ckpt} at step {start}")
    forward = torch.compile(model) if train_cfg.compile else model
    dtype = choice.dtype
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == torch.bfloat16 else contextlib.nullcontext
    flops_per_token = train_flops_per_token(model_cfg, train_cfg.seq_len)
    peak = matmul_peak(dtype) * world.world  # every rank measures about the same
    step_tokens = micro * train_cfg.seq_len * train_cfg.grad_accum
    plan = budget.TimeBudget(duration_seconds(train_cfg.time_budget), start, train_cfg.steps, train_cfg.warmup_steps, t0)
    length = f"{train_cfg.steps} steps"
    if plan.active:
        length = f"up to {length} (time budget {train_cfg.time_budget}, planned after step {plan.plan_at})"
    elif plan.seconds is not None and train_cfg.steps > plan.plan_at:
        length += f" (planned for time budget {train_cfg.time_budget})"
    log(f"model: {count_params(model_cfg)['total']:,} parameters | {length} x {step_tokens:,} tokens "
        f"| {train_cfg.precision}{' + fp8' if train_cfg.fp8 else ''}{' compiled' if train_cfg.compile else ''} "
        f"| unigram baseline {unigram:.3f} "
        f"| set-up {time.perf_counter() - t_setup:.0f}s")

    interrupted = False

    def on_sigint(signum, frame):
        nonlocal interrupted
        interrupted = True

    previous = signal.signal(signal.SIGINT, on_sigint)
    progress = Progress(train_cfg.steps, start, log, bar=world.is_main)
    last_ckpt, val_loss = ckpt, None
    t_last, tok_last = time.perf_counter(), tokens

    def save(step: int) -> Path:
        world.before_save(model, optimizer)
        state = {"step": step, "tokens": tokens, "bias_tokens_seen": balance.tokens_seen}
        return checkpoint.save(run_dir, step, model, optimizer, state, tokenizer.to_str(), model_cfg, train_cfg,
                               train_cfg.keep_last, full=world.full, write=world.is_main)

    try:
        model.train()
        for step in range(start, train_cfg.steps):
            plan.step_begins(step)
            lr = lr_at(step, train_cfg.steps, train_cfg.lr, train_cfg.warmup_steps, train_cfg.min_lr_ratio,
                       train_cfg.schedule, train_cfg.decay_fraction)
            for group in optimizer.param_groups:
                group["lr"] = lr
            late = step >= train_cfg.mtp_lambda_late_from * train_cfg.steps
            mtp_lambda = train_cfg.mtp_lambda_late if late else model_cfg.mtp_lambda
            sums = {"loss": 0.0, "lm_loss": 0.0, "mtp_loss": 0.0, "balance_loss": 0.0}
            if distill is not None:
                sums |= {"ce": 0.0, "kd": 0.0, "agreement": 0.0}
            finite = True
            tracing = contextlib.ExitStack()  # trace_step: this step's timeline, every rank (parallel/timeline.py)
            if train_cfg.trace_step == step + 1:
                tracing.enter_context(timeline.record(run_dir / "trace" / f"rank{world.rank}.json"))
            micro_batches = []
            for index in world.micro_batches(step, train_cfg.grad_accum):  # all of them, or this rank's share
                x, y = train_batches.get(index)
                windows = train_batches.window_ids(index)
                k = index - step * train_cfg.grad_accum
                micro_batches.append(distill.prepare(model, x, y, windows, step, k) if distill else (x, y, windows))
            # the step's loss is a mean over all its targets, not a mean of micro-batch means: with masked
            # targets (SFT records, on-policy prompts) the micro-batches hold different counts
            counts = [int((y != -100).sum()) for _, y, _ in micro_batches]
            total = int(world.sum([sum(counts)])[0])
            if world.pipeline is not None:  # the schedule runs every micro-batch, forward and backward
                with autocast():
                    parts = world.pipeline.step([x for x, _, _ in micro_batches], [y for _, y, _ in micro_batches],
                                                [total / c if c else 0.0 for c in counts], mtp_lambda)
                lm, mtp, bal = world.sum_stages([parts["lm_loss"], parts["mtp_loss"], parts["balance_loss"]])
                # (summed over the data ranks below, with every layout's parts)
                sums = {"loss": lm + mtp + bal, "lm_loss": lm, "mtp_loss": mtp, "balance_loss": bal}
                finite = math.isfinite(sums["loss"])
                micro_batches = []
            for k, ((x, y, windows), count) in enumerate(zip(micro_batches, counts)):
                if count == 0 and world.world == 1:
                    continue  # every target masked: nothing to learn here (ranks still run the collectives)
                load = [m.tokens_per_expert.clone() for m in balance._moe] if count == 0 else None
                with autocast(), record_function(f"frugallm:F{k}"):
                    out = forward(x, targets=y, mtp_lambda=mtp_lambda)
                    loss, parts = distill.loss(out, x, y, windows, total) if distill else (out.loss, {})
                if not torch.isfinite(loss):
                    finite = False
                    if world.world == 1:
                        break
                if distill is None:  # a mean over this micro-batch's targets -> its share of the step's mean
                    loss = loss / (total / count) if count else loss * 0.0  # / grad_accum when all are full
                with record_function(f"frugallm:B{k}"):
                    loss.backward()
                if load is not None:  # as if skipped: its routing is no load
                    for m, before in zip(balance._moe, load):
                        m.tokens_per_expert.copy_(before)
                    continue
                for key in sums:
                    value = parts[key] if key in parts else getattr(out, key)
                    value = value.item() if isinstance(value, torch.Tensor) else value or 0.0
                    sums[key] += value if key in parts else value / (total / count)
            tracing.close()
            if train_cfg.trace_step == step + 1:
                world.barrier()  # every rank's trace is written
                if world.is_main:
                    report = timeline.report(run_dir / "trace", world.world, f"step {step + 1}: {world.layout}")
                    log(f"timeline of step {step + 1}: {run_dir / 'trace' / 'timeline.png'}; span "
                        f"{report['span_ms']:.0f} ms, bubble per rank "
                        + ", ".join(f"{r['bubble']:.0%}" for r in report["ranks"]))
            if world.world > 1:  # the logged parts and the verdict on the loss cover every rank
                *values, bad = world.sum([*sums.values(), float(not finite)])
                sums, finite = dict(zip(sums, values)), bad == 0
            grad_norm = world.clip_grad_norm(model, train_cfg.grad_clip) if finite else None
            if not finite or not torch.isfinite(grad_norm):
                what = f"loss {loss.item()}" if not finite else f"gradient norm {grad_norm.item()}"
                optimizer.zero_grad(set_to_none=True)
                balance.discard()
                if not train_cfg.skip_nonfinite:
                    raise NonFiniteLoss(
                        f"non-finite {what} at step {step + 1}; the run stopped and its last good checkpoint is "
                        f"{last_ckpt or 'none (no save yet)'}. Lower lr (now {lr:.2e}), or --set skip_nonfinite=true")
                log(f"step {step + 1}: non-finite {what}, step skipped (skip_nonfinite=true)")
                if interrupted:
                    last_ckpt = save(step)
                    log(f"interrupted: saved {last_ckpt}; continue with --resume")
                    break
                continue
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            max_vio = balance.step()
            tokens += step_tokens
            done = step + 1
            if plan.plan_due(done):
                n_eval = min(train_cfg.eval_batches, val_batches.windows // val_batches.batch_size)
                state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values()) + sum(
                    t.numel() * t.element_size() for st in optimizer.state.values() for t in st.values()
                    if isinstance(t, torch.Tensor))
                # an eval is n_eval forward passes of a micro-batch, ~1/3 of a micro-batch's forward + backward
                planned, how = plan.plan(train_cfg.steps, done, n_eval / (3 * train_cfg.grad_accum), state_bytes,
                                         train_cfg.eval_every, train_cfg.save_every)
                planned = world.broadcast(planned)  # every rank stops at rank 0's plan
                log(f"time budget {train_cfg.time_budget}: {how}")
                train_cfg = dataclasses.replace(train_cfg, steps=planned)
                if world.is_main:
                    train_cfg.to_json(run_dir / "train_config.json")  # and every checkpoint from now on
                progress.set_total(planned)

            eval_due = done % train_cfg.eval_every == 0 or done == train_cfg.steps
            if done % train_cfg.log_every == 0 or eval_due:  # an eval step always gets its metrics line
                now = time.perf_counter()
                tps = (tokens - tok_last) / max(now - t_last, 1e-9)
                steps_since = (tokens - tok_last) // step_tokens
                t_last, tok_last = now, tokens
                metrics = {"step": done, "tokens": tokens, **sums, "lr": lr, "grad_norm": grad_norm.item(),
                           "tokens_per_s": tps, "mfu": tps * flops_per_token / peak, "precision": choice.name,
                           "mtp_lambda": mtp_lambda, "max_violation": max_vio,
                           "max_violation_mean": sum(max_vio) / len(max_vio) if max_vio else 0.0}
                if world.layout.ep > 1:  # expert-parallel traffic (parallel/expert.py), forward, all ranks
                    metrics["ep_bytes_per_step"] = world.ep_bytes() / max(steps_since, 1)
                if eval_due:
                    val_loss = evaluate(model, val_batches, train_cfg.eval_batches, autocast, world)
                    metrics |= {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}
                    if model_cfg.residual != "plain" and world.pipeline is None:  # H_res gain over depth (mHC §3.1)
                        from ..model.hyperconn import composite_gains

                        gains = composite_gains(model, val_batches.get(0)[0])
                        metrics |= {"hc_gain_fwd": gains["hc_gain_fwd"], "hc_gain_bwd": gains["hc_gain_bwd"]}
                    t_last = time.perf_counter()  # eval time is not training throughput
                if world.is_main:
                    with open(run_dir / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(metrics) + "\n")
                    progress.update(done, train_cfg.steps, metrics)
            if world.world > 1:  # a Ctrl-C on any rank stops all of them at the same step
                interrupted = world.any(interrupted)
            if done % train_cfg.save_every == 0 or done == train_cfg.steps or interrupted:
                last_ckpt = save(done)
            if interrupted:
                log(f"interrupted: saved {last_ckpt}; continue with --resume")
                break
            if done >= train_cfg.steps:  # a time budget's plan ends before the range's cap
                break
        world.barrier()  # rank 0's last checkpoint is on disk before anyone reads it
    finally:
        progress.close()
        signal.signal(signal.SIGINT, previous)
        world.close()
    final_step = checkpoint.latest(run_dir)
    return RunResult(run_dir, int(final_step.name.split("_")[1]) if final_step else 0, val_loss, unigram,
                     interrupted, last_ckpt)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint being resumed, so the log reads as one uninterrupted run."""
    if path.exists():
        lines = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= step]
        write_file(path, "".join(l + "\n" for l in lines))
