"""kernels/prepack.py: oneDNN-prepacked bf16 weights give the SAME outputs as the plain modules."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from frugallm import Transformer
from frugallm.infer.generate import generate
from frugallm.kernels.experts import use_grouped_experts
from frugallm.model.moe import MLP, MoE
from frugallm.kernels.prepack import PackedExperts, PackedLinear, PackedMLP, prepack, unavailable_reason

from conftest import tiny_config

from frugallm.host import host_profile

# Skipped, not faked, where this host's oneDNN cannot pack bf16 weights (AVX2-only CPUs), and
# under FRUGALLM_HOST=no-bf16: the profile's reason is the skip's reason.
pytestmark = pytest.mark.skipif(not host_profile().bf16_prepack,
                                reason=f"no oneDNN bf16 prepacking on this host: {host_profile().cpu_model}, "
                                       f"ISA {host_profile().capability}, profile {host_profile().source}")
BF16 = torch.bfloat16


@pytest.mark.parametrize("shape", [(1, 1, 64), (3, 7, 64), (5, 64)])
def test_linear_and_mlp_are_bit_identical(shape):
    x = torch.randn(shape, dtype=BF16)
    lin = nn.Linear(64, 40, bias=True).to(BF16)
    assert torch.equal(PackedLinear(lin)(x), lin(x))
    assert torch.equal(PackedLinear(lin).weight, lin.weight)
    mlp = MLP(64, 48).to(BF16)
    assert torch.equal(PackedMLP(mlp)(x), mlp(x))  # [w1; w3] fused into one GEMM: same numbers


def test_fp32_input_is_cast_through_bf16():
    lin = nn.Linear(64, 40, bias=False).to(BF16)
    x = torch.randn(2, 64)
    y = PackedLinear(lin)(x)
    assert y.dtype == torch.float32 and torch.equal(y, F.linear(x.to(BF16), lin.weight).float())


def test_moe_decode_is_bit_identical_and_prefill_close(cfg):
    moe = MoE(cfg).to(BF16).eval()
    # the gate too: MoE(cfg) leaves it torch.empty (Transformer.init_weights fills it), and uninitialised
    # memory made this test NaN (so never equal) in a long pytest session
    for w in (moe.experts.w1, moe.experts.w2, moe.experts.w3, moe.gate.weight):
        nn.init.normal_(w, std=0.1)
    packed = MoE(cfg).to(BF16).eval()
    packed.load_state_dict(moe.state_dict())
    use_grouped_experts(moe)  # the reference is what every plan runs without prepacking
    assert prepack(packed) == ["experts", "shared_experts"]  # the gate is not a matmul module
    with torch.no_grad():
        x = torch.randn(1, 1, cfg.dim, dtype=BF16)  # decode: N*K < E, both run one GEMM chain per expert
        assert torch.equal(packed(x)[0], moe(x)[0])
        x = torch.randn(2, 16, cfg.dim, dtype=BF16)  # prefill: plain takes _grouped_mm, another summation order
        ref, out = moe(x)[0].float(), packed(x)[0].float()
        assert (out - ref).norm() / ref.norm() < 1e-2
    assert type(packed.experts) is PackedExperts and type(packed.shared_experts) is PackedMLP


@pytest.mark.parametrize("mode", ["plain", "mhc"])
def test_model_generates_the_same_tokens_and_saves_the_same_weights(mode):
    cfg = tiny_config(residual=mode, hc_streams=2)
    plain = Transformer(cfg).to(BF16).eval()
    packed = Transformer(cfg).to(BF16).eval()
    packed.load_state_dict(plain.state_dict())
    names = prepack(packed)
    assert "head" in names and "layers.0.ffn" in names and "layers.1.ffn.experts" in names
    assert not any(n.endswith("wkv_b") for n in names)  # the absorbed path reads wkv_b.weight
    assert isinstance(packed.layers[1].ffn.experts, PackedExperts)
    assert isinstance(packed.layers[1].ffn.shared_experts, PackedMLP)
    state = plain.state_dict()
    assert packed.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in packed.state_dict().items())
    # A one-token prompt keeps every MoE on its per-expert path in both models (see above), so the
    # whole greedy decode, plain and speculative, must match token for token.
    prompt = torch.tensor([[5]])
    ref = generate(plain, prompt, 24)
    assert torch.equal(generate(packed, prompt, 24), ref)
    assert torch.equal(generate(packed, prompt, 24, speculative=True), ref)


def test_not_applied_where_it_does_not_fit(cfg):
    model = Transformer(cfg)
    assert "bf16" in unavailable_reason(model)
    assert prepack(model) == [] and type(model.head) is nn.Linear
