"""`open(path)`: the one place that answers "what is this directory?" (docs/architecture.md).

Five kinds of model exist on disk (four directories and one file), each written by its own format module:

    kind         what it is                                         written by
    run          a training run: checkpoints/step_*/ inside         formats/checkpoint.py
    checkpoint   one checkpoint directory (manifest kind checkpoint) formats/checkpoint.py
    quantized    frugallm's quantized layout (quantization.json)    formats/quantized.py
    hf           a Hugging Face directory: config.json + safetensors formats/hf.py (or anyone)
    gguf         one llama.cpp deepseek2 GGUF file (*.gguf)          formats/gguf.py (or llama.cpp)

A run resolves to its newest checkpoint that verifies (`Opened.weights`); a checkpoint or a quantized
export is verified against its manifest before anything is read from it. A Hugging Face directory whose
config is not a DeepSeek one (`Opened.deepseek` False) opens too, for the callers that can run it through
transformers (a distillation teacher); `Opened.model()` refuses it. Anything else is one error that says
what was looked for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import io
from ..config import ModelConfig
from . import checkpoint, hf
from ..names import CHECKPOINTS, CONFIG
from . import quantized as quantized_layout

@dataclass(frozen=True)
class Opened:
    kind: str  # run | checkpoint | quantized | hf | gguf (the table above)
    path: Path  # what was asked for
    weights: Path  # the directory holding the weights: a run's newest verified checkpoint, else path
    hf_config: dict | None  # the Hugging Face config.json (kind hf)
    quantization: dict | None  # quantization.json (kind quantized) or the HF quantization_config

    @property
    def deepseek(self) -> bool:
        """Whether frugallm's own model can hold these weights (every kind but a foreign HF model)."""
        return self.kind != "hf" or (self.hf_config or {}).get("model_type") in hf.MODEL_TYPES

    @property
    def config(self) -> ModelConfig:
        if not self.deepseek:
            raise ValueError(f"{self.path} holds a {self.hf_config.get('model_type')!r} model, which frugallm's "
                             f"Transformer cannot hold; model types it reads: {', '.join(hf.MODEL_TYPES)}")
        if self.kind == "hf":
            return hf.config_from_hf(self.hf_config)
        if self.kind == "gguf":
            from . import gguf_read

            return gguf_read.config_from_gguf(gguf_read.reader(self.path))
        return ModelConfig.from_json(self.weights / CONFIG)

    def model(self, dtype: torch.dtype | None = None, quantized: bool | None = None):
        """The Transformer these weights make: quantized codes kept or dequantized by
        `hf.keep_quantized`'s rule, the weights read in `dtype` (None: as stored; fp32 for a
        checkpoint). Frugallm checkpoints are read as stored and then cast, as they always were."""
        if not self.deepseek:
            self.config  # raises, naming the model type
        if self.kind == "gguf":
            from .gguf_read import load_gguf

            return load_gguf(self.path, dtype=dtype, quantized=quantized)
        if self.kind != "hf" and self.quantization is not None:
            return quantized_layout.load_quantized(self.weights, dtype=dtype, quantized=quantized)
        if self.kind == "hf":
            return hf.from_hf(self.path, dtype=dtype, quantized=quantized)
        return checkpoint.load_model(self.weights, dtype, quantized)


def open(path) -> Opened:  # noqa: A001 - the format layer's one entry point, as io's open is Python's
    """What `path` is, with its config and quantization metadata (no weights are read)."""
    path = Path(path)
    if path.suffix == ".gguf" and path.is_file():
        from . import gguf_read

        return Opened("gguf", path, path, None, gguf_read.quantization(path))
    if (path / CHECKPOINTS).exists():
        ckpt = checkpoint.latest(path)
        if ckpt is None:
            raise FileNotFoundError(f"{path} is a frugallm run without a checkpoint that verifies; "
                                    f"train it (frugallm train --out {path} --resume) or pass another directory")
        return _local(path, ckpt, "run")
    kind = io.manifest_kind(path)
    if kind == "checkpoint":
        checkpoint.verify(path)
        return _local(path, path, "checkpoint")
    if kind == "quantized" and (path / quantized_layout.META).exists():
        return _local(path, path, "quantized")
    if (path / CONFIG).exists():
        hf_config = json.loads((path / CONFIG).read_text())
        return Opened("hf", path, path, hf_config, hf_config.get("quantization_config"))
    raise FileNotFoundError(f"{path} is neither a frugallm run (no valid checkpoint), a checkpoint, a quantized "
                            f"export, a Hugging Face model directory (no {CONFIG}) nor a .gguf file; pass one of those")


def _local(path: Path, weights: Path, kind: str) -> Opened:
    """A directory frugallm wrote itself: a checkpoint, or a quantized export in frugallm's layout."""
    meta = weights / quantized_layout.META
    return Opened(kind, path, weights, None, json.loads(meta.read_text()) if meta.exists() else None)
