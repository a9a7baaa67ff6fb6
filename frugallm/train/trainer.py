"""The training loop: data -> model -> AdamW, with exact resume, telemetry and safe checkpoints.

One optimizer step = `grad_accum` micro-batches. Per step, in order:
  lr from the schedule; MTP lambda from its schedule; forward/backward of each micro-batch
  (bf16 autocast or fp32); a non-finite loss stops the run (or skips the step); clip at 1.0;
  AdamW step; the aux-loss-free bias update from the whole step's expert load; logging;
  eval; checkpoint. Nothing random happens after initialisation and the data position is a
  pure function of the step, so a resumed run repeats the uninterrupted one bit for bit (fp32).

The set-up (run directory, ranks, execution plan, data, model, optimizer) is train/setup.py. A time
budget (`time_budget="8m"`, train/time_budget.py) plans `steps` from the first steps' measured time and
re-plans as it changes; the lr, MTP-lambda and warm-up phases follow the plan (train/schedule.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.profiler import record_function

from ..config import ModelConfig
from ..formats import checkpoint
from ..names import METRICS, TRAIN_CONFIG
from ..model.count import count_params, in_words
from ..model.hyperconn import composite_gains
from ..parallel import timeline
from . import time_budget
from .config import TrainConfig, duration_seconds
from .schedule import Schedule
from .setup import Run, set_up
from .telemetry import Progress, evaluate, matmul_peak, train_flops_per_token


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


def _print(line: str) -> None:
    print(line, flush=True)  # progress must reach a pipe or CI log as it happens


@dataclass
class Meter:
    """What the telemetry keeps between steps: the MFU's terms, the time budget, the throughput window."""

    flops_per_token: float
    peak: float  # the measured matmul FLOP/s of every rank together
    step_tokens: int
    budget: time_budget.TimeBudget
    schedule: Schedule  # the step-counted phases, fitted to the planned length (train/schedule.py)
    progress: Progress | None = None
    t_last: float = 0.0
    tok_last: int = 0
    val_loss: float | None = None


@dataclass
class StepOut:
    """One optimizer step's numbers, as the loop and the telemetry read them."""

    lr: float
    mtp_lambda: float
    sums: dict[str, float]  # the loss parts, means over the step's targets, summed over every rank
    finite: bool  # every rank's every loss
    loss: torch.Tensor | None  # this rank's last micro-batch loss (None: none ran, or a pipeline step)
    grad_norm: torch.Tensor | None = None
    max_vio: list[float] = field(default_factory=list)


def train(model_cfg: ModelConfig, train_cfg: TrainConfig, run_dir: str | Path, resume: bool = False,
          log: Callable[[str], None] = _print) -> RunResult:
    """Train into `run_dir` (created), or continue the run there with resume=True."""
    t0 = time_budget.now()  # a time budget covers the whole call, set-up included
    t_setup = time.perf_counter()
    run = set_up(model_cfg, train_cfg, Path(run_dir), resume, log)
    try:
        return _train(run, t0, t_setup)
    finally:
        run.release()  # the run directory's lock: the next trainer of it may start


def _train(run: Run, t0: float, t_setup: float) -> RunResult:
    """The loop, from the set-up run to its last checkpoint."""
    meter = _announce(run, t0, t_setup)
    previous = signal.signal(signal.SIGINT, run.on_sigint)
    meter.progress = Progress(run.train_cfg.steps, run.start, run.log, bar=run.world.is_main)
    meter.t_last, meter.tok_last = time.perf_counter(), run.tokens
    world, loss = run.world, None
    try:
        run.model.train()
        for step in range(run.start, run.train_cfg.steps):
            meter.budget.step_begins(step)
            out = _step(run, step, meter.schedule)
            loss = out.loss if out.loss is not None else loss
            out.grad_norm = world.clip_grad_norm(run.model, run.train_cfg.grad_clip) if out.finite else None
            if not out.finite or not torch.isfinite(out.grad_norm):
                if _skip(run, step, out, loss, meter.schedule):
                    break
                continue
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            out.max_vio = run.balance.step()
            run.tokens += meter.step_tokens
            done = step + 1
            if _plan_due(run, meter, done):
                _plan_length(run, meter, done)
            _telemetry(run, meter, done, out)
            if world.world > 1:  # a Ctrl-C on any rank stops all of them at the same step
                run.interrupted = world.any(run.interrupted)
            if done % run.train_cfg.save_every == 0 or done == run.train_cfg.steps or run.interrupted:
                run.last_checkpoint = _save(run, done, meter.schedule)
            if run.interrupted:
                run.log(f"interrupted: saved {run.last_checkpoint}; continue with --resume")
                break
            if done >= run.train_cfg.steps:  # a time budget's plan ends before the range's cap
                break
        world.barrier()  # rank 0's last checkpoint is on disk before anyone reads it
    finally:
        meter.progress.close()
        signal.signal(signal.SIGINT, previous)
        world.close()
    final_step = checkpoint.latest(run.run_dir)
    return RunResult(run.run_dir, int(final_step.name.split("_")[1]) if final_step else 0, meter.val_loss,
                     run.unigram, run.interrupted, run.last_checkpoint)


def _announce(run: Run, t0: float, t_setup: float) -> Meter:
    """The MFU's terms and the time budget, then the run's summary line."""
    cfg = run.train_cfg
    flops_per_token = train_flops_per_token(run.model_cfg, cfg.seq_len)
    peak = matmul_peak(run.plan.dtype) * run.world.world  # every rank measures about the same
    step_tokens = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    schedule = Schedule.from_state(run.schedule_state, cfg)
    budget = time_budget.TimeBudget(duration_seconds(cfg.time_budget), run.start, cfg.steps, schedule.warmup, t0)
    length, warmup = f"{cfg.steps} steps", ""
    if budget.active:  # the warm-up is fitted, and said, at the plan
        length = f"up to {length} (time budget {cfg.time_budget}, planned after step {budget.plan_at})"
    else:
        if budget.seconds is not None and cfg.steps > budget.plan_at:
            length += f" (planned for time budget {cfg.time_budget})"
        warmup = f", {schedule.describe()}"
        for line in schedule.problems(cfg, step_tokens):
            run.log(f"warning: {line}")
    run.log(f"model: {in_words(count_params(run.model_cfg))} | {length} x {step_tokens:,} tokens{warmup} "
            f"| {cfg.precision}{' + fp8' if cfg.fp8 else ''}{' compiled' if cfg.compile else ''} "
            f"| unigram baseline {run.unigram:.3f} "
            f"| set-up {time.perf_counter() - t_setup:.0f}s")
    return Meter(flops_per_token, peak, step_tokens, budget, schedule)


# --- the step ---------------------------------------------------------------------------------------

def _step(run: Run, step: int, schedule: Schedule) -> StepOut:
    """lr and MTP lambda from their schedules, then forward and backward of the step's micro-batches
    (by the pipeline schedule, or this rank's one after another); the loss parts summed over every rank."""
    cfg, world = run.train_cfg, run.world
    lr = schedule.lr(step, cfg)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    late = schedule.late(step, cfg.mtp_lambda_late_from)
    mtp_lambda = cfg.mtp_lambda_late if late else run.model_cfg.mtp_lambda
    sums = {"loss": 0.0, "lm_loss": 0.0, "mtp_loss": 0.0, "balance_loss": 0.0}
    if run.model_cfg.index_topk > 0 and run.model_cfg.attention == "mla":  # DSA indexers' KL (model/indexer_loss.py)
        sums["indexer_loss"] = 0.0
    if run.distill is not None:
        sums |= {"ce": 0.0, "kd": 0.0, "agreement": 0.0}
    tracing = contextlib.ExitStack()  # trace_step: this step's timeline, every rank (parallel/timeline.py)
    if cfg.trace_step == step + 1:
        tracing.enter_context(timeline.record(run.run_dir / "trace" / f"rank{world.rank}.json"))
    micro_batches = _micro_batches(run, step)
    # the step's loss is a mean over all its targets, not a mean of micro-batch means: with masked
    # targets (SFT records, on-policy prompts) the micro-batches hold different counts
    counts = [int((y != -100).sum()) for _, y, _ in micro_batches]
    total = int(world.sum([sum(counts)])[0])
    if world.pipeline is not None:  # the schedule runs every micro-batch, forward and backward
        sums, loss = _pipeline_step(run, micro_batches, counts, total, mtp_lambda), None
        finite = math.isfinite(sums["loss"])
    else:
        finite, loss = _forward_backward(run, micro_batches, counts, total, mtp_lambda, sums)
    tracing.close()
    if cfg.trace_step == step + 1:
        _trace_report(run, step)
    if world.world > 1:  # the logged parts and the verdict on the loss cover every rank
        *values, bad = world.sum([*sums.values(), float(not finite)])
        sums, finite = dict(zip(sums, values)), bad == 0
    return StepOut(lr, mtp_lambda, sums, finite, loss)


def _micro_batches(run: Run, step: int) -> list[tuple]:
    """(x, y, windows) of each of the step's micro-batches this rank runs (all of them in one process);
    with a teacher, the distillation objective prepares each (an on-policy one samples its continuation)."""
    out = []
    for index in run.world.micro_batches(step, run.train_cfg.grad_accum):  # all of them, or this rank's share
        x, y = run.train_batches.get(index)
        windows = run.train_batches.window_ids(index)
        k = index - step * run.train_cfg.grad_accum
        out.append(run.distill.prepare(run.model, x, y, windows, step, k) if run.distill else (x, y, windows))
    return out


def _pipeline_step(run: Run, micro_batches: list[tuple], counts: list[int], total: int, mtp_lambda: float) -> dict:
    """The pipeline schedule's forward and backward of every micro-batch (parallel/pipeline.py)."""
    world = run.world
    with run.plan.autocast_context():
        parts = world.pipeline.step([x for x, _, _ in micro_batches], [y for _, y, _ in micro_batches],
                                    [total / c if c else 0.0 for c in counts], mtp_lambda)
    lm, mtp, bal = world.sum_stages([parts["lm_loss"], parts["mtp_loss"], parts["balance_loss"]])
    # (summed over the data ranks by the caller, with every layout's parts)
    return {"loss": lm + mtp + bal, "lm_loss": lm, "mtp_loss": mtp, "balance_loss": bal}


def _forward_backward(run: Run, micro_batches: list[tuple], counts: list[int], total: int, mtp_lambda: float,
                      sums: dict[str, float]) -> tuple[bool, torch.Tensor | None]:
    """Forward and backward of each micro-batch in turn, the gradients accumulating, each one's loss
    parts added into `sums`. Returns (every loss finite, the last micro-batch's loss)."""
    world, distill, balance = run.world, run.distill, run.balance
    finite, loss = True, None
    for k, ((x, y, windows), count) in enumerate(zip(micro_batches, counts)):
        if count == 0 and world.world == 1:
            continue  # every target masked: nothing to learn here (ranks still run the collectives)
        load = [m.tokens_per_expert.clone() for m in balance._moe] if count == 0 else None
        with run.plan.autocast_context(), record_function(f"frugallm:F{k}"):
            out = run.forward(x, targets=y, mtp_lambda=mtp_lambda)
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
    return finite, loss


def _trace_report(run: Run, step: int) -> None:
    """After a traced step: every rank's trace written, rank 0 draws the timeline and logs its bubbles."""
    world = run.world
    world.barrier()  # every rank's trace is written
    if world.is_main:
        report = timeline.report(run.run_dir / "trace", world.world, f"step {step + 1}: {world.layout}")
        run.log(f"timeline of step {step + 1}: {run.run_dir / 'trace' / 'timeline.png'}; span "
                f"{report['span_ms']:.0f} ms, bubble per rank "
                + ", ".join(f"{r['bubble']:.0%}" for r in report["ranks"]))


def _skip(run: Run, step: int, out: StepOut, loss: torch.Tensor | None, schedule: Schedule) -> bool:
    """A non-finite loss or gradient norm: stop the run (NonFiniteLoss), or with skip_nonfinite drop the
    step's gradients and expert load. True when an interrupt then ends the loop (after a save)."""
    if not out.finite:  # a pipeline step has no micro-batch loss here: its summed loss says it
        what = f"loss {loss.item() if loss is not None else out.sums['loss']}"
    else:
        what = f"gradient norm {out.grad_norm.item()}"
    run.optimizer.zero_grad(set_to_none=True)
    run.balance.discard()
    if not run.train_cfg.skip_nonfinite:
        raise NonFiniteLoss(
            f"non-finite {what} at step {step + 1}; the run stopped and its last good checkpoint is "
            f"{run.last_checkpoint or 'none (no save yet)'}. Lower lr (now {out.lr:.2e}), or --set skip_nonfinite=true")
    run.log(f"step {step + 1}: non-finite {what}, step skipped (skip_nonfinite=true)")
    if run.interrupted:
        run.last_checkpoint = _save(run, step, schedule)
        run.log(f"interrupted: saved {run.last_checkpoint}; continue with --resume")
        return True
    return False


# --- telemetry and checkpoints ----------------------------------------------------------------------

def _plan_due(run: Run, meter: Meter, done: int) -> bool:
    """Whether the time budget plans (or re-plans) after step `done`. Only the first plan may come early
    (by each rank's clock): rank 0's decides it for every rank; the re-plans fall on the same steps everywhere."""
    due = meter.budget.plan_due(done) and done < run.train_cfg.steps
    if run.world.world > 1 and meter.budget.timing and not meter.budget.planned:
        due = bool(run.world.broadcast(int(due)))
    return due


def _plan_length(run: Run, meter: Meter, done: int) -> None:
    """The time budget's plan once its steps are measured, and its re-plans: `steps` becomes the most
    that fit, recorded in train_config.json (and in every checkpoint from now on), and the schedule
    re-maps the rest of the run onto it; the same on every rank."""
    cfg, world = run.train_cfg, run.world
    n_eval = min(cfg.eval_batches, run.val_batches.windows // run.val_batches.batch_size)
    state_bytes = sum(t.numel() * t.element_size() for t in run.model.state_dict().values()) + sum(
        t.numel() * t.element_size() for st in run.optimizer.state.values() for t in st.values()
        if isinstance(t, torch.Tensor))
    first = not meter.budget.planned
    # an eval is n_eval forward passes of a micro-batch, ~1/3 of a micro-batch's forward + backward
    planned, how = meter.budget.plan(cfg.steps, done, n_eval / (3 * cfg.grad_accum), state_bytes,
                                     cfg.eval_every, cfg.save_every)
    planned = world.broadcast(planned)  # every rank stops at rank 0's plan
    if planned != cfg.steps:
        meter.schedule.replan(done, planned)
        run.train_cfg = dataclasses.replace(cfg, steps=planned)
        if world.is_main:
            run.train_cfg.to_json(run.run_dir / TRAIN_CONFIG)  # and every checkpoint from now on
        meter.progress.set_total(planned, "" if first else f"re-planned from {cfg.steps}")
    if how is not None:
        run.log(f"time budget {cfg.time_budget}: {how}" + (f"; {meter.schedule.describe()}" if first else ""))
    if first:
        for line in meter.schedule.problems(run.train_cfg, meter.step_tokens):
            run.log(f"warning: {line}")


def _telemetry(run: Run, meter: Meter, done: int, out: StepOut) -> None:
    """Step `done`'s metrics line (every log_every steps, and at each eval) into metrics.jsonl and the
    progress display; every eval_every steps and at the end, with the validation loss."""
    cfg, world = run.train_cfg, run.world
    eval_due = done % cfg.eval_every == 0 or done == cfg.steps
    if not (done % cfg.log_every == 0 or eval_due):  # an eval step always gets its metrics line
        meter.progress.step_done(done, cfg.steps, out.sums["loss"], out.lr)
        return
    now = time.perf_counter()
    tps = (run.tokens - meter.tok_last) / max(now - meter.t_last, 1e-9)
    steps_since = (run.tokens - meter.tok_last) // meter.step_tokens
    meter.t_last, meter.tok_last = now, run.tokens
    metrics = {"step": done, "tokens": run.tokens, **out.sums, "lr": out.lr, "grad_norm": out.grad_norm.item(),
               "tokens_per_s": tps, "mfu": tps * meter.flops_per_token / meter.peak, "precision": run.plan.precision,
               "mtp_lambda": out.mtp_lambda, "max_violation": out.max_vio,
               "max_violation_mean": sum(out.max_vio) / len(out.max_vio) if out.max_vio else 0.0}
    if world.layout.ep > 1:  # expert-parallel traffic (parallel/expert.py), forward, all ranks
        metrics["ep_bytes_per_step"] = world.ep_bytes() / max(steps_since, 1)
    if eval_due:
        meter.val_loss = evaluate(run.model, run.val_batches, cfg.eval_batches, run.plan.autocast_context, world)
        metrics |= {"val_loss": meter.val_loss, "val_ppl": math.exp(min(meter.val_loss, 50)), **_hc_gains(run)}
        meter.t_last = time.perf_counter()  # eval time is not training throughput
    if world.is_main:
        with open(run.run_dir / METRICS, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        meter.progress.update(done, cfg.steps, metrics)


def _hc_gains(run: Run) -> dict[str, float]:
    """A hyper-connected model's H_res composite gain over depth, forward and backward (mHC §3.1), on
    the first val batch; {} for a plain residual or pipeline stages (no rank holds every layer)."""
    if run.model_cfg.residual == "plain" or run.world.pipeline is not None:
        return {}
    gains = composite_gains(run.model, run.val_batches.get(0)[0])
    return {"hc_gain_fwd": gains["hc_gain_fwd"], "hc_gain_bwd": gains["hc_gain_bwd"]}


def _save(run: Run, step: int, schedule: Schedule) -> Path:
    """Checkpoint `step` (every rank takes part in gathering a sharded model; rank 0 writes)."""
    world = run.world
    world.before_save(run.model, run.optimizer)
    state = {"step": step, "tokens": run.tokens, "bias_tokens_seen": run.balance.tokens_seen,
             "schedule": schedule.to_state()}  # a re-planned schedule resumes as it was
    return checkpoint.save(run.run_dir, step, run.model, run.optimizer, state, run.tokenizer.to_str(), run.model_cfg,
                           run.train_cfg, run.train_cfg.keep_last, full=run.world.full, write=world.is_main)
