"""What `frugallm train` and `frugallm distill` settle before a run starts: its two configs (from a
preset, a file, the run being resumed and the command's flags), its length, and the hand-over to
torchrun for a multi-process layout (parallel/layout.py)."""

from __future__ import annotations

import math
import os
import sys

from ..config import ModelConfig, get_preset
from ..names import CONFIG, TRAIN_CONFIG
from .config import TrainConfig, apply_overrides

DEFAULT_TIME = "8m"  # `frugallm train` with neither --steps nor --time: the main job fits in 10 minutes
DEFAULT_PRESET = "tiny"  # `frugallm train` with neither --preset nor --config
LAUNCH_FLAGS = ("--nproc", "--nnodes", "--node-rank", "--rdzv-endpoint")  # the flags that start torchrun


def run_configs(out, *, config=None, preset=None, train_config=None, resume=False, data=None, steps=None,
                time=None, save_every=None, ep=None, pp=None, dp=None, sets=(), extra=(),
                model_from: ModelConfig | None = None) -> tuple[ModelConfig, TrainConfig]:
    """The run's (ModelConfig, TrainConfig). The model: --config, else --preset, else `model_from`
    (distill --init-from), else a resumed run's own, else DEFAULT_PRESET; the training config:
    --train-config, else the resumed run's, else the defaults. Then the flags, `extra` key=value pairs
    and --set pairs override them, in that order. A resume starts from the run's own settings: only
    what is given counts as a change."""
    saved = None
    if resume:
        from ..formats.checkpoint import latest

        saved = latest(out)
        if saved is None:
            raise FileNotFoundError(f"--resume: {out} holds no valid checkpoint; drop --resume to start a "
                                    "new run there, or pass the run's directory with --out")
    model_cfg = ModelConfig.from_json(config) if config else get_preset(preset) if preset \
        else model_from if model_from else ModelConfig.from_json(saved / CONFIG) if saved \
        else get_preset(DEFAULT_PRESET)
    train_cfg = TrainConfig.from_json(train_config) if train_config else \
        TrainConfig.from_json(saved / TRAIN_CONFIG) if saved else TrainConfig()
    # the length: --time (steps a cap), or --steps alone (no budget), or neither: DEFAULT_TIME, capped at
    # TrainConfig.steps; a --train-config file or --set steps=/time_budget= says it instead (and a
    # resumed run keeps its own)
    time_budget = time
    if time_budget is None and steps is not None:
        time_budget = ""
    elif time_budget is None and not saved and not train_config and not any(
            p.startswith(("steps=", "time_budget=")) for p in sets):
        time_budget = DEFAULT_TIME
    flags = {"data": data, "steps": steps, "time_budget": time_budget, "save_every": save_every,
             "ep": ep, "pp": pp, "dp": dp}
    if saved:  # the layout belongs to this launch, not to the run: a resume on other ranks starts from none
        flags |= {k: v for k, v in (("ep", 1), ("pp", 1), ("dp", 0)) if flags[k] is None}
    pairs = [f"{k}={v}" for k, v in flags.items() if v is not None] + list(extra) + list(sets)
    return apply_overrides(model_cfg, train_cfg, pairs)


def train_overrides(init_from=None, dsa_stage=None, *, resume=False) -> tuple[list[str], ModelConfig | None]:
    """`frugallm train`'s --init-from and --dsa-stage as key=value pairs, and the ModelConfig a new run
    starts from: init_from's own unless --preset or --config names another (run_configs: they come first;
    e.g. a V3-shaped run with --preset tiny-v32 gains indexers, train/setup.py init_from). The run takes
    init_from's tokenizer: its weights know those ids."""
    extra = [f"dsa_stage={dsa_stage}"] if dsa_stage else []
    if not init_from:
        return extra, None
    from ..formats.open import open as open_model

    extra += [f"init_from={init_from}", f"tokenizer={init_from}"]
    return extra, None if resume else open_model(init_from).config


def distill_overrides(teacher, init_from=None, *, config=None, resume=False,
                      **kd) -> tuple[list[str], ModelConfig | None]:
    """`frugallm distill`'s key=value pairs for the TrainConfig that names the teacher, and the
    student's ModelConfig when it starts from a model (init_from). kd: loss, beta, temperature,
    kd_weight, topk, on_policy (None: the TrainConfig default). The student's vocabulary is the
    teacher's tokenizer (token-level KD compares the distributions id by id)."""
    if not teacher:
        raise ValueError("frugallm distill needs --teacher DIR (a frugallm run or Hugging Face DeepSeek directory)")
    from ..formats.checkpoint import load_tokenizer
    from ..plan import load

    student_tokenizer = load_tokenizer(init_from or teacher)
    extra = [f"teacher={teacher}", f"tokenizer={init_from or teacher}"]
    extra += [f"{key}={value}" for key, value in (
        ("kd_loss", kd.get("loss")), ("kd_beta", kd.get("beta")), ("kd_temperature", kd.get("temperature")),
        ("kd_weight", kd.get("kd_weight")), ("kd_topk", kd.get("topk")), ("on_policy", kd.get("on_policy")),
        ("init_from", init_from)) if value is not None]
    model_from = load(init_from).config if init_from else None
    if model_from is None and not config and not resume:
        extra.append(f"vocab_size={student_tokenizer.vocab_size}")  # a preset student speaks the teacher's tokens
    return extra, model_from


def torchrun(model_cfg: ModelConfig, train_cfg: TrainConfig, nproc: int, argv: list[str], nnodes: int = 1,
             node_rank: int = 0, rdzv_endpoint: str = "") -> None:
    """Check the layout here, before any process starts, then become torchrun running `argv` (the
    command's own arguments, less the flags that start torchrun) on nproc processes per node."""
    from ..parallel.layout import resolve, torchrun_command

    resolve(model_cfg, train_cfg, nproc * nnodes)
    cmd = torchrun_command(nproc, without_launch_flags(argv), nnodes, node_rank, rdzv_endpoint)
    # where OMP_NUM_THREADS is unset, torchrun sets it to 1 with a banner about it: set it here instead,
    # the node's cores shared out among its processes (or `threads` each, where the run sets it)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_process(train_cfg.threads, nproc)))
    sys.stdout.flush()
    os.execv(cmd[0], cmd)


def threads_per_process(threads: int, nproc: int) -> int:
    """`threads` where set, else this machine's cores (those the process may use) shared out among nproc."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return threads or max(1, cores // nproc)


def without_launch_flags(argv: list[str]) -> list[str]:
    """argv minus the flags that start torchrun (the ranks must not start it again)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in LAUNCH_FLAGS:
            skip = True
        elif not arg.startswith(tuple(f + "=" for f in LAUNCH_FLAGS)):
            out.append(arg)
    return out


def val_line(result) -> str | None:
    """The run's validation loss beside the unigram baseline's (trainer.RunResult), if it has one."""
    if result.val_loss is None:
        return None
    return (f"val loss {result.val_loss:.3f} (perplexity {math.exp(result.val_loss):.1f}) vs unigram baseline "
            f"{result.unigram_loss:.3f} (perplexity {math.exp(result.unigram_loss):.1f})")
