"""A run's metrics.jsonl, read back: by a resume (which drops the lines past its checkpoint) and by `plot`.

The trainer appends one JSON object per logged step. A crash mid-append leaves the last line torn (no
closing brace, or cut inside a number): that line is dropped with a warning, since the resumed run
logs its step again. Any other line that is not a JSON object with a "step" was not written so, and
is an error naming the file and the line, never a guess.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Callable


def read_metrics(path: str | Path, warn: Callable[[str], None] | None = None) -> list[dict]:
    """The rows of a metrics.jsonl, in order; warn(message) (default: warnings.warn) is told of a torn
    last line, dropped."""
    path, warn = Path(path), warn or warnings.warn
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    last = max((n for n, line in enumerate(lines) if line.strip()), default=-1)
    rows = []
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if n == last:
                warn(f"{path} line {n + 1} is cut short ({e}), as a crash mid-write leaves it; dropped")
                break
            raise ValueError(f"{path} line {n + 1} is not valid JSON ({e}); frugallm writes one JSON object per "
                             "line: fix or delete that line") from None
        if not (isinstance(row, dict) and isinstance(row.get("step"), int)):
            raise ValueError(f"{path} line {n + 1} is not a metrics record (a JSON object with an integer "
                             "\"step\"); fix or delete that line")
        rows.append(row)
    return rows
