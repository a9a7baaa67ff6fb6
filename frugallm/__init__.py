"""frugallm: DeepSeek-style language models (MLA, DeepSeekMoE, MTP) that train and run on modest hardware.

Re-exports only (docs/architecture.md): nothing in the package imports this module.
"""

from .config import PRESETS, ModelConfig, get_preset
from .export import to_hf  # formats/hf.py's, with the tokenizer found for it
from .formats.hf import from_hf
from .infer.generate import generate, generate_stream
from .model import ModelOutput, Transformer
from .model.count import count_params
from .plan import inference_dtype, load, load_for_inference
from .formats.checkpoint import load_tokenizer  # a run's: its verified checkpoint's

__version__ = "0.1.0"

__all__ = ["ModelConfig", "PRESETS", "get_preset", "Transformer", "ModelOutput", "count_params", "from_hf", "to_hf",
           "load", "load_for_inference", "inference_dtype", "load_tokenizer",
           "generate", "generate_stream"]
