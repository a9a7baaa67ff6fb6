"""A training time budget (`time_budget="8m"`): `steps` becomes a cap, and the run plans its length.

The first few steps, inside the LR warmup so nothing so far depends on the total, are timed (fewer
where timing them all would overrun the budget). Then the run plans the most steps whose training,
evals and checkpoints fit in what is left of the budget (counted from the start of `train()`,
set-up included); the trainer sets `steps` to the plan and rewrites train_config.json, so the LR
schedule decays to its floor exactly at the last planned step. From then on it is a step-counted
run: a resume uses the saved plan and never plans again (a resume from before the plan point plans
anew).
"""

from __future__ import annotations

import time

_clock = time.perf_counter  # the budget's only clock (tests replace it to plan deterministically)
SAVE_BYTES_PER_S = 100e6  # checkpoint cost estimate: write, fsync and sha256 read-back, a slow laptop disk


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
    """Times the steps before the plan; `step_begins` / `plan_due` around each step, then `plan`."""

    def __init__(self, seconds: float | None, start: int, steps: int, warmup_steps: int, t0: float):
        self.seconds, self.t0 = seconds, t0
        self.plan_at = measured_steps(warmup_steps)
        self.active = seconds is not None and start < self.plan_at < steps
        # not this call's first step (one-off costs: allocation, compiling) when there are others to time
        self.first_timed = start + 1 if self.plan_at - start >= 2 else start
        self.timed_s, self.timed_n, self._t = 0.0, 0, None

    @property
    def step_s(self) -> float:
        return self.timed_s / self.timed_n

    def step_begins(self, step: int) -> None:
        self._t = now() if self.active and step >= self.first_timed else None

    def plan_due(self, done: int) -> bool:
        """After step `done`: record its time; True when the plan is to be made now (after the
        measured steps, or sooner where measuring them all would overrun the budget)."""
        if self._t is None:
            return False
        t = now()
        self.timed_s, self.timed_n = self.timed_s + t - self._t, self.timed_n + 1
        self.spent = t - self.t0
        return done >= self.plan_at or self.spent + (self.plan_at - done) * self.step_s > self.seconds

    def plan(self, cap: int, done: int, eval_steps: float, save_bytes: int, eval_period: int,
             save_every: int) -> tuple[int, str]:
        """The planned total and a line saying how. eval_steps: an eval's cost in training steps."""
        self.active = False
        planned, overhead = plan_steps(cap, done, self.seconds - self.spent, self.step_s, eval_steps * self.step_s,
                                       save_bytes / SAVE_BYTES_PER_S, eval_period, save_every)
        return planned, (f"{self.step_s:.2f} s/step measured over {self.timed_n} steps, {self.spent:.0f}s spent -> "
                         f"{planned} of {cap} steps (eval+save ~{overhead:.0f}s)")
