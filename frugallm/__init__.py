"""frugallm: DeepSeek-style language models (MLA, DeepSeekMoE, MTP) that train and run on modest hardware."""

from .config import PRESETS, ModelConfig, get_preset
from .model import ModelOutput, Transformer
from .model.count import count_params

__version__ = "0.1.0"


def from_hf(path, dtype=None, quantized=None):
    """Load a Hugging Face DeepSeek-V2/V3 directory into a frugallm Transformer (see convert.py);
    a DeepSeek FP8 directory keeps its FP8 storage unless a dtype or quantized=False is given."""
    from .convert import from_hf as _from_hf

    return _from_hf(path, dtype=dtype, quantized=quantized)


def to_hf(model, path, dtype=None, files=()):
    """Write `model` as a Hugging Face DeepSeek-V2/V3 directory (see convert.py)."""
    from .convert import to_hf as _to_hf

    return _to_hf(model, path, dtype=dtype, files=files)


def generate(model, input_ids, max_new_tokens, **kwargs):
    """New token ids (B, T_new) after `input_ids` ((B, T) tensor or a list of token-id lists); see infer/generate.py."""
    from .infer.generate import generate as _generate

    return _generate(model, input_ids, max_new_tokens, **kwargs)


def generate_stream(model, input_ids, max_new_tokens, **kwargs):
    """Like `generate`, but yields each step's new tokens (B, k) as they come; see infer/generate.py."""
    from .infer.generate import generate_stream as _stream

    return _stream(model, input_ids, max_new_tokens, **kwargs)


def load(path, dtype=None, quantized=None):
    """A model from a frugallm run directory (its last good checkpoint) or a Hugging Face DeepSeek directory.

    Quantized checkpoints (numerics/quantize.py: frugallm's int8/fp8 layout, or DeepSeek's FP8
    layout) keep their codes when no dtype is asked for; a dtype, or quantized=False, gives a
    plain model with the weights dequantized into it (convert.keep_quantized).
    """
    from pathlib import Path

    from .train.checkpoint import locate

    path = Path(path)
    ckpt = locate(path)  # a run's newest verified checkpoint, or a checkpoint / quantized export itself
    if ckpt is not None and (ckpt / "quantization.json").exists():
        from .numerics.quantized_checkpoint import load_quantized

        return load_quantized(ckpt, dtype=dtype, quantized=quantized)
    if ckpt is not None:
        from safetensors.torch import load_file

        from .convert import keep_quantized

        keep_quantized(False, dtype, quantized, ckpt)  # quantized=True on a plain checkpoint: an error
        model = Transformer.from_state_dict(ModelConfig.from_json(ckpt / "config.json"),
                                            load_file(ckpt / "model.safetensors"))
        if dtype is not None:
            model.to(dtype)
        return model.eval()
    if (path / "config.json").exists():
        return from_hf(path, dtype=dtype, quantized=quantized)
    raise FileNotFoundError(f"{path} is neither a frugallm run (no valid checkpoint) nor a Hugging Face model dir")


def load_for_inference(path, dtype="auto", prepack: bool = True):
    """`load` for generation on this machine. dtype: "auto" (default) takes the host profile's
    inference choice (host.py: bf16 only where it measures clearly faster here, else fp32), or
    a name / torch.dtype, honoured. A quantized checkpoint keeps its int8/fp8 codes under auto
    and dequantizes to that dtype as it runs; an explicit dtype dequantizes it into a plain model.
    With `prepack`, a bf16 model gets its weights prepacked for oneDNN where the host supports it
    (numerics/prepack.py: the same outputs, faster eager GEMVs). Pass prepack=False for a model to
    compile (infer/compiled.py: compile_decode), which packs its weights itself. The result is for
    inference only: prepacked weights are not trainable parameters. `inference_dtype(dtype)` gives
    the choice with its reason, for printing."""
    from .numerics.kernels import apply_inference_kernels
    from .numerics.quantize import weight_bytes

    choice = inference_dtype(dtype)
    if dtype not in (None, "auto"):
        model = load(path, dtype=choice.dtype, quantized=False)
    else:
        model = load(path)
        if weight_bytes(model)["quantized_params"]:
            return model.to(choice.dtype)  # codes stay; they dequantize to this dtype (numerics/quantize.py)
        model.to(choice.dtype)
    apply_inference_kernels(model, prepack)  # numerics/kernels.py: where the host decides
    return model


def inference_dtype(dtype="auto"):
    """The host's dtype for generation (host.py `choose_dtype("inference")`), as a DtypeChoice
    (.dtype, .reason: one line with the measured figures)."""
    from .host import choose_dtype

    return choose_dtype("inference", dtype)


def load_tokenizer(path):
    """The tokenizer of a frugallm run or a Hugging Face checkpoint directory (its tokenizer.json)."""
    from .tokenizer import load_tokenizer as _load

    return _load(path)


__all__ = ["ModelConfig", "PRESETS", "get_preset", "Transformer", "ModelOutput", "count_params", "from_hf", "to_hf",
           "load", "load_for_inference", "inference_dtype", "load_tokenizer",
           "generate", "generate_stream"]
