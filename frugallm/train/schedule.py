"""A run's step-counted phases, fitted to its planned length and re-planned with it (docs/design/training.md).

The phases: the LR warm-up (`warmup_steps`), the decay to min_lr_ratio * lr at the last planned step
(cosine, or WSD's last `decay_fraction`), the MTP lambda switch (`mtp_lambda_late_from`, a fraction of
the steps) and the expert-bias freeze (`bias_freeze_tokens`, tokens).

Fitting: a warm-up fits when it takes at most a quarter of the run. `warmup_steps=None` (the default) is
30 steps, cut to a quarter of a shorter run, so a 20-step run warms up over 5 steps and still decays to
its floor; an explicit `warmup_steps` is honoured, with a warning where it does not fit. The decay and
the lambda switch are fractions of the steps and fit any length (WSD's decay takes at least the last 2
steps: optim.lr_at); an explicit bias freeze past the run's last token never happens, and is warned about.

Re-planning (a time budget, train/time_budget.py): the schedule is that of a *nominal* run (`warmup`,
`total`; a budgeted run's nominal length is its cap), read at a position given by a piecewise-linear,
increasing map from the actual step (`knots`, pairs (actual step, nominal position); none = the
identity). A plan or re-plan to `end` steps after step `done` pins the last step run where it was and
maps the new last step, end - 1, onto the nominal last step, total - 1: the LR stays continuous and
still reaches its floor exactly at the last planned step; the lambda switch and WSD's decay move with
it. Inside the warm-up, an auto warm-up's remaining part is also cut to a quarter of what is left.
The knots are part of the run's saved state (trainer.json), so a resume repeats the schedule exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .optim import lr_at

AUTO_WARMUP = 30  # warmup_steps=None: this many steps, or a quarter of a shorter run
WARMUP_SHARE = 4  # a warm-up fits in 1/WARMUP_SHARE of the run (of what is left of it, mid-run)


def fitted_warmup(warmup: float, total: int, done: int = 0) -> float:
    """The warm-up's end (a step) cut to fit a `total`-step run whose first `done` steps are run: at
    most a quarter of the steps left, at least one more step; a warm-up already over stays as it is."""
    if warmup <= done:
        return warmup
    return min(warmup, done + max(1, (total - done) // WARMUP_SHARE))


@dataclass
class Schedule:
    """The nominal run (`warmup`, `total`) and the map from actual steps onto it; `end`: the planned steps."""

    warmup: int
    total: int
    end: int
    auto: bool  # warmup_steps=None: the warm-up may be cut to fit a re-plan
    knots: list[tuple[int, float]] = field(default_factory=list)

    @classmethod
    def for_run(cls, cfg) -> "Schedule":
        """A run of cfg.steps steps (a budgeted run's cap) from its TrainConfig (train/config.py)."""
        auto = cfg.warmup_steps is None
        warmup = int(fitted_warmup(AUTO_WARMUP, cfg.steps)) if auto else cfg.warmup_steps
        return cls(warmup, cfg.steps, cfg.steps, auto)

    @classmethod
    def from_state(cls, state: dict | None, cfg) -> "Schedule":
        """The schedule a checkpoint saved (trainer.json), if it is for cfg.steps steps; else a fresh one
        for them (an older checkpoint, or a resume given another length: its schedule starts anew)."""
        if state and state.get("end") == cfg.steps:
            return cls(state["warmup"], state["total"], state["end"], state["auto"],
                       [(a, v) for a, v in state["knots"]])
        return cls.for_run(cfg)

    def to_state(self) -> dict:
        return {"warmup": self.warmup, "total": self.total, "end": self.end, "auto": self.auto,
                "knots": [list(k) for k in self.knots]}

    def position(self, step: int) -> float:
        """The nominal step that actual step `step` runs at: the identity before the first knot and
        after the last, linear between knots (an int, unchanged, while there is no knot)."""
        knots = self.knots
        if not knots:
            return step
        if step <= knots[0][0]:
            return knots[0][1] - knots[0][0] + step
        for (a0, v0), (a1, v1) in zip(knots, knots[1:]):
            if step <= a1:
                return v0 + (v1 - v0) * (step - a0) / (a1 - a0)
        a, v = knots[-1]
        return v + step - a

    def actual(self, position: float) -> float:
        """The actual step at nominal `position` (the inverse of `position`)."""
        knots = self.knots
        if not knots or position <= knots[0][1]:
            return position - (knots[0][1] - knots[0][0] if knots else 0)
        for (a0, v0), (a1, v1) in zip(knots, knots[1:]):
            if position <= v1:
                return a0 + (a1 - a0) * (position - v0) / (v1 - v0)
        a, v = knots[-1]
        return a + position - v

    def lr(self, step: int, cfg) -> float:
        return lr_at(self.position(step), self.total, cfg.lr, self.warmup, cfg.min_lr_ratio, cfg.schedule,
                     cfg.decay_fraction)

    def late(self, step: int, late_from: float) -> bool:
        """Whether step `step` is past the MTP lambda switch (`late_from` of the steps)."""
        return self.position(step) >= late_from * self.total

    def warmup_end(self) -> int:
        """The first actual step at the peak LR (the warm-up's length, for a run not re-planned)."""
        return math.ceil(self.actual(self.warmup) - 1e-9)

    def replan(self, done: int, end: int) -> None:
        """`end` steps in all, decided after step `done`: the last step run keeps its position, the new
        last step maps onto the nominal last step (see the module docstring)."""
        self.end = end
        if self.warmup >= self.total - 1:  # the nominal run never leaves its warm-up: nothing to map
            return
        last = done - 1
        anchor = (last, self.position(last))
        knots = [k for k in self.knots if k[0] < last] + [anchor]
        warm_end = self.actual(self.warmup)
        if warm_end > done:  # inside the warm-up: an auto one is cut to fit what is left
            if self.auto:
                warm_end = fitted_warmup(warm_end, end, done)
            knots.append((warm_end, self.warmup))
        if end - 1 > knots[-1][0] and knots[-1][1] < self.total - 1:
            knots.append((end - 1, self.total - 1))
        self.knots = [] if all(a == v for a, v in knots) else knots  # the identity: no knots

    def problems(self, cfg, step_tokens: int) -> list[str]:
        """Warnings for the explicit values that cannot fit the planned run: a warm-up longer than a
        quarter of it (honoured), a bias freeze past its last token (it never freezes)."""
        out = []
        warm = self.warmup_end()
        if not self.auto and self.warmup and warm > fitted_warmup(warm, self.end):
            left = self.end - warm
            tail = ("the run ends inside it, below the peak lr" if left < 0 else "no step is left to decay"
                    if left == 0 else f"{_steps(left)} {'are' if left > 1 else 'is'} left to decay")
            out.append(f"warmup_steps={cfg.warmup_steps} takes more than a quarter of the {self.end}-step run and "
                       f"{tail}; honoured as set (drop it for a warm-up that fits: "
                       f"{_steps(int(fitted_warmup(AUTO_WARMUP, self.end)))})")
        if cfg.bias_freeze_tokens and cfg.bias_gamma and cfg.bias_freeze_tokens >= self.end * step_tokens:
            out.append(f"bias_freeze_tokens={cfg.bias_freeze_tokens:,} is past the run's {self.end * step_tokens:,} "
                       f"tokens: the expert bias never freezes; honoured as set")
        return out

    def describe(self) -> str:
        """The warm-up's length, and where it was cut to fit."""
        warm = self.warmup_end()
        text = f"warm-up {_steps(warm)}"
        if self.auto and warm < AUTO_WARMUP:
            text += f" (cut from {AUTO_WARMUP} to fit the {self.end}-step run)"
        return text + (", which the run ends inside" if warm > self.end else "")


def _steps(n: int) -> str:
    return f"{n} step{'' if n == 1 else 's'}"
