"""`frugallm report`: the papers' claims, measured on this host, in one report (docs/report.md).

Each claim is a `Section`: the paper's figure and where it is stated, and a `measure(share)` that runs
the small-scale experiment in about `share` seconds and returns a `Finding`: the figure measured here
(a number, or "not measured, because ..."), the set-up, a verdict and why, a table, plots. `run_report`
splits the budget over the sections by weight, caches each finding per host and section version (a
second run only redraws; an interrupted run resumes from the sections already done) and renders the
whole report (render.py).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

VERDICTS = ("reproduced", "not reproduced", "not measurable at this scale")
RESERVE_S = 10.0  # the budget kept for rendering and the sections that need no share
_LOG = [print]


@dataclass
class Finding:
    measured: str  # the figure measured here, worded; or "not measured, because ..."
    verdict: str  # one of VERDICTS
    why: str  # one or two sentences: what decided the verdict
    setup: str  # model, data, steps, dtype: enough to judge the figure
    figures: dict[str, float | str] = field(default_factory=dict)  # name -> number or "not measured, because ..."
    header: list[str] = field(default_factory=list)
    rows: list[list] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)  # PNG paths relative to the report directory
    seconds: float = 0.0
    scale: str = ""  # what the budget decided (steps, sizes) and what it shrank

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict {self.verdict!r} must be one of {VERDICTS}")
        for name, value in self.figures.items():
            if not isinstance(value, (int, float)) and not str(value).startswith("not measured, because"):
                raise ValueError(f"figure {name}={value!r} must be a number or 'not measured, because ...'")


@dataclass(frozen=True)
class Section:
    name: str  # --only NAME
    title: str
    claim: str  # the paper's figure, with paper, section, table or figure
    measure: Callable[[float, Path], Finding]  # (seconds to spend, the report directory) -> Finding
    weight: float = 1.0  # share of the budget; 0 = instant (needs no share)
    version: int = 1  # bump when the experiment changes, so cached findings are redone

    @property
    def command(self) -> str:
        return f"frugallm report --only {self.name}"


def host_key() -> dict:
    """What a cached finding depends on besides the section: the machine and the software."""
    import platform

    import torch

    from ..host import host_profile

    p = host_profile()
    return {"cpu": p.cpu_model, "flags": p.flags, "torch": torch.__version__, "python": platform.python_version(),
            "profile": p.source if p.source.startswith("forced") else "measured"}


def cache_path(out: Path, section: Section, host: dict, budget_s: float) -> Path:
    """One file per (section, its version, host, budget): a finding measured at another budget is another
    experiment (its size came from the budget), so it is measured again, not reused."""
    key = json.dumps({"section": section.name, "version": section.version, "host": host, "budget_s": budget_s},
                     sort_keys=True)
    return out / "cache" / f"{section.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def progress(line: str) -> None:
    """A progress line from inside a section (harness.py's arms); run_report sets where it goes."""
    _LOG[0](line)


def _cached(path: Path, out: Path) -> Finding | None:
    """The finding saved at `path`, if it and every plot it names are there."""
    if not path.exists():
        return None
    finding = Finding(**json.loads(path.read_text()))
    return finding if all((out / p).exists() for p in finding.plots) else None


def run_report(sections: list[Section], budget_s: float, out: Path, log=print, redo: bool = False,
               threads: int = 1) -> list:
    """Measure each section (or read its cached finding), write report.md / report.html, return
    [(section, finding)]. Each finding is saved as soon as it exists: a killed run loses one section.
    Shares are planned again before each section from the time left, so a section that overran (or a
    cached one that cost nothing) moves the others' shares. One torch thread: on a shared host two
    threads stall on other jobs, and timings between arms stay comparable."""
    import os

    import torch

    from .. import io

    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    _LOG[0] = log
    host = host_key()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    done, start = [], time.monotonic()
    for i, s in enumerate(sections, 1):
        path = cache_path(out, s, host, budget_s)
        finding = None if redo else _cached(path, out)
        if finding is not None:
            log(f"[{i}/{len(sections)}] {s.name}: cached ({finding.verdict})")
        else:
            left = budget_s - (time.monotonic() - start)
            weights = sum(t.weight for t in sections[i - 1:]
                          if redo or _cached(cache_path(out, t, host, budget_s), out) is None)
            share = max(0.0, left - RESERVE_S) * s.weight / weights if s.weight else 0.0
            log(f"[{i}/{len(sections)}] {s.name}: measuring ({share:.0f} s of the {left:.0f} s left)")
            t = time.monotonic()
            finding = s.measure(share, out)
            finding.seconds = round(time.monotonic() - t, 1)
            path.parent.mkdir(parents=True, exist_ok=True)
            io.write_file(path, json.dumps(asdict(finding), indent=1))
            log(f"    {finding.verdict}: {finding.measured} ({finding.seconds:.0f} s)")
        done.append((s, finding))
    from .render import write_report

    context = {"threads": threads, "cores": os.cpu_count(), "load": load,
               "wall_s": time.monotonic() - start}
    write_report(done, out, host, budget_s, context)
    return done
