"""Exports of a trained model for inference elsewhere: a weight-only quantized copy (int8 / fp8).

The orchestration only: open the source (plan.load), quantize its weights (kernels/quantize.py), and
write them in a layout (formats/quantized.py). Each of those steps lives in its own room.
"""

from __future__ import annotations

import torch

from .formats.quantized import check_layout, check_request, write_quantized
from .kernels.fp8 import DEFAULT_SKIP
from .kernels.quantize import quantize_model
from .plan import load


def quantize_checkpoint(src, to: str, out, *, layout: str | None = None, skip=DEFAULT_SKIP,
                        dtype: torch.dtype = torch.bfloat16):
    """Write a weight-only quantized copy of `src` to `out` for inference; returns out's Path.

    src: a frugallm run dir (its last good checkpoint), a checkpoint dir, or a Hugging Face
        DeepSeek dir (FP8 or quantized sources are dequantized first), read with frugallm.load.
    to: "int8" (per output channel) or "fp8" (e4m3, 128x128 blocks).
    layout: "deepseek" (a Hugging Face directory, FP8 only; the default for fp8) or "frugallm"
        (the default for int8; any model): see formats/quantized.py.
    skip: name patterns kept high precision (quantize_model); dtype: of the tensors kept so.
    The tokenizer files of src are copied, so frugallm.load_tokenizer(out) works.
    """
    layout, guard = check_request(src, to, out, layout)
    model = load(src, dtype=torch.float32, quantized=False)
    check_layout(model, layout)
    quantize_model(model, to, skip)
    model.to(dtype)  # the tensors kept high precision are stored in dtype (codes and scales stay as they are)
    return write_quantized(model, out, to, layout, src, guard, skip, dtype)
