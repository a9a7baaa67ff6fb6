"""The step-counted phases fitted to the planned length, and re-planned with it (frugallm/train/schedule.py).

README: "the learning-rate schedule ends on the last planned step". Issue 31: a 20-step run ended its
30-step warm-up at lr 2e-3 below the 3e-3 peak, and a `--time 1m` plan of 30 steps ended at the peak."""

import json

import pytest

from frugallm.train.config import TrainConfig
from frugallm.train.optim import lr_at
from frugallm.train.schedule import Schedule

PEAK, FLOOR = 3e-3, 3e-4  # TrainConfig's lr and lr * min_lr_ratio


def lrs(schedule: Schedule, cfg: TrainConfig) -> list[float]:
    return [schedule.lr(step, cfg) for step in range(schedule.end)]


@pytest.mark.parametrize("kind", ["cosine", "wsd"])
@pytest.mark.parametrize("steps, warmup", [(20, 5), (30, 7), (4, 1), (1, 1)])
def test_a_short_run_leaves_warm_up_and_ends_on_its_floor(steps, warmup, kind):
    cfg = TrainConfig(steps=steps, schedule=kind)  # warmup_steps: the default
    schedule = Schedule.for_run(cfg)
    lr = lrs(schedule, cfg)
    assert schedule.warmup_end() == warmup
    assert lr[warmup - 1] == pytest.approx(PEAK) and max(lr) == pytest.approx(PEAK)
    assert lr[-1] == pytest.approx(FLOOR if steps > 1 else PEAK)
    assert lr[:warmup] == sorted(lr[:warmup]) and lr[warmup - 1:] == sorted(lr[warmup - 1:], reverse=True)
    assert schedule.describe() == f"warm-up {warmup} step{'s' * (warmup > 1)} (cut from 30 to fit the {steps}-step run)"
    assert schedule.problems(cfg, 4096) == []
    late = [schedule.late(step, cfg.mtp_lambda_late_from) for step in range(steps)]
    assert late == [step >= 0.7 * steps for step in range(steps)]  # a fraction of the steps: fits any length


def test_a_run_the_warm_up_fits_keeps_its_schedule_exactly():
    # the default 500-step run, and an explicit warm-up that fits (the golden runs): lr_at as before, bit for bit
    for cfg, warmup in ((TrainConfig(steps=500), 30), (TrainConfig(steps=80, warmup_steps=2), 2),
                        (TrainConfig(steps=120, schedule="wsd"), 30)):
        schedule = Schedule.for_run(cfg)
        assert lrs(schedule, cfg) == [lr_at(s, cfg.steps, PEAK, warmup, 0.1, cfg.schedule, 0.2)
                                      for s in range(cfg.steps)]
        assert schedule.describe() == f"warm-up {warmup} steps"


def test_an_explicit_warm_up_that_cannot_fit_is_honoured_with_a_warning():
    cfg = TrainConfig(steps=20, warmup_steps=30)
    schedule = Schedule.for_run(cfg)
    assert lrs(schedule, cfg) == [PEAK * (s + 1) / 30 for s in range(20)]  # as set: the run ends inside it
    (warning,) = schedule.problems(cfg, 4096)
    assert warning.startswith("warmup_steps=30 takes more than a quarter of the 20-step run and the run ends "
                              "inside it") and "drop it for a warm-up that fits: 5 steps" in warning
    cfg = TrainConfig(steps=20, warmup_steps=10)
    assert "10 steps are left to decay" in Schedule.for_run(cfg).problems(cfg, 4096)[0]
    cfg = TrainConfig(steps=20, bias_freeze_tokens=100_000)  # 20 steps x 4096 tokens: it never freezes
    assert Schedule.for_run(cfg).problems(cfg, 4096) == [
        "bias_freeze_tokens=100,000 is past the run's 81,920 tokens: the expert bias never freezes; honoured as set"]


@pytest.mark.parametrize("kind", ["cosine", "wsd"])
def test_a_time_budget_plan_of_30_steps_leaves_warm_up_and_ends_on_its_floor(kind):
    # `--time 1m`: the 500-step cap's schedule until the plan after step 10, which finds room for 30
    cfg = TrainConfig(steps=500, time_budget="1m", schedule=kind)
    schedule = Schedule.for_run(cfg)
    before = lrs(schedule, cfg)[:10]
    schedule.replan(10, 30)
    lr = lrs(schedule, cfg)
    assert len(lr) == 30 and lr[:10] == before == [PEAK * (s + 1) / 30 for s in range(10)]  # the steps run stay
    warm = schedule.warmup_end()
    assert warm == 15 and schedule.describe() == "warm-up 15 steps (cut from 30 to fit the 30-step run)"
    assert lr[warm] == pytest.approx(PEAK) and lr[-1] == pytest.approx(FLOOR)
    assert lr[:warm + 1] == sorted(lr[:warm + 1]) and lr[warm:] == sorted(lr[warm:], reverse=True)
    assert max(b - a for a, b in zip(lr, lr[1:])) < 0.25 * PEAK  # no jump: the warm-up goes on to the peak
    late = [schedule.late(s, cfg.mtp_lambda_late_from) for s in range(30)]
    assert not late[warm] and late[-1] and late == sorted(late)  # the lambda switch moved into the plan


def test_re_plans_keep_the_lr_continuous_and_end_it_on_the_last_planned_step():
    cfg = TrainConfig(steps=400, time_budget="8m")
    schedule = Schedule.for_run(cfg)
    for done, end in ((10, 200), (40, 150), (60, 180), (170, 175)):  # shorter, longer, and near the end
        before = lrs(schedule, cfg)[:done]
        schedule.replan(done, end)
        lr = lrs(schedule, cfg)
        assert lr[:done] == pytest.approx(before, rel=1e-12, abs=0)  # what has run keeps its lr (to rounding)
        assert lr[-1] == pytest.approx(FLOOR) and lr[30:] == sorted(lr[30:], reverse=True)
        assert abs(lr[done] - lr[done - 1]) < 0.05 * PEAK
    # the re-plans are the run's state: a checkpoint's trainer.json brings them back exactly
    state = json.loads(json.dumps(schedule.to_state()))
    again = Schedule.from_state(state, TrainConfig(steps=175, time_budget="8m"))
    assert again == schedule and lrs(again, cfg) == lrs(schedule, cfg)
    # a resume given another length (--steps) starts a schedule for it; an old checkpoint has none
    assert Schedule.from_state(state, TrainConfig(steps=300)) == Schedule.for_run(TrainConfig(steps=300))
    assert Schedule.from_state(None, TrainConfig(steps=300)) == Schedule.for_run(TrainConfig(steps=300))
