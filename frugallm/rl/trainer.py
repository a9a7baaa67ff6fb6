"""`frugallm grpo`: the GRPO loop over an ordinary run directory (docs/design/grpo.md).

Per step s, in order:
  1. prompts: `prompts_per_step` records, the s-th slice of a seeded permutation per epoch of the task;
  2. rollouts: G completions of each, sampled by the serving engine at `temperature` (rollout.py),
     each with a seed that is a function of (seed, s, index);
  3. rewards (rewards.py) -> group advantages; accuracy = the share the records' verifiers call right;
     with dynamic sampling the groups whose rewards are all equal are dropped and more prompts are
     sampled to refill the batch, up to max_sample_rounds rounds (none left: no update);
  4. log-probs by a training forward: the sampling policy's (a no-grad forward, when mu > 1; with mu = 1
     it is the policy itself, detached), the reference's (beta > 0);
  5. mu times: forward + backward of the batch in micro-batches, clip, AdamW step;
  6. metrics line; checkpoint every save_every steps and at the end (formats/checkpoint.py: atomic,
     verified); Ctrl-C saves and exits.
Nothing random happens outside the seeded rollouts, so `--resume` after a kill repeats the uninterrupted run.

The MTP modules are frozen (requires_grad False: no RL gradient reaches them, no MTP loss is computed),
and the MoE expert biases are not updated: every forward runs in eval mode (no load counted, no balance
loss). docs/design/grpo.md says why.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..config import ModelConfig
from ..formats import checkpoint
from ..formats.open import open as open_model
from ..io import write_file
from ..model.transformer import Transformer
from ..names import CONFIG, METRICS, TRAIN_CONFIG
from ..plan import apply, resolve
from ..plan import load as load_model
from ..train.config import duration_seconds
from ..train.metrics_file import read_metrics
from ..train.optim import build_optimizer
from ..train.setup import check_out, claim
from . import rewards as reward_fns
from .config import RESUMABLE, GRPOConfig, resume_conflicts
from .objective import advantages, equal_groups, grpo_loss, overlong_penalty
from .rollout import batch, completion_logprobs, completion_text, prompt_ids, sample, seed_for
from .tasks import load_tasks


@dataclass
class GRPORun:
    cfg: GRPOConfig
    run_dir: Path
    model: torch.nn.Module
    forward: torch.nn.Module
    reference: torch.nn.Module | None
    tokenizer: object
    optimizer: torch.optim.Optimizer
    plan: object
    records: list[dict]
    log: Callable[[str], None]
    start: int = 0
    tokens: int = 0
    interrupted: bool = False
    last_checkpoint: Path | None = None
    lock: object | None = None
    history: list[dict] = field(default_factory=list)

    def on_sigint(self, signum, frame) -> None:
        self.interrupted = True


def _print(line: str) -> None:
    print(line, flush=True)


def open_config(run_dir: Path, cfg: GRPOConfig, given: set[str], resume: bool) -> tuple[GRPOConfig, Path | None]:
    """The config the run goes on with and the checkpoint it resumes. A resume keeps the run's own config;
    of the fields the caller gave (`given`), only RESUMABLE ones may differ."""
    if not resume:
        if checkpoint.checkpoints(run_dir):
            raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
        return cfg, None
    ckpt = checkpoint.latest(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"--resume: {run_dir} holds no valid checkpoint")
    saved = GRPOConfig.from_json(ckpt / TRAIN_CONFIG)
    asked = dataclasses.replace(saved, **{k: getattr(cfg, k) for k in given})
    if conflicts := resume_conflicts(saved, asked):
        raise ValueError(f"--resume: {run_dir} was started with other settings: {'; '.join(conflicts)}; drop those "
                         f"flags (only {', '.join(RESUMABLE)} may change on resume) or start a new run with another --out")
    return asked, ckpt


def _frozen_reference(path: str, plan) -> torch.nn.Module:
    ref = load_model(path).float().eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return apply(ref, plan).model


def set_up(cfg: GRPOConfig, run_dir: Path, resume: bool = False, given: set[str] = frozenset(),
           log: Callable[[str], None] = _print) -> GRPORun:
    """The run directory (checked, locked), configs, model, reference, optimizer and task."""
    run_dir = Path(run_dir)
    check_out(run_dir, resume)
    lock = claim(run_dir)
    try:
        run = _set_up(cfg, run_dir, resume, given, log)
    except BaseException:
        lock.close()
        raise
    run.lock = lock
    return run


def _set_up(cfg: GRPOConfig, run_dir: Path, resume: bool, given: set[str], log) -> GRPORun:
    cfg, ckpt = open_config(run_dir, cfg, given, resume)
    if ckpt is None:
        if not cfg.init_from:
            raise ValueError("grpo needs --init-from RUN|HF_DIR: the policy to start from (an SFT run, say)")
        cfg = dataclasses.replace(cfg, reference=str(open_model(cfg.init_from).weights))
    elif cfg.beta > 0 and not Path(cfg.reference).exists():
        raise FileNotFoundError(f"--resume: the reference weights {cfg.reference} are gone (a newer checkpoint of "
                                "that run rotated them out?); restore them or start a new run")
    records = load_tasks(cfg.task)
    for name in cfg.reward_names():  # said now, not at the first step
        if name != "verifier":
            reward_fns.resolve(name)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    plan = resolve("train", dtype=cfg.precision)
    log(plan.reasons[0])
    if ckpt is None:
        model = load_model(cfg.reference).float()
        tokenizer = checkpoint.load_tokenizer(cfg.init_from)
    else:
        model = Transformer(ModelConfig.from_json(ckpt / CONFIG))
        tokenizer = checkpoint.load_tokenizer(ckpt)
    if tokenizer.eos_id is None:
        raise ValueError(f"{cfg.init_from}'s tokenizer has no end-of-text token: completions could never end")
    state = checkpoint.load(ckpt, model, None) if ckpt is not None else None
    for p in model.mtp.parameters():  # not trained by RL (docs/design/grpo.md)
        p.requires_grad_(False)
    applied = apply(model, plan)
    reference = _frozen_reference(cfg.reference, plan) if cfg.beta > 0 else None
    optimizer = build_optimizer(applied.model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.adam_eps)
    run_dir.mkdir(parents=True, exist_ok=True)
    run = GRPORun(cfg, run_dir, applied.model, applied.forward, reference, tokenizer, optimizer, plan, records, log,
                  last_checkpoint=ckpt)
    if ckpt is None:
        cfg.to_json(run_dir / TRAIN_CONFIG)
        model.config.to_json(run_dir / CONFIG)
        tokenizer.save(run_dir)
    else:
        checkpoint.load(ckpt, None, optimizer, params_of=applied.model)
        run.start, run.tokens = state["step"], state["tokens"]
        if (run_dir / METRICS).exists():  # lines past the checkpoint go: the log reads as one run
            rows = read_metrics(run_dir / METRICS, lambda line: log(f"warning: {line}"))
            write_file(run_dir / METRICS, "".join(json.dumps(r) + "\n" for r in rows if r["step"] <= run.start))
        log(f"resumed from {ckpt} at step {run.start}")
    return run


def prompts_for(step: int, per_step: int, n: int, seed: int) -> list[int]:
    """Record indices of step `step`: consecutive slices of a seeded permutation per epoch (a function
    of the step alone, so a resume picks the same)."""
    out = []
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, i = divmod(k, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(order[i]))
    return out


def refill_prompts(step: int, round_: int, per_step: int, n: int, seed: int) -> list[int]:
    """Dynamic sampling's extra prompts for round `round_` >= 1 of step `step`: a seeded draw (a function of
    the step and round alone, so a resume draws the same) of `per_step` records."""
    g = torch.Generator().manual_seed(seed * 100_003 + 7_919 * step + round_ + 1_000_000_007)
    return torch.randint(n, (per_step,), generator=g).tolist()


def _rollouts(run: GRPORun, step: int, chosen: list[int], offset: int = 0):
    """The G completions of each chosen record, their rewards (with DAPO's overlong penalty when set) and
    verdicts. `offset`: the index of the first completion among the step's, for its seed."""
    cfg, tok = run.cfg, run.tokenizer
    records = [run.records[i] for i in chosen for _ in range(cfg.group)]  # groups of G consecutive completions
    prompts = [prompt_ids(tok, r["prompt"]) for r in records]
    seeds = [seed_for(cfg.seed, step, offset + i) for i in range(len(records))]
    rollouts = sample(run.model, tok, prompts, cfg.max_new_tokens, cfg.temperature, seeds)
    texts = [completion_text(tok, r) for r in rollouts]
    names = cfg.reward_names()
    rewards = torch.tensor([reward_fns.score(names, rec["prompt"], t, rec) for rec, t in zip(records, texts)])
    if cfg.overlong_buffer:
        lengths = torch.tensor([len(r.tokens) for r in rollouts])
        rewards = rewards + overlong_penalty(lengths, cfg.max_new_tokens, cfg.overlong_buffer).to(rewards.dtype)
    correct = torch.tensor([reward_fns.score(["verifier"], rec["prompt"], t, rec) >= 1.0
                            for rec, t in zip(records, texts)])
    return rollouts, rewards, correct


def _sample_batch(run: GRPORun, step: int):
    """The step's rollouts, rewards, verdicts, all-equal flags (per group) and the kept completions' mask.
    Without dynamic sampling: one round, all kept. With it (DAPO): groups whose rewards are all equal are
    dropped, and further rounds of prompts are sampled until prompts_per_step groups are kept or
    max_sample_rounds are spent; surplus groups beyond prompts_per_step are dropped too (in order)."""
    cfg = run.cfg
    n, per = len(run.records), cfg.prompts_per_step
    parts, kept_groups = [], 0
    for round_ in range(cfg.max_sample_rounds if cfg.dynamic_sampling else 1):
        chosen = prompts_for(step, per, n, cfg.seed) if round_ == 0 else refill_prompts(step, round_, per, n, cfg.seed)
        rollouts, rewards, correct = _rollouts(run, step, chosen, offset=round_ * per * cfg.group)
        equal = equal_groups(rewards, cfg.group)
        keep = torch.ones_like(equal) if not cfg.dynamic_sampling else ~equal
        room = per - kept_groups
        keep &= keep.cumsum(0) <= room
        kept_groups += int(keep.sum())
        parts.append((rollouts, rewards, correct, equal, keep))
        if kept_groups >= per:
            break
    rollouts = [r for p in parts for r in p[0]]
    rewards, correct, equal, keep = (torch.cat([p[i] for p in parts]) for i in range(1, 5))
    return rollouts, rewards, correct, equal, keep.repeat_interleave(cfg.group)


def _logprobs(model, rollouts, cfg: GRPOConfig, plan) -> torch.Tensor:
    """(N, T) no-grad log-probs of the rollouts' tokens under `model`, micro-batch by micro-batch."""
    parts = []
    with torch.no_grad():
        for a in range(0, len(rollouts), cfg.micro_batch):
            ids, at, tokens, mask = batch(rollouts[a:a + cfg.micro_batch])
            with plan.autocast_context():
                parts.append(completion_logprobs(model, ids, at, tokens, cfg.temperature))
    T = max(p.shape[1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, T - p.shape[1])) for p in parts])


def _update(run: GRPORun, rollouts, adv: torch.Tensor) -> dict:
    """mu AdamW steps on the kept rollouts; the loss parts averaged over the mu updates."""
    cfg = run.cfg
    _, _, _, mask = batch(rollouts)
    n_seqs, n_tokens = len(rollouts), int(mask.sum())
    old = _logprobs(run.forward, rollouts, cfg, run.plan) if cfg.mu > 1 else None
    ref = _logprobs(run.reference, rollouts, cfg, run.plan) if run.reference is not None else None
    sums = {"loss": 0.0, "kl": 0.0, "clip_fraction": 0.0, "ratio_mean": 0.0, "grad_norm": 0.0}
    for _ in range(cfg.mu):
        run.optimizer.zero_grad(set_to_none=True)
        for a in range(0, n_seqs, cfg.micro_batch):
            chunk = slice(a, a + cfg.micro_batch)
            ids, at, tokens, m = batch(rollouts[chunk])
            T = m.shape[1]
            with run.plan.autocast_context():
                logp = completion_logprobs(run.forward, ids, at, tokens, cfg.temperature)
            loss, st = grpo_loss(logp, logp.detach() if old is None else old[chunk, :T], adv[chunk], m,
                                 ref_logp=None if ref is None else ref[chunk, :T], beta=cfg.beta,
                                 eps_low=cfg.eps_low, eps_high=cfg.eps_high, norm=cfg.loss_norm,
                                 max_len=cfg.max_new_tokens, n_seqs=n_seqs, n_tokens=n_tokens)
            loss.backward()
            share = int(m.sum()) / max(n_tokens, 1)  # the stats are per token: weight the chunks by tokens
            sums["loss"] += loss.item() / cfg.mu
            for key in ("kl", "clip_fraction", "ratio_mean"):
                sums[key] += getattr(st, key) * share / cfg.mu
        params = [p for p in run.model.parameters() if p.grad is not None]
        sums["grad_norm"] += float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)) / cfg.mu
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return sums


def grpo_step(run: GRPORun, step: int) -> dict:
    """One GRPO step (the module docstring's 1-5); returns its metrics line. reward_mean, accuracy, length
    and equal_groups are over every completion sampled in the step (all rounds: each an unbiased sample of
    the policy); the advantages are those of each completion's own group."""
    cfg = run.cfg
    t0 = time.perf_counter()
    rollouts, rewards, correct, equal, keep = _sample_batch(run, step)
    t_rollout = time.perf_counter() - t0
    adv = advantages(rewards, cfg.group, cfg.scale_rewards)
    kept = [r for r, k in zip(rollouts, keep.tolist()) if k]
    lengths = torch.tensor([len(r.tokens) for r in rollouts], dtype=torch.float32)
    sampled = int(lengths.sum())
    run.tokens += sampled
    parts = _update(run, kept, adv[keep]) if kept else {}
    return {"step": step + 1, "reward_mean": rewards.mean().item(), "reward_std": rewards.std().item(),
            "accuracy": correct.float().mean().item(), "kl": parts.get("kl"), "clip_fraction": parts.get("clip_fraction"),
            "ratio_mean": parts.get("ratio_mean"), "loss": parts.get("loss"), "grad_norm": parts.get("grad_norm"),
            "length_mean": lengths.mean().item(), "stopped": sum(r.finish == "stop" for r in rollouts) / len(rollouts),
            "equal_groups": equal.float().mean().item(), "kept": len(kept),
            "sample_rounds": len(rollouts) // (cfg.prompts_per_step * cfg.group), "lr": cfg.lr, "tokens": run.tokens,
            "rollout_tokens_per_s": sampled / max(t_rollout, 1e-9), "rollout_s": t_rollout,
            "update_s": time.perf_counter() - t0 - t_rollout}


@dataclass
class GRPOResult:
    run_dir: Path
    step: int
    interrupted: bool
    last: dict | None


def train_grpo(cfg: GRPOConfig, run_dir: str | Path, resume: bool = False, given: set[str] = frozenset(),
               log: Callable[[str], None] = _print) -> GRPOResult:
    """Run GRPO into `run_dir` (created), or continue the run there with resume=True."""
    t_start = time.perf_counter()
    run = set_up(cfg, Path(run_dir), resume, given, log)
    cfg = run.cfg
    budget = duration_seconds(cfg.time_budget)
    previous = signal.signal(signal.SIGINT, run.on_sigint)
    row, done = None, run.start
    log(f"grpo: {len(run.records)} task records | {cfg.prompts_per_step} prompts x G={cfg.group} per step | "
        f"{cfg.variant} (norm {cfg.loss_norm}, eps {cfg.eps_low}/{cfg.eps_high}, beta {cfg.beta}, mu {cfg.mu}) "
        f"| lr {cfg.lr} | up to {cfg.steps} steps" + (f" within {cfg.time_budget}" if budget else ""))
    try:
        for step in range(run.start, cfg.steps):
            t0 = time.perf_counter()
            row = grpo_step(run, step)
            done = step + 1
            with open(run.run_dir / METRICS, "a") as f:
                f.write(json.dumps(row) + "\n")
            log(f"step {done}/{cfg.steps} | reward {row['reward_mean']:.3f} | acc {row['accuracy']:.3f} | "
                f"kl {row['kl'] or 0:.4f} | clip {row['clip_fraction'] or 0:.3f} | len {row['length_mean']:.1f} | "
                f"equal {row['equal_groups']:.2f} | {row['rollout_tokens_per_s']:.0f} tok/s")
            out_of_time = budget is not None and time.perf_counter() - t_start + (time.perf_counter() - t0) > budget
            if done % cfg.save_every == 0 or done == cfg.steps or run.interrupted or out_of_time:
                run.last_checkpoint = _save(run, done)
            if run.interrupted:
                log(f"interrupted: saved {run.last_checkpoint}; continue with --resume")
                break
            if out_of_time:
                log(f"time budget {cfg.time_budget}: stopped after step {done}")
                break
    finally:
        signal.signal(signal.SIGINT, previous)
        if run.lock is not None:
            run.lock.close()
    return GRPOResult(run.run_dir, done, run.interrupted, row)


def _save(run: GRPORun, step: int) -> Path:
    return checkpoint.save(run.run_dir, step, run.model, run.optimizer, {"step": step, "tokens": run.tokens},
                           run.tokenizer.to_str(), run.model.config, run.cfg, run.cfg.keep_last)
