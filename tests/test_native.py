"""frugallm's C++ int8-activation GEMV (kernels/native.py, csrc/qgemv.cpp) against its twin.

Every implementation this CPU can run (plain C++, AVX2, AVX-512 VNNI; the others skip, saying which
flag is missing) against `qgemv_reference`, which quantizes the activations by the same rule and sums
the same integer block products in float64; the twin against the fp32 product on the dequantized
weights (the activation quantization's error, bounded); bad input's errors; the plan's choice; and
a compiled decode step on the kernel against the same modules run eagerly."""

import pytest
import torch

from frugallm import Transformer
from frugallm.host import forced
from frugallm.infer import KVCache
from frugallm.infer.generate import generate
from frugallm.kernels import native
from frugallm.kernels.compiled import compile_decode, unavailable_reason
from frugallm.kernels.quantize import dequantize, quantize, quantize_model
from frugallm.plan import resolve

from conftest import tiny_config

REASON = native.unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=str(REASON))


def isa_params():
    have = native.runnable_isas() if REASON is None else []
    return [pytest.param(isa, id=name.replace(" ", "-"), marks=pytest.mark.skipif(
        isa not in have, reason=f"this CPU lacks {', '.join(native.ISA_FLAGS.get(isa, ()))} for {name}"))
        for isa, name in native.ISAS.items()]


def case(fmt, shape, grouped=False, seed=0):
    """(codes, scales as the op takes them) of a random weight of `shape`."""
    torch.manual_seed(seed)
    w = torch.randn(shape)
    w[..., 0, :32] = 0  # an all-zero block: scale 0
    q, s = quantize(w, fmt)
    if fmt == "int8":
        s = s.float()
        if grouped:  # GGUF q8_0's layout: a scale per 32 inputs (varied, so a wrong block index shows)
            s = s[..., None].expand(*s.shape, shape[-1] // 32) * (0.5 + torch.rand(*s.shape, shape[-1] // 32))
    return q, s.contiguous()


FORMS = [("int8", False), ("int8", True), ("int4", False)]


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("fmt,grouped", FORMS, ids=["int8", "int8-grouped", "int4"])
@pytest.mark.parametrize("N,K,P", [(37, 256, 1), (100, 800, 3), (9, 32 * 300, 2)])  # K/32: 8, 25, 300 blocks
def test_kernel_equals_its_twin(isa, fmt, grouped, N, K, P):
    """25 blocks: not a multiple of the 8 scales a vector holds; 300: more than one stack piece (256)."""
    q, s = case(fmt, (N, K), grouped)
    x = torch.randn(P, K) * 3
    x[0, 64:96] = 0  # an all-zero activation block
    want = native.qgemv_reference(x, q, s)
    got = native.qgemv(x, q, s, None, isa)
    assert got.shape == (P, N) and got.dtype == torch.float32
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("fmt,grouped", FORMS, ids=["int8", "int8-grouped", "int4"])
def test_gathered_experts_equal_their_twin(isa, fmt, grouped):
    q, s = case(fmt, (6, 48, 96), grouped)
    x, idx = torch.randn(5, 96), torch.tensor([3, 0, 5, 3, 1])
    want = native.qgemv_reference(x, q, s, idx)
    assert (native.qgemv(x, q, s, idx, isa) - want).abs().max() <= 1e-5 * want.abs().max()
    one = native.qgemv_reference(x[2:3], q[5], s[5])  # the gather picks the right expert
    assert torch.allclose(want[2:3], one, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_the_twin_is_the_dequantized_product_up_to_activation_quantization(fmt):
    """Per block, |x - dx qx| <= dx / 2 elementwise, so |y_twin - y| <= sum_g dx_g / 2 * sum_j |W[n, 32g + j]|."""
    q, s = case(fmt, (64, 512))
    x = torch.randn(2, 512)
    w = dequantize(q, s).double()
    _, dx = native.quantize_activations(x)
    bound = ((dx.double()[:, None, :] / 2) * w.abs().unflatten(-1, (-1, 32)).sum(-1)[None]).sum(-1)
    err = (native.qgemv_reference(x, q, s).double() - x.double() @ w.T).abs()
    assert (err <= bound * (1 + 1e-5) + 1e-6).all()
    assert err.max() > 0  # the activations really are quantized


def test_bad_input_says_what_is_wrong():
    q, s = case("int8", (8, 64))
    with pytest.raises(RuntimeError, match="isa must be 0"):
        native.qgemv(torch.randn(1, 64), q, s, None, 7)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        native.qgemv(torch.randn(1, 48), q[:, :48].contiguous(), s, None, 0)
    qe, se = case("int8", (3, 8, 64))
    with pytest.raises(RuntimeError, match=r"expert index 3 is outside \[0, 3\)"):
        native.qgemv(torch.randn(2, 64), qe, se, torch.tensor([0, 3]), 0)
    with pytest.raises(RuntimeError, match="stacked codes need idx"):
        native.qgemv(torch.randn(2, 64), qe, se, None, 0)


def test_the_plan_picks_the_kernel_by_the_hosts_flags():
    assert native.host_isa(["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"]) == 2
    assert native.host_isa(["avx2", "fma", "f16c"]) == 1 and native.host_isa(["asimd"]) == 0
    no_bf16 = forced("no-bf16")  # FRUGALLM_HOST=no-bf16 plays an AVX2 laptop
    assert not any(f.startswith("avx512") for f in no_bf16.flags)
    plan = resolve("inference", no_bf16, dtype="fp32", compile="on", quantized="int4")
    assert plan.qgemv_isa == native.host_isa(no_bf16.flags) and any("int8 activations" in r for r in plan.reasons)
    exact = resolve("inference", no_bf16, dtype="fp32", compile="on", quantized="int4", int8_activations=False)
    assert exact.qgemv_isa is None and resolve("inference", no_bf16, dtype="fp32", compile="off",
                                               quantized="int8").qgemv_isa is None


@pytest.mark.skipif(unavailable_reason(Transformer(tiny_config())) is not None,
                    reason="torch.compile cannot run here (no C++ compiler or unsupported build)")
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_compiled_step_on_the_kernel_equals_the_same_modules_eager(fmt):
    """Every matmul quantized: after compile_decode(qgemv_isa=...), an eager step runs the same kernel on
    the same modules (its twin); the compiled step matches it within 1e-4 of the logits, the greedy
    tokens agree, and both differ from the fp32-activation model's logits by the activations' rounding."""
    torch.manual_seed(0)
    model = Transformer(tiny_config(n_layers=2, q_lora_rank=32, v_head_dim=16, moe_inter_dim=32)).eval()
    quantize_model(model, fmt, skip=())
    prompt, ids = [[5, 17, 2, 40, 33]], torch.tensor([[5, 17, 2, 40, 33]])
    cache = KVCache(model.config, 1, 16)
    with torch.inference_mode():
        model(ids, cache=cache)
        fp32_acts = model(torch.tensor([[7]]), cache=cache, absorb=True).logits
    decoder = compile_decode(model, log=lambda line: None, qgemv_isa=max(native.runnable_isas()))
    want = generate(model, prompt, 6)  # eager, the swapped modules: the kernel
    assert torch.equal(generate(model, prompt, 6, decoder=decoder), want)
    cache, other = (KVCache(model.config, 1, 16) for _ in range(2))
    with torch.inference_mode():
        model(ids, cache=cache), model(ids, cache=other)  # prefill, eager (many rows: the fp32 path)
        eager = model(torch.tensor([[7]]), cache=cache, absorb=True).logits
        compiled = decoder(torch.tensor([[7]]), other).logits
    scale = eager.abs().max()
    assert (compiled - eager).abs().max() < 1e-4 * scale
    assert 1e-6 * scale < (eager - fp32_acts).abs().max() < 0.1 * scale
