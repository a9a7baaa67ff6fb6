"""FLOPs per token of a ModelConfig: the numerator of MFU (train/telemetry.py) and of the training-cost
estimate (train/estimate.py). Counted on the meta device (count.py): nothing is allocated.

A multiply-add is 2 FLOPs; a training token costs its forward (1x) and backward (2x) = 3 forwards:

    matmuls    6 x the matmul parameters a token activates: only K of the routed experts, the head once
               per prediction depth (main + each MTP module), the embedding lookup not at all
    attention  per layer 3 x 2 x (the multiply-adds of one query against the keys it attends to),
               averaged over the positions of a causal sequence of S tokens:
                 dense MLA (naive path, V2 §2.1): H (d_qk + d_v) per key, S/2 keys on average
                 DSA (DeepSeek-V3.2 §2.1): the cheaper of its two modes, plus the lightning indexer
                   over all S/2 earlier keys, H^I (d^I + 1) per key (dot products, weighted sum):
                   - sparse, in MLA's MQA (absorbed) mode: H (2 d_c + d_r) per key, over
                     k - k^2 / (2S) keys on average (min(t, k) over t < S; S/2 while S <= k)
                   - masked dense (the paper's short-prefill "masked MHA mode"): as dense MLA
                   At 4K V3.2 costs as V3 (plus its indexer); at 128K the sparse mode is 9x cheaper.
                 hybrid (DeepSeek-V4 §2.3; docs/design/v4-attention.md): H heads against one shared K=V head
                   of head_dim D, 2 H D per key (scores, values), over the sliding window's n_win keys
                   (min(t + 1, n_win)) plus, by the block's kind:
                   - CSA: the top index_topk of the t / m compressed entries, plus the lightning indexer
                     over all of them, H^I (d^I + 1) per entry
                   - HCA: all t / m' compressed entries
                   Averaged over a 1M-token sequence, a forward token of V4-Pro costs 32 % of V3.2's
                   (V4-Flash 13 %); for the last token of a 1M context V4's report states 27 % (Flash 10 %).

This is the "6ND plus attention" rule the papers' cost figures follow: for V3 at 4K context it gives
about 250 GFLOPs a token (223 of matmuls, 31 of attention).
"""

from __future__ import annotations

from ..config import ModelConfig
from .count import count_params


def attended_keys(seq_len: int, topk: int = 0) -> float:
    """Mean keys a query attends to over a causal sequence of seq_len tokens, with at most topk (0: all)."""
    if topk <= 0 or seq_len <= topk:
        return seq_len / 2
    return topk - topk * topk / (2 * seq_len)


def attention_flops_per_token(cfg: ModelConfig, seq_len: int, dense: bool = False) -> float:
    """Forward FLOPs of attention scores and values per token, all layers and MTP depths; dense: every
    earlier key attended even with an indexer (V3.2's dense warm-up), which still runs."""
    if cfg.attention == "hybrid":
        return sum(hybrid_layer_flops(cfg, kind, seq_len) for kind in cfg.layer_types)
    layer = 2 * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * attended_keys(seq_len)
    if cfg.index_topk > 0 and dense:
        layer += 2 * cfg.index_n_heads * (cfg.index_head_dim + 1) * seq_len / 2
    elif cfg.index_topk > 0:
        sparse = 2 * cfg.n_heads * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim) * attended_keys(seq_len, cfg.index_topk)
        layer = min(layer, sparse) + 2 * cfg.index_n_heads * (cfg.index_head_dim + 1) * seq_len / 2
    return layer * (cfg.n_layers + cfg.n_mtp)


def hybrid_layer_flops(cfg: ModelConfig, kind: str, seq_len: int) -> float:
    """Forward attention FLOPs per token of one hybrid block of `kind` (sliding | csa | hca; header)."""
    keys = attended_keys(seq_len, cfg.sliding_window)
    index = 0.0
    if kind == "csa":
        entries = seq_len / cfg.csa_rate  # closed CSA windows at the sequence's end
        keys += attended_keys(entries, cfg.index_topk)
        index = 2 * cfg.index_n_heads * (cfg.index_head_dim + 1) * entries / 2
    elif kind == "hca":
        keys += seq_len / cfg.hca_rate / 2
    return 2 * cfg.n_heads * 2 * cfg.head_dim * keys + index


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters a token multiplies by: active ones, without the embedding lookup, the head per depth."""
    c = count_params(cfg)
    head = cfg.vocab_size * cfg.dim
    return c["active"] - head + c["mtp_active"] + cfg.n_mtp * head


def train_flops_per_token(cfg: ModelConfig, seq_len: int, dense: bool = False) -> float:
    """Forward + backward FLOPs per training token at sequence length seq_len (see the header)."""
    return 6 * matmul_params(cfg) + 3 * attention_flops_per_token(cfg, seq_len, dense)
