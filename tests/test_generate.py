"""Generation: cached decode vs full recompute, ragged batches, speculative vs greedy, the SpecDec rule."""

import math

import pytest
import torch

from frugallm import Transformer
from frugallm.infer import KVCache
from frugallm.infer.generate import generate, generate_stream
from frugallm.infer.sampling import probs
from frugallm.infer.speculative import accept

from conftest import tiny_config
from test_mtp import _two_chain_stream


def _greedy_full_recompute(model, prompt: list[int], n: int) -> list[int]:
    """The reference twin: no cache, the whole sequence through the naive path every step."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]), absorb=False).logits[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("residual", ["plain", "hc", "mhc"])
def test_cached_decode_equals_full_recompute_single_and_ragged_batch(residual):
    model = Transformer(tiny_config(residual=residual, hc_streams=2)).double().eval()
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (9, 3, 6)]
    want = [_greedy_full_recompute(model, p, 8) for p in prompts]
    assert generate(model, prompts[:1], 8)[0].tolist() == want[0]
    assert generate(model, prompts, 8).tolist() == want


def test_yarn_model_and_q_lora_rank_zero_ragged():
    cfg = tiny_config(q_lora_rank=0, rope_scaling="yarn", rope_factor=4.0, original_seq_len=16)
    model = Transformer(cfg).double().eval()
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (20, 2)]
    assert generate(model, prompts, 6).tolist() == [_greedy_full_recompute(model, p, 6) for p in prompts]


def test_cache_holds_only_the_latent_and_rope_key():
    cfg = tiny_config()
    cache = KVCache(cfg, batch_size=2, max_len=10)
    per_token = cfg.n_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    assert cache.values_per_token() == per_token
    assert sum(t.numel() for t in cache.c_kv + cache.k_pe) == per_token * 2 * 10


def test_cache_reuse_after_reset_and_overflow_is_an_error():
    model = Transformer(tiny_config()).double().eval()
    cache = KVCache(model.config, 1, max_len=8, dtype=torch.float64)
    ids = torch.randint(0, 97, (1, 5))
    first = model(ids, cache=cache).logits
    cache.reset()
    assert torch.equal(model(ids, cache=cache).logits, first)
    with pytest.raises(ValueError, match="allocate a larger KVCache"):
        model(ids, cache=cache)


def test_streaming_yields_what_generate_returns_and_stop_pads():
    model = Transformer(tiny_config()).double().eval()
    prompts = [[1, 2, 3], [4, 5]]
    full = generate(model, prompts, 12)
    chunks = list(generate_stream(model, prompts, 12))
    assert torch.equal(torch.cat(chunks, 1), full)
    stop = int(full[0, 3])  # row 0 stops at its 4th token
    out = generate(model, prompts, 12, stop=stop)
    first = (full[0] == stop).nonzero()[0].item()
    assert out[0, : first + 1].tolist() == full[0, : first + 1].tolist()
    assert (out[0, first:] == stop).all()


def test_bad_arguments_are_clear_errors():
    model = Transformer(tiny_config()).eval()
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [[1]], 0)
    with pytest.raises(ValueError, match="exceeds the context"):
        generate(model, [[1] * 60], 10)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        generate(model, [[1, 500]], 2)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1], []], 2)
    with pytest.raises(ValueError, match="MTP"):
        generate(Transformer(tiny_config(n_mtp=0)), [[1]], 2, speculative=True)


@pytest.mark.parametrize("n_mtp,residual", [(1, "plain"), (2, "plain"), (1, "mhc")])
def test_greedy_speculative_equals_greedy_random_model(n_mtp, residual):
    model = Transformer(tiny_config(n_mtp=n_mtp, residual=residual, hc_streams=2)).double().eval()
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (7, 2, 5)]
    stats = {}
    spec = generate(model, prompts, 15, speculative=True, stats=stats)
    assert torch.equal(spec, generate(model, prompts, 15))
    assert stats["drafted"] > 0 and stats["forwards"] < 15


@pytest.mark.parametrize("n_mtp", [1, 2])
def test_v32_cached_and_speculative_decode_equal_full_recompute(n_mtp):
    """DSA (index_topk 5): the cache holds the indexer's keys, and each decode step reads only the top-k latent
    rows (model/attention.py), for rows of different lengths, prompts shorter and longer than index_topk, and
    speculative verify steps (MTP modules with indexers of their own): the full forward's greedy tokens."""
    model = Transformer(tiny_config(index_topk=5, index_n_heads=2, index_head_dim=8, n_mtp=n_mtp,
                                    init_std=0.2)).double().eval()
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (9, 2, 5)]
    want = [_greedy_full_recompute(model, p, 14) for p in prompts]
    assert generate(model, prompts, 14).tolist() == want
    stats = {}
    assert generate(model, prompts, 14, speculative=True, stats=stats).tolist() == want
    assert stats["drafted"] > 0


@pytest.fixture(scope="module")
def trained():
    """A model whose MTP module really predicts: t_{i+2} = perm[t_i] (see test_mtp)."""
    torch.manual_seed(0)
    V = 32
    model = Transformer(tiny_config(vocab_size=V, n_mtp=1, mtp_lambda=1.0, n_layers=2, max_seq_len=48))
    perm = torch.randperm(V)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        ids = _two_chain_stream(16, 24, perm)
        loss = model(ids[:, :-1], targets=ids[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.double().eval(), perm


def test_greedy_speculative_equals_greedy_trained_model(trained):
    model, perm = trained
    prompts = [_two_chain_stream(1, n, perm)[0].tolist() for n in (6, 3, 9)]
    stats = {}
    spec = generate(model, prompts, 30, speculative=True, stats=stats)
    assert torch.equal(spec, generate(model, prompts, 30))
    assert stats["acceptance"] > 0.7 and stats["tokens_per_forward"] > 1.4, stats


def test_accept_rule_keeps_the_target_distribution():
    """First emitted token of a step, drafted from q and verified against p, is distributed as p.

    (Every row's first token is its own: n = min over rows never truncates before it.)
    """
    torch.manual_seed(1)
    V, B, D = 5, 40000, 2
    p_logits = torch.randn(1, D + 1, V).expand(B, -1, -1)
    q = probs(torch.randn(1, D, V), 1.0).expand(B, -1, -1)
    drafts = torch.multinomial(q[:, 0], 1)
    drafts = torch.cat([drafts, torch.multinomial(q[:, 1], 1)], dim=1)
    n, token, accepted = accept(p_logits, drafts, q, 1.0, None, None, None)
    first = torch.where(torch.full((B,), n) > 0, drafts[:, 0], token)
    counts = torch.bincount(first, minlength=V).double()
    expected = probs(p_logits[0, 0], 1.0).double() * B
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 20.5, chi2  # chi-square, 4 degrees of freedom: P(chi2 > 20.5) < 4e-4


def test_speculative_sampling_matches_the_models_joint_distribution():
    """End to end on a 4-token vocabulary: the joint law of 3 generated tokens equals the model's."""
    torch.manual_seed(2)
    V = 4
    cfg = tiny_config(vocab_size=V, dim=32, n_layers=1, n_dense_layers=1, n_mtp=1, init_std=0.5, max_seq_len=8)
    model = Transformer(cfg).double().eval()
    prompt = [1, 2]
    triples = torch.cartesian_prod(*[torch.arange(V)] * 3)  # (64, 3)
    with torch.no_grad():
        logp = model(torch.cat([torch.tensor(prompt).expand(len(triples), -1), triples], 1)).logits.log_softmax(-1)
    exact = sum(logp[:, len(prompt) - 1 + j].gather(1, triples[:, j:j + 1]).squeeze(1) for j in range(3)).exp()
    counts, trials, stats = torch.zeros(len(triples)), 3000, {}
    for seed in range(trials // 3):  # 3 rows per call: lockstep truncation is exercised too
        out = generate(model, [prompt] * 3, 3, temperature=1.0, seed=seed, speculative=True, stats=stats)
        for row in out:
            counts[(row[0] * V + row[1]) * V + row[2]] += 1
    expected = exact * trials
    keep = expected >= 5  # pool sparse cells
    chi2 = (((counts - expected)[keep] ** 2) / expected[keep]).sum() + \
        (counts[~keep].sum() - expected[~keep].sum()) ** 2 / max(expected[~keep].sum().item(), 1e-9)
    dof = int(keep.sum())  # cells kept + 1 pooled - 1
    # normal approximation of the chi-square quantile at ~1e-4
    assert chi2 < dof + 3.7 * math.sqrt(2 * dof), (chi2.item(), dof)
