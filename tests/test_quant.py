"""Weight-only int8 / fp8 quantization (kernels/quantize.py, quantized_checkpoint.py): kernels vs their reference twins,
the converter's filter, bytes per parameter, checkpoints in DeepSeek's FP8 and frugallm's int8
layouts (keep-codes and dequantized loads), and the loss change against fp32 on a trained model."""

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

import frugallm
from frugallm import Transformer
from frugallm.model.moe import Gate, MoE, RoutedExperts
from frugallm.kernels.fp8 import weight_dequant, weight_quant
from frugallm.kernels.quantize import (FORMATS, LINEAR, QuantExperts, QuantLinear, _e4m3_dequant, dequantize,
                                        quantize, quantize_model, weight_bytes)
from frugallm.export import quantize_checkpoint

from conftest import tiny_config

# Loss change against fp32 on the trained tiny model below (mean CE over 2048 val tokens, loss
# ~4.85-5.1 nats, unigram ~5.2). Measured with fp32 activations: int8 +0.00001, fp8 +0.0003 nats; with
# bf16 activations: int8 -0.0001, fp8 +0.0002 (bf16 alone +0.0002). Bounds, ~20x margin (also in
# kernels/quantize.py). int4 (q4_0 codes; here only the matrices whose inputs split into groups of 32,
# not the routed experts nor wo / wq_b): +0.0007 nats with fp32 activations:
LOSS_BOUND = {"int8": 0.005, "fp8": 0.01, "int4": 0.02}


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# --- kernels ------------------------------------------------------------------------------------

def test_int8_quantizer_per_output_channel():
    w = torch.randn(5, 40)
    w[2] = 0  # an all-zero row gives codes 0, never NaN
    q, s = quantize(w, "int8")
    assert q.dtype == torch.int8 and s.shape == (5,) and s.dtype == torch.float32
    assert torch.equal(s[[0, 1, 3, 4]], w[[0, 1, 3, 4]].abs().amax(1) / 127)
    assert q.abs().max() == 127 and torch.equal(q[2], torch.zeros(40, dtype=torch.int8))
    assert ((dequantize(q, s) - w).abs() <= s[:, None] / 2 + 1e-7).all()  # round to nearest
    stacked_q, stacked_s = quantize(torch.stack([w, 2 * w]), "int8")  # (E, N, K) experts
    assert torch.equal(stacked_q[1], q) and torch.equal(stacked_s[1, [0, 1, 3, 4]], 2 * s[[0, 1, 3, 4]])


def _linear_reference(x, q, s):
    """Either format's matmul the plain way: the whole weight dequantized to x's dtype, then F.linear."""
    return torch.nn.functional.linear(x, dequantize(q, s, x.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,K", [(48, 64), (40, 24), (97, 128)])  # K % 16 != 0: int8pack crashes, so not used
@pytest.mark.parametrize("M", [1, 5, 40])  # up to INT8PACK_MAX_ROWS rows: int8pack; above: cast + GEMM
def test_int8_kernel_matches_reference_twin(dtype, N, K, M):
    q, s = quantize(torch.randn(N, K), "int8")
    x = torch.randn(3, M, K).to(dtype)
    y, ref = LINEAR["int8"](x, q, s), _linear_reference(x, q, s)
    assert y.shape == (3, M, N) and y.dtype == dtype
    assert _rel(y, ref) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_e4m3_bit_trick_dequant_is_exact_in_fp32_and_within_an_ulp_in_bf16():
    w = torch.randn(200, 300) * torch.logspace(-3, 1, 300)  # wide range: e4m3 subnormal codes too
    w[128:, 128:256] = 0  # an all-zero block
    q, s = weight_quant(w)
    assert (q.float().abs() < 2 ** -6).any() and (q.float() != 0).any()
    assert torch.equal(_e4m3_dequant(q, s, torch.float32), weight_dequant(q, s))
    fast, ref = _e4m3_dequant(q, s, torch.bfloat16).float(), weight_dequant(q, s, dtype=torch.bfloat16).float()
    assert ((fast - ref).abs() <= ref.abs() * 2 ** -7).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,K", [(256, 384), (200, 130)])
def test_fp8_linear_matches_dequant_reference(dtype, N, K):
    q, s = quantize(torch.randn(N, K) * 0.02, "fp8")
    x = torch.randn(7, K).to(dtype)
    assert _rel(LINEAR["fp8"](x, q, s), _linear_reference(x, q, s)) < (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_experts_match_their_twin_and_the_dense_moe(fmt, dtype):
    cfg = tiny_config(moe_inter_dim=32 if fmt == "int4" else 16)  # int4 takes inputs in groups of 32
    moe = MoE(cfg)
    with torch.no_grad():
        for p in (moe.experts.w1, moe.experts.w2, moe.experts.w3, moe.gate.weight):
            p.normal_(0, 0.1)
    x = torch.randn(2, 9, cfg.dim)
    with torch.no_grad():
        dense = moe(x)[0]
        quantize_model(moe, fmt, skip=())
        qmoe = moe.to(dtype)
        assert type(qmoe.experts) is QuantExperts and type(qmoe.shared_experts.w1) is QuantLinear
        weights, idx, _ = qmoe.gate(x.view(-1, cfg.dim).to(dtype))
        flat = x.view(-1, cfg.dim).to(dtype)
        fast = qmoe.experts(flat, weights, idx)
        assert _rel(fast, qmoe.experts.reference(flat, weights, idx)) < (1e-5 if dtype == torch.float32 else 2e-2)
        assert _rel(qmoe(x.to(dtype))[0], dense) < {"int8": 0.02, "fp8": 0.06, "int4": 0.2}[fmt]


# --- the converter -------------------------------------------------------------------------------

def test_quantize_model_honours_skip_and_covers_experts():
    model = Transformer(tiny_config())
    done = quantize_model(model, "int8")
    assert type(model.head) is nn.Linear and type(model.embed) is nn.Embedding  # default skip
    assert all(type(m) is not nn.Linear for n, m in model.named_modules() if n.startswith(("layers", "mtp")))
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    assert len(moes) == 3 and all(type(m.experts) is QuantExperts for m in moes)  # two main layers + the MTP block
    assert all(type(m.gate) is Gate and m.gate.weight.dtype == torch.float32 for m in moes)  # routing exact
    assert "layers.1.ffn.experts" in done and "mtp.0.eh_proj" in done and "head" not in done

    model = Transformer(tiny_config())
    done = quantize_model(model, "fp8", skip=("mtp", "experts", "wkv_b"))
    assert type(model.head) is QuantLinear  # not in this skip
    assert type(model.mtp[0].eh_proj) is nn.Linear and type(model.mtp[0].block.ffn) is MoE
    assert type(model.layers[1].ffn) is MoE and type(model.layers[1].ffn.shared_experts.w1) is QuantLinear
    assert type(model.layers[0].attn.wkv_b) is nn.Linear and type(model.layers[0].attn.wkv_a) is QuantLinear
    assert not any(n.startswith("mtp") or n.endswith("experts") for n in done)
    with pytest.raises(ValueError, match="int3"):
        quantize_model(model, "int3")


def test_bytes_per_param_counts_codes_and_scales():
    model = Transformer(tiny_config())
    assert weight_bytes(model)["bytes_per_param"] == 4.0
    dense = {n: p.shape for n, p in model.named_parameters()}
    quantize_model(model, "int8", skip=())
    b = weight_bytes(model)
    weights = [s for n, s in dense.items() if len(s) >= 2 and "embed" not in n and "gate" not in n]
    codes = sum(s.numel() for s in weights)
    scales = sum(s[:-1].numel() for s in weights)  # one fp32 per output channel
    assert b["quantized_params"] == codes and b["quantized_bytes_per_param"] == (codes + 4 * scales) / codes
    assert b["params"] == sum(s.numel() for s in dense.values()) + model.layers[1].ffn.gate.bias.numel() * 3
    model.to(torch.bfloat16)  # the rest halves; codes and fp32 scales stay
    assert weight_bytes(model)["quantized_bytes_per_param"] == b["quantized_bytes_per_param"]
    assert weight_bytes(model)["bytes"] < b["bytes"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_casting_a_quantized_model_keeps_codes_and_fp32_scales(fmt):
    model = Transformer(tiny_config(moe_inter_dim=32)).eval()  # int4: experts' inputs in groups of 32
    quantize_model(model, fmt)
    model.to(torch.bfloat16)
    lin, moe = model.layers[0].attn.wkv_b, model.layers[1].ffn.experts
    assert lin.qweight.dtype == moe.w1.dtype == {"int8": torch.int8, "int4": torch.uint8}.get(fmt, torch.float8_e4m3fn)
    scale = torch.float16 if fmt == "int4" else torch.float32  # int4: q4_0's fp16 scales
    assert lin.weight_scale_inv.dtype == moe.w1_scale_inv.dtype == scale
    assert lin.compute_dtype == lin.weight.dtype == torch.bfloat16  # what the absorbed path reads
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        naive, absorbed = model(ids, absorb=False).logits, model(ids, absorb=True).logits
    assert naive.dtype == torch.bfloat16 and _rel(absorbed, naive) < 2e-2
    assert frugallm.generate(model, ids[:1, :5], 4).shape == (1, 4)  # cached decode on codes


# --- checkpoints and loss, on a briefly trained model ---------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained 100 steps (fp32, ~8 s) on a few stdlib files: its run dir, val batches."""
    from frugallm.train.config import TrainConfig
    from frugallm.train import data
    from frugallm.train.trainer import train

    root = tmp_path_factory.mktemp("quant")
    corpus = root / "corpus"
    corpus.mkdir()
    for f in sorted(Path(os.__file__).parent.glob("[a-c]*.py"))[:24]:
        shutil.copy(f, corpus / f.name)
    mp = pytest.MonkeyPatch()
    mp.setenv("FRUGALLM_CACHE", str(root / "cache"))
    model_cfg = tiny_config(vocab_size=512, max_seq_len=128)
    train_cfg = TrainConfig(data=str(corpus), seq_len=64, batch_size=8, steps=100, warmup_steps=5, lr=1e-2,
                            tokenizer_train_chars=200_000, val_fraction=0.2, eval_every=1000, log_every=1000,
                            save_every=100, sample_tokens=0, precision="fp32")
    result = train(model_cfg, train_cfg, root / "run", log=lambda *_: None)
    tok = frugallm.load_tokenizer(root / "run")
    val = torch.from_numpy(data.prepare(str(corpus), tok, 0.2).val[: 32 * 65].astype("int64")).view(32, 65)
    yield root / "run", val, result.unigram_loss  # the val split depends on the tmp path: so do the losses
    mp.undo()


def _loss(model, val):
    with torch.no_grad():
        return model(val[:, :-1], targets=val[:, 1:]).lm_loss.item()


def test_fp8_checkpoint_is_deepseeks_layout_and_round_trips(trained, tmp_path):
    run, val, _ = trained
    ref = frugallm.load(run).float()
    out = quantize_checkpoint(run, "fp8", tmp_path / "fp8")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                             "weight_block_size": [128, 128]}
    with safe_open(out / "model.safetensors", framework="pt") as f:
        w = f.get_tensor("model.layers.1.mlp.experts.3.gate_proj.weight")
        s = f.get_tensor("model.layers.1.mlp.experts.3.gate_proj.weight_scale_inv")
        assert w.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == (1, 1)
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16  # the head stays high precision
        assert "lm_head.weight_scale_inv" not in f.keys()
    assert frugallm.load_tokenizer(out).encode("def f(x):") == frugallm.load_tokenizer(run).encode("def f(x):")

    kept = frugallm.from_hf(out)  # as shipped: FP8 storage kept, bf16 activations
    assert type(kept.layers[0].attn.wq_a) is QuantLinear and kept.layers[1].ffn.experts.w1.dtype == torch.float8_e4m3fn
    plain = frugallm.from_hf(out, dtype=torch.float32)  # dequantized per block, e.g. to train
    assert type(plain.layers[0].attn.wq_a) is nn.Linear and plain.layers[1].ffn.experts.w1.dtype == torch.float32
    kept32 = frugallm.load(out, quantized=True, dtype=torch.float32)  # codes, fp32 activations
    ids = val[:4, :32]
    with torch.no_grad():
        logits = ref(ids).logits
        assert _rel(kept32(ids).logits, plain(ids).logits) < 1e-5
        # The trained weights depend on the fixture's tmp path (documents are split into train / val by
        # their absolute path), and so does this error: 0.008 and 0.060 seen in two sessions. A broken
        # dequantization is off by ~1.
        assert _rel(plain(ids).logits, logits) < 0.08
        assert _rel(kept(ids).logits, logits) < 0.08


def test_transformers_loads_the_fp8_checkpoint(trained, tmp_path):
    pytest.importorskip("accelerate", reason="transformers' FP8 loader needs accelerate (not a frugallm dependency)")
    from transformers import AutoModelForCausalLM

    run, val, _ = trained
    out = quantize_checkpoint(run, "fp8", tmp_path / "fp8")
    hf = AutoModelForCausalLM.from_pretrained(out).float().eval()  # on CPU it dequantizes to bf16 itself
    ours = frugallm.load(out, dtype=torch.bfloat16).float()  # the same bf16-rounded weights, fp32 compute
    with torch.no_grad():
        assert _rel(hf(val[:2, :32]).logits, ours(val[:2, :32]).logits) < 1e-4


def test_int8_checkpoint_round_trips(trained, tmp_path):
    run, val, _ = trained
    out = quantize_checkpoint(run, "int8", tmp_path / "int8")
    assert json.loads((out / "quantization.json").read_text())["format"] == "int8"
    kept = frugallm.load(out)
    assert type(kept.layers[1].ffn.experts) is QuantExperts and kept.layers[1].ffn.experts.w1.dtype == torch.int8
    assert kept.embed.weight.dtype == torch.bfloat16 and kept.layers[1].ffn.gate.bias.dtype == torch.float32
    plain = frugallm.load(out, dtype=torch.float32)
    assert type(plain.layers[1].ffn.experts) is RoutedExperts and plain.layers[1].ffn.experts.w1.dtype == torch.float32
    assert frugallm.load_tokenizer(out).vocab_size == frugallm.load_tokenizer(run).vocab_size
    ref = frugallm.load(run)
    with torch.no_grad():
        assert _rel(kept(val[:2, :32]).logits, ref(val[:2, :32]).logits) < 0.03
    with pytest.raises(ValueError, match="DeepSeek .* FP8 only"):
        quantize_checkpoint(run, "int8", tmp_path / "x", layout="deepseek")
    with pytest.raises(ValueError, match="not a quantized checkpoint"):
        frugallm.load(run, quantized=True)


def test_hc_models_use_frugallms_layout(tmp_path):
    model = Transformer(tiny_config(residual="mhc", hc_streams=2))  # no HF form: a frugallm checkpoint dir
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ckpt / "model.safetensors")
    model.config.to_json(ckpt / "config.json")
    (ckpt / "manifest.json").write_text("{}")
    with pytest.raises(ValueError, match="layout='frugallm'"):
        quantize_checkpoint(ckpt, "fp8", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.warns(UserWarning, match="no tokenizer"):
        out = quantize_checkpoint(ckpt, "fp8", tmp_path / "out", layout="frugallm")
    loaded = frugallm.load(out, quantized=True, dtype=torch.float32)
    ids = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        assert _rel(loaded(ids).logits, model.eval()(ids).logits) < 0.05


@pytest.mark.parametrize("fmt", FORMATS)
def test_loss_change_against_fp32_is_within_bound(trained, fmt, tmp_path):
    run, val, unigram = trained
    ref = frugallm.load(run)
    base = _loss(ref, val)
    assert base < min(unigram + 0.1, math.log(512) - 0.5)  # trained: near or past the unigram loss
    quantize_model(ref, fmt)
    delta = _loss(ref, val) - base  # fp32 activations: the weights' quantization error alone
    assert abs(delta) < LOSS_BOUND[fmt], f"{fmt}: loss {base:.4f} -> {base + delta:.4f}"
    delta_bf16 = _loss(ref.to(torch.bfloat16), val) - base  # the fast CPU configuration
    assert abs(delta_bf16) < LOSS_BOUND[fmt] + 0.005


def test_cached_scale_casts_follow_loads():
    a, b = Transformer(tiny_config()).eval(), Transformer(tiny_config()).eval()
    for m in (a, b):
        quantize_model(m, "int8")
        m.to(torch.bfloat16)
    ids = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        a(ids)  # fills a's bf16 scale caches
        a.load_state_dict(b.state_dict())  # in-place copies into the same buffers
        assert torch.equal(a(ids).logits, b(ids).logits)
