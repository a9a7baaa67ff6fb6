"""MLA: absorbed == naive, cached == full, YaRN golden values, the RoPE layout."""


import pytest
import torch

from frugallm import Transformer, get_preset
from frugallm.infer import KVCache
from frugallm.model.rope import apply_rope, inv_freq, rope_attn_factor, softmax_scale, yarn_range

from conftest import tiny_config

YARN = dict(rope_scaling="yarn", rope_factor=4.0, original_seq_len=16, max_seq_len=64, mscale=0.707, mscale_all_dim=0.707)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("q_lora_rank", [0, 24])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_absorbed_equals_naive_whole_sequence(q_lora_rank, dtype, tol):
    model = Transformer(tiny_config(q_lora_rank=q_lora_rank, **YARN)).to(dtype).eval()
    ids = torch.randint(0, 97, (2, 23))
    with torch.no_grad():
        naive = model(ids, absorb=False).logits
        absorbed = model(ids, absorb=True).logits
    assert _rel(absorbed, naive) <= tol


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_token_by_token_decode_equals_full_recompute(dtype, tol):
    cfg = tiny_config(**YARN)
    model = Transformer(cfg).to(dtype).eval()
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        full = model(ids, absorb=False).logits
        for absorb in (True, False):
            cache = KVCache(cfg, batch_size=2, dtype=dtype)
            prefill = model(ids[:, :7], cache=cache, absorb=False).logits  # prefill: naive
            steps = [model(ids[:, t:t + 1], cache=cache, absorb=absorb).logits for t in range(7, 20)]
            assert cache.lengths.tolist() == [20, 20]
            assert _rel(torch.cat([prefill, *steps], 1), full) <= tol


def test_chunked_prefill_on_cache_uses_offset_mask():
    cfg = tiny_config()
    model = Transformer(cfg).double().eval()
    ids = torch.randint(0, 97, (1, 16))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache(cfg, 1, dtype=torch.float64)
        a = model(ids[:, :5], cache=cache).logits
        b = model(ids[:, 5:16], cache=cache).logits  # S=11 on top of 5 cached: (S, start+S) mask
    assert _rel(torch.cat([a, b], 1), full) <= 1e-10


def test_cache_holds_only_latents():
    cfg = get_preset("tiny")
    cache = KVCache(cfg, batch_size=1, max_len=8)
    assert cache.values_per_token() == cfg.n_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    v3 = get_preset("v3")
    assert v3.kv_lora_rank + v3.qk_rope_head_dim == 576


def test_k_pe_is_shared_and_unnormalised():
    mla = Transformer(tiny_config()).layers[0].attn
    assert mla.wkv_a.out_features == mla.dc + mla.dr  # one rope key, not one per head
    assert mla.kv_norm.weight.shape == (mla.dc,)
    assert hasattr(mla, "q_norm") and not hasattr(Transformer(tiny_config(q_lora_rank=0)).layers[0].attn, "q_norm")


def test_yarn_golden_values():
    v3 = get_preset("v3")
    assert yarn_range(v3) == (10, 23)
    f = inv_freq(v3)
    base = 1.0 / (1e4 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    ratio = (base / f.double())
    assert int((ratio - 1).abs().lt(1e-6).sum()) == 11  # untouched pairs
    assert int((ratio - 40).abs().lt(1e-4).sum()) == 9  # fully divided by the factor
    assert softmax_scale(v3) == pytest.approx(0.1352337789, abs=1e-10)
    assert softmax_scale(get_preset("v2-lite")) == pytest.approx(0.1147213868, abs=1e-10)
    assert softmax_scale(get_preset("tiny", qk_nope_head_dim=128, qk_rope_head_dim=64)) == pytest.approx(0.0721687836, abs=1e-10)
    assert rope_attn_factor(v3) == 1.0


def test_rope_matches_complex_reference_layout():
    """Adjacent pairs (x[2i], x[2i+1]) rotate as one complex number (V3-code apply_rotary_emb)."""
    x = torch.randn(3, 5, 2, 8, dtype=torch.float64)
    angles = torch.outer(torch.arange(5, dtype=torch.float64), torch.rand(4, dtype=torch.float64))
    ref = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * torch.polar(
        torch.ones_like(angles), angles)[:, None]).flatten(-2)
    out = apply_rope(x, angles.cos()[:, None], angles.sin()[:, None])
    assert torch.allclose(out, ref, atol=1e-12)


def test_sequence_past_max_seq_len_is_a_clear_error():
    model = Transformer(tiny_config(max_seq_len=8))
    with pytest.raises(ValueError, match="exceeds max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_bad_inputs_are_clear_errors():
    model = Transformer(tiny_config())
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, seq\) integer token ids"):
        model(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="targets"):
        model(torch.zeros(2, 4, dtype=torch.long), targets=torch.zeros(2, 5, dtype=torch.long))
