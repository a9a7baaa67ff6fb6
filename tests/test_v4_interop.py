"""DeepSeek-V4 interop (formats/hf_v4.py): tiny deepseek_v4 models written by transformers load to the same
logits (fp32, sequences past the sliding window, both compression rates, more CSA entries than the indexer
keeps), to_hf writes what transformers loads back, the MTP layer and FP8 scales round trip, presets count
the release's parameters."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import frugallm
from frugallm import Transformer, count_params, get_preset
from frugallm.formats.hf_config import config_from_hf, hf_format

hf_v4 = pytest.importorskip("transformers.models.deepseek_v4.modeling_deepseek_v4")
from transformers import AutoModelForCausalLM, DeepseekV4Config, DeepseekV4ForCausalLM  # noqa: E402

TYPES = ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention", "compressed_sparse_attention"]
V, WIN, CSA, HCA, TOPK = 61, 8, 4, 8, 3


def _hf_config(**changes):
    kw = dict(vocab_size=V, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, head_dim=16,
              partial_rotary_factor=0.5, q_lora_rank=24, o_groups=2, o_lora_rank=12, sliding_window=WIN,
              layer_types=TYPES, compress_rates={TYPES[1]: CSA, TYPES[2]: HCA}, index_n_heads=8, index_head_dim=12,
              index_topk=TOPK, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
              mlp_layer_types=["hash_moe", "moe", "moe", "moe"], max_position_embeddings=128,
              num_nextn_predict_layers=0, rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32,
                                                           "beta_slow": 1, "original_max_position_embeddings": 32})
    kw.update(changes)
    cfg = DeepseekV4Config(**kw)
    cfg._attn_implementation = "eager"
    return cfg


def _randomise(model):
    """Trained-looking weights: routing, sinks, position biases and mHC far from their init."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.dim() > 1 else 0.5))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.3)
            elif name.endswith("tid2eid"):
                b.copy_(torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(V)]))
    return model.eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("v4") / "hf"
    torch.manual_seed(0)
    theirs = _randomise(DeepseekV4ForCausalLM(_hf_config()))
    theirs.save_pretrained(path)
    return theirs, frugallm.from_hf(path), path


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("S", [5, 43])
def test_logits_equal_transformers(pair, S):
    """S = 43: past the window of 8, 10 CSA entries (more than the top-3), 5 HCA entries, 3 tokens past the
    last closed window; S = 5: inside the window, no entry closed yet."""
    theirs, ours, _ = pair
    assert [blk.attn.kind for blk in ours.layers] == ["sliding", "csa", "hca", "csa"]
    assert ours.config.n_hash_layers == 1 and ours.config.rope_scaling == "yarn"
    ids = torch.randint(0, V, (2, S), generator=torch.Generator().manual_seed(S))
    with torch.no_grad():
        assert _rel(ours(ids).logits, theirs(ids).logits) < 1e-5


def test_to_hf_writes_what_transformers_loads_to_the_same_logits(pair, tmp_path):
    theirs, ours, _ = pair
    frugallm.to_hf(ours, tmp_path / "out")
    keys = load_file(tmp_path / "out" / "model.safetensors").keys()
    assert {"embed.weight", "hc_head_fn", "layers.1.hc_attn_base", "layers.0.ffn.gate.tid2eid",
            "layers.1.attn.indexer.compressor.wkv.weight", "layers.2.ffn.experts.7.w3.weight"} <= set(keys)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back) is DeepseekV4ForCausalLM
    ids = torch.randint(0, V, (2, 43))
    with torch.no_grad():
        assert _rel(back(ids).logits, theirs(ids).logits) < 1e-5
    again = frugallm.from_hf(tmp_path / "out")
    for (n, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n


def test_mtp_layer_round_trips_and_transformers_ignores_it(pair, tmp_path):
    _, ours, _ = pair
    cfg = ours.config.replace(n_mtp=1, layer_types=ours.config.layer_types + ("sliding",))
    model = Transformer(cfg)
    frugallm.to_hf(model, tmp_path / "hf")
    keys = set(load_file(tmp_path / "hf" / "model.safetensors").keys())
    assert {"mtp.0.e_proj.weight", "mtp.0.h_proj.weight", "mtp.0.enorm.weight", "mtp.0.norm.weight",
            "mtp.0.attn.wq_a.weight", "mtp.0.hc_ffn_fn", "mtp.0.ffn.experts.0.w1.weight"} <= keys
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["compress_ratios"] == [0, CSA, HCA, CSA, 0]
    assert "mtp.0" in (tmp_path / "hf" / "README.md").read_text()
    loaded = frugallm.from_hf(tmp_path / "hf")
    assert loaded.config.n_mtp == 1 and loaded.config.layer_types == cfg.layer_types
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()  # mtp.* ignored, as the release's
    ids = torch.randint(0, V, (1, 20))
    with torch.no_grad():
        assert _rel(back(ids).logits, model.eval()(ids).logits) < 1e-5


def test_a_release_mtp_layer_with_its_own_hyper_head_is_left_out(pair, tmp_path):
    """The release's MTP block ends in its own hyper head (mtp.0.hc_head_*), which frugallm's MTP does not
    model: loading warns and drops the MTP layer rather than run it wrongly."""
    _, _, path = pair
    tensors = load_file(path / "model.safetensors")
    tensors.update({"mtp.0.e_proj.weight": torch.zeros(32, 32), "mtp.0.hc_head_fn": torch.zeros(4, 128)})
    save_file(tensors, tmp_path / "model.safetensors")
    config = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    with pytest.warns(UserWarning, match="own hyper head"):
        assert frugallm.from_hf(tmp_path).config.n_mtp == 0


def test_fp8_scales_round_trip_in_the_release_layout(pair, tmp_path):
    from frugallm.kernels.quantize import quantize_model

    _, ours, path = pair
    cfg = ours.config.replace(n_mtp=1, layer_types=ours.config.layer_types + ("sliding",))
    model = Transformer(cfg).eval()
    quantize_model(model, "fp8")
    frugallm.to_hf(model, tmp_path / "fp8")
    tensors = load_file(tmp_path / "fp8" / "model.safetensors")
    assert tensors["layers.1.attn.wq_a.weight"].dtype == torch.float8_e4m3fn
    assert tensors["layers.1.attn.wq_a.scale"].dtype == torch.float32  # NAME.scale, as the release names it
    assert "layers.1.ffn.experts.3.w2.scale" in tensors and "mtp.0.e_proj.weight" in tensors
    codes = frugallm.from_hf(tmp_path / "fp8", quantized=True)
    plain = frugallm.from_hf(tmp_path / "fp8", quantized=False)
    ids = torch.randint(0, V, (1, 30))
    with torch.no_grad():
        want = model(ids).logits
        assert torch.allclose(codes(ids).logits, want, rtol=1e-5, atol=1e-5)
        assert torch.allclose(plain(ids).logits, want, rtol=1e-5, atol=1e-5)
    # a release-style FP8 tensor beside a transformers-written directory's weights: dequantized per block
    tensors = load_file(path / "model.safetensors")
    key = "model.layers.1.attn.wq_b.weight"  # (64, 24): one ragged 128x128 block
    w = tensors[key]
    scale = w.abs().max() / 448
    tensors[key] = (w / scale).to(torch.float8_e4m3fn)
    tensors["model.layers.1.attn.wq_b.scale"] = scale.reshape(1, 1).float()
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    loaded = frugallm.from_hf(tmp_path)
    assert torch.equal(loaded.layers[1].attn.wq_b.weight, tensors[key].float() * scale)


def test_frugallm_load_opens_a_v4_directory(pair):
    _, ours, path = pair
    opened = frugallm.formats.open.open(path)
    assert opened.deepseek and opened.config.attention == "hybrid"
    model = frugallm.load(path)
    ids = torch.randint(0, V, (1, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ours(ids).logits)


def test_the_release_config_form_reads_as_transformers_does():
    """The release's config.json keys (compress_ratios with the MTP block's entry, num_hash_layers,
    qk_rope_head_dim, a top-level rope_scaling) give the config transformers' form gives."""
    release = dict(model_type="deepseek_v4", vocab_size=V, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                   head_dim=16, qk_rope_head_dim=8, q_lora_rank=24, o_groups=2, o_lora_rank=12, sliding_window=WIN,
                   compress_ratios=[0, 4, 128, 4, 0], num_hash_layers=1, index_n_heads=8, index_head_dim=12,
                   index_topk=TOPK, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                   max_position_embeddings=128, num_nextn_predict_layers=1,
                   rope_scaling={"type": "yarn", "factor": 4.0, "beta_fast": 32, "beta_slow": 1,
                                 "original_max_position_embeddings": 32})
    theirs = DeepseekV4Config(**{k: v for k, v in release.items() if k != "model_type"})
    ours = config_from_hf(release)
    assert ours.layer_types == ("sliding", "csa", "hca", "csa", "sliding")
    assert [t for t in theirs.layer_types] == [{"sliding": TYPES[0], "csa": TYPES[1], "hca": TYPES[2]}[k]
                                               for k in ours.layer_types[:4]]
    assert ours.n_hash_layers == theirs.mlp_layer_types.count("hash_moe") == 1
    assert (ours.qk_rope_head_dim, ours.rope_factor, ours.original_seq_len) == (theirs.qk_rope_head_dim, 4.0, 32)
    assert theirs.rope_parameters["compress"]["rope_type"] == "yarn"


def test_tiny_v4_exports_and_models_it_cannot_hold_are_refused(tmp_path):
    cfg = get_preset("tiny-v4")
    assert hf_format(cfg) == "deepseek_v4"
    for changes, field in [(dict(residual="plain", hc_form="paper"), "residual='plain'"),
                           (dict(n_dense_layers=1), "n_dense_layers=1"),
                           (dict(n_expert_groups=4, n_limited_groups=2), "n_expert_groups=4")]:
        with pytest.raises(ValueError, match=f"deepseek_v4, which cannot hold .*{field}"):
            hf_format(cfg.replace(**changes))


# --- presets --------------------------------------------------------------------------------

def test_v4_presets_count_the_published_parameters():
    """DeepSeek-V4-Flash: 284B total, 13B activated; V4-Pro: 1.6T total, 49B activated (the release's model
    cards). Totals as for V3 (gate biases in, MTP out; the frozen tid2eid tables are not parameters); the
    activated figures read the active count less the input embedding (a lookup, no matmul), as V3's 37B does."""
    for name, total, active in [("v3", 671e9, 37e9), ("v4-flash", 284e9, 13e9), ("v4-pro", 1.6e12, 49e9)]:
        cfg = get_preset(name)
        counts = count_params(cfg)
        digits = 1e9 if total < 1e12 else 1e11
        assert round(counts["total"] / digits) == round(total / digits), name
        assert round((counts["active"] - cfg.vocab_size * cfg.dim) / 1e9) == round(active / 1e9), name
    assert count_params(get_preset("v4-flash"))["total"] == 284_332_240_471
    assert count_params(get_preset("v4-pro"))["total"] == 1_572_973_210_339


@pytest.mark.parametrize("name", ["v4-flash", "v4-pro"])
def test_v4_presets_count_what_transformers_builds(name):
    """The preset's config.json, built by transformers on the meta device, has the preset's parameters
    (MTP excluded, as transformers has none): the same modules on both sides."""
    cfg = get_preset(name)
    with torch.device("meta"):
        release = DeepseekV4ForCausalLM(DeepseekV4Config(**frugallm.formats.hf_v4.config_to_v4(cfg, torch.bfloat16)))
    n = sum(p.numel() for p in release.parameters()) + sum(
        b.numel() for name, b in release.named_buffers() if name.endswith("e_score_correction_bias"))
    assert count_params(cfg)["total"] == n


# --- FLOPs ----------------------------------------------------------------------------------

def test_hybrid_attention_flops_follow_the_window_the_top_k_and_the_rates():
    from frugallm.model.flops import attention_flops_per_token, hybrid_layer_flops, matmul_params

    cfg = get_preset("v4-flash")
    per_key, M = 2 * cfg.n_heads * 2 * cfg.head_dim, 1 << 20
    flops = lambda kind, S: hybrid_layer_flops(cfg, kind, S)  # noqa: E731
    assert flops("sliding", 64) == per_key * 32  # inside the window: S/2 keys on average
    assert flops("sliding", M) == pytest.approx(per_key * (128 - 128 ** 2 / (2 * M)))  # the window, not the context
    assert flops("hca", M) - flops("sliding", M) == pytest.approx(per_key * M / 128 / 2)  # every HCA entry
    index = 2 * cfg.index_n_heads * (cfg.index_head_dim + 1) * M / 4 / 2
    assert flops("csa", M) - flops("sliding", M) - index == pytest.approx(per_key * (512 - 512 ** 2 / (2 * M / 4)))
    assert attention_flops_per_token(cfg, M) == sum(flops(k, M) for k in cfg.layer_types)

    def forward(name):  # one forward token averaged over a 1M-token sequence, without MTP
        c = get_preset(name)
        c = c.replace(n_mtp=0, **({"layer_types": c.layer_types[:c.n_layers]} if c.layer_types else {}))
        return 2 * matmul_params(c) + attention_flops_per_token(c, M)

    assert 0.30 < forward("v4-pro") / forward("v32") < 0.34  # model/flops.py's header


def test_estimate_reads_v4s_published_token_count():
    from frugallm.model.flops import train_flops_per_token
    from frugallm.train.estimate import PUBLISHED, run_estimate

    for name in ("v4-flash", "v4-pro"):
        assert [p.tokens for p in PUBLISHED[name].phases] == [32e12]
    est = run_estimate(get_preset("v4-flash"), "v4-flash", tokens=None, seq_len=None, gpu="h800", gpus=2048, mfu=None,
                       price=None, published=PUBLISHED["v4-flash"])
    flops = est["rows"][0]["flops_per_token"]
    assert flops == train_flops_per_token(get_preset("v4-flash"), 4096)
    assert est["gpu_hours"] == pytest.approx(32e12 * flops / (0.4 * 989e12) / 3600)
