"""DeepSeek-V3.2 (DSA): frugallm's lightning indexer and top-k attention against transformers' deepseek_v32.

The reference models are tiny deepseek_v32 models built by transformers from the configs below and saved
into tmp dirs (no download). Their index scores have no ties at the top-k boundary (16 indexer heads:
an exact-zero ReLU score needs all 16 dot products <= 0), so the selected keys are unique and every
implementation must pick the same ones. With few heads ties are common: see test_ties_*.
"""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, DeepseekV32Config, DeepseekV32ForCausalLM
from transformers.models.deepseek_v32 import modeling_deepseek_v32 as hf_v32

import frugallm
from frugallm import Transformer
from frugallm.model import attention
from frugallm.model.indexer import select, top_rows
from frugallm.model.kv_cache import KVCache

from conftest import tiny_config

TOPK = 8
COMMON = dict(
    vocab_size=101, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
    first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
    n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2, q_lora_rank=16, kv_lora_rank=8,
    qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, max_position_embeddings=64, routed_scaling_factor=2.5,
    index_topk=TOPK, index_n_heads=16, index_head_dim=8,
    rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32,
                  "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
)


def make_hf(path, **changes):
    torch.manual_seed(0)
    model = DeepseekV32ForCausalLM(DeepseekV32Config(**{**COMMON, **changes}))
    with torch.no_grad():  # larger-than-init weights: routing, attention and index scores far from uniform
        for name, p in model.named_parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.5)
    model.eval().save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("v32") / "hf"
    hf = make_hf(path)
    return hf, frugallm.from_hf(path), path


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("S", [6, 40])  # below index_topk (nothing to select) and far above it
def test_logits_match_transformers(pair, S):
    hf, ours, _ = pair
    assert ours.config.index_topk == TOPK and ours.layers[0].attn.indexer is not None
    ids = torch.randint(0, 101, (2, S))
    with torch.no_grad():
        ref = hf(ids).logits
        assert _rel(ours(ids).logits, ref) <= 1e-5
        assert _rel(ours(ids, absorb=True).logits, ref) <= 1e-5
        dense = Transformer.from_state_dict(ours.config.replace(index_topk=64), ours.state_dict())
        gap = _rel(dense(ids).logits, ref)  # the same weights attending to every key
    assert (gap > 1e-2) == (S > TOPK), gap  # selection is exercised above index_topk, and only there


def _indexer_outputs(model, kind, ids):
    """Per layer, what its indexer saw and chose in one forward of `model` over ids."""
    seen, hooks = [], []
    for layer in (model.model.layers if kind == "hf" else model.layers):
        ix = layer.self_attn.indexer if kind == "hf" else layer.attn.indexer
        hooks.append(ix.register_forward_hook(lambda m, args, out: seen.append((m, args, out))))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return seen


def test_topk_indices_match_transformers_where_scores_have_no_ties(pair):
    hf, ours, _ = pair
    ids = torch.randint(0, 101, (2, 40))
    theirs, mine = _indexer_outputs(hf, "hf", ids), _indexer_outputs(ours, "ours", ids)
    compared = 0
    for (_, _, idx), (ix, (x, q_lat, cos, sin, *_), keep) in zip(theirs, mine, strict=True):
        visible = torch.ones(40, 40).tril().bool()
        with torch.no_grad():
            scores = ix.scores(x, q_lat, cos, sin, ix.keys(x, cos, sin)).masked_fill(~visible, float("-inf"))
        top = scores.topk(TOPK + 1, dim=-1).values
        for b in range(2):
            for t in range(TOPK, 40):  # rows with more visible keys than index_topk
                if top[b, t, TOPK - 1] == top[b, t, TOPK]:
                    continue  # a tie at the boundary: any of the tied keys is a valid choice
                assert sorted(idx[b, t].tolist()) == keep[b, t].nonzero().flatten().tolist(), (b, t)
                compared += 1
    assert compared >= 0.95 * len(mine) * 2 * (40 - TOPK)


def test_greedy_generation_matches_transformers_full_forward(pair):
    hf, ours, _ = pair
    prompt = torch.randint(0, 101, (1, 5))  # the context grows from below index_topk to far above it
    new = frugallm.generate(ours, prompt, 32, temperature=0.0)  # cached decode, absorbed MLA
    seq = prompt
    with torch.no_grad():
        for _ in range(32):  # transformers' full forward over the whole sequence each step (no cache)
            seq = torch.cat([seq, hf(seq).logits[:, -1:].argmax(-1)], dim=1)
    assert new.tolist() == seq[:, 5:].tolist()


def test_to_hf_writes_what_transformers_loads_to_the_same_logits(pair, tmp_path):
    hf, ours, _ = pair
    frugallm.to_hf(ours, tmp_path / "out")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back) is DeepseekV32ForCausalLM and back.config.index_topk == TOPK
    assert back.model.layers[0].self_attn.indexer.weights_proj.weight.dtype == torch.float32
    ids = torch.randint(0, 101, (2, 30))
    with torch.no_grad():
        assert _rel(back(ids).logits, hf(ids).logits) <= 1e-5


def test_mtp_layer_with_its_indexer_round_trips(tmp_path):
    model = Transformer(tiny_config(index_topk=4, index_n_heads=4, index_head_dim=12, n_mtp=1, init_std=0.2))
    frugallm.to_hf(model, tmp_path / "hf")
    keys = load_file(tmp_path / "hf" / "model.safetensors").keys()
    L = model.config.n_layers
    assert {f"model.layers.{L}.eh_proj.weight", f"model.layers.{L}.self_attn.indexer.wq_b.weight",
            "model.layers.0.self_attn.indexer.k_norm.bias"} <= set(keys)
    loaded = frugallm.from_hf(tmp_path / "hf")
    assert loaded.config == model.config
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]  # MTP self-speculative decoding (its block has an indexer too)
    stats = {}
    drafted = frugallm.generate(loaded, prompts, 20, speculative=True, stats=stats)
    assert torch.equal(drafted, frugallm.generate(loaded, prompts, 20)) and stats["accepted"] > 0


def test_fp8_indexer_weights_load_dequantized_and_as_codes(pair, tmp_path):
    _, ours, path = pair
    tensors = load_file(path / "model.safetensors")
    key = "model.layers.1.self_attn.indexer.wq_b.weight"  # (128, 16): one ragged 128x128 block
    w = tensors[key]
    scale = w.abs().max() / 448
    tensors[key] = (w / scale).to(torch.float8_e4m3fn)
    tensors[key + "_scale_inv"] = scale.reshape(1, 1).float()
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    loaded = frugallm.from_hf(tmp_path)
    assert torch.equal(loaded.layers[1].attn.indexer.wq_b.weight, tensors[key].float() * scale)
    from frugallm.kernels.quantize import quantize_model

    ours_copy = Transformer.from_state_dict(ours.config, {k: v.clone() for k, v in ours.state_dict().items()})
    quantize_model(ours_copy, "fp8")  # the indexer's wq_b and wk too: they are nn.Linear
    frugallm.to_hf(ours_copy, tmp_path / "fp8")
    assert "model.layers.1.self_attn.indexer.wk.weight_scale_inv" in load_file(tmp_path / "fp8" / "model.safetensors")
    codes = frugallm.from_hf(tmp_path / "fp8", quantized=True)
    ids = torch.randint(0, 101, (1, 20))
    with torch.no_grad():
        assert torch.allclose(codes(ids).logits, ours_copy(ids).logits, rtol=1e-5, atol=1e-5)


def _cached_run(model, ids, chunks, absorb=None):
    """Logits of ids read through a KVCache in `chunks` (token counts per forward)."""
    cache = KVCache(model.config, ids.shape[0], 64)
    out, at = [], 0
    with torch.no_grad():
        for n in chunks:
            out.append(model(ids[:, at:at + n], cache=cache, absorb=absorb).logits)
            at += n
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("heads", [1, 8])  # 1 indexer head: many exact-zero ties at the top-k boundary
def test_cached_decode_equals_full_forward(heads):
    model = Transformer(tiny_config(index_topk=6, index_n_heads=heads, index_head_dim=8, init_std=0.2)).eval()
    ids = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        full = model(ids).logits
    assert _rel(_cached_run(model, ids, [3] + [1] * 37), full) <= 1e-5  # decode from below index_topk
    assert _rel(_cached_run(model, ids, [17, 5] + [1] * 18, absorb=True), full) <= 1e-5
    assert model.layers[0].attn.indexer is not None
    cache = KVCache(model.config, 1, 64)
    assert cache.index_k is not None and cache.values_per_token() == 3 * (32 + 8 + 8)


def test_ties_go_to_the_earliest_keys_whatever_the_row_length():
    scores = torch.tensor([[[3.0, 0.0, 0.0, 5.0, 0.0, 0.0, -1.0]]])
    visible = torch.tensor([[True] * 6 + [False]])
    assert select(scores, 3, visible).tolist() == [[[True, True, False, True, False, False, False]]]
    assert select(scores[..., :5], 3).tolist() == [[[True, True, False, True, False]]]
    few = torch.tensor([[True, True, False, False, False, False, False]])  # fewer visible than k: all of them
    assert select(scores, 3, few).tolist() == [[[True, True, False, False, False, False, False]]]


def test_top_rows_lists_the_kept_keys_in_order_and_pads():
    keep = torch.tensor([[[True, False, True, True, False], [False, True, False, False, False]]])
    idx, valid = top_rows(keep, 3)
    assert idx.tolist() == [[[0, 2, 3], [1, 0, 0]]]
    assert valid.tolist() == [[[True, True, True], [True, False, False]]]


def _ragged_decode(model, ids, lengths, steps):
    """Logits (B, steps, V) of absorbed decode steps after a right-padded prefill whose rows keep only
    their first lengths[b] tokens: row b then feeds ids[b, lengths[b] + i] at its own position."""
    B = ids.shape[0]
    cache = KVCache(model.config, B, 64)
    lengths = torch.tensor(lengths)
    out = []
    with torch.no_grad():
        model(ids[:, :int(lengths.max())], cache=cache)
        cache.lengths.copy_(lengths)
        for i in range(steps):
            out.append(model(ids.gather(1, (lengths + i)[:, None]), cache=cache, absorb=True).logits)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("heads", [1, 8])  # 1 indexer head: ties at the top-k boundary
def test_gathered_sparse_attention_equals_the_masked_twin(monkeypatch, heads):
    """The absorbed path reading only each query's k kept latent rows (MLA._over_rows) against the same path
    over all rows under the top-k mask (GATHER_RATIO 0: never gather): full-forward logits, and cached
    decode of rows of different lengths, from prompts shorter (3, 5) and longer (20) than index_topk 6."""
    model = Transformer(tiny_config(index_topk=6, index_n_heads=heads, index_head_dim=8, init_std=0.2)).eval()
    ids = torch.randint(0, 97, (3, 40))
    gathered = []
    over_rows = attention.MLA._over_rows
    monkeypatch.setattr(attention.MLA, "_over_rows", lambda *a: gathered.append(1) or over_rows(*a))

    def run(ratio):
        monkeypatch.setattr(attention, "GATHER_RATIO", ratio)
        with torch.no_grad():
            full = model(ids, absorb=True).logits
        return full, _ragged_decode(model, ids, [3, 20, 5], 16)

    masked = run(0)
    assert not gathered
    sparse = run(10 ** 9)  # every absorbed call past index_topk gathers
    assert len(gathered) == 3 * 17
    assert _rel(sparse[0], masked[0]) <= 1e-5 and _rel(sparse[1], masked[1]) <= 1e-5
    gathered.clear()
    monkeypatch.setattr(attention, "GATHER_RATIO", 4)  # the default: every decode step gathers, S = 40 does not
    with torch.no_grad():
        assert _rel(model(ids, absorb=True).logits, masked[0]) <= 1e-5 and not gathered
    assert _rel(_ragged_decode(model, ids, [3, 20, 5], 16), masked[1]) <= 1e-5 and len(gathered) == 3 * 16


def test_transformers_topk_ties_depend_on_the_sequence_length(tmp_path):
    """Why transformers' cached decode can disagree with its full forward: with 1 indexer head, exact-zero
    ties at the k-th score are common, and torch.topk's choice among them changes with the row's length,
    so even its full forward changes the logits of earlier positions when one token is appended."""
    hf = make_hf(tmp_path, index_n_heads=1, num_hidden_layers=2)
    ids = torch.randint(0, 101, (4, 41))
    with torch.no_grad():
        short, long = hf(ids[:, :40]).logits, hf(ids).logits[:, :40]
    assert (short - long).abs().max() > 1e-3  # causal in theory, not in fact


def test_v32_preset_counts_the_release_parameters():
    with torch.device("meta"):
        release = DeepseekV32ForCausalLM(DeepseekV32Config())  # transformers' defaults: DeepSeek-V3.2's sizes
    n = sum(p.numel() for p in release.parameters()) + sum(
        b.numel() for name, b in release.named_buffers() if name.endswith("e_score_correction_bias"))
    assert frugallm.count_params(frugallm.get_preset("v32"))["total"] == n == 671_877_944_064
    assert hf_v32.DeepseekV32Indexer  # the oracle of this file


def test_weights_proj_stays_fp32_when_the_model_is_cast():
    model = Transformer(frugallm.get_preset("tiny-v32")).to(torch.bfloat16)
    ix = model.layers[0].attn.indexer
    assert ix.weights_proj.weight.dtype == torch.float32 and ix.wq_b.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 4096, (1, 200))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits.float()).all()
    assert model.double().layers[0].attn.indexer.weights_proj.weight.dtype == torch.float64


@pytest.mark.parametrize("changes, message", [
    (dict(index_topk=-1), "index_topk=-1 must be >= 0"),
    (dict(index_topk=8, q_lora_rank=0, index_n_heads=2, index_head_dim=8), "needs q_lora_rank > 0"),
    (dict(index_topk=8, index_head_dim=8), "index_n_heads=0 must be > 0"),
    (dict(index_topk=8, index_n_heads=2, index_head_dim=4), "index_head_dim=4 must be >= qk_rope_head_dim=8"),
])
def test_bad_dsa_configs_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**changes)


def test_dsa_with_a_v2_router_cannot_be_exported(tmp_path):
    model = Transformer(tiny_config(index_topk=4, index_n_heads=2, index_head_dim=8, score_func="softmax",
                                    group_score="max", gate_bias=False, norm_topk_prob=False))
    with pytest.raises(ValueError, match="only as deepseek_v32"):
        frugallm.to_hf(model, tmp_path / "x")
