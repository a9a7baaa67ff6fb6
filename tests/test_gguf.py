"""GGUF both ways (issue 28): `frugallm export --to gguf` writes llama.cpp's deepseek2 layout, the gguf
package's own reader accepts every type, and `frugallm.load("x.gguf")` gives the weights back: exactly at
f32, the file's int8 codes at q8_0. Agreement with llama.cpp itself: tests/test_gguf_llamacpp.py."""

import json

import numpy as np
import pytest
import torch

import frugallm
from frugallm.cli import main
from frugallm.formats.checkpoint import load_tokenizer
from frugallm.formats.gguf import TYPES, write_gguf
from frugallm.formats.open import open as open_model
from frugallm.kernels.quantize import QuantExperts, QuantLinear, quantize_model
from frugallm.tokenizer import train_tokenizer

from conftest import tiny_config

gguf = pytest.importorskip("gguf")

TEXTS = ["def main(argv):\n    return [x ** 2 for x in argv if x]  # squares\n",
         "Ünïcödé — 世界 🎉 naïve café, Ελληνικά and עברית\n", "\t\tindented   runs    of\n\n\n   spaces  \n",
         "literal specials stay text: <|bos|> <|eos|> <|user|>\n", "numbers 12345 3.14159 0x1F and 'quotes' don't"]
VARIED = "".join(TEXTS) + "    \n\t \u00a0 trailing"


def gguf_config(**overrides):
    """Dimensions that split into q8_0's 32-blocks (so every weight is quantized), a dense layer, MoE with
    groups, a shared expert and the selection bias, and MTP (which the GGUF leaves out)."""
    base = dict(vocab_size=320, dim=64, inter_dim=96, n_heads=2, q_lora_rank=32, kv_lora_rank=32,
                qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, moe_inter_dim=32, max_seq_len=128)
    return tiny_config(**base | overrides)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(iter(TEXTS * 20), 310)


def random_model(cfg):
    torch.manual_seed(0)
    model = frugallm.Transformer(cfg).eval()
    with torch.no_grad():  # the bias is zero at init: a real one tests that it is written and used
        for name, b in model.named_buffers():
            if name.endswith("gate.bias"):
                b.normal_(0, 0.1)
    return model


def logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return (out if torch.is_tensor(out) else out.logits).float()


@pytest.mark.parametrize("kind", TYPES)
def test_the_gguf_reader_accepts_every_type_and_frugallm_loads_it(kind, tokenizer, tmp_path):
    cfg = gguf_config()
    model = random_model(cfg)
    path = write_gguf(model, tokenizer, tmp_path / f"m-{kind}.gguf", kind)
    r = gguf.GGUFReader(path)
    fields = {name: f.contents() for name, f in r.fields.items() if name not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")}
    assert fields["general.architecture"] == "deepseek2"
    assert fields["deepseek2.attention.key_length_mla"] == 48 and fields["deepseek2.attention.value_length_mla"] == 32
    assert fields["deepseek2.expert_gating_func"] == 2 and fields["deepseek2.expert_weights_norm"] is True
    assert fields["deepseek2.expert_group_count"] == 4 and fields["tokenizer.ggml.pre"] == "gpt-2"
    names = {t.name: t for t in r.tensors}
    assert {"blk.1.attn_k_b.weight", "blk.1.attn_v_b.weight", "blk.1.ffn_gate_exps.weight",
            "blk.1.ffn_up_shexp.weight", "blk.1.exp_probs_b.bias", "blk.0.ffn_gate.weight"} <= set(names)
    assert not any("nextn" in n or "kv_b" in n for n in names)  # no MTP; kv_b split
    assert list(names["blk.1.ffn_gate_exps.weight"].shape) == [64, 32, 8]  # ne: d, I, E
    want = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0"}[kind]
    assert names["blk.1.ffn_down_exps.weight"].tensor_type.name == want
    assert names["blk.1.attn_norm.weight"].tensor_type.name == names["blk.1.ffn_gate_inp.weight"].tensor_type.name == "F32"

    loaded = frugallm.load(path)
    assert loaded.config == cfg.replace(n_mtp=0)
    ids = torch.tensor([tokenizer.encode(VARIED)[:100]])
    err = (logits(loaded, ids) - logits(model, ids)).abs().max() / logits(model, ids).abs().max()
    assert err <= {"f32": 0, "f16": 1e-3, "bf16": 1e-2, "q8_0": 2e-2, "q4_0": 0.2}[kind], err


def test_f32_round_trip_is_exact_with_the_tokenizer(tokenizer, tmp_path):
    cfg = gguf_config(rope_scaling="yarn", rope_factor=4.0, original_seq_len=32, mscale=0.707, mscale_all_dim=0.707)
    model = random_model(cfg)
    path = write_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    back = frugallm.load(path)
    assert back.config == cfg.replace(n_mtp=0)
    ours, theirs = model.state_dict(), back.state_dict()
    assert set(theirs) == {k for k in ours if not k.startswith("mtp.")}
    assert all(torch.equal(ours[k], theirs[k]) and ours[k].dtype == theirs[k].dtype for k in theirs)
    tok = load_tokenizer(path)
    assert tok.encode(VARIED) == tokenizer.encode(VARIED) and tok.vocab_size == tokenizer.vocab_size
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "<|eos|> hi"}]
    assert tok.encode_chat(chat) == tokenizer.encode_chat(chat)
    assert tok.decode(tok.encode(VARIED)) == VARIED


def _file_codes(path, name):
    """The int8 codes and f16 scales of a q8_0 tensor, read with the gguf package alone."""
    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == name)
    shape = tuple(int(n) for n in reversed(t.shape))
    blocks = np.asarray(t.data).reshape(*shape[:-1], shape[-1] // 32, 34)
    return (blocks[..., 2:].copy().view(np.int8).reshape(shape),
            blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32))


def test_q8_0_loads_as_int8_codes_the_file_holds(tokenizer, tmp_path):
    model = random_model(gguf_config())
    path = write_gguf(model, tokenizer, tmp_path / "m.gguf", "q8_0")
    loaded = frugallm.load(path)
    wq_a, experts = loaded.layers[1].attn.wq_a, loaded.layers[1].ffn.experts
    assert isinstance(wq_a, QuantLinear) and isinstance(experts, QuantExperts) and wq_a.fmt == "int8"
    codes, scales = _file_codes(path, "blk.1.attn_q_a.weight")  # (32, 64): two blocks a row
    assert np.array_equal(wq_a.qweight.numpy(), codes)
    assert np.array_equal(wq_a.weight_scale_inv.numpy(), scales)  # one scale per block: (N, K / 32)
    codes, scales = _file_codes(path, "blk.1.ffn_gate_exps.weight")
    assert np.array_equal(experts.w1.numpy(), codes) and np.array_equal(experts.w1_scale_inv.numpy(), scales)
    # the grouped kernel against the reference: dequantize, then F.linear
    x = torch.randn(3, 64)
    assert torch.allclose(wq_a(x), x @ wq_a.weight.T, rtol=1e-5, atol=1e-5)
    # written again, the codes go back as they came: the same file contents, tensor by tensor
    again = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(write_gguf(loaded, tokenizer, tmp_path / "2.gguf",
                                                                              "q8_0")).tensors}
    assert all(np.array_equal(np.asarray(t.data), again[t.name]) for t in gguf.GGUFReader(path).tensors)
    # an explicit dtype dequantizes instead (training, distillation)
    assert type(frugallm.load(path, dtype=torch.float32).layers[1].attn.wq_a) is torch.nn.Linear


def test_frugallm_int8_codes_survive_a_q8_0_round_trip(tokenizer, tmp_path):
    model = random_model(gguf_config())
    quantize_model(model, "int8")  # per output channel
    path = write_gguf(model, tokenizer, tmp_path / "m.gguf", "q8_0")
    back = frugallm.load(path)
    for name in ("layers.1.attn.wq_b", "layers.0.ffn.w2", "layers.2.ffn.experts"):
        ours, theirs = model.get_submodule(name), back.get_submodule(name)
        for w in ("qweight",) if isinstance(ours, QuantLinear) else ("w1", "w2", "w3"):
            s = "weight_scale_inv" if w == "qweight" else w + "_scale_inv"
            assert torch.equal(getattr(ours, w), getattr(theirs, w)), name
            s_ours, s_theirs = getattr(ours, s), getattr(theirs, s)
            assert s_theirs.shape == s_ours.shape  # one scale per row again: the fast int8 kernel
            assert torch.equal(s_theirs, s_ours.half().float())  # stored as f16, as q8_0 stores scales


def test_q4_0_loads_as_int4_codes_the_file_holds_and_writes_back_the_same(tokenizer, tmp_path):
    """q4_0 blocks are (f16 d, 16 bytes of two codes each), frugallm's int4 layout: read as they are, they run
    as the dequantized model runs, and written again they give the same file, tensor by tensor."""
    from frugallm.kernels.int4 import dequantize_int4

    model = random_model(gguf_config())
    path = write_gguf(model, tokenizer, tmp_path / "m.gguf", "q4_0")
    loaded = frugallm.load(path)
    wq_a, experts = loaded.layers[1].attn.wq_a, loaded.layers[1].ffn.experts
    assert isinstance(wq_a, QuantLinear) and isinstance(experts, QuantExperts) and wq_a.fmt == "int4"
    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.1.attn_q_a.weight")
    blocks = np.asarray(t.data).reshape(32, 2, 18)  # (N, K / 32, 2 + 16): d, then the packed codes
    assert np.array_equal(wq_a.qweight.numpy(), blocks[..., 2:].reshape(32, 32))
    assert np.array_equal(wq_a.weight_scale_inv.numpy(), blocks[..., :2].copy().view(np.float16)[..., 0])
    # the file's own dequantization (the gguf package's) is what the codes mean
    want = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(32, 64)
    assert np.array_equal(dequantize_int4(wq_a.qweight, wq_a.weight_scale_inv).numpy(), want)
    ids = torch.randint(0, 320, (1, 12))
    assert torch.allclose(logits(loaded, ids), logits(frugallm.load(path, dtype=torch.float32), ids),
                          rtol=1e-4, atol=1e-4)
    again = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(write_gguf(loaded, tokenizer, tmp_path / "2.gguf",
                                                                              "q4_0")).tensors}
    assert all(np.array_equal(np.asarray(t.data), again[t.name]) for t in gguf.GGUFReader(path).tensors)


@pytest.mark.parametrize("change, reason", [
    (dict(residual="mhc"), "one plain residual stream"),
    (dict(index_topk=8, index_n_heads=2, index_head_dim=16), "lightning indexer"),
    (dict(n_hash_layers=1), "hash routing"),
    (dict(group_score="max"), "top-2 scores"),
    (dict(n_shared_experts=0), "shared experts"),
    (dict(rope_scaling="yarn", rope_factor=4.0, mscale=1.0, mscale_all_dim=0.707), "mscale == mscale_all_dim"),
])
def test_what_llama_cpp_cannot_run_is_refused_with_the_reason(change, reason, tokenizer, tmp_path):
    model = frugallm.Transformer(gguf_config(**change))
    with pytest.raises(ValueError, match=reason):
        write_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    assert not list(tmp_path.iterdir())


def test_a_tokenizer_llama_cpp_would_split_otherwise_is_refused(tokenizer, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import pre_tokenizers

    from frugallm.tokenizer import Tokenizer

    other = HFTokenizer.from_str(tokenizer.to_str())
    other.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)  # " def" and "def" alike: not GPT-2's
    with pytest.raises(ValueError, match="no llama.cpp equivalent.*add_prefix_space"):
        write_gguf(random_model(gguf_config()), Tokenizer(other), tmp_path / "m.gguf", "f32")
    assert not list(tmp_path.iterdir())


def test_out_is_checked_before_any_work(tokenizer, tmp_path):
    model = random_model(gguf_config())
    with pytest.raises(ValueError, match="must end in .gguf"):
        write_gguf(model, tokenizer, tmp_path / "m.bin", "f32")
    (tmp_path / "notes.gguf").write_text("mine")
    with pytest.raises(ValueError, match="not a GGUF file"):
        write_gguf(model, tokenizer, tmp_path / "notes.gguf", "f32")
    assert (tmp_path / "notes.gguf").read_text() == "mine"
    write_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    write_gguf(model, tokenizer, tmp_path / "m.gguf", "f16")  # an older GGUF is replaced
    assert frugallm.load(tmp_path / "m.gguf", dtype=torch.float32).config.dim == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "notes.gguf"]  # no temp file left


def test_cli_export_then_every_command_opens_the_gguf(tiny_run, tmp_path, capsys):
    out = tmp_path / "tiny.gguf"
    assert main(["export", str(tiny_run), "--to", "gguf", "--type", "q8_0", "--out", str(out)]) == 0
    assert "MTP module(s) are not written" in capsys.readouterr().err
    opened = open_model(out)
    assert opened.kind == "gguf" and opened.quantization["format"] == "int8"
    assert opened.config == open_model(tiny_run).config.replace(n_mtp=0)
    assert main(["generate", str(out), "--prompt", "the cat", "--max-new-tokens", "4"]) == 0
    assert main(["export", str(tiny_run), "--to", "gguf", "--out", str(tmp_path / "x.bin")]) == 2
    assert main(["export", str(tiny_run), "--to", "hf", "--type", "q8_0", "--out", str(tmp_path / "h")]) == 2
    # distill --teacher and train --init-from read a model through formats.open / plan.load
    from frugallm.distill.teacher import Teacher
    from frugallm.train.setup import check_init_from, init_from

    tok = load_tokenizer(out)
    assert tok.encode("the cat sat") == load_tokenizer(tiny_run).encode("the cat sat")
    assert Teacher.load(out, tok).vocab_size == opened.config.vocab_size
    student = frugallm.Transformer(opened.config)
    check_init_from(opened.config, str(out))
    init_from(student, str(out), log=lambda line: None)
    assert torch.equal(student.layers[1].attn.wq.weight, frugallm.load(out, dtype=torch.float32).layers[1].attn.wq.weight)


def test_export_to_hf_takes_a_run_and_writes_its_tokenizer(tiny_run, tmp_path):
    out = frugallm.to_hf(str(tiny_run), tmp_path / "hf")
    assert (out / "tokenizer.json").exists()
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    assert main(["export", str(tiny_run), "--to", "hf", "--out", str(tmp_path / "hf2")]) == 0
    assert (tmp_path / "hf2" / "tokenizer.json").exists()
