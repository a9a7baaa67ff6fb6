"""Token-level distillation: each divergence against a plain float64 formula, the loss's reductions, the
vocabulary check, the frozen teacher, and the offline top-k cache (equal to the teacher, resumable)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from frugallm import Transformer
from frugallm.distill import (KINDS, Teacher, TopK, TopKCache, build_topk_cache, distill_loss, kd_divergence,
                              match_vocab, topk_record)
from frugallm.tokenizer import train_tokenizer

# (kind, beta) pairs covering every divergence, the JSD interior and its two endpoints
CASES = [("fkl", 0.5), ("rkl", 0.5), ("tvd", 0.5), ("jsd", 0.5), ("jsd", 0.1), ("jsd", 0.9), ("jsd", 0.0),
         ("jsd", 1.0)]


def reference(p: torch.Tensor, q: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    """The textbook definitions, float64, for strictly positive p (teacher) and q (student): (N, M) -> (N,)."""
    kl = lambda a, b: (a * (a / b).log()).sum(-1)
    if kind == "fkl":
        return kl(p, q)
    if kind == "rkl":
        return kl(q, p)
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if beta == 0:  # TRL's generalized_jsd_loss: beta = 0 is KL(p || q), beta = 1 is KL(q || p)
        return kl(p, q)
    if beta == 1:
        return kl(q, p)
    m = beta * p + (1 - beta) * q  # beta of the teacher
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def logits(n=6, v=11, scale=2.0, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g) * scale).to(dtype)


# --- divergences --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,beta", CASES)
def test_divergence_is_zero_when_teacher_equals_student(kind, beta):
    z = logits(dtype=torch.float32)
    assert kd_divergence(z, z.clone(), kind, beta, 1.5).abs().max() < 1e-6
    # and for a top-k teacher (k < V, rest bucket): the coarsened distributions are equal too
    rec = topk_record(z.double(), 4, 1.5)
    assert kd_divergence(z.double(), rec, kind, beta, 1.5).abs().max() < 1e-12


@pytest.mark.parametrize("kind,beta", CASES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_divergence_matches_float64_formula(kind, beta, temperature):
    s, t = logits(seed=1), logits(seed=2)
    p, q = F.softmax(t / temperature, -1), F.softmax(s / temperature, -1)
    want = reference(p, q, kind, beta)
    torch.testing.assert_close(kd_divergence(s, t, kind, beta, temperature), want, rtol=1e-10, atol=1e-12)
    # fp32 and bf16 inputs are upcast: fp32 arithmetic, close to the float64 truth
    got = kd_divergence(s.float(), t.float(), kind, beta, temperature)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert kd_divergence(s.bfloat16(), t.bfloat16(), kind, beta, temperature).dtype == torch.float32


def test_jsd_limits_are_the_two_kls_as_in_trl():
    s, t = logits(seed=3), logits(seed=4)
    fkl, rkl = kd_divergence(s, t, "fkl"), kd_divergence(s, t, "rkl")
    assert torch.equal(kd_divergence(s, t, "jsd", beta=0.0), fkl)  # the endpoints are special-cased ...
    assert torch.equal(kd_divergence(s, t, "jsd", beta=1.0), rkl)
    eps = 1e-8  # ... and the interior tends to them, linearly in eps: JSD/β -> KL(p||q), JSD/(1-β) -> KL(q||p)
    torch.testing.assert_close(kd_divergence(s, t, "jsd", beta=eps) / eps, fkl, rtol=1e-5, atol=0)
    torch.testing.assert_close(kd_divergence(s, t, "jsd", beta=1 - eps) / eps, rkl, rtol=1e-5, atol=0)


def test_minus_inf_logits_stay_finite_with_finite_gradients():
    s, t = logits(seed=5), logits(seed=6)
    s[:, -3:] = float("-inf")  # padded vocabulary masked on both sides
    t[:, -3:] = float("-inf")
    t[0, 2] = float("-inf")  # and one token only the teacher rules out
    for kind, beta in CASES:
        s_ = s.clone().requires_grad_()
        d = kd_divergence(s_, t, kind, beta)
        if kind == "rkl" or (kind, beta) == ("jsd", 1.0):
            assert torch.isinf(d[0]) and torch.isfinite(d[1:]).all()  # q > 0 where p = 0: KL(q||p) is infinite
            continue
        d.sum().backward()
        assert torch.isfinite(d).all() and torch.isfinite(s_.grad).all(), kind
        assert (s_.grad[:, -3:] == 0).all()
        p, q = F.softmax(t[1:, :-3], -1), F.softmax(s[1:, :-3], -1)  # rows without a one-sided zero
        torch.testing.assert_close(d[1:], reference(p, q, kind, beta), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind,beta", CASES)
def test_topk_with_k_equal_to_vocab_equals_dense(kind, beta):
    s, t = logits(seed=7), logits(seed=8)
    dense_s, topk_s = s.clone().requires_grad_(), s.clone().requires_grad_()
    dense = kd_divergence(dense_s, t, kind, beta, 2.0)
    rec = topk_record(t, t.shape[-1], 2.0)
    sparse = kd_divergence(topk_s, rec, kind, beta, 2.0)
    torch.testing.assert_close(sparse, dense, rtol=1e-10, atol=1e-12)
    dense.sum().backward()
    sparse.sum().backward()
    torch.testing.assert_close(topk_s.grad, dense_s.grad, rtol=1e-9, atol=1e-12)
    # a record without its stored rest mass (derived as 1 - sum p) agrees too
    bare = TopK(rec.ids, rec.logprobs, None, 2.0)
    torch.testing.assert_close(kd_divergence(s, bare, kind, beta, 2.0), dense, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind,beta", CASES)
def test_topk_rest_bucket_is_the_divergence_of_the_coarsened_distributions(kind, beta):
    s, t, k, tau = logits(seed=9), logits(seed=10), 4, 1.3
    p, q = F.softmax(t / tau, -1), F.softmax(s / tau, -1)
    ids = p.topk(k, -1).indices
    coarse = lambda x: torch.cat([x.gather(-1, ids), 1 - x.gather(-1, ids).sum(-1, keepdim=True)], -1)
    want = reference(coarse(p), coarse(q), kind, beta)
    rec = topk_record(t, k, tau)
    torch.testing.assert_close(kd_divergence(s, rec, kind, beta, tau), want, rtol=1e-9, atol=1e-12)
    assert (want <= reference(p, q, kind, beta) + 1e-12).all()  # data processing: never above the dense value
    with pytest.raises(ValueError, match="temperature"):
        kd_divergence(s, rec, kind, beta, 1.0)  # a record taken at another tau is refused


def test_bad_arguments_are_refused_with_the_fix():
    assert {kind for kind, _ in CASES} == set(KINDS)
    s, t = logits(), logits(seed=1)
    with pytest.raises(ValueError, match="must be one of"):
        kd_divergence(s, t, "kl")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        kd_divergence(s, t, "jsd", beta=1.5)
    with pytest.raises(ValueError, match="match_vocab"):  # a padded teacher's logits, not sliced
        kd_divergence(s, torch.cat([t, t[:, :3]], -1))
    with pytest.raises(ValueError, match="kd_weight"):
        distill_loss(s, torch.zeros(6, dtype=torch.long), t, kd_weight=2.0)


# --- the loss -----------------------------------------------------------------------------------

def test_tau_squared_scaling_and_the_two_ends_of_the_weight():
    s, t = logits(12, 11, seed=11).reshape(3, 4, 11), logits(12, 11, seed=12).reshape(3, 4, 11)
    y = torch.randint(0, 11, (3, 4))
    for tau in (2.0, 3.0):
        on = distill_loss(s, y, t, kind="fkl", temperature=tau, kd_weight=1.0)
        off = distill_loss(s, y, t, kind="fkl", temperature=tau, kd_weight=1.0, tau_squared=False)
        torch.testing.assert_close(on["loss"], tau ** 2 * off["loss"], rtol=1e-15, atol=0)
    assert torch.equal(on["kd"], off["kd"])  # "kd" is reported unscaled
    two = distill_loss(s, y, t, kind="fkl", temperature=2.0, kd_weight=1.0)  # x4 is exact in binary floating point
    assert torch.equal(two["loss"], 4.0 * distill_loss(s, y, t, kind="fkl", temperature=2.0, kd_weight=1.0,
                                                       tau_squared=False)["loss"])
    torch.testing.assert_close(off["loss"], kd_divergence(s.reshape(12, 11), t.reshape(12, 11), "fkl", 0.5, 3.0).mean())
    ce_only = distill_loss(s, y, t, kd_weight=0.0, temperature=3.0)
    torch.testing.assert_close(ce_only["loss"], F.cross_entropy(s.reshape(12, 11), y.reshape(12)))  # CE at tau = 1
    half = distill_loss(s, y, t, kd_weight=0.25, temperature=3.0)
    torch.testing.assert_close(half["loss"], 0.75 * half["ce"] + 0.25 * 9.0 * half["kd"])


def test_masked_tokens_are_excluded():
    s, t = logits(10, 11, seed=13), logits(10, 11, seed=14)
    y = torch.randint(0, 11, (10,))
    y[[1, 4, 5]] = -100
    s_bad, t_bad = s.clone(), t.clone()
    s_bad[[1, 4, 5]] = 1e4  # masked rows may hold anything, even NaN from the teacher
    t_bad[[1, 4, 5]] = float("nan")
    keep = y != -100
    for kind, beta in CASES:
        got = distill_loss(s_bad, y, t_bad, kind=kind, beta=beta, kd_weight=0.5)
        want = distill_loss(s[keep], y[keep], t[keep], kind=kind, beta=beta, kd_weight=0.5)
        torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-12, atol=0)
        assert int(got["tokens"]) == 7
    rec = topk_record(t, 3)
    got = distill_loss(s, y, rec, kind="jsd")
    want = distill_loss(s[keep], y[keep], topk_record(t[keep], 3), kind="jsd")
    torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-12, atol=0)
    all_masked = distill_loss(s, torch.full_like(y, -100), t)
    assert all_masked["loss"] == 0 and all_masked["agreement"] == 0


@pytest.mark.parametrize("sparse", [False, True])
def test_gradient_accumulation_with_the_global_count_equals_one_big_batch(sparse):
    torch.manual_seed(0)
    d, V = 8, 13
    head = torch.nn.Linear(d, V, bias=False).double()
    x = torch.randn(4, 5, d, dtype=torch.float64)  # 2 micro-batches of 2 sequences
    t = torch.randn(4, 5, V, dtype=torch.float64) * 2
    teacher = topk_record(t, 5, 2.0) if sparse else t
    y = torch.randint(0, V, (4, 5))
    y[0, :3] = -100  # micro-batch 1: 7 tokens; micro-batch 2: 9
    y[2, 4] = -100
    kw = dict(kind="jsd", beta=0.3, temperature=2.0, kd_weight=0.7)

    distill_loss(head(x), y, teacher, **kw)["loss"].backward()
    big = head.weight.grad.clone()
    head.weight.grad = None
    total = int((y != -100).sum())
    assert total == 16
    pick = lambda rec, sl: rec.map(lambda a: a[sl]) if sparse else rec[sl]
    for sl in (slice(0, 2), slice(2, 4)):
        distill_loss(head(x[sl]), y[sl], pick(teacher, sl), denominator=total, **kw)["loss"].backward()
    torch.testing.assert_close(head.weight.grad, big, rtol=1e-12, atol=1e-15)
    # the batch's own count (the default) would weight the two micro-batches' tokens differently
    head.weight.grad = None
    for sl in (slice(0, 2), slice(2, 4)):
        (distill_loss(head(x[sl]), y[sl], pick(teacher, sl), **kw)["loss"] / 2).backward()
    assert not torch.allclose(head.weight.grad, big)


def test_agreement_counts_argmax_matches_on_unmasked_tokens():
    t = torch.zeros(4, 5)
    t[torch.arange(4), torch.tensor([0, 1, 2, 3])] = 5.0  # teacher argmax 0, 1, 2, 3
    s = torch.zeros(4, 5)
    s[torch.arange(4), torch.tensor([0, 1, 4, 4])] = 5.0  # student agrees on rows 0 and 1
    y = torch.tensor([0, -100, 2, 3])
    assert float(distill_loss(s, y, t)["agreement"]) == pytest.approx(1 / 3)
    assert float(distill_loss(s, y, topk_record(t, 2))["agreement"]) == pytest.approx(1 / 3)


# --- vocabulary matching and the teacher --------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizers():
    a = "the cat sat on the mat and the dog ran to the park with a ball " * 20
    b = "import numpy as np def forward self return torch tensor shape " * 20
    return train_tokenizer([a], 290), train_tokenizer([b], 290)


def test_match_vocab_accepts_the_same_tokenizer_and_padding_rows(tokenizers):
    tok, _ = tokenizers
    n = tok.vocab_size
    assert match_vocab(tok, tok, n) is None  # same width: nothing to slice
    assert match_vocab(tok, tok, n + 64) == n  # a padded teacher embedding: keep the first n columns
    assert match_vocab(tok, tok.tok, n + 64, student_vocab_size=n + 8) == n + 8  # a padded student too
    with pytest.raises(ValueError, match="fewer than the student's"):
        match_vocab(tok, tok, n, student_vocab_size=n + 8)


def test_match_vocab_refuses_another_vocabulary_by_content(tokenizers):
    a, b = tokenizers
    assert a.vocab_size == b.vocab_size  # the same size, yet not the same vocabulary
    with pytest.raises(ValueError) as e:
        match_vocab(a, b, b.vocab_size)
    msg = str(e.value)
    assert f"student tokenizer {a.vocab_size:,} tokens" in msg and f"teacher tokenizer {b.vocab_size:,}" in msg
    assert "student id" in msg and "frugallm distill generate" in msg and "SFT" in msg


def test_teacher_is_frozen_and_slices_padded_vocabulary(tokenizers, tmp_path):
    tok, _ = tokenizers
    n = tok.vocab_size
    model = Transformer(tiny_config(vocab_size=n + 7, n_layers=2, n_dense_layers=2, n_mtp=0)).train()
    want = model.eval()(torch.randint(0, n, (2, 6), generator=torch.Generator().manual_seed(0))).logits
    teacher = Teacher(model, keep=match_vocab(tok, tok, n + 7), dtype="fp32")
    ids = torch.randint(0, n, (2, 6), generator=torch.Generator().manual_seed(0))
    got = teacher.logits(ids)
    assert got.shape == (2, 6, n) and got.dtype == torch.float32 and not got.requires_grad
    torch.testing.assert_close(got, want[..., :n].detach())
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.model.parameters())
    # the hash follows the weights and the compute dtype
    same = Teacher(Transformer.from_state_dict(model.config, model.state_dict()), keep=n, dtype="fp32")
    assert same.hash == teacher.hash
    other = Transformer(tiny_config(vocab_size=n + 7, n_layers=2, n_dense_layers=2, n_mtp=0))
    assert Teacher(other, keep=n, dtype="fp32").hash != teacher.hash
    # loaded from a directory (a Hugging Face export with its tokenizer), checked against the student
    import frugallm

    tok.save(tmp_path)
    frugallm.to_hf(model, tmp_path / "teacher", files=(tmp_path / "tokenizer.json",))
    loaded = Teacher.load(tmp_path / "teacher", tok, dtype="fp32")
    assert loaded.vocab_size == n and len(loaded.hash) == 16
    torch.testing.assert_close(loaded.logits(ids), got)


# --- the offline top-k cache --------------------------------------------------------------------

@pytest.fixture
def tiny_teacher():
    model = Transformer(tiny_config(n_layers=2, n_dense_layers=2, n_mtp=0))  # dense: no MoE kernels to warm up
    with torch.no_grad():
        model.head.weight.mul_(300)  # spread the log-probs: top-k ids are then far from ties
    return Teacher(model, dtype="fp32")


def stream(n=16 * 10 + 5, seed=0):
    return np.random.default_rng(seed).integers(0, 97, n).astype(np.uint16)  # 10 windows of 16


def test_offline_cache_equals_direct_topk_of_the_teacher(tiny_teacher, tmp_path):
    tokens, S, k, tau = stream(), 16, 8, 2.0
    cache = build_topk_cache(tiny_teacher, tokens, root=tmp_path, data_fingerprint="d0", seq_len=S, k=k,
                             temperature=tau, batch_windows=1, chunk_windows=4, progress=False)
    assert len(cache) == 10 and cache.k == k and cache.temperature == tau
    ws = [9, 0, 4, 3]  # across shards, in any order
    got = cache.get(ws)
    x = torch.from_numpy(np.stack([tokens[w * S: w * S + S] for w in ws]).astype(np.int64))
    want = topk_record(torch.cat([tiny_teacher.logits(x[i:i + 1]) for i in range(4)]), k, tau)
    assert got.ids.shape == (4, S, k) and got.ids.dtype == torch.int64
    assert torch.equal(got.ids, want.ids)
    torch.testing.assert_close(got.logprobs, want.logprobs.half().float(), rtol=0, atol=0)  # fp16 rounding only
    torch.testing.assert_close(got.rest, want.rest.half().float(), rtol=0, atol=0)
    assert cache.bytes_per_token >= 6 * k + 2 and cache.bytes_per_token < 6 * k + 2 + 32
    assert cache.build_seconds > 0
    # a second call opens the built cache without running the teacher
    class NoForward:
        hash, vocab_size = tiny_teacher.hash, tiny_teacher.vocab_size

        def logits(self, ids):
            raise AssertionError("the teacher ran again")
    again = build_topk_cache(NoForward(), tokens, root=tmp_path, data_fingerprint="d0", seq_len=S, k=k,
                             temperature=tau, progress=False)
    assert again.directory == cache.directory
    assert TopKCache(cache.directory).get([9]).ids.equal(got.ids[:1])
    # the record plugs into the loss: the teacher's own logits as the student give ~0 divergence
    student = torch.cat([tiny_teacher.logits(x[i:i + 1]) for i in range(4)])
    out = distill_loss(student, torch.from_numpy(np.stack([tokens[w * S + 1: w * S + S + 1] for w in ws])).long(),
                       got, kind="fkl", temperature=tau, kd_weight=1.0)
    assert float(out["kd"]) < 1e-3 and float(out["agreement"]) == 1.0


class Interrupted(Exception):
    pass


def test_interrupted_build_resumes_and_gives_identical_shards(tiny_teacher, tmp_path, monkeypatch):
    tokens, kw = stream(), dict(data_fingerprint="d0", seq_len=16, k=8, temperature=1.0, batch_windows=2,
                                chunk_windows=3, progress=False)
    whole = build_topk_cache(tiny_teacher, tokens, root=tmp_path / "a", **kw)

    def stop(done, total):
        if done == 2:
            raise Interrupted  # after the second of four chunks is recorded
    with pytest.raises(Interrupted):
        build_topk_cache(tiny_teacher, tokens, root=tmp_path / "b", on_chunk=stop, **kw)
    calls = []
    real = tiny_teacher.logits

    def fail_midway(ids):  # then a crash in the middle of the third chunk
        calls.append(ids.shape[0])
        if len(calls) == 2:
            raise Interrupted
        return real(ids)
    monkeypatch.setattr(tiny_teacher, "logits", fail_midway)
    with pytest.raises(Interrupted):
        build_topk_cache(tiny_teacher, tokens, root=tmp_path / "b", **kw)
    assert calls[0] == 2  # it started at window 6, the first not recorded

    calls.clear()
    monkeypatch.setattr(tiny_teacher, "logits", lambda ids: calls.append(ids.shape[0]) or real(ids))
    resumed = build_topk_cache(tiny_teacher, tokens, root=tmp_path / "b", **kw)
    assert sum(calls) == 4  # only windows 6..9 were computed again
    assert resumed.directory.name == whole.directory.name
    for f in sorted(whole.directory.glob("shard-*.bin")):
        assert f.read_bytes() == (resumed.directory / f.name).read_bytes(), f.name
    assert not any(p.name.endswith(".partial") for p in (tmp_path / "b").iterdir())
    meta = json.loads((resumed.directory / "topk.json").read_text())
    assert meta["windows"] == 10 and meta["shards"] == 4


@pytest.mark.parametrize("kind,beta", [("fkl", 0.5), ("rkl", 0.5), ("jsd", 0.5), ("jsd", 0.1), ("jsd", 0.9),
                                       ("jsd", 0.0), ("jsd", 1.0), ("tvd", 0.5)])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fused_divergence_equals_the_autograd_reference(kind, beta, temperature):
    """The closed-form gradients of distill/fused.py (the path kd_divergence takes for dense teachers) equal
    autograd through `divergence`, in fp64, blocks of rows included (N is not a multiple of the block), and with
    teacher probabilities that underflow to 0."""
    from frugallm.distill import fused
    from frugallm.distill.losses import divergence, kd_divergence

    def reference(z, t):  # the dense divergence through autograd over `divergence` (fp64 here: no casts)
        return divergence(F.log_softmax(t.detach() / temperature, dim=-1), F.log_softmax(z / temperature, dim=-1),
                          kind, beta)

    g = torch.Generator().manual_seed(0)
    z = (torch.randn(fused.ROWS * 2 + 3, 40, generator=g, dtype=torch.float64) * 3).requires_grad_()
    t = torch.randn(z.shape, generator=g, dtype=torch.float64) * 3
    t[0, :10] = -1e4
    w = torch.rand(z.shape[0], generator=g, dtype=torch.float64)
    fast, ref = kd_divergence(z, t, kind, beta, temperature), reference(z, t)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    (g_fast,), (g_ref,) = (torch.autograd.grad((d * w).sum(), z) for d in (fast, ref))
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-10, atol=1e-12)
