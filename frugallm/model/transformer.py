"""The DeepSeek-V2/V3 Transformer: embed -> blocks -> norm -> head, plus MTP modules.

This file only wires the concepts together (MLA in attention.py, with DSA's indexer in indexer.py
for V3.2 configs (index_topk > 0), DeepSeekMoE in moe.py,
MTP in mtp.py, RoPE/YaRN in rope.py, HC/mHC in hyperconn.py). It knows nothing of precision or
parallelism.
Block (pre-norm):  h = x + MLA(attn_norm(x));  out = h + FFN(ffn_norm(h)),
FFN = dense SwiGLU for the first `n_dense_layers` layers, DeepSeekMoE after.
With residual = hc / mhc, x is n streams (B, S, n, d) and each "+" is a hyper-connection: the
sub-layer reads H_pre x and writes H_res x + H_post^T F(.) (hyperconn.py). The streams are
expanded after the embedding and collapsed (mean; V4's hyper head with hc_form = release,
mhc_release.py) before the final norm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from .attention import MLA
from .hybrid_attention import HybridAttention
from .indexer import take_indexer_loss
from .hyperconn import StreamConnection, collapse_streams, expand_streams
from .mhc_release import make_connection, make_hyper_head
from .moe import MLP, MoE
from .mtp import MTPModule, cross_entropy, mtp_loss
from .norm import RMSNorm
from .rope import rope_tables


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, S, vocab)
    loss: torch.Tensor | None = None  # lm_loss + mtp_loss + balance_loss + indexer_loss, for the trainer
    lm_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None  # already weighted by lambda / D
    balance_loss: torch.Tensor | None = None  # sum over MoE layers (main and MTP)
    indexer_loss: torch.Tensor | None = None  # DSA training: the indexers' KL, summed over layers (indexer_loss.py)
    hidden: torch.Tensor | None = None  # (B, S, d) last block output (streams collapsed), before the final norm


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # V2/V3 MLA (with V3.2's indexer), or V4's hybrid attention of the block's kind (layer_types[layer_id])
        self.attn = HybridAttention(cfg, layer_id) if cfg.attention == "hybrid" else MLA(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_id)
        self.ffn = MoE(cfg, cfg.is_hash_layer(layer_id)) if self.is_moe else MLP(cfg.dim, cfg.inter_dim)
        self.attn_conn = make_connection(cfg, 2 * layer_id)  # plain: x + F(x), no parameters
        self.ffn_conn = make_connection(cfg, 2 * layer_id + 1)

    def forward(self, x, cos, sin, positions=None, cache=None, absorb=False, mask=None, ids=None):
        """x (B, S, d), or (B, S, n, d) streams with hc/mhc -> (x of the same shape, balance loss or None);
        ids (B, S): the input tokens, which a hash-routed MoE (V4) selects its experts by."""
        mix = self.attn_conn(x)  # read: mix.h (B, S, d) is the sub-layer input
        x = self.attn_conn.write(mix, self.attn(self.attn_norm(mix.h), cos, sin, positions, cache, absorb, mask))
        mix = self.ffn_conn(x)
        if self.is_moe:
            y, balance = self.ffn(self.ffn_norm(mix.h), ids)
        else:
            y, balance = self.ffn(self.ffn_norm(mix.h)), None
        return self.ffn_conn.write(mix, y), balance


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.hc_head = make_hyper_head(cfg)  # release mHC's final collapse; None: the mean of the streams
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # MTP block k is "layer n_layers + k" (its HF index), a MoE block for V3-like configs
        self.mtp = nn.ModuleList(MTPModule(cfg, Block(cfg, cfg.n_layers + k)) for k in range(cfg.n_mtp))
        self.reset_buffers()
        self.init_weights()

    @classmethod
    def from_state_dict(cls, cfg: ModelConfig, state: dict[str, torch.Tensor]) -> "Transformer":
        """Build on the meta device and adopt `state`'s tensors (no second allocation), in eval mode."""
        with torch.device("meta"):
            model = cls(cfg)
        model.load_state_dict(state, strict=True, assign=True)
        model.reset_buffers()
        return model.eval()

    def reset_buffers(self) -> None:
        """(Re)build the non-persistent buffers, e.g. after meta-device construction + load."""
        device = self.embed.weight.device
        cos, sin = rope_tables(self.config, device=None if device.type == "meta" else device)
        self.register_buffer("rope_cos", cos.to(device), persistent=False)  # (max_seq_len, dr/2) fp32
        self.register_buffer("rope_sin", sin.to(device), persistent=False)
        for m in self.modules():
            if isinstance(m, MoE):
                m.tokens_per_expert = torch.zeros_like(m.tokens_per_expert, device=device)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) for every matrix (V3 §4.2: 0.006), ones for norms, zero gate bias and
        zero norm biases (the DSA indexer's key LayerNorm, model/indexer.py)."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=std)
            elif name.endswith("norm.bias"):
                nn.init.zeros_(p)
            else:
                nn.init.ones_(p)  # RMSNorm weights
        for m in self.modules():  # HC / mHC coefficients have their own init (hyperconn.py)
            if isinstance(m, StreamConnection):
                m.reset_parameters(std)
            elif isinstance(m, HybridAttention):  # V4: zero sinks and compressor slot biases
                m.reset_parameters()

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, cache=None,
                absorb: bool | None = None, mtp_lambda: float | None = None,
                logits_at: torch.Tensor | None = None) -> ModelOutput:
        """input_ids (B, S) -> ModelOutput with logits (B, S, vocab).

        targets (B, S): next-token labels (-100 = ignore); with them the output carries the main
        loss, the weighted MTP loss, the balance loss and (DSA training) the indexer loss separately,
        and their sum as `loss`.
        cache: a KVCache (model/kv_cache.py). Row b's tokens go to positions lengths[b]..+S-1,
            and its lengths advance by S.
        absorb: MLA's path (model/attention.py): True the absorbed one, False the naive one, None
            (auto) absorbed iff a cached decode step (a cache and S == 1), naive otherwise.
        logits_at (B, k): compute logits only at these indices into S (e.g. each prompt's last
            token), giving logits (B, k, vocab); `hidden` stays (B, S, d).
        """
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int):
            raise ValueError(f"input_ids must be (batch, seq) integer token ids, got {tuple(input_ids.shape)} "
                             f"{input_ids.dtype}")
        if targets is not None and targets.shape != input_ids.shape:
            raise ValueError(f"targets {tuple(targets.shape)} must have the shape of input_ids {tuple(input_ids.shape)}")
        S = input_ids.shape[1]
        block_kwargs = self.block_kwargs(input_ids, cache, absorb)
        h = self.embed_streams(input_ids)
        h, balance = self.run_layers(h, enumerate(self.layers), block_kwargs, cache)
        if cache is not None:
            cache.advance(S)
        return self.finish(h, input_ids, targets, balance, block_kwargs, mtp_lambda, logits_at)

    # The pieces of forward, in order. Pipeline stages (parallel/pipeline.py) call them on their share of
    # the layers: the first stage embeds, every stage runs its layers, the last finishes.
    def embed_streams(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, S) ids -> h (B, S, d), or (B, S, n, d) as n residual streams with HC / mHC."""
        h = self.embed(input_ids)
        return h if self.config.residual == "plain" else expand_streams(h, self.config.hc_streams)

    def run_layers(self, h: torch.Tensor, layers, block_kwargs: dict, cache=None):
        """h through `layers` ((index, Block) pairs, in order) -> (h, their summed balance loss or None)."""
        balance = None
        for i, layer in layers:
            h, bal = layer(h, cache=cache.layer(i) if cache is not None else None, **block_kwargs)
            balance = _add(balance, bal)
        return h, balance

    def finish(self, h: torch.Tensor, input_ids: torch.Tensor, targets: torch.Tensor | None, balance,
               block_kwargs: dict, mtp_lambda: float | None = None, logits_at: torch.Tensor | None = None) -> ModelOutput:
        """The last layer's h -> logits, and with targets the main, MTP and balance losses (balance:
        the layers' so far, to which the MTP blocks' is added) and their sum `loss`."""
        cfg = self.config
        if cfg.residual != "plain":
            h = collapse_streams(h) if self.hc_head is None else self.hc_head(h)  # (B, S, d)
        logits = self.head(self.norm(_pick(h, logits_at)))
        if targets is None:
            return ModelOutput(logits=logits, hidden=h, balance_loss=balance, indexer_loss=self._indexer_loss())
        lm_loss = cross_entropy(logits, targets)
        loss, mtp = lm_loss, None
        if cfg.n_mtp > 0:
            lam = cfg.mtp_lambda if mtp_lambda is None else mtp_lambda
            mtp, bal = mtp_loss(self.mtp, self.embed, self.head, h, input_ids, targets, lam, **block_kwargs)
            balance = _add(balance, bal)
            loss = loss + mtp
        if balance is not None:
            loss = loss + balance
        index = self._indexer_loss()  # after the MTP blocks, whose indexers learn too
        if index is not None:
            loss = loss + index
        return ModelOutput(logits=logits, loss=loss, lm_loss=lm_loss, mtp_loss=mtp, balance_loss=balance,
                           indexer_loss=index, hidden=h)

    def _indexer_loss(self) -> torch.Tensor | None:
        """The DSA indexers' KL of this forward (training with a dsa stage set: indexer.py), else None."""
        return take_indexer_loss(self) if self.config.index_topk > 0 else None

    def mtp_step(self, depth: int, h_prev: torch.Tensor, next_ids: torch.Tensor, cache, absorb: bool | None = None,
                 logits_at: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Run MTP module `depth` (0-based) over S cached positions, for drafting (infer/speculative.py).

        h_prev (B, S, d): the previous depth's hidden states at those positions (the main model's
        `hidden` for depth 0); next_ids (B, S): the tokens depth+1 places after them; cache: this
        module's own one-layer KVCache. Returns (h (B, S, d), logits (B, S, vocab)), where
        logits[:, i] predicts the token depth+2 places after position i; with logits_at (B, k)
        only at those indices, (B, k, vocab).
        """
        module = self.mtp[depth]
        block_kwargs = self._positions(next_ids.shape[1], cache, absorb)
        h, _ = module(h_prev, self.embed(next_ids), cache=cache.layer(0), **block_kwargs)
        cache.advance(next_ids.shape[1])
        return h, self.head(module.norm(_pick(h, logits_at)))

    def block_kwargs(self, input_ids: torch.Tensor, cache=None, absorb: bool | None = None) -> dict:
        """What every block of a forward over input_ids (B, S) takes besides h: `_positions`, and the ids
        themselves where V4's hash-routed MoE layers select experts by them."""
        kwargs = self._positions(input_ids.shape[1], cache, absorb)
        if self.config.n_hash_layers:
            kwargs["ids"] = input_ids
        return kwargs

    def _positions(self, S: int, cache, absorb: bool | None) -> dict:
        """RoPE tables, positions, mask and attention path for S new tokens (per row with a cache)."""
        cfg = self.config
        if absorb is None:
            absorb = cache is not None and S == 1
        if cache is None:
            if S > cfg.max_seq_len:
                raise ValueError(f"sequence of {S} tokens exceeds max_seq_len={cfg.max_seq_len}; "
                                 f"shorten the input or raise max_seq_len")
            return dict(cos=self.rope_cos[:S], sin=self.rope_sin[:S], absorb=absorb)
        positions, mask = cache.window(S)  # (B, S), (B, S, T) or None
        if not cache.static and int(positions[:, -1].max()) >= cfg.max_seq_len:  # static: the caller checks
            raise ValueError(f"position {int(positions[:, -1].max())} is past max_seq_len={cfg.max_seq_len}; "
                             f"shorten the input or raise max_seq_len")
        return dict(cos=self.rope_cos[positions], sin=self.rope_sin[positions], positions=positions, mask=mask,
                    absorb=absorb)


def _pick(h: torch.Tensor, at: torch.Tensor | None) -> torch.Tensor:
    """h (B, S, d) -> h at indices `at` (B, k) along S, (B, k, d); all of h when `at` is None."""
    return h if at is None else h.gather(1, at[..., None].expand(-1, -1, h.shape[-1]))


def _add(a, b):
    return b if a is None else a if b is None else a + b
