"""Training precision `auto` (resolved once from the host profile, recorded in the run) and the time
budget (steps planned from measured throughput; the LR schedule ends at the plan; resume repeats it).

The budget's clock is replaced by a counter (time_budget._clock), so every plan here is deterministic."""

import json
import signal

import pytest
import torch
from safetensors.torch import load_file

from frugallm.cli import main
from frugallm.config import get_preset
from frugallm.train.config import TrainConfig, apply_overrides, duration_seconds
from frugallm.formats import checkpoint
from frugallm.model.transformer import Transformer
from frugallm.train import time_budget, trainer
from frugallm.train.time_budget import plan_steps
from frugallm.train.trainer import RunResult

SMALL = ["dim=64", "n_layers=2", "n_heads=2", "q_lora_rank=0", "kv_lora_rank=32", "qk_nope_head_dim=16",
         "qk_rope_head_dim=8", "v_head_dim=16", "n_routed_experts=8", "n_expert_groups=2", "n_limited_groups=1",
         "n_activated_experts=2", "moe_inter_dim=32", "inter_dim=128", "vocab_size=384", "max_seq_len=64",
         "seq_len=32", "batch_size=4", "tokenizer_train_chars=200000", "warmup_steps=3", "eval_every=5",
         "eval_batches=2", "log_every=1", "sample_tokens=0"]


def _configs(corpus, *pairs):
    return apply_overrides(get_preset("tiny"), TrainConfig(data=str(corpus)), SMALL + list(pairs))


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def fast_peak(monkeypatch):
    """The MFU denominator's 1024^3 matmul takes seconds in bf16 on a host without native bf16."""
    monkeypatch.setattr(trainer, "matmul_peak", lambda dtype: 1e12)


@pytest.mark.parametrize("host, expected", [("no-bf16", "fp32"), ("bf16", "bf16")])
def test_auto_precision_follows_the_host_and_is_recorded(tmp_path, corpus, monkeypatch, fast_peak, capsys, host,
                                                         expected):
    monkeypatch.setenv("FRUGALLM_HOST", host)
    model_cfg, train_cfg = _configs(corpus, "steps=3", "save_every=3")
    assert train_cfg.precision == "auto"  # the default
    logs = []
    trainer.train(model_cfg, train_cfg, tmp_path / "run", log=logs.append)
    assert any(line.startswith(f"train dtype auto -> {expected}") for line in logs), logs
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["precision"] == expected
    ckpt = checkpoint.latest(tmp_path / "run")
    assert json.loads((ckpt / "train_config.json").read_text())["precision"] == expected
    assert [r["precision"] for r in _rows(tmp_path / "run")] == [expected] * 3
    # `frugallm eval` runs in the host's prefill choice and says why
    assert main(["eval", str(tmp_path / "run"), "--batches", "1"]) == 0
    assert f"prefill dtype auto -> {expected}" in capsys.readouterr().err


def test_resume_repeats_the_recorded_precision_on_another_host(tmp_path, corpus, monkeypatch, fast_peak):
    monkeypatch.setenv("FRUGALLM_HOST", "no-bf16")
    model_cfg, train_cfg = _configs(corpus, "steps=2", "save_every=2")
    trainer.train(model_cfg, train_cfg, tmp_path / "run", log=lambda s: None)
    monkeypatch.setenv("FRUGALLM_HOST", "bf16")  # where auto would choose bf16
    longer = TrainConfig(**{**train_cfg.to_dict(), "steps": 4})
    trainer.train(model_cfg, longer, tmp_path / "run", resume=True, log=lambda s: None)
    assert [r["precision"] for r in _rows(tmp_path / "run")] == ["fp32"] * 4


def test_explicit_precision_is_honoured(tmp_path, corpus, monkeypatch, fast_peak):
    monkeypatch.setenv("FRUGALLM_HOST", "bf16")
    model_cfg, train_cfg = _configs(corpus, "steps=1", "precision=fp32")
    trainer.train(model_cfg, train_cfg, tmp_path / "fp32", log=lambda s: None)
    assert _rows(tmp_path / "fp32")[0]["precision"] == "fp32"
    monkeypatch.setenv("FRUGALLM_HOST", "no-bf16")
    model_cfg, train_cfg = _configs(corpus, "steps=1", "precision=bf16")
    with pytest.warns(UserWarning, match="bf16"):  # honoured, with a warning that it is slow here
        trainer.train(model_cfg, train_cfg, tmp_path / "bf16", log=lambda s: None)
    assert _rows(tmp_path / "bf16")[0]["precision"] == "bf16"
    with pytest.raises(ValueError, match="precision='fp16' must be 'auto', 'bf16' or 'fp32'"):
        TrainConfig(precision="fp16")


def test_time_budget_parsing():
    assert [duration_seconds(t) for t in ("90s", "8m", "1.5h", "")] == [90.0, 480.0, 5400.0, None]
    for bad in ("8", "8 m", "8d", "-1m", "0s", "m", "1h30m"):
        with pytest.raises(ValueError, match=r"time_budget=.* must be a positive number followed by s, m or h"):
            TrainConfig(time_budget=bad)


def test_cli_length_flags(monkeypatch, capsys):
    seen = []

    def fake_train(model_cfg, train_cfg, run_dir, resume=False):
        seen.append((train_cfg.steps, train_cfg.time_budget))
        return RunResult(run_dir, train_cfg.steps, None, 0.0, False, None)

    monkeypatch.setattr(trainer, "train", fake_train)
    for flags, expected in [([], (500, "8m")), (["--steps", "40"], (40, "")), (["--time", "90s"], (500, "90s")),
                            (["--time", "90s", "--steps", "40"], (40, "90s")), (["--set", "steps=40"], (40, ""))]:
        assert main(["train", "--no-sample", *flags]) == 0
        assert seen.pop() == expected, flags
    assert main(["train", "--time", "5 minutes"]) == 2
    assert "time_budget='5 minutes' must be a positive number followed by s, m or h" in capsys.readouterr().err


def test_plan_steps():
    # 10 s left at 1 s/step from step 5, no eval or save cost: 15 steps
    assert plan_steps(100, 5, 10.0, 1.0, 0.0, 0.0, 10, 50) == (15, 0.0)
    # an eval costs 2 s: at n=13 the evals at 10 and the final at 13 (8 + 4 = 12 > 10); at n=12, 7 + 4 = 11
    # also too much; n=11: 6 + 4 = 10 fits
    assert plan_steps(100, 5, 10.0, 1.0, 2.0, 0.0, 10, 50)[0] == 11
    assert plan_steps(100, 5, 10.0, 1.0, 2.0, 0.0, 10, 50)[1] == pytest.approx(4.0)
    assert plan_steps(8, 5, 1e9, 1.0, 1.0, 1.0, 10, 50)[0] == 8  # the cap
    assert plan_steps(100, 5, -3.0, 1.0, 0.0, 0.0, 10, 50) == (5, 0.0)  # the set-up spent it all: stop now


class StepClock:
    """The budget's clock (time_budget._clock), moved only by the model's forwards, so every plan is
    deterministic: a training forward (one per step: grad_accum=1) costs `step_s`, an eval forward
    step_s / 3 (the budget's own estimate of it) and a checkpoint nothing (SAVE_BYTES_PER_S infinite).
    The budget's estimates then hold, and only a change of `step_s` moves the plan. `interrupt_at`:
    Ctrl-C during that training forward (the trainer finishes the step, saves and stops)."""

    def __init__(self, monkeypatch, step_s: float = 1.0, interrupt_at: int = 0):
        self.t, self.step_s, self.forwards, self.interrupt_at, self.costs = 0.0, step_s, 0, interrupt_at, {}
        monkeypatch.setattr(time_budget, "_clock", lambda: self.t)
        monkeypatch.setattr(time_budget, "SAVE_BYTES_PER_S", float("inf"))
        real = Transformer.forward

        def forward(model, *args, **kwargs):
            if model.training:
                self.forwards += 1
                self.step_s = self.costs.get(self.forwards, self.step_s)
                if self.forwards == self.interrupt_at:
                    signal.raise_signal(signal.SIGINT)
            self.t += self.step_s if model.training else self.step_s / 3
            return real(model, *args, **kwargs)

        monkeypatch.setattr(Transformer, "forward", forward)


def test_budgeted_run_plans_its_steps_and_resumes_bit_identically(tmp_path, corpus, monkeypatch):
    model_cfg, train_cfg = _configs(corpus, "steps=60", "time_budget=20s", "save_every=4", "precision=fp32")
    full, cut = tmp_path / "full", tmp_path / "cut"
    with monkeypatch.context() as m:
        StepClock(m)
        logs = []
        trainer.train(model_cfg, train_cfg, full, log=logs.append)
    plan = [line for line in logs if line.startswith("time budget 20s:")]
    # steady steps: the first plan holds, and the re-plans every 10 steps keep it
    assert len(plan) == 1 and "1.00 s/step measured over 2 steps" in plan[0], logs
    saved = json.loads((full / "train_config.json").read_text())
    planned = saved["steps"]
    assert 3 < planned < 60 and f"-> {planned} of 60 steps" in plan[0]
    assert saved["time_budget"] == "20s"
    rows = _rows(full)
    assert [r["step"] for r in rows] == list(range(1, planned + 1))
    assert rows[-1]["lr"] == pytest.approx(train_cfg.lr * train_cfg.min_lr_ratio)  # the schedule ends at the plan
    assert rows[2]["lr"] == pytest.approx(train_cfg.lr)  # warmup: planned after the 3 steps of warmup
    assert checkpoint.latest(full).name == f"step_{planned:07d}"

    # the same run, Ctrl-C at step 8 (after the plan), then resumed with a fresh clock: no second plan
    with monkeypatch.context() as m:
        StepClock(m, interrupt_at=8)
        assert trainer.train(model_cfg, train_cfg, cut, log=lambda s: None).interrupted
    assert checkpoint.latest(cut).name == "step_0000008"
    with monkeypatch.context() as m:
        StepClock(m)
        logs = []
        trainer.train(model_cfg, train_cfg, cut, resume=True, log=logs.append)
    assert not any(line.startswith("time budget") for line in logs)
    assert [(r["step"], r["loss"], r.get("val_loss"), r["lr"]) for r in _rows(cut)] == \
        [(r["step"], r["loss"], r.get("val_loss"), r["lr"]) for r in rows]
    a = load_file(checkpoint.latest(full) / "model.safetensors")
    b = load_file(checkpoint.latest(cut) / "model.safetensors")
    assert checkpoint.latest(cut).name == f"step_{planned:07d}"
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_slowdown_re_plans_the_rest_and_the_schedule_still_ends_on_its_floor(tmp_path, corpus, monkeypatch):
    """Issue 25: the steps become twice as slow after the plan; the re-plans shorten the run, so it keeps
    its budget, the LR still ends at its floor on the last step, the progress line says so, and a resume
    after the re-plans repeats the run exactly (they are in the checkpoint)."""
    model_cfg, train_cfg = _configs(corpus, "steps=100", "time_budget=120s", "save_every=4", "precision=fp32",
                                    "warmup_steps=null")
    full, cut = tmp_path / "full", tmp_path / "cut"
    with monkeypatch.context() as m:
        clock = StepClock(m)
        clock.costs[9] = 2.0  # from step 9 on, right after the plan at step 8 (auto warm-up 25: plan_at 8)
        logs = []
        trainer.train(model_cfg, train_cfg, full, log=logs.append)
    plans = [line for line in logs if line.startswith("time budget 120s:")]
    totals = [int(line.split(" of 100 steps")[0].rsplit(" ", 1)[1]) for line in plans]
    # the first plan (1 s/step): all 100 steps fit; then the 30-step window fills with 2 s steps
    assert totals[0] == 100 and len(totals) >= 2 and totals[1:] == sorted(totals[1:], reverse=True), plans
    assert all(" re-planned after step " in line for line in plans[1:])
    assert plans[-1].startswith("time budget 120s: re-planned after step ") and " 2.00 s/step over the last 30 " \
        in plans[-1]
    assert clock.t <= 120  # the budget holds (without the re-plans, 100 steps: ~190 s)
    assert any(f"re-planned from {totals[0]}" in line for line in logs if line.startswith("step ")), logs
    rows = _rows(full)
    assert rows[-1]["step"] == totals[-1] == json.loads((full / "train_config.json").read_text())["steps"]
    assert rows[-1]["lr"] == pytest.approx(train_cfg.lr * train_cfg.min_lr_ratio)
    lrs = [r["lr"] for r in rows]
    peak = lrs.index(max(lrs))  # warm-up, then the decay: continuous through every re-plan
    assert lrs[peak] == pytest.approx(train_cfg.lr) and lrs[:peak + 1] == sorted(lrs[:peak + 1])
    assert lrs[peak:] == sorted(lrs[peak:], reverse=True)
    assert max(abs(b - a) for a, b in zip(lrs, lrs[1:])) < 0.2 * train_cfg.lr

    last_plan = int(plans[-1].split("re-planned after step ")[1].split(":")[0])
    with monkeypatch.context() as m:  # Ctrl-C after the last re-plan; resumed, it goes on exactly
        clock = StepClock(m, interrupt_at=last_plan + 2)
        clock.costs[9] = 2.0
        assert trainer.train(model_cfg, train_cfg, cut, log=lambda s: None).interrupted
    with monkeypatch.context() as m:
        StepClock(m)
        trainer.train(model_cfg, train_cfg, cut, resume=True, log=lambda s: None)
    assert [(r["step"], r["loss"], r["lr"]) for r in _rows(cut)] == [(r["step"], r["loss"], r["lr"]) for r in rows]


def test_slow_steps_plan_before_the_measuring_overruns_the_budget(tmp_path, corpus, monkeypatch):
    model_cfg, train_cfg = _configs(corpus, "steps=60", "time_budget=25s", "precision=fp32")
    StepClock(monkeypatch, step_s=10.0)  # a step takes 10 s
    logs = []
    trainer.train(model_cfg, train_cfg, tmp_path / "run", log=logs.append)
    # after step 2 (the first timed one), 20 s are spent and step 3 would end past 25 s: plan now
    assert any(line.startswith("time budget 25s: 10.00 s/step measured over 1 steps, 20s spent -> 2 of 60 steps")
               for line in logs), logs
    assert [r["step"] for r in _rows(tmp_path / "run")] == [1, 2]
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["steps"] == 2


def test_a_short_run_fits_its_warm_up_says_so_and_shows_its_first_steps(tmp_path, corpus, fast_peak):
    """Issue 31: `--steps 20` kept the 30-step warm-up (ending at lr 2e-3), and nothing was shown between
    the set-up and step 10."""
    model_cfg, train_cfg = _configs(corpus, "steps=20", "warmup_steps=null", "log_every=10", "eval_every=10",
                                    "precision=fp32")
    logs = []
    trainer.train(model_cfg, train_cfg, tmp_path / "run", log=logs.append)
    (summary,) = [line for line in logs if line.startswith("model: ")]
    assert "| 20 steps x 128 tokens, warm-up 5 steps (cut from 30 to fit the 20-step run) |" in summary
    assert not any(line.startswith("warning") for line in logs)
    steps = [line.split(" | ")[0] for line in logs if line.startswith("step ")]
    assert steps == [f"step {n}/20" for n in range(1, 11)] + ["step 20/20"], logs  # each step until the first line
    rows = _rows(tmp_path / "run")
    assert rows[-1]["lr"] == pytest.approx(train_cfg.lr * train_cfg.min_lr_ratio)
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["warmup_steps"] is None
    # an explicit warm-up is honoured, and the run says it does not fit
    model_cfg, train_cfg = _configs(corpus, "steps=5", "warmup_steps=3", "save_every=5", "precision=fp32")
    logs = []
    trainer.train(model_cfg, train_cfg, tmp_path / "explicit", log=logs.append)
    assert "warning: warmup_steps=3 takes more than a quarter of the 5-step run and 2 steps are left to decay; " \
           "honoured as set (drop it for a warm-up that fits: 1 step)" in logs
    assert [r["lr"] for r in _rows(tmp_path / "explicit")] == pytest.approx([1e-3, 2e-3, 3e-3, 3e-3, 3e-4])
