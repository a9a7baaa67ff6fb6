"""Parameter counting without allocating weights: build the model on the meta device."""

from __future__ import annotations

import torch

from ..config import ModelConfig


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Counts for `cfg` (REFERENCE §1.2), computed on the meta device.

    total      main model, fp32 gate biases included, MTP excluded (V3: 671,026,419,200)
    active     per token: total with only K routed experts per MoE layer (embedding and head counted)
    embedding  input embedding + output head
    mtp        the MTP modules' own parameters (they share the embedding and head)
    mtp_active MTP parameters activated per token
    """
    from .transformer import Transformer  # deferred: importing the model is not free

    with torch.device("meta"):
        model = Transformer(cfg)
    numel = lambda mod: sum(p.numel() for p in mod.parameters()) + sum(
        b.numel() for n, b in mod.named_buffers() if n.endswith("gate.bias"))
    mtp = numel(model.mtp)
    total = numel(model) - mtp
    expert = 3 * cfg.dim * cfg.moe_inter_dim
    idle = (cfg.n_routed_experts - cfg.n_activated_experts) * expert
    n_moe_main = sum(layer.is_moe for layer in model.layers)
    n_moe_mtp = sum(m.block.is_moe for m in model.mtp)
    return {
        "total": total,
        "active": total - n_moe_main * idle,
        "embedding": model.embed.weight.numel() + model.head.weight.numel(),
        "mtp": mtp,
        "mtp_active": mtp - n_moe_mtp * idle,
    }
