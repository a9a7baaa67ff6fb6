"""GRPO's pieces by hand (docs/design/grpo.md): advantages, the clipped loss with k3 and its three
normalisations against a float64 reference written from the equations, rewards (code in a limited
subprocess), toy tasks, pass@k; and a few real steps that raise a rewarded token's probability."""

from __future__ import annotations

import math
import time

import pytest
import torch

from frugallm.rl import rewards
from frugallm.rl.evaluate import ks_for, pass_at_k
from frugallm.rl.objective import advantages, equal_groups, grpo_loss, overlong_penalty, token_logprobs
from frugallm.rl.tasks import KINDS, generate, load_tasks, write_tasks


def test_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    a = advantages(r, 4)
    std = math.sqrt(0.25)  # [1,0,0,0]: mean 0.25, Bessel variance (0.5625 + 3 * 0.0625) / 3 = 0.25
    torch.testing.assert_close(a[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]) / (std + 1e-4))
    assert torch.equal(a[4:], torch.zeros(4))  # an all-equal group: no signal, no 0/0
    torch.testing.assert_close(advantages(r, 4, scale=False)[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]))
    assert equal_groups(r, 4).tolist() == [False, True]
    with pytest.raises(ValueError, match="groups of 3"):
        advantages(r, 3)


def _reference(logp, old, ref, adv, mask, beta, eps_low, eps_high, norm, max_len):
    """The loss from the equations, one token at a time, in float64."""
    N, T = logp.shape
    total, seq_terms = 0.0, []
    for i in range(N):
        terms = []
        for t in range(T):
            if not mask[i, t]:
                continue
            rho = torch.exp(logp[i, t] - old[i, t])
            term = torch.minimum(rho * adv[i], rho.clamp(1 - eps_low, 1 + eps_high) * adv[i])
            d = ref[i, t] - logp[i, t]
            terms.append(-(term - beta * (torch.exp(d) - d - 1)))
        seq_terms.append(terms)
    n_tokens = sum(len(t) for t in seq_terms)
    if norm == "sequence":
        total = sum(sum(t) / len(t) for t in seq_terms) / N
    elif norm == "token":
        total = sum(sum(t) for t in seq_terms) / n_tokens
    else:
        total = sum(sum(t) for t in seq_terms) / (N * max_len)
    return total


@pytest.mark.parametrize("norm,eps_high", [("sequence", 0.2), ("constant", 0.2), ("token", 0.28)])
def test_loss_and_gradient_match_a_float64_reference(norm, eps_high):
    """GRPO (sequence), Dr. GRPO (constant) and DAPO (token, clip-higher): loss and gradient in float64."""
    g = torch.Generator().manual_seed(1)
    N, T = 6, 5
    logp = (-torch.rand(N, T, generator=g, dtype=torch.float64) * 3).requires_grad_()
    old = logp.detach() + torch.randn(N, T, generator=g, dtype=torch.float64) * 0.3  # ratios beyond the clip
    ref = logp.detach() + torch.randn(N, T, generator=g, dtype=torch.float64) * 0.2
    adv = torch.randn(N, generator=g, dtype=torch.float64)
    mask = torch.arange(T)[None] < torch.tensor([5, 3, 1, 4, 5, 2])[:, None]
    kw = dict(beta=0.04, eps_low=0.2, eps_high=eps_high)
    loss, stats = grpo_loss(logp, old, adv, mask, ref_logp=ref, norm=norm, max_len=8, **kw)
    want = _reference(logp, old, ref, adv, mask, norm=norm, max_len=8, **kw)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    got_grad = torch.autograd.grad(loss, logp)[0]
    want_grad = torch.autograd.grad(want, logp)[0]
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-12)
    assert 0 < stats.clip_fraction < 1
    # chunks carrying the batch's counts add up to the batch's loss
    halves = [grpo_loss(logp[s], old[s], adv[s], mask[s], ref_logp=ref[s], norm=norm, max_len=8, n_seqs=N,
                        n_tokens=int(mask.sum()), **kw)[0] for s in (slice(0, 2), slice(2, N))]
    torch.testing.assert_close(halves[0] + halves[1], loss, rtol=1e-12, atol=1e-12)


def test_the_three_normalisations_by_hand():
    """Two completions, lengths 1 and 3, every per-token loss -1 (ratio 1, A = 1, no KL):
    sequence = mean of per-sequence means = -1; token = -4 / 4 = -1 too; with A = (1, 2):
    sequence = -(1 + 2) / 2 = -1.5, token = -(1 + 3 * 2) / 4 = -1.75, constant (max_len 4) = -7 / 8."""
    logp = torch.zeros(2, 3)
    mask = torch.tensor([[True, False, False], [True, True, True]])
    adv = torch.tensor([1.0, 2.0])
    got = {n: grpo_loss(logp, logp, adv, mask, norm=n, max_len=4)[0].item() for n in ("sequence", "token", "constant")}
    assert got == pytest.approx({"sequence": -1.5, "token": -1.75, "constant": -0.875})


def test_ratio_one_zero_advantage_and_k3():
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, stats = grpo_loss(logp, logp, torch.zeros(1), mask, ref_logp=logp, beta=0.1)
    assert loss.item() == 0 and stats.kl == 0 and stats.clip_fraction == 0 and stats.ratio_mean == 1
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # k3 >= 0 whatever the two policies
        ref = torch.randn(1, 2, generator=g) * 3
        assert grpo_loss(logp, logp, torch.zeros(1), mask, ref_logp=ref, beta=1.0)[1].kl >= 0
    with pytest.raises(ValueError, match="reference"):
        grpo_loss(logp, logp, torch.zeros(1), mask, beta=0.1)


def test_overlong_penalty_by_hand():
    """DAPO eq. 13 with L_max 10, L_cache 4: 0 up to 6 tokens, then -(|o| - 6) / 4, -1 at 10 (truncated)."""
    got = overlong_penalty(torch.tensor([1, 6, 7, 8, 10]), max_len=10, buffer=4)
    assert got.tolist() == pytest.approx([0.0, 0.0, -0.25, -0.5, -1.0])
    assert overlong_penalty(torch.tensor([10]), max_len=10, buffer=0).tolist() == [0.0]  # off


def test_clip_fraction_counts_the_clipped_tokens():
    """Ratios 1.5 (A > 0: clipped above 1.2), 0.5 (A > 0: not clipped; min takes the unclipped),
    0.5 with A < 0 (clipped below 0.8), 1.1 (inside); a masked token at ratio 9 does not count."""
    old = torch.zeros(2, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 9.0], [0.5, 1.1, 9.0]]))
    mask = torch.tensor([[True, True, False], [True, True, False]])
    stats = grpo_loss(logp, old, torch.tensor([1.0, -1.0]), mask)[1]
    assert stats.clip_fraction == 2 / 4
    stats = grpo_loss(logp, old, torch.tensor([1.0, -1.0]), mask, eps_high=0.6)[1]  # clip-higher: 1.5 is inside
    assert stats.clip_fraction == 1 / 4


def test_token_logprobs_at_a_temperature():
    logits = torch.tensor([[[2.0, 0.0, -1.0]]])
    got = token_logprobs(logits, torch.tensor([[0]]), temperature=2.0)
    assert got.item() == pytest.approx(torch.log_softmax(logits / 2, -1)[0, 0, 0].item())


def test_builtin_rewards():
    rec = {"answer": "42"}
    assert rewards.exact("", " 42\nmore", rec) == 1 and rewards.exact("", "41", rec) == 0
    assert rewards.numeric("", "<think>6*7</think> it is 42.0", rec) == 1
    assert rewards.numeric("", "<think>42</think> 41", rec) == 0 and rewards.numeric("", "none", rec) == 0
    cd = {"numbers": [3, 7, 25], "target": 46}
    assert rewards.countdown("", "25+3*7", cd) == 1 and rewards.countdown("", "25+3*7 = 46", cd) == 1
    assert rewards.countdown("", "25+7*3+0", cd) == 0  # 0 was not given
    assert rewards.countdown("", "25+25-4", cd) == 0 and rewards.countdown("", "__import__('os')", cd) == 0
    assert rewards.format_reward("", "<think>a b</think> 42", {}) == 1
    assert rewards.format_reward("", "<think>a b</think>", {}) == 0 and rewards.format_reward("", "42", {}) == 0


def test_code_reward_limits_hangs_and_crashes():
    tests = {"tests": ["assert add(2, 3) == 5"]}
    assert rewards.code("", "```python\ndef add(a, b):\n    return a + b\n```", tests) == 1
    assert rewards.code("", "def add(a, b):\n    return a - b\n", tests) == 0
    t0 = time.monotonic()
    assert rewards.run_code("while True: pass", seconds=1.0) is False  # a hang is killed at the limit
    assert time.monotonic() - t0 < 5
    assert rewards.run_code("import os; os.abort()") is False  # a crash
    assert rewards.run_code("x = bytearray(2 * 1024**3)", memory=256 * 2**20) is False  # over the memory limit
    assert rewards.run_code("x = 1") is True


def test_rewards_by_name(tmp_path, monkeypatch):
    (tmp_path / "mine.py").write_text("def r(prompt, completion, record):\n    return len(completion)\n"
                                      "def bad(prompt, completion, record):\n    raise KeyError('x')\n")
    assert rewards.resolve(f"{tmp_path / 'mine.py'}:r")("", "abc", {}) == 3
    monkeypatch.syspath_prepend(str(tmp_path))
    assert rewards.resolve("mine:r")("", "ab", {}) == 2
    with pytest.warns(UserWarning, match="raised KeyError"):  # a failing reward scores 0, the run goes on
        assert rewards.score([f"{tmp_path / 'mine.py'}:bad", "exact"], "", "7", {"answer": "7"}) == 1
    for name, message in (("nosuch", "built-in"), ("mine:nosuch", "no function"), ("no_module_x:f", "cannot import"),
                          (f"{tmp_path / 'gone.py'}:f", "does not exist")):
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            rewards.resolve(name)


@pytest.mark.parametrize("kind", KINDS)
def test_toy_tasks_are_verifiable_and_seeded(kind, tmp_path):
    records = generate(kind, 50, seed=3)
    assert records == generate(kind, 50, seed=3) and records != generate(kind, 50, seed=4)
    for r in records:  # the record's own completion is right, and another answer is not
        assert rewards.score(["verifier"], r["prompt"], r["completion"], r) == 1
        assert rewards.score(["verifier"], r["prompt"], "0 0", r) == 0 or r["answer"] in ("0", "0 0")
    assert load_tasks(write_tasks(records, tmp_path / "t.jsonl")) == records
    assert len(load_tasks(f"{kind}:7")) == 7


def test_task_file_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"answer": 1}\n')
    with pytest.raises(ValueError, match="line 2 has no string"):
        load_tasks(bad)
    with pytest.raises(FileNotFoundError, match="grpo tasks"):
        load_tasks(tmp_path / "missing.jsonl")


def test_pass_at_k_by_hand():
    """n = 5, c = 2: pass@1 = 2/5; pass@2 = 1 - C(3,2)/C(5,2) = 1 - 3/10; pass@4 = 1 - 0 (n - c < k)."""
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(5, 2, 4) == 1.0 and pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(200, 13, 100) == pytest.approx(1 - math.comb(187, 100) / math.comb(200, 100))
    assert ks_for(5) == [1, 2, 4, 5] and ks_for(1) == [1]
