"""Compiled decoding (kernels/compiled.py) against its eager twin, and the static-shape pieces it
is made of: the gathered / dense experts against the loop, the static cache against the dynamic one."""

import pytest
import torch

from frugallm import Transformer
from frugallm.infer import KVCache
from frugallm.kernels.compiled import GemvLinear, compile_decode, unavailable_reason
from frugallm.infer.generate import generate
from frugallm.kernels.experts import dense_experts, gathered_experts
from frugallm.model.moe import MoE, loop_experts
from frugallm.kernels.prepack import prepack
from frugallm.kernels.quantize import quantize_model

from conftest import tiny_config


@pytest.mark.parametrize("experts", [gathered_experts, dense_experts])
@pytest.mark.parametrize("n_tokens", [1, 3, 9])
def test_static_shape_experts_equal_the_loop(experts, n_tokens):
    cfg = tiny_config()
    moe = MoE(cfg).double()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(n_tokens, cfg.dim, dtype=torch.float64)
    weights, idx, _ = moe.gate(x)
    ws = moe.experts.w1, moe.experts.w2, moe.experts.w3
    want = loop_experts(x, weights, idx, *ws)
    got = experts(x, weights, idx, *ws)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("dsa", [{}, dict(index_topk=5, index_n_heads=2, index_head_dim=8)])
def test_static_cache_view_equals_the_dynamic_cache(dsa):
    """KVCache.over (the whole buffers, as CompiledDecode passes them) masks the stale and the
    never-written slots instead of slicing: same logits, same writes, ragged rows. With DSA the
    indexer's keys too, and row 1's new tokens see 3 and 4 keys, fewer than index_topk 5, in a cache of
    9 (dynamic) or 16 (static) slots: the gathered top-k rows are padded, and the padding masked."""
    model = Transformer(tiny_config(**dsa)).double().eval()
    cache = KVCache(model.config, 2, max_len=16, dtype=torch.float64)
    with torch.no_grad():
        model(torch.randint(0, 97, (2, 7)), cache=cache)
        cache.lengths.copy_(torch.tensor([7, 2]))  # row 1 is a shorter prompt: slots 2..6 are stale
        other = KVCache(model.config, 2, max_len=16, dtype=torch.float64)
        for mine, theirs in zip([*sum(other.buffers(), []), other.lengths], [*sum(cache.buffers(), []), cache.lengths]):
            mine.copy_(theirs)
        ids = torch.randint(0, 97, (2, 2))
        want = model(ids, cache=cache, absorb=True).logits
        static = KVCache.over(other.c_kv, other.k_pe, other.lengths, index_k=other.index_k)
        got = model(ids, cache=static, absorb=True).logits
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(other.lengths, cache.lengths)
    assert len(cache.buffers()) == (3 if dsa else 2)
    assert all(torch.equal(a, b) for a, b in zip(sum(other.buffers(), []), sum(cache.buffers(), [])))


def test_converted_models_are_refused_with_the_fix():
    model = Transformer(tiny_config()).to(torch.bfloat16).eval()
    if not prepack(model):  # no bf16 packing on this host: fp8 codes are refused (int8 / int4 compile)
        quantize_model(model, "fp8")
    reason = unavailable_reason(model)
    assert reason and ("prepack=False" in reason or "fp8" in reason)
    with pytest.raises(RuntimeError, match="cannot compile the decode step"):
        compile_decode(model)


@pytest.mark.skipif(unavailable_reason(Transformer(tiny_config())) is not None,
                    reason="torch.compile cannot run here (no C++ compiler or unsupported build)")
def test_compiled_decode_equals_eager_greedy_batch_and_speculative():
    """fp32: batch 4 of ragged prompts (the dense expert path) and batch 1 speculative (gathered,
    verify steps of 2 tokens): the same greedy tokens as the eager model, one graph per shape."""
    torch.manual_seed(0)
    model = Transformer(tiny_config(n_layers=2)).eval()
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (9, 3, 6, 1)]
    want = generate(model, prompts, 10)
    spec_want = generate(model, prompts[:1], 10)
    said = []  # compile_decode returns at once: the wait is on each shape's first call, and is said there
    decoder = compile_decode(model, log=said.append)
    assert said == []
    assert torch.equal(generate(model, prompts, 10, decoder=decoder), want)
    assert said == ["compiling the decode step for batch 4, 1 token (first use, ~30 s) ..."]
    assert torch.equal(generate(model, prompts, 10, decoder=decoder), want) and len(said) == 1  # compiled once
    stats = {}
    assert torch.equal(generate(model, prompts[:1], 10, speculative=True, decoder=decoder, stats=stats), spec_want)
    assert stats["forwards"] < 10  # the verify graph (2 tokens per step) ran, not just the 1-token one
    assert "compiling the decode step for batch 1, 2 tokens (first use, ~30 s) ..." in said
    assert len(said) == len(set(said))
    with torch.inference_mode():  # logits, not only their argmax: within fp32 reassociation
        cache = KVCache(model.config, 1, max_len=16)
        model(torch.tensor([prompts[0]]), cache=cache)
        ids = torch.tensor([[5]])
        got = decoder(ids, cache).logits
        cache.lengths -= 1
        eager = model(ids, cache=cache, absorb=True).logits
    assert torch.allclose(got, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(unavailable_reason(Transformer(tiny_config())) is not None,
                    reason="torch.compile cannot run here (no C++ compiler or unsupported build)")
def test_two_compiled_models_keep_their_own_weights():
    """Dynamo checks no guards on the model's modules (compiled.py): two models of one config must
    still never share a graph, since each graph has its model's weights frozen in."""
    decoders, models = [], []
    for seed in (1, 2):
        torch.manual_seed(seed)
        models.append(Transformer(tiny_config(n_layers=1)).eval())
        decoders.append(compile_decode(models[-1]))
    with torch.inference_mode():
        for model, decoder in zip(models, decoders):
            cache = KVCache(model.config, 1, max_len=8)
            model(torch.tensor([[3, 4, 5]]), cache=cache)
            got = decoder(torch.tensor([[6]]), cache).logits
            cache.lengths -= 1
            want = model(torch.tensor([[6]]), cache=cache, absorb=True).logits
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(unavailable_reason(Transformer(tiny_config())) is not None,
                    reason="torch.compile cannot run here (no C++ compiler or unsupported build)")
def test_gemv_linear_equals_linear_traced_and_eager():
    """One-row calls traced by torch.compile take the multiply-and-sum GEMV; several rows and eager
    calls are nn.Linear's. fp64, so any difference is a wrong reduction, not rounding."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 20, bias=False).double()
    gemv = GemvLinear(48, 20, bias=False).double()
    gemv.load_state_dict(linear.state_dict())
    traced = torch.compile(gemv, dynamic=False)
    for shape in [(1, 1, 48), (1, 48), (3, 2, 48)]:
        x = torch.randn(shape, dtype=torch.float64)
        want = linear(x)
        assert torch.allclose(gemv(x), want, rtol=1e-13, atol=1e-13)
        assert torch.allclose(traced(x), want, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(unavailable_reason(Transformer(tiny_config())) is not None,
                    reason="torch.compile cannot run here (no C++ compiler or unsupported build)")
def test_compiled_v32_decode_equals_the_full_forward():
    """DSA (index_topk 5): the compiled step takes the indexer's keys as graph inputs beside the latents and
    gathers each query's top-k rows of the whole static buffer (padded where a row sees fewer than k):
    speculative decoding of a ragged batch (verify, MTP draft and plain 1-token graphs: one test, as each
    graph compiles for ~30 s) gives the full forward's greedy tokens, fp32."""
    from test_generate import _greedy_full_recompute

    torch.manual_seed(0)
    model = Transformer(tiny_config(n_layers=2, index_topk=5, index_n_heads=2, index_head_dim=8,
                                    init_std=0.2)).eval()
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (9, 2, 6)]
    want = [_greedy_full_recompute(model, p, 10) for p in prompts]
    said, stats = [], {}
    decoder = compile_decode(model, log=said.append)
    assert generate(model, prompts, 10, speculative=True, decoder=decoder, stats=stats).tolist() == want
    assert stats["forwards"] < 10  # verify steps of 2 tokens ran, MTP drafts, and a last step with no draft
    assert len(said) == 3 and "compiling the decode step for batch 3, 1 token (first use, ~30 s) ..." in said
