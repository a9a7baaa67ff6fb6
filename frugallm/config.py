"""Model configuration: one flat dataclass, JSON round-trip, named presets.

Every behaviour is an explicit field (docs/design/configs.md): nothing is inferred from a
dimension, a file name or the presence of a weight. Unknown keys and inconsistent values
are errors that name the fields involved.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_CHOICES = {
    "score_func": ("sigmoid", "softmax", "sqrtsoftplus"),
    "group_score": ("top2_sum", "max"),
    "rope_scaling": ("none", "yarn"),
    "residual": ("plain", "hc", "mhc"),
    "hc_form": ("paper", "release"),
    "attention": ("mla", "hybrid"),
}

# DeepSeek-V4's attention kinds per block (V4 §2.3; model/hybrid_attention.py): a sliding window alone, CSA
# (compressed sparse: csa_rate with overlapping windows and the lightning indexer) or HCA (heavily compressed,
# hca_rate, dense). Each one's name in transformers' `layer_types`.
HF_LAYER_TYPES = {"sliding": "sliding_attention", "csa": "compressed_sparse_attention",
                  "hca": "heavily_compressed_attention"}


# Keys that config.json files from earlier frugallm versions hold and that do not describe the architecture:
# how attention and the routed experts run is the execution plan's (plan.py), and the attention path
# is chosen per call (Transformer.forward's `absorb`). Read and ignored, so old runs still open.
RETIRED_KEYS = ("attn_impl", "moe_impl")


@dataclass
class ModelConfig:
    # --- vocabulary, width, depth
    vocab_size: int = 4096
    dim: int = 256
    n_layers: int = 4
    n_dense_layers: int = 1  # HF first_k_dense_replace: the first layers use a dense SwiGLU MLP
    inter_dim: int = 768  # dense MLP width
    max_seq_len: int = 512
    norm_eps: float = 1e-6
    init_std: float = 0.006  # V2 §3.1.2 / V3 §4.2: std of every learnable matrix
    # --- mla (DeepSeek-V2 §2.1; docs/design/mla.md)
    n_heads: int = 4
    q_lora_rank: int = 0  # 0 = a single wq projection, no q_norm (V2-Lite)
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    # --- moe (DeepSeek-V3 §2.1.2; docs/design/moe.md)
    n_routed_experts: int = 16  # 0 = a dense model
    n_shared_experts: int = 1
    n_activated_experts: int = 4
    moe_inter_dim: int = 128
    n_expert_groups: int = 4
    n_limited_groups: int = 2
    score_func: str = "sigmoid"
    group_score: str = "top2_sum"  # V3: sum of the top-2 biased scores; V2: max score of the group
    norm_topk_prob: bool = True  # renormalise the K gathered weights (V3 sigmoid gate)
    route_scale: float = 2.5
    gate_bias: bool = True  # aux-loss-free selection bias, fp32 buffer, never trained by gradient
    # DeepSeek-V4 (docs/design/moe.md): the first n_hash_layers MoE layers choose their experts by a frozen
    # token-id -> experts table (tid2eid) instead of by score; no selection bias, no bias update there
    n_hash_layers: int = 0
    swiglu_limit: float = 0.0  # V4: > 0 clamps SwiGLU's gate (above) and up (both sides) projections; 0 = off
    balance_loss_alpha: float = 1e-4  # sequence-wise balance loss (V3 eq. 17); 0 disables
    # --- mtp (DeepSeek-V3 §2.2; docs/design/mtp.md)
    n_mtp: int = 1  # D sequential MTP modules; 0 disables
    mtp_lambda: float = 0.3  # L_MTP = (lambda / D) * sum_k L_k
    # --- rope / yarn (DeepSeek-V2 §3.1.4; docs/design/rope-yarn.md)
    rope_theta: float = 10000.0
    rope_scaling: str = "none"
    rope_factor: float = 1.0
    original_seq_len: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    # cos/sin multiplier; None = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim),
    # which is 1.0 for every DeepSeek release. Set explicitly only to mirror a foreign config.
    rope_attn_factor: float | None = None
    # --- hc / mhc (docs/design/hyper-connections.md; model/hyperconn.py)
    residual: str = "plain"  # plain pre-norm residual | hc (Hyper-Connections) | mhc (manifold-constrained HC)
    hc_streams: int = 4  # n, the expansion rate: the residual stream is n parallel streams of width dim
    hc_sinkhorn_iters: int = 20  # mhc: Sinkhorn-Knopp iterations (column then row normalisation each)
    hc_dynamic: bool = True  # input-dependent coefficients (HC's W / mHC's phi) on top of the static biases
    hc_alpha_init: float = 0.01  # initial scale of the dynamic part (HC's s_alpha, s_beta; paper mHC's alpha)
    # mhc: "paper" (mHC's own maps, mean collapse) | "release" (DeepSeek-V4's: eps'd maps and Sinkhorn,
    # a learned final collapse; model/mhc_release.py)
    hc_form: str = "paper"
    hc_eps: float = 1e-6  # release mhc: added to H_pre, to the softmax and to every Sinkhorn denominator
    # --- dsa: DeepSeek Sparse Attention (DeepSeek-V3.2 §2.1; docs/design/dsa.md; model/indexer.py)
    index_topk: int = 0  # k keys each query attends to, chosen by the lightning indexer; 0 = no indexer (dense MLA)
    index_n_heads: int = 0  # the indexer's heads H^I (release: 64); used only with index_topk > 0
    index_head_dim: int = 0  # their width d^I (release: 128), RoPE on its first qk_rope_head_dim dims
    # --- hybrid attention: DeepSeek-V4 §2.3 (docs/design/v4-attention.md; model/hybrid_attention.py). With
    # attention="hybrid" every block attends with one shared K=V head of head_dim (RoPE on its last
    # qk_rope_head_dim dims) over a sliding window, plus compressed entries by layer_types; the MLA fields
    # (kv_lora_rank, qk_nope_head_dim, v_head_dim) are unused, q_lora_rank is the query latent, and the
    # index_* fields size CSA's lightning indexer (top index_topk compressed entries).
    attention: str = "mla"  # mla (V2/V3/V3.2) | hybrid (V4)
    # one per block, the MTP blocks last (n_layers + n_mtp, as the release's compress_ratios lists them):
    # "sliding" | "csa" | "hca" (transformers' names: HF_LAYER_TYPES); empty with attention="mla"
    layer_types: tuple[str, ...] = ()
    head_dim: int = 0  # width of each query head and of the shared K=V head (release: 512)
    sliding_window: int = 0  # n_win: the last n_win tokens (the query's own included) every block attends to
    csa_rate: int = 4  # m: tokens per CSA entry (each entry pools 2m tokens: overlapping windows)
    hca_rate: int = 128  # m': tokens per HCA entry
    # RoPE base of the CSA / HCA blocks (queries, keys and compressed entries; YaRN by rope_scaling applies to
    # these only); sliding blocks rotate with rope_theta and no scaling
    compress_rope_theta: float = 160000.0
    o_groups: int = 0  # g: heads in g groups, each projected to o_lora_rank before one mixing projection
    o_lora_rank: int = 0
    attn_sink: bool = True  # a learned logit per head in every softmax's denominator (release: on)

    def __post_init__(self) -> None:
        if isinstance(self.layer_types, list):  # JSON gives a list: stored as a tuple, so configs compare equal
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        errors = check_types(self)
        if errors:  # comparisons below would fail on a wrong type with a TypeError
            raise ValueError("invalid ModelConfig: " + "; ".join(errors))
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                errors.append(f"{name}={getattr(self, name)!r} must be one of {choices}")
        for name in ("vocab_size", "dim", "n_layers", "max_seq_len", "n_heads", "kv_lora_rank",
                     "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, name) <= 0:
                errors.append(f"{name}={getattr(self, name)} must be > 0")
        for name in ("q_lora_rank", "n_dense_layers", "n_routed_experts", "n_shared_experts", "n_mtp"):
            if getattr(self, name) < 0:
                errors.append(f"{name}={getattr(self, name)} must be >= 0")
        if self.qk_rope_head_dim % 2:
            errors.append(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even (RoPE rotates pairs)")
        if self.n_dense_layers > self.n_layers:
            errors.append(f"n_dense_layers={self.n_dense_layers} exceeds n_layers={self.n_layers}")
        if self.n_dense_layers > 0 or self.n_routed_experts == 0:
            if self.inter_dim <= 0:
                errors.append(f"inter_dim={self.inter_dim} must be > 0 when dense layers exist")
        if self.n_routed_experts > 0:
            e, g, k = self.n_routed_experts, self.n_expert_groups, self.n_limited_groups
            if self.moe_inter_dim <= 0:
                errors.append(f"moe_inter_dim={self.moe_inter_dim} must be > 0")
            if g <= 0 or e % g:
                errors.append(f"n_routed_experts={e} must be divisible by n_expert_groups={g}")
            elif not 1 <= k <= g:
                errors.append(f"n_limited_groups={k} must be in [1, n_expert_groups={g}]")
            elif not 1 <= self.n_activated_experts <= k * (e // g):
                errors.append(
                    f"n_activated_experts={self.n_activated_experts} must be in [1, n_limited_groups * "
                    f"n_routed_experts / n_expert_groups = {k * (e // g)}]")
            elif g > 1 and self.group_score == "top2_sum" and e // g < 2:
                errors.append(f"group_score='top2_sum' needs >= 2 experts per group "
                              f"(n_routed_experts / n_expert_groups = {e // g})")
        n_moe = sum(self.is_moe_layer(i) for i in range(self.n_layers))
        if not 0 <= self.n_hash_layers <= n_moe:
            errors.append(f"n_hash_layers={self.n_hash_layers} must be in [0, the {n_moe} MoE layers]")
        if not self.swiglu_limit >= 0:
            errors.append(f"swiglu_limit={self.swiglu_limit} must be >= 0 (0 = no clamp)")
        if self.rope_scaling == "yarn":
            if self.rope_factor < 1.0:
                errors.append(f"rope_factor={self.rope_factor} must be >= 1 with rope_scaling='yarn'")
            if self.original_seq_len <= 0:
                errors.append(f"original_seq_len={self.original_seq_len} must be > 0")
        if self.index_topk < 0:
            errors.append(f"index_topk={self.index_topk} must be >= 0 (0 = no indexer, dense attention)")
        elif self.index_topk > 0:
            if self.q_lora_rank == 0:
                errors.append(f"index_topk={self.index_topk} needs q_lora_rank > 0: the indexer's query reads the "
                              f"query latent; set q_lora_rank or index_topk=0")
            if self.index_n_heads <= 0:
                errors.append(f"index_n_heads={self.index_n_heads} must be > 0 with index_topk={self.index_topk}")
            if self.index_head_dim < self.qk_rope_head_dim:
                errors.append(f"index_head_dim={self.index_head_dim} must be >= qk_rope_head_dim="
                              f"{self.qk_rope_head_dim} (RoPE rotates the first qk_rope_head_dim dims of each "
                              f"indexer head) with index_topk={self.index_topk}")
        errors += hybrid_errors(self)
        if self.residual != "plain":
            for name in ("hc_streams", "hc_sinkhorn_iters"):
                if getattr(self, name) < 1:
                    errors.append(f"{name}={getattr(self, name)} must be >= 1 with residual={self.residual!r}")
            if not self.hc_alpha_init >= 0:
                errors.append(f"hc_alpha_init={self.hc_alpha_init} must be >= 0")
        if self.hc_form == "release":
            if self.residual != "mhc":
                errors.append(f"hc_form='release' is a form of mHC but residual={self.residual!r}; set "
                              f"residual='mhc' or hc_form='paper'")
            if not self.hc_eps >= 0:
                errors.append(f"hc_eps={self.hc_eps} must be >= 0 with hc_form='release'")
        if errors:
            raise ValueError("invalid ModelConfig: " + "; ".join(errors))

    # --- derived sizes (read-only; never stored)
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_id: int) -> bool:
        return self.n_routed_experts > 0 and layer_id >= self.n_dense_layers

    def is_hash_layer(self, layer_id: int) -> bool:
        """One of the first n_hash_layers MoE layers of the main stack (V4's hash-routed MoE)."""
        return self.is_moe_layer(layer_id) and layer_id < min(self.n_layers, self.n_dense_layers + self.n_hash_layers)

    # --- JSON round-trip
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = {k: v for k, v in d.items() if k not in RETIRED_KEYS}
        check_keys(cls, d)
        return cls(**d)

    def to_json(self, path: str | Path) -> None:
        from .io import write_file  # atomic and fsynced: a crash never leaves a torn config

        write_file(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        return read_config(cls, path)

    def replace(self, **changes: Any) -> "ModelConfig":
        check_keys(type(self), changes)
        return dataclasses.replace(self, **changes)


def hybrid_errors(cfg: ModelConfig) -> list[str]:
    """The problems of the hybrid attention's fields (V4 §2.3), one message each; none for MLA configs."""
    types = cfg.layer_types
    if not isinstance(types, tuple) or not all(isinstance(t, str) for t in types):
        return [f"layer_types={types!r} must be a list of strings, one of {tuple(HF_LAYER_TYPES)} per block"]
    if cfg.attention != "hybrid":
        return [f"layer_types is for attention='hybrid'; set attention='hybrid' or layer_types=[]"] if types else []
    errors, blocks = [], cfg.n_layers + cfg.n_mtp
    if len(types) != blocks:
        errors.append(f"layer_types has {len(types)} entries but the model has n_layers + n_mtp = {blocks} "
                      f"blocks; give one of {tuple(HF_LAYER_TYPES)} per block, MTP blocks last")
    bad = sorted(set(types) - set(HF_LAYER_TYPES))
    if bad:
        errors.append(f"layer_types entries {bad} must be one of {tuple(HF_LAYER_TYPES)}")
    for name in ("head_dim", "sliding_window", "csa_rate", "hca_rate", "o_groups", "o_lora_rank", "q_lora_rank"):
        if getattr(cfg, name) <= 0:
            errors.append(f"{name}={getattr(cfg, name)} must be > 0 with attention='hybrid'")
    if 0 < cfg.head_dim < cfg.qk_rope_head_dim:
        errors.append(f"head_dim={cfg.head_dim} must be >= qk_rope_head_dim={cfg.qk_rope_head_dim} (RoPE rotates "
                      f"the last qk_rope_head_dim dims of each head)")
    if cfg.o_groups > 0 and cfg.n_heads % cfg.o_groups:
        errors.append(f"n_heads={cfg.n_heads} must be divisible by o_groups={cfg.o_groups}")
    if not cfg.compress_rope_theta > 0:
        errors.append(f"compress_rope_theta={cfg.compress_rope_theta} must be > 0")
    if "csa" in types and cfg.index_topk <= 0:
        errors.append("layer_types has 'csa' blocks, whose lightning indexer needs index_topk > 0 (with "
                      "index_n_heads and index_head_dim); set them or use 'hca' blocks")
    return errors


def read_config(cls: type, path: str | Path) -> Any:
    """A config from its JSON file; every problem (missing, unreadable, not JSON, not an object, a bad
    key or value) is a ValueError that names the file."""
    try:
        d = json.loads(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"cannot read {cls.__name__} file {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cls.__name__} file {path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{cls.__name__} file {path} must hold a JSON object of fields, got {type(d).__name__}")
    try:
        return cls.from_dict(d)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


_TYPES = {"int": (int,), "float": (float, int), "str": (str,), "bool": (bool,)}
_WORDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false", "None": "null"}


def check_types(cfg: Any) -> list[str]:
    """One message per field whose value is not of its declared type (int, float, str, bool, or
    `X | None`); ints are accepted for floats and stored as floats, bools are never ints."""
    errors = []
    for f in dataclasses.fields(cfg):
        value, names = getattr(cfg, f.name), [t.strip() for t in str(f.type).split("|")]
        if value is None and "None" in names:
            continue
        allowed = tuple(t for n in names for t in _TYPES.get(n, (object,)))
        if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
            errors.append(f"{f.name}={value!r} must be " + " or ".join(_WORDS.get(n, n) for n in names))
        elif "float" in names and isinstance(value, int) and not isinstance(value, bool):
            object.__setattr__(cfg, f.name, float(value))
    return errors


def check_keys(cls: type, d: dict[str, Any]) -> None:
    """Raise a ValueError naming unknown keys and listing the valid ones."""
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(valid))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} key(s) {unknown}; valid keys are: {', '.join(valid)}")


def yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN attention temperature sqrt(1/t) = 0.1 * mscale * ln(factor) + 1 (1.0 when factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


_V3_DIMS = dict(
    q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    rope_scaling="yarn", rope_factor=40.0, original_seq_len=4096, beta_fast=32.0, beta_slow=1.0,
    max_seq_len=163840,
)

PRESETS: dict[str, dict[str, Any]] = {
    # Trains at a useful speed on 2 CPU cores with MLA, MoE (groups, bias) and MTP all on.
    "tiny": dict(
        vocab_size=4096, dim=256, n_layers=4, n_dense_layers=1, inter_dim=768, max_seq_len=512,
        n_heads=4, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        n_routed_experts=16, n_shared_experts=1, n_activated_experts=4, moe_inter_dim=128,
        n_expert_groups=4, n_limited_groups=2, route_scale=2.5, n_mtp=1,
    ),
    # About 53M total (33M active) parameters: CPU-trainable and still a real fine-grained MoE.
    "small": dict(
        vocab_size=16384, dim=512, n_layers=8, n_dense_layers=1, inter_dim=1536, max_seq_len=1024,
        n_heads=8, q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=48, qk_rope_head_dim=16, v_head_dim=48,
        n_routed_experts=16, n_shared_experts=1, n_activated_experts=4, moe_inter_dim=160,
        n_expert_groups=4, n_limited_groups=2, route_scale=2.5, n_mtp=1,
    ),
    # DeepSeek-V2-Lite (16B): softmax gate, no groups, no bias, q_lora_rank 0.
    "v2-lite": dict(
        _V3_DIMS, q_lora_rank=0, mscale=0.707, mscale_all_dim=0.707,
        vocab_size=102400, dim=2048, n_layers=27, n_dense_layers=1, inter_dim=10944, n_heads=16,
        n_routed_experts=64, n_shared_experts=2, n_activated_experts=6, moe_inter_dim=1408,
        n_expert_groups=1, n_limited_groups=1, score_func="softmax", group_score="max",
        norm_topk_prob=False, route_scale=1.0, gate_bias=False, n_mtp=0,
    ),
    # DeepSeek-V2 (236B, 21B active; V2 §3.1.2): group-limited softmax routing (8 groups, 3 per token),
    # routed outputs scaled by 16. For counting and meta-device construction only.
    "v2": dict(
        _V3_DIMS, mscale=0.707, mscale_all_dim=0.707,
        vocab_size=102400, dim=5120, n_layers=60, n_dense_layers=1, inter_dim=12288, n_heads=128,
        n_routed_experts=160, n_shared_experts=2, n_activated_experts=6, moe_inter_dim=1536,
        n_expert_groups=8, n_limited_groups=3, score_func="softmax", group_score="max",
        norm_topk_prob=False, route_scale=16.0, gate_bias=False, n_mtp=0,
    ),
    # DeepSeek-V3 (671B): for counting and meta-device construction only.
    "v3": dict(
        _V3_DIMS, vocab_size=129280, dim=7168, n_layers=61, n_dense_layers=3, inter_dim=18432, n_heads=128,
        n_routed_experts=256, n_shared_experts=1, n_activated_experts=8, moe_inter_dim=2048,
        n_expert_groups=8, n_limited_groups=4, score_func="sigmoid", group_score="top2_sum",
        norm_topk_prob=True, route_scale=2.5, gate_bias=True, n_mtp=1, mtp_lambda=0.3,
    ),
}
# DeepSeek-V3.2 (DeepSeek-V3.2 §2): V3 plus a lightning indexer on every layer (671,877,944,064 parameters
# with the gate biases, MTP excluded). For counting and meta-device construction only.
PRESETS["v32"] = dict(PRESETS["v3"], index_topk=2048, index_n_heads=64, index_head_dim=128)
# tiny plus an indexer: each query attends to 128 of up to 512 keys once past the first 128.
PRESETS["tiny-v32"] = dict(PRESETS["tiny"], index_topk=128, index_n_heads=4, index_head_dim=32)
# tiny in DeepSeek-V4's shape (docs/design/v4-attention.md): hybrid attention whose blocks cross all three
# kinds (sliding, CSA, HCA; the MTP block slides, as the release's), release mHC over 4 streams, every layer
# MoE with the first hash-routed, sqrtsoftplus scores without groups, clamped SwiGLU, MTP. The rates are cut
# to the context (HCA 16:1, not 128:1): a 256-token training window closes 64 CSA entries (more than the
# indexer's 16) and 16 HCA entries, and crosses the 32-token window.
PRESETS["tiny-v4"] = dict(
    PRESETS["tiny"], n_dense_layers=0, n_heads=4, q_lora_rank=128, qk_rope_head_dim=16,
    attention="hybrid", layer_types=("sliding", "csa", "hca", "csa", "sliding"), head_dim=64, sliding_window=32,
    csa_rate=4, hca_rate=16, o_groups=2, o_lora_rank=64, index_topk=16, index_n_heads=4, index_head_dim=32,
    residual="mhc", hc_form="release", n_expert_groups=1, n_limited_groups=1, score_func="sqrtsoftplus",
    route_scale=1.5, n_hash_layers=1, swiglu_limit=10.0,
)
# DeepSeek-V4 (V4 §2; for counting and meta-device construction only). Sizes: DeepSeek-V4-Flash's are transformers'
# DeepseekV4Config defaults; V4-Pro's, its release config (mindformers' DeepseekV4Config defaults match). Layer
# kinds as the release's compress_ratios: Flash 2 sliding, then CSA / HCA alternating; Pro (transformers' default
# schedule) 2 HCA, then HCA / CSA alternating; the MTP block slides. Totals: Flash 284,332,240,471 (published
# 284B), Pro 1,572,973,210,339 (1.6T). Active, less the input embedding (a lookup): 13.27B (13B), 48.83B (49B),
# as V3's 36.6B reads "37B"; count_params' active (embedding and head in) is 13.80B and 49.76B.
_V4 = dict(
    PRESETS["tiny-v4"], vocab_size=129280, head_dim=512, qk_rope_head_dim=64, qk_nope_head_dim=448, v_head_dim=512,
    kv_lora_rank=512, n_shared_experts=1, n_activated_experts=6, n_hash_layers=3, sliding_window=128, csa_rate=4,
    hca_rate=128, index_n_heads=64, index_head_dim=128, o_lora_rank=1024, max_seq_len=1048576, rope_scaling="yarn",
    rope_factor=16.0, original_seq_len=65536, init_std=0.02,
)
PRESETS["v4-flash"] = dict(
    _V4, dim=4096, n_layers=43, n_heads=64, q_lora_rank=1024, n_routed_experts=256, moe_inter_dim=2048,
    inter_dim=2048, route_scale=1.5, o_groups=8, index_topk=512,
    layer_types=("sliding",) * 2 + ("csa", "hca") * 20 + ("csa", "sliding"),
)
PRESETS["v4-pro"] = dict(
    _V4, dim=7168, n_layers=61, n_heads=128, q_lora_rank=1536, n_routed_experts=384, moe_inter_dim=3072,
    inter_dim=3072, route_scale=2.5, o_groups=16, index_topk=1024,
    layer_types=("hca",) * 2 + ("hca", "csa") * 29 + ("hca", "sliding"),
)


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """Look a preset up by exact name; overrides are checked like any other config key."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    d = dict(PRESETS[name])
    check_keys(ModelConfig, overrides)
    d.update(overrides)
    return ModelConfig(**d)


__all__ = ["ModelConfig", "PRESETS", "HF_LAYER_TYPES", "get_preset", "check_keys", "check_types", "read_config", "yarn_mscale"]
