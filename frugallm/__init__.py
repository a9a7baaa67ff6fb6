"""frugallm: DeepSeek-style language models (MLA, DeepSeekMoE, MTP) that train and run on modest hardware."""

from .config import PRESETS, ModelConfig, get_preset
from .model import ModelOutput, Transformer
from .model.count import count_params

__version__ = "0.1.0"


def from_hf(path, dtype=None):
    """Load a Hugging Face DeepSeek-V2/V3 directory into a frugallm Transformer (see convert.py)."""
    from .convert import from_hf as _from_hf

    return _from_hf(path, dtype=dtype)


def to_hf(model, path, dtype=None):
    """Write `model` as a Hugging Face DeepSeek-V2/V3 directory (see convert.py)."""
    from .convert import to_hf as _to_hf

    return _to_hf(model, path, dtype=dtype)


__all__ = ["ModelConfig", "PRESETS", "get_preset", "Transformer", "ModelOutput", "count_params", "from_hf", "to_hf"]
