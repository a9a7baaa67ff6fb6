"""Parameter counting without allocating weights: build the model on the meta device."""

from __future__ import annotations

import torch

from ..config import ModelConfig
from .hybrid_cache import hybrid_cache_lines
from .kv_cache import cache_lines


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Counts for `cfg` (docs/design/configs.md), computed on the meta device.

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


def in_words(counts: dict[str, int]) -> str:
    """The parameter count as every command words it (train, info, quantize, an export's README):
    the main model (count_params' "total", the papers' figure), the MTP modules, and their total."""
    main, mtp = counts["total"], counts["mtp"]
    if not mtp:
        return f"{main:,} parameters (main model; no MTP)"
    return f"{main:,} parameters in the main model + {mtp:,} in MTP = {main + mtp:,} total"


# count_params' keys as `frugallm info` words them (the same words as in_words)
LABELS = {"total": "main model", "active": "main model, active per token", "embedding": "embedding + output head",
          "mtp": "MTP", "mtp_active": "MTP, active per token"}


def summary(cfg: ModelConfig, label: str, max_build_params: float = 2e9):
    """`frugallm info`'s lines for `cfg` (named `label`): the counts; then, unless the model has more than
    `max_build_params` parameters, a seeded build, one forward pass over up to 16 random ids, and
    the parameters by module (a layer's blocks, an MTP module's, or a top-level module)."""
    from .transformer import Transformer  # deferred: importing the model is not free

    counts = count_params(cfg)
    yield f"frugallm model: {label}"
    rows = {LABELS[k]: v for k, v in counts.items()} | {"total (main model + MTP)": counts["total"] + counts["mtp"]}
    width = max(len(k) for k in rows)
    for k, v in rows.items():
        yield f"  {k:<{width}}  {v:>17,}  ({v / 1e6:,.2f}M)"
    yield from hybrid_cache_lines(cfg) if cfg.attention == "hybrid" else cache_lines(cfg)
    if counts["total"] > max_build_params:
        yield f"  (not built: {counts['total']:,} parameters exceed --max-build-params; counted on the meta device)"
        return
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, min(16, cfg.max_seq_len)))
    with torch.no_grad():
        logits = model(ids).logits
    yield (f"  forward pass: input {tuple(ids.shape)} -> logits {tuple(logits.shape)}, "
           f"finite={bool(torch.isfinite(logits).all())}")
    yield "  parameters by module:"
    rows: dict[str, int] = {}
    for name, p in model.named_parameters():
        key = ".".join(name.split(".")[:3]) if name.startswith(("layers", "mtp")) else name.split(".")[0]
        rows[key] = rows.get(key, 0) + p.numel()
    w = max(len(k) for k in rows)
    for k, v in rows.items():
        yield f"    {k:<{w}}  {v:>12,}"
