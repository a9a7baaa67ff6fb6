"""The int4 format (kernels/int4.py) and compiled decoding of int8 / int4 models (kernels/compiled_quant.py),
each fast path against its reference twin: q4_0's rule against gguf-py's, packing, the eager int4 linear
against dequantize + F.linear, the traced GEMV expressions against F.linear, and a compiled decode of a
quantized model against the same model eager."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from frugallm import Transformer
from frugallm.infer.generate import generate
from frugallm.infer import KVCache
from frugallm.kernels.compiled import compile_decode, unavailable_reason
from frugallm.kernels.compiled_quant import gemv
from frugallm.kernels.int4 import GROUP, dequantize_int4, pack_codes, quantize_int4, unpack_codes
from frugallm.kernels.quantize import QuantExperts, QuantLinear, dequantize, quantize, quantize_model
from frugallm.kernels.swap import kernels_in_use
from frugallm.plan import resolve

from conftest import tiny_config


def int4_config(**overrides):
    """tiny_config with every matmul's input width a multiple of 32, so int4 covers all of them."""
    return tiny_config(**{**dict(q_lora_rank=32, v_head_dim=16, moe_inter_dim=32), **overrides})


def test_int4_packing_is_exact_and_in_q4_0_order():
    c = torch.randint(0, 16, (3, 5, 64), dtype=torch.uint8)
    p = pack_codes(c)
    assert p.shape == (3, 5, 32) and p.dtype == torch.uint8 and torch.equal(unpack_codes(p), c)
    assert torch.equal(p[..., :16] & 15, c[..., :16]) and torch.equal(p[..., :16] >> 4, c[..., 16:32])


def test_int4_round_trip_error_bound_and_zero_groups():
    w = torch.randn(16, 128)
    w[3, 32:64] = 0  # an all-zero group: d = 0, codes 8, dequantized exactly 0
    p, d = quantize_int4(w)
    assert p.shape == (16, 64) and d.shape == (16, 4) and d.dtype == torch.float16
    back = dequantize_int4(p, d)
    assert torch.equal(back[3, 32:64], torch.zeros(32))
    amax = w.abs().unflatten(-1, (-1, GROUP)).amax(-1).repeat_interleave(GROUP, -1)
    # codes reach -8 * d = the group's extreme value; the other side stops at +7 d: error <= d = amax / 8,
    # plus d's fp16 rounding (|c - 8| <= 8 times 2^-11 relative)
    assert ((back - w).abs() <= amax / 8 * (1 + 2 ** -7) + 1e-12).all()
    assert torch.equal(quantize(w, "int4")[0], p) and torch.equal(dequantize(p, d, torch.bfloat16), back.bfloat16())


def test_int4_is_gguf_q4_0_exactly():
    gguf = pytest.importorskip("gguf")
    w = torch.randn(8, 96)
    w[0, :32] = torch.linspace(-1, 1, 32)  # ties of |max|: the first one wins, in both
    blocks = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q4_0).reshape(8, 3, 18)
    p, d = quantize_int4(w)
    assert torch.equal(torch.from_numpy(np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0]), d)
    assert torch.equal(torch.from_numpy(np.ascontiguousarray(blocks[..., 2:])).reshape(8, 48), p)
    ref = gguf.quants.dequantize(blocks.reshape(8, -1), gguf.GGMLQuantizationType.Q4_0)
    assert torch.equal(dequantize_int4(p, d), torch.from_numpy(ref).reshape(8, 96))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_int4_linear_is_dequantize_then_linear(dtype):
    lin = torch.nn.Linear(64, 24, bias=True)
    q = QuantLinear.from_linear(lin, "int4").to(dtype)
    x = torch.randn(3, 64, dtype=dtype)
    want = F.linear(x, dequantize(q.qweight, q.weight_scale_inv, dtype)) + lin.bias.detach().to(dtype)
    assert torch.equal(q(x), want)
    assert torch.equal(q.weight, dequantize(q.qweight, q.weight_scale_inv, dtype))


def _grouped_int8(w):
    s = w.abs().unflatten(-1, (-1, GROUP)).amax(-1) / 127  # (N, K/32), as GGUF's q8_0
    return (w.unflatten(-1, (-1, GROUP)) / s[..., None]).round().clamp(-127, 127).to(torch.int8).flatten(-2), s


@pytest.mark.parametrize("form", ["int8", "int8-grouped", "int4"])
def test_traced_gemv_expressions_equal_linear_on_dequantized_weights(form):
    """gemv (what the compiled step traces) run eagerly: one row, and gathered experts' leading dims."""
    w = torch.randn(5, 24, 64)  # (E, N, K)
    q, s = _grouped_int8(w) if form == "int8-grouped" else quantize(w, form)
    x = torch.randn(64)
    want = torch.stack([F.linear(x, dequantize(q[e], s[e])) for e in range(5)])  # (E, N)
    assert torch.allclose(gemv(x[None, :], q[2], s[2]), want[2], rtol=1e-5, atol=1e-5)
    idx = torch.tensor([[4, 1]])  # one token, two experts: codes gathered (1, 2, N, K')
    got = gemv(x[None, None, None, :], q[idx], s[idx])
    assert got.shape == (1, 2, 24) and torch.allclose(got[0], want[[4, 1]], rtol=1e-5, atol=1e-5)


def test_fp8_codes_are_refused_and_plans_compile_int8_and_int4():
    model = Transformer(int4_config(n_layers=2)).eval()
    quantize_model(model, "fp8")
    reason = unavailable_reason(model)
    assert reason and "fp8" in reason and "int4" in reason
    plan = resolve("inference", dtype="fp32", compile=True, quantized=True)
    assert plan.compile and any("GEMVs read them" in r for r in plan.reasons)
    with pytest.raises(ValueError, match="fp8"):
        resolve("inference", dtype="fp32", compile=True, quantized="fp8")


@pytest.mark.skipif(unavailable_reason(Transformer(tiny_config())) is not None,
                    reason="torch.compile cannot run here (no C++ compiler or unsupported build)")
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_compiled_decode_of_a_quantized_model_equals_it_eager(fmt):
    """Every matmul quantized (head included): the compiled batch-1 step, whose GEMVs read the codes,
    gives the eager quantized model's greedy tokens and, on one step, its logits within 1e-4 (fp32
    activations; only the summation order differs). One compiled graph per format."""
    torch.manual_seed(0)
    model = Transformer(int4_config(n_layers=2)).eval()
    quantize_model(model, fmt, skip=())
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    prompt = [torch.randint(0, 97, (5,)).tolist()]
    want = generate(model, prompt, 6)
    decoder = compile_decode(model, log=lambda line: None)
    assert "compiled-quantized-gemv" in kernels_in_use(model) and "compiled-quantized-experts" in kernels_in_use(model)
    assert torch.equal(generate(model, prompt, 6, decoder=decoder), want)
    cache, other = (KVCache(model.config, 1, 16) for _ in range(2))
    ids = torch.tensor(prompt)
    with torch.inference_mode():
        model(ids, cache=cache), model(ids, cache=other)  # prefill, eager
        step = torch.tensor([[want[0, 0].item()]])
        eager = model(step, cache=cache, absorb=True).logits
        compiled = decoder(step, other).logits
    assert (compiled - eager).abs().max() < 1e-4 * eager.abs().max()
    assert isinstance(model.layers[1].ffn.experts, QuantExperts)  # the twin keeps the buffers and state dict


def int4_checkpoint(tmp_path):
    """(an int4-quantized model, the quantized checkpoint formats/quantized.py wrote of it)."""
    from frugallm.formats.quantized import check_request, write_quantized

    model = Transformer(int4_config(n_layers=2)).eval()
    quantize_model(model, "int4")
    (tmp_path / "src").mkdir()
    layout, guard = check_request(tmp_path / "src", "int4", tmp_path / "q", None)
    with pytest.warns(UserWarning, match="no tokenizer"):
        out = write_quantized(model, tmp_path / "q", "int4", layout, tmp_path / "src", guard, dtype=torch.float32)
    return model, out


def test_int4_checkpoint_round_trips(tmp_path):
    """formats/quantized.py: int4 codes and fp16 scales written and read back as they are."""
    from frugallm.formats.quantized import load_quantized

    model, out = int4_checkpoint(tmp_path)
    loaded = load_quantized(out)
    experts = loaded.layers[1].ffn.experts
    assert type(experts) is QuantExperts and experts.fmt == "int4" and experts.w1.dtype == torch.uint8
    assert experts.w1_scale_inv.dtype == torch.float16
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    ids = torch.randint(0, 97, (1, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_an_eager_plan_dequantizes_int4_codes_once_at_load(tmp_path):
    """Eager int4 unpacks every weight on every call (~0.26x a plain model's decode, LOG.md), so a plan that
    does not compile reads int4 codes into plain weights once, saying why; the logits are the codes' own."""
    from frugallm.plan import prepare_inference

    model, out = int4_checkpoint(tmp_path)
    said = []
    applied, plan = prepare_inference(out, "auto", compile="off", log=said.append)
    assert not plan.compile and not any(isinstance(m, (QuantLinear, QuantExperts)) for m in applied.model.modules())
    assert any("int4 codes dequantized once at load" in line for line in said + list(plan.reasons))
    ids = torch.randint(0, 97, (1, 7))
    with torch.no_grad():
        got = applied.model(ids).logits.float()
        want = model.to(plan.dtype)(ids).logits.float()
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5) if plan.dtype == torch.float32 else \
        (got - want).abs().max() < 0.05 * want.abs().max()
