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


def cache_path(out: Path, section: Section, host: dict) -> Path:
    key = json.dumps({"section": section.name, "version": section.version, "host": host}, sort_keys=True)
    return out / "cache" / f"{section.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def plan_shares(sections: list[Section], budget_s: float, reserve_s: float = 10.0) -> dict[str, float]:
    """Seconds per section: the budget less a reserve for rendering, split by weight (instant ones get 0)."""
    total = sum(s.weight for s in sections)
    spend = max(0.0, budget_s - reserve_s)
    return {s.name: (spend * s.weight / total if total else 0.0) for s in sections}


def run_report(sections: list[Section], budget_s: float, out: Path, log=print, redo: bool = False) -> list:
    """Measure each section (or read its cached finding), write report.md / report.html, return
    [(section, finding)]. Each finding is saved as soon as it exists: a killed run loses one section."""
    from .. import io

    out.mkdir(parents=True, exist_ok=True)
    host = host_key()
    shares = plan_shares(sections, budget_s)
    done, start = [], time.monotonic()
    for i, s in enumerate(sections, 1):
        path = cache_path(out, s, host)
        if path.exists() and not redo:
            finding = Finding(**json.loads(path.read_text()))
            log(f"[{i}/{len(sections)}] {s.name}: cached ({finding.verdict})")
        else:
            left = budget_s - (time.monotonic() - start)
            share = min(shares[s.name], max(0.0, left - 10.0)) if s.weight else 0.0
            log(f"[{i}/{len(sections)}] {s.name}: measuring ({share:.0f} s of the budget)")
            t = time.monotonic()
            finding = s.measure(share, out)
            finding.seconds = round(time.monotonic() - t, 1)
            path.parent.mkdir(parents=True, exist_ok=True)
            io.write_file(path, json.dumps(asdict(finding), indent=1))
            log(f"    {finding.verdict}: {finding.measured} ({finding.seconds:.0f} s)")
        done.append((s, finding))
    from .render import write_report

    write_report(done, out, host, budget_s)
    return done
