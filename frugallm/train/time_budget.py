"""A training time budget (`time_budget="8m"`): `steps` becomes a cap, and the run plans its length.

The first few steps, inside the LR warmup so nothing so far depends on the total, are timed (fewer
where timing them all would overrun the budget). Then the run plans the most steps whose training,
evals and checkpoints fit in what is left of the budget (counted from the start of `train()`,
set-up included); the trainer sets `steps` to the plan and rewrites train_config.json, and the
schedule (train/schedule.py) maps its last step onto the LR floor.

Then it re-plans every REPLAN_EVERY steps from the mean time of the last REPLAN_WINDOW steps and the
time actually left (past evals and checkpoints included), shortening or lengthening the rest of the
run (never past the cap) when the length moves by more than 1/REPLAN_SLACK of the steps left; the
schedule re-maps the rest so the LR still ends at its floor on the last planned step. A resume from
after the first plan goes on with the saved plan and schedule and never plans again (a resume from
before it plans anew).
"""

from __future__ import annotations

import time
from collections import deque

_clock = time.perf_counter  # the budget's only clock (tests replace it to plan deterministically)
SAVE_BYTES_PER_S = 100e6  # checkpoint cost estimate: write, fsync and sha256 read-back, a slow laptop disk
REPLAN_EVERY = 10  # steps between re-plans
REPLAN_WINDOW = 30  # the steps whose mean time a re-plan uses: a sustained change, not one slow batch
REPLAN_SLACK = 10  # a re-plan moves the length only by more than 1/10 of the steps left (and 2 steps): a
# 10-step window of short steps is noisy, and each move of the length is a log line


def now() -> float:
    return _clock()


def measured_steps(warmup_steps: int) -> int:
    """The step after which a time-budgeted run plans its total: a few steps, inside the warmup
    (when it is at least 3 steps long), where the LR does not depend on the total."""
    return max(3, min(10, warmup_steps // 3))


def plan_steps(cap: int, done: int, remaining_s: float, step_s: float, eval_s: float, save_s: float,
               eval_period: int, save_every: int) -> tuple[int, float]:
    """The most total steps n in [done, cap] whose cost after step `done` fits in remaining_s:
    n - done steps, the evals (every `eval_period`) and checkpoints (every `save_every`) they pass,
    and the final eval and checkpoint at n. Returns (n, its eval + checkpoint seconds)."""
    def overhead(n: int) -> float:
        evals = n // eval_period - done // eval_period + (n % eval_period != 0)
        saves = n // save_every - done // save_every + (n % save_every != 0)
        return evals * eval_s + saves * save_s

    lo, hi = done, cap  # the cost only grows with n: bisect for the last n that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if (mid - done) * step_s + overhead(mid) <= remaining_s:
            lo = mid
        else:
            hi = mid - 1
    return lo, overhead(lo) if lo > done else 0.0


class TimeBudget:
    """Times the steps; `step_begins` / `plan_due` around each step, then `plan` when it says so: the
    first plan after the measured steps, then a re-plan every REPLAN_EVERY steps."""

    def __init__(self, seconds: float | None, start: int, steps: int, warmup_steps: int, t0: float):
        self.seconds, self.t0, self.cap = seconds, t0, steps
        self.plan_at = measured_steps(warmup_steps)
        self.active = seconds is not None and start < self.plan_at < steps
        # not this call's first step (one-off costs: allocation, compiling) when there are others to time
        self.first_timed = start + 1 if self.plan_at - start >= 2 else start
        self.planned, self.next_plan = False, self.plan_at
        self.times: deque[float] = deque()  # the timed steps' seconds: all before the first plan, then a window
        self._t = None

    @property
    def timing(self) -> bool:
        """Whether the step now running is timed (the same on every rank: the steps and budget decide it)."""
        return self._t is not None

    @property
    def step_s(self) -> float:
        return sum(self.times) / len(self.times)

    def step_begins(self, step: int) -> None:
        self._t = now() if self.active and step >= self.first_timed else None

    def plan_due(self, done: int) -> bool:
        """After step `done`: record its time; True when a plan is to be made now (after the measured
        steps, or sooner where measuring them all would overrun the budget; then every REPLAN_EVERY)."""
        if self._t is None:
            return False
        t = now()
        self.times.append(t - self._t)
        self.spent = t - self.t0
        if self.planned:
            return done >= self.next_plan
        return done >= self.plan_at or self.spent + (self.plan_at - done) * self.step_s > self.seconds

    def plan(self, current: int, done: int, eval_steps: float, save_bytes: int, eval_period: int,
             save_every: int) -> tuple[int, str | None]:
        """The planned total after step `done` (the run now plans `current`), and a line saying how; None
        for a re-plan that keeps the length. eval_steps: an eval's cost in training steps."""
        step_s, timed, first = self.step_s, len(self.times), not self.planned
        planned, overhead = plan_steps(self.cap, done, self.seconds - self.spent, step_s, eval_steps * step_s,
                                       save_bytes / SAVE_BYTES_PER_S, eval_period, save_every)
        self.planned, self.next_plan = True, done + REPLAN_EVERY
        self.times = deque(self.times, maxlen=REPLAN_WINDOW)
        if first:
            return planned, (f"{step_s:.2f} s/step measured over {timed} steps, {self.spent:.0f}s spent -> "
                             f"{planned} of {self.cap} steps (eval+save ~{overhead:.0f}s)")
        if abs(planned - current) <= max(2, (current - done) // REPLAN_SLACK):
            return current, None
        return planned, (f"re-planned after step {done}: {step_s:.2f} s/step over the last {timed} steps, "
                         f"{self.spent:.0f}s spent -> {planned} of {self.cap} steps (was {current})")
