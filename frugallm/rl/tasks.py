"""Tasks: JSONL records, one a line, with at least "prompt" and usually "answer" and "verifier" (the reward
that says a completion is right: rewards.py). `generate` writes verifiable toy tasks a small model can
learn; each record also carries "completion", a right answer, so the same file trains the format by SFT
first (`frugallm train --data FILE.jsonl` puts the loss on the completion).

  arithmetic  "37+48=" -> "85"                        verifier numeric
  countdown   "numbers 3 7 25 target 46:" -> "25+3*7"  verifier countdown (any expression that makes it)
  sorting     "sort 7 2 9 4:" -> "2 4 7 9"            verifier exact
"""

from __future__ import annotations

import ast
import json
import random
from pathlib import Path

from ..io import write_file
from .rewards import _evaluate

KINDS = ("arithmetic", "countdown", "sorting")


def _arithmetic(rng: random.Random, digits: int) -> dict:
    a, b = rng.randrange(10 ** digits), rng.randrange(10 ** digits)
    op = rng.choice("+-")
    value = a + b if op == "+" else a - b
    return {"prompt": f"{a}{op}{b}=", "answer": str(value), "verifier": "numeric", "completion": str(value)}


def _countdown(rng: random.Random, digits: int) -> dict:
    """Three numbers and a target made from them (so every record has an answer; others may exist)."""
    nums = [rng.randrange(1, 10 ** digits) for _ in range(3)]
    a, b, c = nums
    op1, op2 = rng.choice("+-*"), rng.choice("+-")
    expr = f"{a}{op1}{b}{op2}{c}"
    target = _evaluate(ast.parse(expr, mode="eval").body, [])
    shown = sorted(nums)
    return {"prompt": f"numbers {' '.join(map(str, shown))} target {target}:", "answer": expr,
            "numbers": shown, "target": target, "verifier": "countdown", "completion": expr}


def _sorting(rng: random.Random, digits: int) -> dict:
    nums = [rng.randrange(10 ** digits) for _ in range(rng.randint(3, 5))]
    answer = " ".join(map(str, sorted(nums)))
    return {"prompt": f"sort {' '.join(map(str, nums))}:", "answer": answer, "verifier": "exact",
            "completion": answer}


MAKERS = {"arithmetic": _arithmetic, "countdown": _countdown, "sorting": _sorting}


def generate(kind: str, n: int, seed: int = 0, digits: int = 2) -> list[dict]:
    """n records of a toy task, seeded: the same (kind, n, seed, digits), the same records."""
    if kind not in MAKERS:
        raise ValueError(f"task kind {kind!r}: choose one of {', '.join(KINDS)}")
    if n < 1 or digits < 1:
        raise ValueError(f"n={n} and digits={digits} must be >= 1")
    rng = random.Random(f"{kind}|{seed}|{digits}")
    return [MAKERS[kind](rng, digits) for _ in range(n)]


def write_tasks(records: list[dict], out: str | Path) -> Path:
    """The records as JSONL at `out`, written atomically."""
    write_file(out, "".join(json.dumps(r) + "\n" for r in records))
    return Path(out)


def load_tasks(source: str | Path) -> list[dict]:
    """The records of a task file, or of a built-in toy task named `KIND` or `KIND:N` (seed 0, 1000 by
    default); a line that is not a JSON object with a string "prompt" is an error naming it."""
    name, _, count = str(source).partition(":")
    if name in MAKERS and not Path(source).exists():
        return generate(name, int(count) if count else 1000)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"task {source}: no such file, and not a built-in task ({', '.join(KINDS)}); "
                                "write one with `frugallm grpo tasks --kind arithmetic --out FILE.jsonl`")
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {n} is not valid JSON ({e}); one JSON object a line") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ValueError(f"{path} line {n} has no string \"prompt\"; a task record is "
                             '{"prompt": ..., "answer": ..., "verifier": ...}')
        records.append(record)
    if not records:
        raise ValueError(f"{path} holds no task records")
    return records
