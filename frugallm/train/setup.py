"""A training run's set-up (train/trainer.py runs the loop): the run directory and its resume checks,
the ranks, the execution plan (plan.py), the tokenizer and data, and the model loaded once (random
init, `init_from`, or the checkpoint being resumed) before the plan is applied to it once.

Precision `auto` is resolved once, by host.py's measured bf16/fp32 GEMM ratio (bf16 is ~100x slower
than fp32 on CPUs without native bf16), and the run records the dtype it chose, so a resume repeats
it on any host. On several ranks every rank computes in rank 0's choice.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..config import ModelConfig
from ..formats import checkpoint
from ..formats.names import CHECKPOINTS, CONFIG, METRICS, TRAIN_CONFIG
from ..io import write_file
from ..model.transformer import Transformer
from ..parallel import layout as parallel_layout
from ..parallel.runtime import runtime_for
from ..plan import Plan, apply, resolve
from ..plan import load as load_model
from ..tokenizer import TOKENIZER, Tokenizer, load_tokenizer, train_tokenizer
from . import data
from .config import TrainConfig
from .optim import ExpertBiasUpdate, build_optimizer
from .telemetry import eval_batch_count


def _silent(line: str) -> None:
    pass


def _tokenizer_for(run_dir: Path, model_cfg: ModelConfig, train_cfg: TrainConfig, log,
                   write: bool = True) -> Tokenizer:
    if (run_dir / TOKENIZER).exists():
        tok = load_tokenizer(run_dir)
    elif train_cfg.tokenizer:
        tok = load_tokenizer(train_cfg.tokenizer)
    else:  # train one on the run's data; cached per (data, vocab)
        key = f"{data.fingerprint(train_cfg.data)}-{model_cfg.vocab_size}-{train_cfg.tokenizer_train_chars}"
        cached = data.cache_root() / "tokenizers" / key
        if (cached / TOKENIZER).exists():
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


# what a run directory holds (a run that stopped before its first checkpoint may be started again)
RUN_FILES = {CONFIG, TRAIN_CONFIG, TOKENIZER, METRICS, CHECKPOINTS}


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


def open_run(model_cfg: ModelConfig, train_cfg: TrainConfig, run_dir: Path,
             resume: bool) -> tuple[ModelConfig, TrainConfig, Path | None]:
    """The configs the run goes on with and the checkpoint it resumes (None for a new run); refuses
    a run directory that is not this run's to write."""
    if not resume:
        if checkpoint.checkpoints(run_dir):
            raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it or choose another "
                                  "--out")
        if run_dir.is_dir() and (strangers := sorted(p.name for p in run_dir.iterdir() if not _run_file(p.name))):
            # a run only writes its own files: never config.json over somebody's project (`--out .`)
            raise FileExistsError(f"{run_dir} holds files that are not a frugallm run ({', '.join(strangers[:3])}"
                                  f"{', ...' if len(strangers) > 3 else ''}); choose a new or empty --out")
        return model_cfg, train_cfg, None
    ckpt = checkpoint.latest(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"--resume: {run_dir} holds no valid checkpoint")
    saved_train = TrainConfig.from_json(ckpt / TRAIN_CONFIG)
    saved_model = ModelConfig.from_json(ckpt / CONFIG)
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
    changes = {k: getattr(train_cfg, k) for k in RESUMABLE if k not in ("steps", "time_budget")}
    if not train_cfg.time_budget:
        changes |= {"steps": train_cfg.steps, "time_budget": ""}
    return saved_model, dataclasses.replace(saved_train, **changes), ckpt


def execution_plan(train_cfg: TrainConfig, world, log) -> Plan:
    """plan.resolve("train") for the run's precision, fp8 and compile; on several ranks, every rank
    takes rank 0's dtype (and rank 0 alone says why)."""
    flags = dict(fp8=train_cfg.fp8, compile=train_cfg.compile)
    plan = resolve("train", dtype=train_cfg.precision, **flags)  # a resumed run's is already resolved: honoured
    if world.world > 1 and not world.is_main:
        plan = resolve("train", dtype=("fp32", "bf16")[world.broadcast(int(plan.precision == "bf16"))], **flags)
    elif world.world > 1:
        world.broadcast(int(plan.precision == "bf16"))
        log(f"{world.layout} ({'gloo' if world.device == 'cpu' else 'nccl'}); micro-batches per rank per step: "
            f"{train_cfg.grad_accum // world.data_ranks}")
    log(plan.reasons[0])  # the dtype's reason (the plan's other parts are in the run's summary line)
    return plan


def _prepare_data(run_dir: Path, model_cfg: ModelConfig, train_cfg: TrainConfig, world, log):
    """The tokenizer and the tokenized splits; rank 0 first (it writes the configs and fills the
    shared caches once), then the others."""
    if not world.is_main:
        world.barrier()
    else:
        model_cfg.to_json(run_dir / CONFIG)
        train_cfg.to_json(run_dir / TRAIN_CONFIG)
    tokenizer = _tokenizer_for(run_dir, model_cfg, train_cfg, log, write=world.is_main)
    splits = data.prepare(train_cfg.data, tokenizer, train_cfg.val_fraction, train_cfg.text_field)
    if world.is_main:
        world.barrier()
    m = splits.manifest
    if m["replaced_bytes"]:
        log(f"warning: {m['replaced_bytes']:,} bytes of the data were not UTF-8 and were replaced by U+FFFD")
    log(f"data: {m['source']} | {sum(m['documents'].values()):,} documents, {m['tokens']['train']:,} train / "
        f"{m['tokens']['val']:,} val tokens | cache {splits.directory}")
    return tokenizer, splits


def _load_model(model_cfg: ModelConfig, train_cfg: TrainConfig, ckpt: Path | None, log):
    """The model as the paper defines it, with its weights loaded once: seeded random init, then
    `init_from`'s weights or the resumed checkpoint's (full tensors, before any plan or sharding).
    Returns (model, the checkpoint's trainer state or None)."""
    torch.manual_seed(train_cfg.seed)
    model = Transformer(model_cfg)
    if train_cfg.init_from and ckpt is None:  # the student starts from existing weights
        model.load_state_dict(load_model(train_cfg.init_from).float().state_dict())
        log(f"student initialised from {train_cfg.init_from}")
    return model, checkpoint.load(ckpt, model, None) if ckpt is not None else None


@dataclass
class Run:
    """A run once set up: what the loop (trainer.py) reads, and the little it changes: train_cfg (a
    time budget's plan), tokens, the last checkpoint and the interrupt flag."""

    model_cfg: ModelConfig
    train_cfg: TrainConfig
    run_dir: Path
    log: Callable[[str], None]
    world: object  # a parallel runtime (parallel/runtime.py)
    plan: Plan
    tokenizer: Tokenizer
    train_batches: data.Batches
    val_batches: data.Batches
    unigram: float
    model: nn.Module
    forward: nn.Module  # the model, or its torch.compile wrapper (plan.apply)
    optimizer: torch.optim.Optimizer
    balance: ExpertBiasUpdate
    distill: object | None  # distill/objective.py Distillation, when the run has a teacher
    start: int = 0
    tokens: int = 0
    last_checkpoint: Path | None = None
    interrupted: bool = False

    def on_sigint(self, signum, frame) -> None:
        self.interrupted = True


def set_up(model_cfg: ModelConfig, train_cfg: TrainConfig, run_dir: Path, resume: bool, log) -> Run:
    """Everything before the first step, in order: the run directory, the ranks (checked before the
    process group starts, parallel/layout.py), the plan, data, the model loaded and then planned once
    (plan.apply: fp8, then EP / FSDP2 / pipeline stages, then compile), the optimizer and its state."""
    model_cfg, train_cfg, ckpt = open_run(model_cfg, train_cfg, run_dir, resume)
    # rank 0 alone logs and writes, and the others follow it through the set-up that fills shared caches
    world = runtime_for(parallel_layout.resolve(model_cfg, train_cfg, parallel_layout.world_from_env()),
                        train_cfg.fp8_dispatch, dict(schedule=train_cfg.pp_schedule, n_microbatches=train_cfg.grad_accum,
                                                     micro_shape=(train_cfg.batch_size, train_cfg.seq_len),
                                                     overlap=train_cfg.overlap))
    if not world.is_main:
        log = _silent
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(train_cfg.threads or torch.get_num_threads())
    plan = execution_plan(train_cfg, world, log)
    train_cfg = dataclasses.replace(train_cfg, precision=plan.precision)  # recorded: a resume repeats it
    tokenizer, splits = _prepare_data(run_dir, model_cfg, train_cfg, world, log)
    micro = train_cfg.batch_size
    train_batches = data.Batches(splits.train, train_cfg.seq_len, micro, train_cfg.seed, mask=splits.train_mask)
    val_batches = data.val_batches(splits.val, train_cfg.seq_len, micro, mask=splits.val_mask)
    eval_batch_count(val_batches, train_cfg.eval_batches)  # too little val data: say so now, not at the first eval
    unigram = data.unigram_loss(splits.train, splits.val, model_cfg.vocab_size, splits.train_mask, splits.val_mask)
    model, state = _load_model(model_cfg, train_cfg, ckpt, log)
    # fp8 converters hold the loaded parameter objects (fp32 masters); one process: parallelize is a no-op
    applied = apply(model, plan, world)
    model = applied.model
    optimizer = build_optimizer(model, train_cfg.lr, train_cfg.weight_decay, (train_cfg.beta1, train_cfg.beta2),
                                train_cfg.adam_eps, train_cfg.optim_state_dtype)
    balance = ExpertBiasUpdate(model, train_cfg.bias_gamma, train_cfg.bias_freeze_tokens or None,
                               world.all_reduce_load if world.world > 1 else None)
    distill = None
    if train_cfg.teacher:  # the student learns from a teacher (frugallm/distill/objective.py)
        from ..distill.objective import Distillation

        distill = Distillation(train_cfg, tokenizer, model_cfg.vocab_size, splits, log)
    run = Run(model_cfg, train_cfg, run_dir, log, world, plan, tokenizer, train_batches, val_batches, unigram,
              model, applied.forward, optimizer, balance, distill, last_checkpoint=ckpt)
    if ckpt is not None:
        checkpoint.load(ckpt, None, optimizer, world.shard, params_of=model)
        run.start, run.tokens, balance.tokens_seen = state["step"], state["tokens"], state["bias_tokens_seen"]
        if world.is_main:
            _truncate_metrics(run_dir / METRICS, run.start)
        log(f"resumed from {ckpt} at step {run.start}")
    return run


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint being resumed, so the log reads as one uninterrupted run."""
    if path.exists():
        lines = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= step]
        write_file(path, "".join(l + "\n" for l in lines))
