"""Checkpoints that survive anything: atomic, verified, pickle-free, last-K.

A checkpoint is a directory `checkpoints/step_000100/` holding
  config.json / train_config.json   the model and run configs
  model.safetensors                 weights and persistent buffers (the fp32 gate bias)
  optimizer.safetensors + .json     AdamW moments per parameter name; hyper-parameters and steps as JSON
  trainer.json + rng.safetensors    step, token counters, data position, the torch RNG state
  tokenizer.json
  manifest.json                     kind "checkpoint", size and sha256 of every file above; written LAST
It is written through frugallm/io.py (a temp dir, every file fsync'ed, then swapped into place), so a
crash mid-save leaves the previous checkpoint untouched. A directory without a manifest, or whose
files do not match it, is rejected with a clear message and the previous one is used.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .. import io
from ..config import ModelConfig
from ..model.moe import upgrade_expert_name
from ..tokenizer import TOKENIZER, Tokenizer
from ..tokenizer import load_tokenizer as read_tokenizer
from ..names import CHECKPOINTS, CONFIG, TRAIN_CONFIG, WEIGHTS

PREFIX = "step_"  # checkpoints/step_000100
CorruptCheckpoint = io.CorruptOutput  # the name callers catch


def _same(name: str, tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def optimizer_tensors(model: nn.Module, optimizer: torch.optim.Optimizer, full=_same) -> tuple[dict, dict]:
    """AdamW state as ({name.key: tensor}, JSON-able meta), keyed by parameter names, no pickle.
    full(name, tensor): the whole tensor of a sharded one (parallel/runtime.py; collective)."""
    names = {id(p): n for n, p in model.named_parameters()}
    tensors, steps, groups = {}, {}, []
    for group in optimizer.param_groups:
        groups.append({k: v for k, v in group.items() if k != "params"} | {"params": [names[id(p)] for p in group["params"]]})
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if key == "step":
                    steps[names[id(p)]] = float(value)
                else:
                    tensors[f"{names[id(p)]}.{key}"] = full(names[id(p)], value).contiguous()
    return tensors, {"param_groups": groups, "steps": steps}


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict, meta: dict,
                   shard=None) -> None:
    """Restore AdamW state saved by optimizer_tensors; shard(name, full, param) cuts this rank's part."""
    params = dict(model.named_parameters())
    names = {id(p): n for n, p in params.items()}
    current = [sorted(names[id(p)] for p in group["params"]) for group in optimizer.param_groups]
    # by name, in any order (older checkpoints list the routed experts under older names and first)
    if current != [sorted(map(upgrade_expert_name, group["params"])) for group in meta["param_groups"]]:
        raise CorruptCheckpoint("the checkpoint's optimizer parameter groups do not match this model")
    for group, saved in zip(optimizer.param_groups, meta["param_groups"]):
        group.update({k: v for k, v in saved.items() if k != "params"})
    tensors = {upgrade_expert_name(k.rsplit(".", 1)[0]) + "." + k.rsplit(".", 1)[1]: v for k, v in tensors.items()}
    for saved_name, step in meta["steps"].items():
        name = upgrade_expert_name(saved_name)
        p = params[name]
        state = {"step": torch.tensor(step, dtype=torch.float32)}
        for key in ("exp_avg", "exp_avg_sq"):  # in the optimizer's moment dtype (adamw.py), else p's
            if f"{name}.{key}" in tensors:
                value = tensors[f"{name}.{key}"].to(getattr(optimizer, "state_dtype", p.dtype))
                state[key] = shard(name, value, p) if shard is not None else value
        optimizer.state[p] = state


def save(run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict,
         tokenizer_json: str, model_cfg: ModelConfig, train_cfg, keep_last: int, full=_same,
         write: bool = True) -> Path:
    """Atomically write checkpoint `step`, then delete all but the newest `keep_last`.

    Sharded runs (parallel/runtime.py) call this on every rank: full(name, tensor) gathers each
    tensor whole (a collective), and only the rank with write=True writes. So a checkpoint is the
    same files whatever the world size, and loads on any other. train_cfg: the run's TrainConfig
    (train/config.py; formats/ sits below train/, so it is only asked for its to_json)."""
    final = Path(run_dir) / CHECKPOINTS / f"{PREFIX}{step:07d}"
    state = {k: full(k, v).contiguous() for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = optimizer_tensors(model, optimizer, full)
    if not write:
        return final
    # a save killed mid-write (kill -9, power loss) leaves its temp dir; the run's lock (train/setup.py)
    # keeps every other writer out, so any found now is dead: it goes before this save's joins it
    for dead in final.parent.glob(f".{PREFIX}*.tmp-*"):
        shutil.rmtree(dead, ignore_errors=True)
    # re-saving a step after a resume swaps the new copy in; there is never a moment without one
    with io.write_directory(final, "checkpoint") as tmp:
        save_file(state, tmp / WEIGHTS)
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
        save_file({"torch_cpu": torch.get_rng_state()}, tmp / "rng.safetensors")
        (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=2))
        model_cfg.to_json(tmp / CONFIG)  # the one way a config.json is written (config.py)
        train_cfg.to_json(tmp / TRAIN_CONFIG)
        (tmp / TOKENIZER).write_text(tokenizer_json)
    for old in checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / CHECKPOINTS
    return sorted(root.glob(f"{PREFIX}*")) if root.exists() else []


def verify(path: Path) -> None:
    """CorruptCheckpoint unless every file matches the manifest (old {file: sha256} manifests too)."""
    io.verify(path, "checkpoint")


def latest(run_dir: Path) -> Path | None:
    """The newest checkpoint that verifies; corrupt ones are reported and skipped."""
    for path in reversed(checkpoints(run_dir)):
        try:
            verify(path)
            return path
        except CorruptCheckpoint as e:
            warnings.warn(f"skipping checkpoint: {e}")
    return None


def load_tokenizer(path) -> Tokenizer:
    """The tokenizer of the weights at `path`. A run's is its newest checkpoint's whose tokenizer.json
    matches the checkpoint's manifest: the run-level tokenizer.json is a copy no manifest covers, which
    `frugallm tokenizer train --out RUN` once replaced unnoticed. A directory with a frugallm manifest
    listing tokenizer.json (a checkpoint, an export) has it verified; anything else (a Hugging Face
    directory, a tokenizer file or folder) is read as it is."""
    path = Path(path)
    if path.suffix == ".gguf" and path.is_file():  # a GGUF holds its vocabulary (formats/gguf_read.py)
        from .gguf_read import load_tokenizer as gguf_tokenizer

        return gguf_tokenizer(path)
    if (path / CHECKPOINTS).is_dir():
        for ckpt in reversed(checkpoints(path)):
            try:
                io.verify(ckpt, "checkpoint", files=(TOKENIZER,))
                return read_tokenizer(ckpt)
            except CorruptCheckpoint as e:
                warnings.warn(f"skipping checkpoint: {e}")
        raise FileNotFoundError(f"{path} is a frugallm run without a checkpoint whose {TOKENIZER} verifies; train "
                                f"it (frugallm train --out {path} --resume) or pass another directory")
    if path.is_dir() and TOKENIZER in ((io.read_manifest(path) or {}).get("files") or {}):
        io.verify(path, None, files=(TOKENIZER,))
    return read_tokenizer(path)


def load_model(path: Path, dtype: torch.dtype | None = None, quantized: bool | None = None):
    """The Transformer of a verified checkpoint directory, in `dtype` (None: fp32, as trained).
    quantized=True is an error: a training checkpoint holds no codes (formats/hf.py keep_quantized)."""
    from ..model.transformer import Transformer
    from .hf import keep_quantized

    keep_quantized(False, dtype, quantized, path)  # quantized=True on a plain checkpoint: an error
    model = Transformer.from_state_dict(ModelConfig.from_json(path / CONFIG), load_file(path / WEIGHTS))
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def load(path: Path, model: nn.Module | None, optimizer: torch.optim.Optimizer | None, shard=None,
         params_of: nn.Module | None = None) -> dict:
    """Restore weights (model: the full, unsharded model), optimizer (its state cut to this rank's
    parts by shard(name, full, param), with the names of `params_of`, default model), RNG; return
    the trainer state dict."""
    verify(path)
    if model is not None:
        model.load_state_dict(load_file(path / WEIGHTS), strict=True)
    if optimizer is not None:
        load_optimizer(params_of or model, optimizer, load_file(path / "optimizer.safetensors"),
                       json.loads((path / "optimizer.json").read_text()), shard)
    torch.set_rng_state(load_file(path / "rng.safetensors")["torch_cpu"])
    return json.loads((path / "trainer.json").read_text())
