"""Hugging Face DeepSeek-V2/V3 interop: same logits both ways, MTP, FP8, shards, refusals."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

import frugallm
from frugallm import Transformer
from frugallm.formats.hf import hf_key

from conftest import tiny_config

# YaRN with mscale == mscale_all_dim and max_position = factor * original: every transformers
# version agrees with the reference semantics there (docs/design/rope-yarn.md).
COMMON = dict(
    vocab_size=101, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
    first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
    n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2, kv_lora_rank=8,
    qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, max_position_embeddings=64, num_nextn_predict_layers=0,
    rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32,
                  "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
)


def make_hf(kind: str, q_lora_rank, path, **save_kwargs):
    if kind == "v3":
        model = DeepseekV3ForCausalLM(DeepseekV3Config(**COMMON, q_lora_rank=q_lora_rank, routed_scaling_factor=2.5))
    else:
        model = DeepseekV2ForCausalLM(DeepseekV2Config(**COMMON, q_lora_rank=q_lora_rank, routed_scaling_factor=1.0,
                                                       topk_method="group_limited_greedy"))
    with torch.no_grad():  # larger-than-init weights, so routing and attention are far from uniform
        for name, p in model.named_parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
        if kind == "v3":
            for layer in model.model.layers[1:]:
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.5)  # non-zero: selection changes
    model.eval().save_pretrained(path, **save_kwargs)
    return model


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("kind", ["v3", "v2"])
@pytest.mark.parametrize("q_lora_rank", [None, 16])
def test_logits_match_transformers_both_directions(kind, q_lora_rank, tmp_path):
    hf = make_hf(kind, q_lora_rank, tmp_path / "hf")
    ours = frugallm.from_hf(tmp_path / "hf")
    assert ours.config.q_lora_rank == (q_lora_rank or 0) and ours.config.rope_scaling == "yarn"
    ids = torch.randint(0, 101, (2, 24))
    with torch.no_grad():
        ref = hf(ids).logits
        logits = ours(ids).logits
        assert logits.shape == (2, 24, 101)
        assert _rel(logits, ref) <= 1e-4
        assert _rel(ours(ids, absorb=True).logits, ref) <= 1e-4
        frugallm.to_hf(ours, tmp_path / "out")
        back = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
        assert type(back) is type(hf)
        assert _rel(back(ids).logits, ref) <= 1e-4


def test_mtp_layer_round_trips(tmp_path):
    model = Transformer(tiny_config(n_mtp=2))
    frugallm.to_hf(model, tmp_path / "hf")
    keys = load_file(tmp_path / "hf" / "model.safetensors").keys()
    L = model.config.n_layers
    for k in range(2):
        assert {f"model.layers.{L + k}.eh_proj.weight", f"model.layers.{L + k}.shared_head.head.weight",
                f"model.layers.{L + k}.embed_tokens.weight", f"model.layers.{L + k}.mlp.experts.0.up_proj.weight"} <= set(keys)
    loaded = frugallm.from_hf(tmp_path / "hf")
    assert loaded.config.n_mtp == 2
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n


def _declare_mtp(path, n=1) -> dict:
    config = json.loads((path / "config.json").read_text())
    config["num_nextn_predict_layers"] = n
    (path / "config.json").write_text(json.dumps(config))
    return config


def test_hf_checkpoint_with_mtp_tensors_loads_them(tmp_path):
    make_hf("v3", 16, tmp_path)  # transformers itself drops the MTP layer; add one as V3 ships it
    config = _declare_mtp(tmp_path)
    donor = Transformer(frugallm.formats.hf.config_from_hf(config))
    tensors = load_file(tmp_path / "model.safetensors")
    for name, t in donor.state_dict().items():
        if name.startswith("mtp."):
            key = hf_key(name, donor.config.n_layers)
            tensors.update({key.format(e=e): t[e] for e in range(len(t))} if "{e}" in key else {key: t})
    save_file(tensors, tmp_path / "model.safetensors")
    loaded = frugallm.from_hf(tmp_path)
    assert torch.equal(loaded.mtp[0].eh_proj.weight, donor.mtp[0].eh_proj.weight)
    assert torch.equal(loaded.mtp[0].block.ffn.experts.w2, donor.mtp[0].block.ffn.experts.w2)


def test_missing_mtp_layer_warns_and_disables_it(tmp_path):
    make_hf("v3", None, tmp_path)
    _declare_mtp(tmp_path)
    with pytest.warns(UserWarning, match="num_nextn_predict_layers=1 but .* holds 0 MTP"):
        assert frugallm.from_hf(tmp_path).config.n_mtp == 0


def test_fp8_block_quantized_weights_are_dequantized(tmp_path):
    hf = make_hf("v3", 16, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    key = "model.layers.1.self_attn.q_b_proj.weight"  # (24, 16): one ragged 128x128 block
    w = tensors[key]
    scale = w.abs().max().clamp(min=1e-4) / 448
    q = (w / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    tensors[key] = q
    tensors[key + "_scale_inv"] = scale.reshape(1, 1).float()
    save_file(tensors, tmp_path / "model.safetensors")
    loaded = frugallm.from_hf(tmp_path)
    assert torch.equal(loaded.layers[1].attn.wq_b.weight, q.float() * scale)
    assert _rel(loaded.layers[1].attn.wq_b.weight, w) < 0.07  # e4m3 has a 3-bit mantissa


def test_block_dequant_with_ragged_edges():
    from frugallm.kernels.fp8 import weight_dequant

    q = torch.randn(200, 130).to(torch.float8_e4m3fn)
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    w = weight_dequant(q, s)
    assert torch.equal(w[:128, :128], q[:128, :128].float())
    assert torch.equal(w[128:, 128:], q[128:, 128:].float() * 4)
    with pytest.raises(ValueError, match=r"expected \(2, 2\)"):
        weight_dequant(q, torch.ones(1, 2))


def test_sharded_checkpoint_loads(tmp_path):
    hf = make_hf("v3", 16, tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ids = torch.randint(0, 101, (1, 10))
    with torch.no_grad():
        assert _rel(frugallm.from_hf(tmp_path)(ids).logits, hf(ids).logits) <= 1e-4


def test_unrepresentable_models_are_refused(tmp_path):
    with pytest.raises(ValueError, match="cannot be exported"):
        frugallm.to_hf(Transformer(tiny_config(gate_bias=False)), tmp_path / "a")
    with pytest.raises(ValueError, match="dense model"):
        frugallm.to_hf(Transformer(tiny_config(n_routed_experts=0)), tmp_path / "b")
    assert not (tmp_path / "a").exists()


def test_unmapped_tensors_are_an_error(tmp_path):
    make_hf("v2", None, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.extra"] = torch.zeros(2)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="does not map"):
        frugallm.from_hf(tmp_path)


def test_bf16_load_keeps_gate_bias_fp32(tmp_path):
    make_hf("v3", 16, tmp_path)
    model = frugallm.from_hf(tmp_path, dtype=torch.bfloat16)
    assert model.layers[1].ffn.experts.w1.dtype == torch.bfloat16
    assert model.layers[1].ffn.gate.bias.dtype == torch.float32


@pytest.mark.parametrize("rope", [
    {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 16, "mscale": 1.0, "mscale_all_dim": 1.0},
    {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 16, "mscale": 0.707, "mscale_all_dim": 0.707},
    {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16},  # both mscale keys missing
    {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "mscale_all_dim": 1.0},  # one missing
])
def test_rope_frequencies_and_attention_factor_match_transformers(rope):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from frugallm.formats.hf import config_from_hf
    from frugallm.model.rope import inv_freq, rope_attn_factor

    hf_config = DeepseekV3Config(**{**COMMON, "rope_scaling": rope, "max_position_embeddings": 640})
    ref_freq, ref_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config)
    ours = config_from_hf(hf_config.to_dict())
    assert torch.allclose(inv_freq(ours), ref_freq, rtol=1e-6)
    assert rope_attn_factor(ours) == pytest.approx(ref_factor, rel=1e-12)


def test_an_export_carries_a_tokenizer_that_autotokenizer_loads_as_is(tiny_run, tmp_path):
    """to_hf(tokenizer=RUN) writes tokenizer.json and tokenizer_config.json: bos added in front of a text
    as frugallm adds it, the special tokens and frugallm's chat template as Jinja, so AutoTokenizer (and
    vLLM, lm-eval's hf backend) gives the same ids for the same text and builds the same prompts."""
    import frugallm
    from frugallm.tokenizer import load_tokenizer

    transformers = pytest.importorskip("transformers")
    out = frugallm.to_hf(frugallm.load(tiny_run), tmp_path / "hf", tokenizer=tiny_run)
    ours = load_tokenizer(tiny_run)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (ours.bos_id, ours.eos_id, ours.pad_id)
    for text in ("def main(", "the cat sat", ""):  # frugallm's own encoding (generate, serve): bos + text
        assert theirs(text).input_ids == [ours.bos_id, *ours.encode(text)]
    assert theirs.encode("the cat sat", add_special_tokens=False) == ours.encode("the cat sat")
    assert load_tokenizer(out).encode("the cat") == ours.encode("the cat")  # frugallm reads it back the same
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat"},
                {"role": "assistant", "content": "sat"}, {"role": "user", "content": "on a mat"}]
    ids = ours.encode_chat(messages)
    rendered = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert theirs.encode(rendered, add_special_tokens=False) == ids
    assert load_tokenizer(out).encode_chat(messages) == ids  # the export's template path: the same ids


def test_an_export_is_a_complete_folder_with_the_usual_permissions(tiny_run, tmp_path, monkeypatch):
    """The README's call writes a folder that AutoTokenizer loads, whose README.md explains the MTP layer's
    UNEXPECTED weights, with the modes of files the user made (mkdtemp's 0700 and safetensors' 0600 were
    kept before); without a tokenizer, a warning says how to pass one."""
    import os
    import stat

    import frugallm

    model = frugallm.load(tiny_run)
    old = os.umask(0o027)
    try:
        notes = []
        out = frugallm.to_hf(model, tmp_path / "hf", tokenizer=tiny_run, log=notes.append)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {
        name: 0o640 for name in ("README.md", "config.json", "manifest.json", "model.safetensors",
                                 "tokenizer.json", "tokenizer_config.json")}
    card = (out / "README.md").read_text()
    assert "UNEXPECTED" in card and "model.layers.2" in card and "main model" in card and "MTP" in card
    assert len(notes) == 1 and "UNEXPECTED" in notes[0]
    with pytest.warns(UserWarning, match="no tokenizer.*tokenizer="):
        bare = frugallm.to_hf(model, tmp_path / "bare")
    assert stat.S_IMODE(bare.stat().st_mode) == 0o777 & ~old
    assert not (bare / "tokenizer.json").exists() and "tokenizer=RUN" in (bare / "README.md").read_text()
