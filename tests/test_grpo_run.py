"""GRPO end to end on a tiny trained run (tests/conftest.py `tiny_run`): the engine's sampling log-probs
against a training forward's, a run directory that loads, plots and resumes exactly, the CLI, eval."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from frugallm.cli import main
from frugallm.formats import checkpoint
from frugallm.plan import load
from frugallm.rl.config import with_variant
from frugallm.rl.rollout import batch, completion_logprobs, prompt_ids, sample
from frugallm.rl.tasks import generate, write_tasks
from frugallm.rl.trainer import train_grpo

TIMING = ("rollout_tokens_per_s", "rollout_s", "update_s")


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    return write_tasks(generate("arithmetic", 40, digits=1), tmp_path_factory.mktemp("task") / "arith.jsonl")


@pytest.fixture(scope="module")
def the_reward(tmp_path_factory):
    """A reward the tiny word-corpus model earns at varying rates (arithmetic it never gets right)."""
    path = tmp_path_factory.mktemp("reward") / "words.py"
    path.write_text("def the(prompt, completion, record):\n    return float(completion.count('the'))\n")
    return f"{path}:the"


def _cfg(tiny_run, task_file, **fields):
    base = dict(init_from=str(tiny_run), task=str(task_file), group=4, prompts_per_step=2, max_new_tokens=6,
                micro_batch=5, lr=1e-3, steps=2, save_every=2)
    return with_variant(fields.pop("variant", "grpo"), **{**base, **fields})


def test_sampling_logprobs_equal_a_training_forward(tiny_run):
    """The engine's log-prob of each sampled token (temperature 1, fp32, absorbed MLA over the KV cache)
    equals a training forward's (naive MLA, no cache, fp32) within 1e-4."""
    model, tok = load(tiny_run).float().eval(), checkpoint.load_tokenizer(tiny_run)
    prompts = [prompt_ids(tok, t) for t in ("the cat", "a dog ran to", "the")]
    rollouts = sample(model, tok, prompts * 2, 12, 1.0, list(range(6)))
    ids, at, tokens, mask = batch(rollouts)
    with torch.no_grad():
        logp = completion_logprobs(model, ids, at, tokens)
    compared = 0
    for i, r in enumerate(rollouts):
        n = len(r.sampled_logprobs)  # every token but a final end-of-text one
        assert n >= len(r.tokens) - 1 and n > 0
        torch.testing.assert_close(logp[i, :n], torch.tensor(r.sampled_logprobs), atol=1e-4, rtol=0)
        compared += n
    assert compared >= 20


def test_run_logs_plots_loads_and_resumes_exactly(tiny_run, task_file, the_reward, tmp_path):
    """A 4-step run equals a 2-step run resumed to 4 (weights bit for bit, metrics but timings), rollouts
    included; its metrics carry the GRPO columns, `frugallm plot` draws them and `load` opens the run."""
    cfg = lambda steps: _cfg(tiny_run, task_file, steps=steps, rewards=the_reward, mu=2)  # noqa: E731
    whole = train_grpo(cfg(4), tmp_path / "whole", log=lambda line: None)
    train_grpo(cfg(2), tmp_path / "cut", log=lambda line: None)
    resumed = train_grpo(cfg(4), tmp_path / "cut", resume=True, given={"steps"}, log=lambda line: None)
    assert whole.step == resumed.step == 4
    a, b = load(tmp_path / "whole").state_dict(), load(tmp_path / "cut").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [[{k: v for k, v in json.loads(line).items() if k not in TIMING}
             for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()] for run in ("whole", "cut")]
    assert rows[0] == rows[1] and [r["step"] for r in rows[0]] == [1, 2, 3, 4]
    for key in ("reward_mean", "accuracy", "kl", "clip_fraction", "length_mean", "equal_groups"):
        assert key in rows[0][0]
    assert rows[0][-1]["kl"] > 0 and max(r["reward_std"] for r in rows[0]) > 0  # it learned, and moved
    assert max(r["clip_fraction"] for r in rows[0]) > 0  # mu = 2: the second update's ratio is not 1
    init = load(tiny_run).state_dict()
    assert any(not torch.equal(a[k], init[k]) for k in a if not k.startswith("mtp."))
    assert all(torch.equal(a[k], init[k]) for k in a if k.startswith("mtp."))  # MTP frozen
    assert main(["plot", str(tmp_path / "whole")]) == 0
    for name in ("reward", "kl", "clip_fraction", "length", "equal_groups"):
        assert (tmp_path / "whole" / f"{name}.png").exists()


def test_dynamic_sampling_drops_all_equal_groups(tiny_run, task_file, tmp_path):
    """A reward that is always 1: every group is all-equal, DAPO drops them all and nothing is updated."""
    reward = tmp_path / "always.py"
    reward.write_text("def one(prompt, completion, record):\n    return 1.0\n")
    result = train_grpo(_cfg(tiny_run, task_file, variant="dapo", rewards=f"{reward}:one", steps=1, save_every=1,
                             beta=0.0), tmp_path / "run", log=lambda line: None)
    assert result.last["equal_groups"] == 1.0 and result.last["kept"] == 0 and result.last["loss"] is None
    a, init = load(tmp_path / "run").state_dict(), load(tiny_run).state_dict()
    assert all(torch.equal(a[k], init[k]) for k in a)


@pytest.fixture(scope="module")
def some_groups_reward(tmp_path_factory):
    """A reward that is 0 for every completion of two prompts in three (all-equal groups) and varies with
    the completion's length for the rest: dynamic sampling must refill."""
    path = tmp_path_factory.mktemp("reward") / "some.py"
    path.write_text("def some(prompt, completion, record):\n"
                    "    return float(len(completion) % 2) if int(record['answer']) % 3 == 0 else 0.0\n")
    return f"{path}:some"


def test_dynamic_sampling_refills_the_batch(tiny_run, task_file, some_groups_reward, tmp_path):
    """DAPO's dynamic sampling: the all-equal groups are dropped and further rounds of prompts refill the
    batch to prompts_per_step groups (never more), or stop at max_sample_rounds; every kept group varies."""
    from frugallm.rl.trainer import _sample_batch, set_up

    cfg = _cfg(tiny_run, task_file, variant="dapo", rewards=some_groups_reward, beta=0.0, max_sample_rounds=4,
               prompts_per_step=3)
    run = set_up(cfg, tmp_path / "run", log=lambda line: None)
    try:
        rounds = []
        for step in range(3):
            rollouts, rewards, _, equal, keep = _sample_batch(run, step)
            G = cfg.group
            n_rounds = len(rollouts) // (3 * G)
            rounds.append(n_rounds)
            kept_groups = keep.view(-1, G)[:, 0]
            assert int(kept_groups.sum()) <= 3 and (int(kept_groups.sum()) == 3 or n_rounds == 4)
            assert not (kept_groups & equal).any()  # no all-equal group is kept
            assert ((rewards.view(-1, G).std(1) > 0) == ~equal).all()
        assert max(rounds) > 1  # it refilled
        assert [len(_sample_batch(run, s)[0]) for s in range(3)] == [r * 3 * G for r in rounds]  # a function of the step
    finally:
        run.lock.close()


DAPO_RUN = dict(variant="dapo", group=4, prompts_per_step=2, max_new_tokens=6, steps=4, save_every=1, lr=1e-3,
                beta=0.04, mu=2, overlong_buffer=2, max_sample_rounds=3, threads=1)


def _grpo_cmd(tiny_run, task_file, reward, out):
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in DAPO_RUN.items() if k not in ("overlong_buffer",
                                                                                   "max_sample_rounds", "threads")]
    sets = [f"--set={k}={DAPO_RUN[k]}" for k in ("overlong_buffer", "max_sample_rounds", "threads")]
    return [sys.executable, "-m", "frugallm.cli", "grpo", "--init-from", str(tiny_run), "--task", str(task_file),
            "--reward", reward, *flags, *sets, "--out", str(out)]


def test_resume_after_sigkill_repeats_the_run(tiny_run, task_file, some_groups_reward, tmp_path):
    """Killed (SIGKILL) after its second checkpoint, a DAPO run (dynamic sampling refill, overlong shaping,
    mu 2, KL) resumes to the uninterrupted run's weights and metrics exactly, rollouts included. (One
    thread throughout, so that the kernels' sums are the same in and out of the subprocess.)"""
    full, cut = tmp_path / "full", tmp_path / "cut"
    proc = subprocess.Popen(_grpo_cmd(tiny_run, task_file, some_groups_reward, cut), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    threads = torch.get_num_threads()
    try:
        cfg = with_variant(DAPO_RUN["variant"], init_from=str(tiny_run), task=str(task_file),
                           rewards=some_groups_reward, **{k: v for k, v in DAPO_RUN.items() if k != "variant"})
        deadline = time.time() + 120
        while not (cut / "checkpoints" / "step_0000002").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        out = proc.communicate(timeout=60)[0].decode()
        assert proc.returncode == -signal.SIGKILL, out  # killed mid-run, not finished
        assert checkpoint.latest(cut).name in ("step_0000002", "step_0000003")
        train_grpo(cfg, full, log=lambda line: None)  # the uninterrupted run
        train_grpo(cfg, cut, resume=True, log=lambda line: None)
    finally:
        torch.set_num_threads(threads)
    a, b = load(full).state_dict(), load(cut).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [[{k: v for k, v in json.loads(line).items() if k not in TIMING}
             for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (full, cut)]
    assert rows[0] == rows[1] and [r["step"] for r in rows[0]] == [1, 2, 3, 4]


def test_cli_tasks_grpo_eval(tiny_run, tmp_path, capsys):
    out = tmp_path / "sort.jsonl"
    assert main(["grpo", "tasks", "--kind", "sorting", "--n", "6", "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 6
    assert main(["grpo", "--init-from", str(tiny_run), "--task", str(out), "--group", "2", "--steps", "1",
                 "--max-new-tokens", "4", "--prompts-per-step", "2", "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--task", str(out), "--samples", "3", "--max-new-tokens", "4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["problems"] == 6 and set(report) >= {"accuracy", "pass@1", "pass@2", "pass@3"}
    assert main(["grpo", "--init-from", str(tiny_run), "--task", str(out), "--reward", "nosuch",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "reward 'nosuch'" in capsys.readouterr().err


def test_rewarding_one_token_raises_its_probability_with_kl_bounded(tiny_run):
    """Reward = the share of a completion's tokens that are " the": six GRPO steps (G = 16, beta 0.04) at
    least double its probability after the prompts, and the KL to the frozen reference stays small. (The
    20-step tiny run is still near uniform over its 300 tokens: a step's 256 sampled tokens hold a few.)"""
    from frugallm.rl.objective import advantages, grpo_loss

    model, tok = load(tiny_run).float().eval(), checkpoint.load_tokenizer(tiny_run)
    reference = load(tiny_run).float().eval()
    target = tok.encode(" the")[0]
    prompts = [prompt_ids(tok, text) for text in ("the cat", "a dog")]
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if not n.startswith("mtp.")], lr=5e-3)

    def p_target():
        with torch.no_grad():
            return sum(model(torch.tensor([p])).logits[0, -1].softmax(-1)[target].item() for p in prompts) / 2

    before, kls = p_target(), []
    for step in range(6):
        rollouts = sample(model, tok, [p for p in prompts for _ in range(16)], 8, 1.0,
                          [100 * step + i for i in range(32)])
        reward = torch.tensor([sum(t == target for t in r.tokens) / len(r.tokens) for r in rollouts])
        ids, at, tokens, mask = batch(rollouts)
        with torch.no_grad():
            ref = completion_logprobs(reference, ids, at, tokens)
        logp = completion_logprobs(model, ids, at, tokens)
        loss, stats = grpo_loss(logp, logp.detach(), advantages(reward, 16), mask, ref_logp=ref, beta=0.04)
        opt.zero_grad()
        loss.backward()
        opt.step()
        kls.append(stats.kl)
    after = p_target()
    assert after > 2 * before, (before, after)
    assert max(kls) < 0.5, kls


def test_init_from_a_gguf_file(tiny_run, task_file, the_reward, tmp_path):
    """--init-from FILE.gguf: the policy, the reference and the tokenizer come from the GGUF file through
    formats/open.py (nothing of GRPO's own); the run's first weights are the file's."""
    from frugallm.formats.gguf import write_gguf

    gguf = write_gguf(load(tiny_run).float(), checkpoint.load_tokenizer(tiny_run), tmp_path / "tiny.gguf")
    result = train_grpo(_cfg(tiny_run, task_file, init_from=str(gguf), rewards=the_reward, steps=1, save_every=1),
                        tmp_path / "run", log=lambda line: None)
    assert result.step == 1 and result.last["kl"] == 0  # one step: the policy was the reference
    assert checkpoint.load_tokenizer(tmp_path / "run").encode("the cat") == \
        checkpoint.load_tokenizer(tiny_run).encode("the cat")
