"""DeepSeek-V4's hybrid attention (model/hybrid_attention.py, model/compressor.py) against transformers'
DeepseekV4Attention directly, one module per block kind (sliding, CSA, HCA), in fp32, forward and backward:
sequences that cross the sliding window, close several compression windows (and leave some tokens past the
last one), and hold more CSA entries than the indexer keeps."""

import re

import pytest
import torch

from frugallm import ModelConfig, Transformer
from frugallm.model.attention import MLA
from frugallm.model.hybrid_attention import HybridAttention
from frugallm.model.transformer import Block

from conftest import tiny_config

hf_v4 = pytest.importorskip("transformers.models.deepseek_v4.modeling_deepseek_v4")
from transformers import DeepseekV4Config  # noqa: E402
from transformers.masking_utils import create_sliding_window_causal_mask  # noqa: E402

KINDS = ("sliding", "csa", "hca")
HF_KINDS = {"sliding": "sliding_attention", "csa": "compressed_sparse_attention", "hca": "heavily_compressed_attention"}
D, H, HD, DR, DQ, G, R, WIN, CSA, HCA, TOPK = 32, 4, 16, 8, 24, 2, 12, 8, 4, 8, 3

# transformers' parameter names -> frugallm's (the release's), for one attention module
RENAMES = [(r"^sinks$", "attn_sink"), (r"^q_a_proj", "wq_a"), (r"^q_a_norm", "q_norm"), (r"^q_b_proj", "wq_b"),
           (r"^kv_proj", "wkv"), (r"^o_a_proj", "wo_a"), (r"^o_b_proj", "wo_b"),
           (r"^compressor\.indexer\.scorer\.", "indexer."), (r"^compressor\.indexer\.q_b_proj", "indexer.wq_b"),
           (r"^compressor\.indexer\.", "indexer.compressor."), (r"position_bias$", "ape"), (r"kv_proj", "wkv"),
           (r"gate_proj", "wgate"), (r"compressor\.kv_norm", "compressor.norm")]


def _ours_name(name: str) -> str:
    for pattern, new in RENAMES:
        name = re.sub(pattern, new, name)
    return name


def _configs(**changes):
    hf = DeepseekV4Config(
        vocab_size=50, hidden_size=D, num_hidden_layers=3, num_attention_heads=H, head_dim=HD,
        partial_rotary_factor=DR / HD, q_lora_rank=DQ, o_groups=G, o_lora_rank=R, sliding_window=WIN,
        layer_types=[HF_KINDS[k] for k in KINDS], index_n_heads=8, index_head_dim=12, index_topk=TOPK,
        compress_rates={HF_KINDS["csa"]: CSA, HF_KINDS["hca"]: HCA}, max_position_embeddings=128,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                         "beta_fast": 32, "beta_slow": 1}, **changes)
    hf._attn_implementation = "eager"
    ours = tiny_config(dim=D, n_heads=H, q_lora_rank=DQ, qk_rope_head_dim=DR, attention="hybrid", n_layers=3, n_mtp=0,
                       layer_types=KINDS, head_dim=HD, sliding_window=WIN, csa_rate=CSA, hca_rate=HCA,
                       o_groups=G, o_lora_rank=R, index_topk=TOPK, index_n_heads=8, index_head_dim=12,
                       rope_scaling="yarn", rope_factor=4.0, original_seq_len=32, max_seq_len=128)
    return hf, ours


def _pair(kind: str):
    hf_cfg, cfg = _configs()
    layer = KINDS.index(kind)
    theirs = hf_v4.DeepseekV4Attention(hf_cfg, layer)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.5 * torch.randn_like(p))
    ours = HybridAttention(cfg, layer)
    state = {_ours_name(n): p.detach().clone() for n, p in theirs.named_parameters()}
    ours.load_state_dict(state, strict=True)
    return hf_cfg, theirs, ours


def _theirs(hf_cfg, theirs, x):
    """transformers' attention as its decoder layer calls it: the model's RoPE tables and sliding mask."""
    pos = torch.arange(x.shape[1])[None]
    rotary = hf_v4.DeepseekV4RotaryEmbedding(hf_cfg)
    embeddings = {k: rotary(x, position_ids=pos, layer_type=k) for k in ("main", "compress")}
    mask = create_sliding_window_causal_mask(config=hf_cfg, inputs_embeds=x, attention_mask=None, cache=None,
                                             position_ids=pos)
    return theirs(x, embeddings, pos, mask)[0]


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("S", [5, 43])
def test_attention_equals_transformers_forward_and_backward(kind, S):
    """S = 43: past the window of 8, 10 CSA entries (> top-3) and 5 HCA entries, 3 tokens past the last
    window; S = 5: inside the window, one CSA entry, no HCA entry yet."""
    hf_cfg, theirs, ours = _pair(kind)
    x = torch.randn(2, S, D)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    want, got = _theirs(hf_cfg, theirs, x1), ours(x2)
    assert _rel(got, want) < 1e-5
    g = torch.randn_like(want)
    want.backward(g)
    got.backward(g)
    assert _rel(x2.grad, x1.grad) < 1e-5
    ours_params = dict(ours.named_parameters())
    for name, p in theirs.named_parameters():
        mine = ours_params[_ours_name(name)].grad
        if p.grad is None:  # the indexer: its selection is discrete, no gradient reaches it on either side
            assert mine is None or not mine.any(), name
        else:
            assert _rel(mine, p.grad) < 1e-5, name


def test_csa_keeps_topk_entries_and_the_indexer_matters():
    """The indexer narrows CSA to index_topk entries per query (beyond the window): with a different
    indexer the output changes, so the test above compares a real selection."""
    _, theirs, ours = _pair("csa")
    x = torch.randn(1, 43, D)
    with torch.no_grad():
        before = ours(x)
        ours.indexer.wq_b.weight.normal_()
        after = ours(x)
    assert _rel(after, before) > 1e-3


def test_blocks_pick_their_attention_from_the_config():
    _, cfg = _configs()
    cfg = cfg.replace(n_mtp=1, layer_types=KINDS + ("sliding",))
    model = Transformer(cfg)
    assert [blk.attn.kind for blk in model.layers] == list(KINDS)
    assert model.mtp[0].block.attn.kind == "sliding"  # the MTP block is the last entry
    assert all(not blk.attn.attn_sink.any() for blk in model.layers)  # sinks start at zero
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    out = model(ids[:, :-1], targets=ids[:, 1:])
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.layers[2].attn.compressor.wkv.weight.grad.abs().sum() > 0
    assert isinstance(Block(tiny_config(), 0).attn, MLA)  # attention='mla', the default


@pytest.mark.parametrize("changes, message", [
    (dict(attention="hybrid"), "layer_types has 0 entries"),
    (dict(layer_types=["sliding"] * 4), "layer_types is for attention='hybrid'"),
    (dict(attention="hybrid", layer_types=["csa"] * 4, head_dim=16, sliding_window=4, o_groups=3, o_lora_rank=8),
     "n_heads=4 must be divisible by o_groups=3"),
    (dict(attention="hybrid", layer_types=["xsa"] * 4, head_dim=16, sliding_window=4, o_groups=2, o_lora_rank=8),
     r"layer_types entries \['xsa'\]"),
    (dict(attention="hybrid", layer_types=["csa"] * 4, head_dim=16, sliding_window=4, o_groups=2, o_lora_rank=8),
     "needs index_topk > 0")])
def test_bad_hybrid_configs_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**changes)


def test_hybrid_config_round_trips_through_json(tmp_path):
    _, cfg = _configs()
    cfg.to_json(tmp_path / "config.json")
    again = ModelConfig.from_json(tmp_path / "config.json")
    assert again == cfg and again.layer_types == KINDS


@pytest.mark.parametrize("chunks", [[43], [13, 1, 1, 1, 5, 1, 2, 1, 9, 1, 1, 1, 6], [1] * 43])
def test_cached_decode_equals_the_full_forward(chunks):
    """A model of one block per kind, fed in chunks through HybridCache (prefill, single-token steps, short
    chunks that close compression windows mid-chunk) gives the logits of one full forward, at every token."""
    from frugallm.model.hybrid_cache import HybridCache

    _, cfg = _configs()
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("attn_sink", "ape")):
                p.normal_(0, 0.5)
        ids = torch.randint(0, cfg.vocab_size, (2, sum(chunks)))
        want = model(ids).logits
        cache, got, at = HybridCache(cfg, 2), [], 0
        for n in chunks:
            got.append(model(ids[:, at:at + n], cache=cache).logits)
            at += n
    assert cache.layer(0).kv.shape[1] == WIN - 1 and cache.layer(2).compressed.count == sum(chunks) // HCA
    assert _rel(torch.cat(got, dim=1), want) < 1e-5


def test_cached_decode_equals_transformers_and_holds_what_it_holds():
    """Chunk by chunk, the three blocks decode with HybridCache as transformers' do with its DynamicCache
    (DeepseekV4CSACache / HCACache), and both caches hold the same rows: the window's n_win - 1, the entries,
    the unpooled tokens of the open window (CSA's indexer too)."""
    from transformers import DynamicCache

    from frugallm.model.hybrid_cache import HybridCache

    pairs = [_pair(kind) for kind in KINDS]
    hf_cfg, cfg = pairs[0][0], _configs()[1]
    theirs_cache, ours_cache = DynamicCache(config=hf_cfg), HybridCache(cfg, 2)
    rotary = hf_v4.DeepseekV4RotaryEmbedding(hf_cfg)
    chunks, at = [13, 1, 1, 1, 5, 2, 1, 9, 1, 6], 0
    x = torch.randn(2, sum(chunks), D)
    with torch.no_grad():
        for n in chunks:
            xs, pos = x[:, at:at + n], torch.arange(at, at + n)[None]
            embeddings = {k: rotary(xs, position_ids=pos, layer_type=k) for k in ("main", "compress")}
            mask = create_sliding_window_causal_mask(config=hf_cfg, inputs_embeds=xs, attention_mask=None,
                                                     cache=theirs_cache, position_ids=pos)
            positions, _ = ours_cache.window(n)
            for i, (_, theirs, ours) in enumerate(pairs):
                want = theirs(xs, embeddings, pos, mask, cache=theirs_cache)[0]
                assert _rel(ours(xs, positions=positions, cache=ours_cache.layer(i)), want) < 1e-5, (i, at)
            ours_cache.advance(n)
            at += n
    for i in (1, 2):
        t, o = theirs_cache.layers[i], ours_cache.layer(i)
        assert t.keys.shape[2] == o.kv.shape[1] == WIN - 1
        states = [("compressor", o.compressed)] + ([("indexer", o.index)] if o.index is not None else [])
        for name, state in states:
            assert torch.allclose(t.compressed_kv[name], state.entries, atol=1e-6)
            assert t.buffer_kv[name].shape == state.kv.shape and t.entry_count[name] == state.count


def test_hybrid_models_are_not_exported_as_v3():
    """No Hugging Face key table for V4's attention yet: the export refuses, rather than writing a V3/V3.2
    directory whose attention weights transformers would not find."""
    from frugallm.formats.hf_config import hf_format

    with pytest.raises(ValueError, match="attention='hybrid'"):
        hf_format(_configs()[1])
