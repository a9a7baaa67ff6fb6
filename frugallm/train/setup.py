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
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..config import ModelConfig
from ..formats import checkpoint
from ..formats.open import open as open_model
from ..names import CHECKPOINTS, CONFIG, METRICS, TRAIN_CONFIG
from ..io import LOCK, OutputError, lock_directory, nobodys_output, write_file
from ..model.indexer import set_dsa_stage
from ..model.transformer import Transformer
from ..parallel import layout as parallel_layout
from ..parallel.runtime import runtime_for
from ..plan import Plan, apply, resolve
from ..plan import load as load_model
from ..tokenizer import TOKENIZER, Tokenizer, train_tokenizer
from ..tokenizer import load_tokenizer as read_tokenizer
from . import data
from .config import TrainConfig
from .metrics_file import read_metrics
from .optim import ExpertBiasUpdate, build_optimizer
from .telemetry import eval_batch_count


def _silent(line: str) -> None:
    pass


def _tokenizer_for(run_dir: Path, model_cfg: ModelConfig, train_cfg: TrainConfig, log,
                   ckpt: Path | None = None) -> Tokenizer:
    """The run's tokenizer: a resumed run's is its checkpoint's (verified, and the run-level copy must
    be the same); a new run's is the copy a run that stopped before its first checkpoint left, else
    train_cfg.tokenizer (a run's: its checkpoint's), else one trained on the data (cached)."""
    if ckpt is not None:
        tok, copy = read_tokenizer(ckpt / TOKENIZER), run_dir / TOKENIZER
        if copy.exists() and read_tokenizer(copy).hash() != tok.hash():
            # other ids for the same text: the data would be tokenized again and the run go on learning
            # noise, its metrics still smooth
            raise ValueError(f"--resume: {copy} differs from {ckpt / TOKENIZER}, the tokenizer this run was trained "
                             f"with (replaced since, e.g. by `frugallm tokenizer train --out {run_dir}`); put the "
                             f"run's back (cp {ckpt / TOKENIZER} {copy}) or start a new run with another --out")
    elif (run_dir / TOKENIZER).exists():
        tok = read_tokenizer(run_dir / TOKENIZER)
    elif train_cfg.tokenizer:
        tok = checkpoint.load_tokenizer(train_cfg.tokenizer)
    else:  # train one on the run's data; cached per (data, vocab)
        key = f"{data.fingerprint(train_cfg.data)}-{model_cfg.vocab_size}-{train_cfg.tokenizer_train_chars}"
        cached = data.cache_root() / "tokenizers" / key
        if (cached / TOKENIZER).exists():
            tok = read_tokenizer(cached)
        else:
            log(f"training a {model_cfg.vocab_size}-token byte-level BPE on {train_cfg.data or 'the built-in corpus'}")
            tok = train_tokenizer(_sample_texts(train_cfg), model_cfg.vocab_size)
            cached.mkdir(parents=True, exist_ok=True)
            tok.save(cached)
    if tok.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
                         f"{model_cfg.vocab_size}; raise vocab_size (--set vocab_size={tok.vocab_size})")
    return tok


def _sample_texts(train_cfg: TrainConfig):
    budget = train_cfg.tokenizer_train_chars
    for doc_id, text in data.iter_documents(train_cfg.data, train_cfg.text_field):
        if budget <= 0:
            return
        if not data.is_val(doc_id, train_cfg.val_fraction):  # never fit the tokenizer on val text
            yield text[:budget]
            budget -= len(text)


# what a run directory holds (a run that stopped before its first checkpoint may be started again);
# TRAIN_CONFIG, written first, or CHECKPOINTS marks a directory as a run; "trace": trace_step's timelines
RUN_FILES = {CONFIG, TRAIN_CONFIG, TOKENIZER, METRICS, CHECKPOINTS, "trace"}
_TEMPS = tuple(f".{name}.tmp-" for name in RUN_FILES)  # io.write_file's, left by a kill


def _run_file(name: str) -> bool:
    return name in RUN_FILES or name.endswith(".png") or name == LOCK or name.startswith(_TEMPS)


def check_out(run_dir: Path, resume: bool) -> None:
    """Refuse, before anything is written there, a run directory that is not this run's to fill: the
    working or home directory (`--out .`), a file, a directory of other files (a run writes config.json
    and appends to metrics.jsonl: never into somebody's project), and for a resume one without checkpoints."""
    if why := nobodys_output(run_dir):
        raise OutputError(f"refusing to train into {run_dir}: {why}; choose a new or empty --out, e.g. runs/NAME")
    if run_dir.exists() and not run_dir.is_dir():
        raise OutputError(f"refusing to train into {run_dir}: it is a file; choose a new or empty --out")
    if resume and not (run_dir / CHECKPOINTS).is_dir():
        raise FileNotFoundError(f"--resume: {run_dir} holds no valid checkpoint")
    if resume or not run_dir.is_dir():
        return
    if strangers := sorted(p.name for p in run_dir.iterdir() if not _run_file(p.name)):
        raise FileExistsError(f"{run_dir} holds files that are not a frugallm run ({', '.join(strangers[:3])}"
                              f"{', ...' if len(strangers) > 3 else ''}); choose a new or empty --out")
    ours = (run_dir / TRAIN_CONFIG).is_file() or (run_dir / CHECKPOINTS).is_dir()
    if not ours and (found := sorted(p.name for p in run_dir.iterdir() if p.name != LOCK)):
        raise FileExistsError(f"{run_dir} holds {', '.join(found)} but no {TRAIN_CONFIG} or {CHECKPOINTS}/, so it "
                              "is not a frugallm run; choose a new or empty --out")


def claim(run_dir: Path):
    """Create the run directory and take its lock (io.lock_directory) for the one process that writes it,
    torchrun's rank 0 (or the only process); None on the other ranks. Close it to release it."""
    if os.environ.get("RANK", "0") != "0":
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    return lock_directory(run_dir)


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
        automatic = asked is None or f.name == "precision" and asked == "auto"  # the run's own value is kept
        if f.name not in RESUMABLE and have != asked and not automatic:
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
    flags = dict(fp8=train_cfg.fp8, compile=train_cfg.compile, ranks=world.world)
    plan = resolve("train", dtype=train_cfg.precision, **flags)  # a resumed run's is already resolved: honoured
    if world.world > 1 and not world.is_main:
        plan = resolve("train", dtype=("fp32", "bf16")[world.broadcast(int(plan.precision == "bf16"))], **flags)
    elif world.world > 1:
        world.broadcast(int(plan.precision == "bf16"))
        log(f"{world.layout} ({'gloo' if world.device == 'cpu' else 'nccl'}); micro-batches per rank per step: "
            f"{train_cfg.grad_accum // world.data_ranks}")
    log(plan.reasons[0])  # the dtype's reason (the plan's other parts are in the run's summary line)
    return plan


def _prepare_data(run_dir: Path, model_cfg: ModelConfig, train_cfg: TrainConfig, ckpt: Path | None, world, log):
    """The tokenizer and the tokenized splits; rank 0 first (it writes the configs and fills the
    shared caches once), then the others."""
    if not world.is_main:
        world.barrier()
    tokenizer = _tokenizer_for(run_dir, model_cfg, train_cfg, log, ckpt)  # refuses before anything is written
    if world.is_main:
        train_cfg.to_json(run_dir / TRAIN_CONFIG)  # first: it marks the directory as a run (check_out)
        model_cfg.to_json(run_dir / CONFIG)
        tokenizer.save(run_dir)
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
    if train_cfg.init_from and ckpt is None:  # the run (or a distillation's student) starts from existing weights
        init_from(model, train_cfg.init_from, log)
    return model, checkpoint.load(ckpt, model, None) if ckpt is not None else None


def check_init_from(ours: ModelConfig, path: str) -> None:
    """Refuse an init_from whose model is not this run's outside the DSA fields (index_*). A model
    without indexers gains fresh ones (DeepSeek-V3.2 §2.1.1 converts V3.1 so; train them with
    dsa_stage=warmup first), one with indexers may drop them; indexers both have are of one shape
    (index_topk may differ). Reads configs only: said before anything is written."""
    theirs = open_model(path).config
    shape = ("index_n_heads", "index_head_dim") if ours.index_topk and theirs.index_topk else ()
    differ = [f"{f.name} ({getattr(theirs, f.name)!r} there, {getattr(ours, f.name)!r} here)"
              for f in dataclasses.fields(ModelConfig)
              if (not f.name.startswith("index_") or f.name in shape) and getattr(theirs, f.name) != getattr(ours, f.name)]
    if differ:
        raise ValueError(f"init_from {path}: its model differs from this run's in {', '.join(differ)}; start from "
                         "a model of this config (only the index_* fields may differ: a dense model gains fresh "
                         "DSA indexers), or drop the --preset/--config/--set that changes it")


def init_from(model: Transformer, path: str, log) -> None:
    """`path`'s weights (check_init_from passed) into the freshly initialised `model`, every one exactly;
    indexers it lacks keep their seeded random init."""
    missing, unexpected = model.load_state_dict(load_model(path, torch.float32).state_dict(), strict=False)
    if any(".indexer." not in name for name in missing + unexpected):  # cannot happen after check_init_from
        raise ValueError(f"init_from {path}: weights that do not fit: {', '.join((missing + unexpected)[:4])}")
    log(f"initialised from {path}" + (f"; {len(missing)} indexer weights are new (random init)" if missing else "")
        + (f"; its {len(unexpected)} indexer weights are dropped" if unexpected else ""))


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
    lock: object | None = None  # the run directory's lock (claim), held by the writing rank until release()
    schedule_state: dict | None = None  # the resumed checkpoint's schedule and its re-plans (train/schedule.py)

    def on_sigint(self, signum, frame) -> None:
        self.interrupted = True

    def release(self) -> None:
        """Let the next writer in: the run directory's lock goes (the OS drops it at exit anyway)."""
        if self.lock is not None:
            self.lock.close()
            self.lock = None


def set_up(model_cfg: ModelConfig, train_cfg: TrainConfig, run_dir: Path, resume: bool, log) -> Run:
    """Everything before the first step, in order: the run directory (checked, then locked for the
    writing rank: Run.release() lets it go), the ranks (checked before the process group starts,
    parallel/layout.py), the plan, data, the model loaded and then planned once (plan.apply: fp8, then
    EP / FSDP2 / pipeline stages, then compile), the optimizer and its state."""
    check_out(run_dir, resume)
    lock = claim(run_dir)  # a second trainer on this directory stops here, before it reads or writes a thing
    try:
        run = _set_up(model_cfg, train_cfg, run_dir, resume, log)
    except BaseException:
        if lock is not None:
            lock.close()
        raise
    run.lock = lock
    return run


def _set_up(model_cfg: ModelConfig, train_cfg: TrainConfig, run_dir: Path, resume: bool, log) -> Run:
    model_cfg, train_cfg, ckpt = open_run(model_cfg, train_cfg, run_dir, resume)
    if train_cfg.dsa_stage == "warmup" and (model_cfg.index_topk == 0 or model_cfg.attention != "mla"):  # said early
        raise ValueError("dsa_stage=warmup trains the DSA indexer, and this model has none (index_topk=0); use a "
                         "model with one (e.g. --preset tiny-v32, or --init-from RUN --preset tiny-v32)")
    if train_cfg.init_from and ckpt is None:
        check_init_from(model_cfg, train_cfg.init_from)
    metrics = None
    if ckpt is not None and (run_dir / METRICS).exists() and os.environ.get("RANK", "0") == "0":
        metrics = read_metrics(run_dir / METRICS, lambda line: log(f"warning: {line}"))  # bad lines: before any write
    # rank 0 alone logs and writes, and the others follow it through the set-up that fills shared caches
    layout = parallel_layout.resolve(model_cfg, train_cfg, parallel_layout.world_from_env())
    auto_accum = train_cfg.grad_accum is None  # the fewest micro-batches the layout takes, recorded for a resume
    train_cfg = dataclasses.replace(train_cfg, grad_accum=parallel_layout.grad_accum_for(layout, train_cfg))
    world = runtime_for(layout, train_cfg.fp8_dispatch, dict(
        schedule=train_cfg.pp_schedule, n_microbatches=train_cfg.grad_accum,
        micro_shape=(train_cfg.batch_size, train_cfg.seq_len), overlap=train_cfg.overlap))
    if not world.is_main:
        log = _silent
    if auto_accum and train_cfg.grad_accum > 1:
        log(f"grad_accum {train_cfg.grad_accum}: the fewest micro-batches per step that {layout} take "
            "(--set grad_accum=N for more)")
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(train_cfg.threads or torch.get_num_threads())
    plan = execution_plan(train_cfg, world, log)
    train_cfg = dataclasses.replace(train_cfg, precision=plan.precision)  # recorded: a resume repeats it
    tokenizer, splits = _prepare_data(run_dir, model_cfg, train_cfg, ckpt, world, log)
    micro = train_cfg.batch_size
    train_batches = data.Batches(splits.train, train_cfg.seq_len, micro, train_cfg.seed, mask=splits.train_mask)
    val_batches = data.val_batches(splits.val, train_cfg.seq_len, micro, mask=splits.val_mask)
    eval_batch_count(val_batches, train_cfg.eval_batches)  # too little val data: say so now, not at the first eval
    unigram = data.unigram_loss(splits.train, splits.val, model_cfg.vocab_size, splits.train_mask, splits.val_mask)
    model, state = _load_model(model_cfg, train_cfg, ckpt, log)
    # fp8 converters hold the loaded parameter objects (fp32 masters); one process: parallelize is a no-op
    applied = apply(model, plan, world)
    model = applied.model
    # DSA's indexers only: V4's CSA indexer (model/compressor.py) is not trained by a loss of its own
    stage = train_cfg.dsa_stage if model_cfg.index_topk > 0 and model_cfg.attention == "mla" else None
    set_dsa_stage(model, stage)  # before the optimizer: the warm-up trains only the indexers' parameters
    optimizer = build_optimizer(model, train_cfg.lr, train_cfg.weight_decay, (train_cfg.beta1, train_cfg.beta2),
                                train_cfg.adam_eps, train_cfg.optim_state_dtype)
    gamma = 0.0 if stage == "warmup" else train_cfg.bias_gamma  # a frozen model's gate biases stay too
    balance = ExpertBiasUpdate(model, gamma, train_cfg.bias_freeze_tokens or None,
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
        run.schedule_state = state.get("schedule")  # older checkpoints have none (train/schedule.py)
        if metrics is not None:  # past the checkpoint: dropped, so the log reads as one uninterrupted run
            write_file(run_dir / METRICS, "".join(json.dumps(r) + "\n" for r in metrics if r["step"] <= run.start))
        log(f"resumed from {ckpt} at step {run.start}")
    return run
