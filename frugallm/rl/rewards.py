"""Rewards: callables (prompt, completion, record) -> float, named on the command line or in a task record.

A name is one of the built-ins below, `module:function` (an importable module) or `FILE.py:function`.
Built in:
  exact      1 if the completion's answer (below) equals record["answer"] (stripped), else 0
  numeric    1 if the answer's last number equals record["answer"] as a number (within 1e-6), else 0
  countdown  1 if the answer is an arithmetic expression (+ - * / and parentheses) that uses each of
             record["numbers"] at most once and equals record["target"], else 0
  format     DeepSeek-R1's format reward: 1 if the completion is <think>...</think> followed by an answer
  code       1 if the completion's code (its first ```python block, else all of it) runs record["tests"]
             without error in a subprocess within a time and memory limit, else 0 (a hang or a crash too)
The answer of a completion: the text after its last </think> (all of it without one), first non-empty line.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import math
import operator
import os
import re
import signal
import subprocess
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable

Reward = Callable[[str, str, dict], float]
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
CODE_SECONDS = 5.0  # wall-clock limit of one code reward's subprocess
CODE_MEMORY = 512 * 2**20  # its address-space limit (RLIMIT_AS), bytes


def answer_of(completion: str) -> str:
    """The part of a completion a verifier reads: after the last </think>, its first non-empty line."""
    text = completion.rsplit("</think>", 1)[-1]
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def exact(prompt: str, completion: str, record: dict) -> float:
    return float(answer_of(completion) == str(record.get("answer", "")).strip())


def numeric(prompt: str, completion: str, record: dict) -> float:
    found = NUMBER.findall(answer_of(completion))
    try:
        want = float(record["answer"])
    except (KeyError, TypeError, ValueError):
        return 0.0
    return float(bool(found) and math.isclose(float(found[-1]), want, rel_tol=1e-9, abs_tol=1e-6))


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _evaluate(node: ast.AST, used: list) -> float:
    """An expression tree of numbers and + - * / only (no names, calls or powers: nothing to run)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        used.append(node.value)
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_evaluate(node.left, used), _evaluate(node.right, used))
    raise ValueError("not a + - * / expression of integers")


def countdown(prompt: str, completion: str, record: dict) -> float:
    text = answer_of(completion).split("=")[0]
    try:
        used: list = []
        value = _evaluate(ast.parse(text, mode="eval").body, used)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError, MemoryError):
        return 0.0
    if Counter(used) - Counter(record.get("numbers", [])):  # a number not given, or used too often
        return 0.0
    return float(math.isclose(value, float(record.get("target", math.nan)), abs_tol=1e-9))


THINK = re.compile(r"^\s*<think>.*?</think>\s*\S", re.DOTALL)


def format_reward(prompt: str, completion: str, record: dict) -> float:
    return float(bool(THINK.match(completion)))


def code_of(completion: str) -> str:
    fenced = re.search(r"```(?:python)?\n(.*?)```", completion, re.DOTALL)
    return fenced[1] if fenced else completion


def _limits(seconds: float, memory: int):
    def apply() -> None:  # in the child, before it runs anything
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        cpu = max(1, math.ceil(seconds))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash leaves no core file
    return apply


def run_code(source: str, seconds: float = CODE_SECONDS, memory: int = CODE_MEMORY) -> bool:
    """Whether `source` exits 0 in a fresh isolated Python (-I: no site, no user paths) in a temporary
    directory, within `seconds` of wall clock and `memory` bytes of address space. A timeout kills its
    whole process group; nothing it does reaches the caller but its exit status."""
    with tempfile.TemporaryDirectory(prefix="frugallm-reward-") as tmp:
        proc = subprocess.Popen([sys.executable, "-I", "-c", source], cwd=tmp, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=_limits(seconds, memory), env={"PATH": os.environ.get("PATH", "")})
        try:
            return proc.wait(timeout=seconds) == 0
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return False


def code(prompt: str, completion: str, record: dict) -> float:
    tests = record.get("tests")
    if not tests:
        return 0.0
    tests = "\n".join(tests) if isinstance(tests, list) else str(tests)
    return float(run_code(code_of(completion) + "\n\n" + tests))


BUILTIN: dict[str, Reward] = {"exact": exact, "numeric": numeric, "countdown": countdown, "format": format_reward,
                              "code": code}


@functools.lru_cache(maxsize=None)  # a FILE.py is run once, not once per completion
def resolve(name: str) -> Reward:
    """A reward by name: a built-in, `module:function` or `FILE.py:function`."""
    if name in BUILTIN:
        return BUILTIN[name]
    where, _, attr = name.rpartition(":")
    if not where or not attr:
        raise ValueError(f"reward {name!r}: name a built-in ({', '.join(BUILTIN)}), module:function or "
                         "FILE.py:function")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise FileNotFoundError(f"reward {name!r}: {path} does not exist")
        spec = importlib.util.spec_from_file_location(f"frugallm_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ValueError(f"reward {name!r}: cannot import {where} ({e}); check the name or use FILE.py:function")
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward {name!r}: {where} has no function {attr}")
    return fn


def verifier_of(record: dict, default: str = "exact") -> Reward:
    """The record's correctness check (its "verifier" field, else `default`): what accuracy counts."""
    return resolve(record.get("verifier") or default)


def score(rewards: list[str], prompt: str, completion: str, record: dict) -> float:
    """The sum of the named rewards ("verifier": the record's own); a reward that raises scores 0."""
    total = 0.0
    for name in rewards:
        fn = verifier_of(record) if name == "verifier" else resolve(name)
        try:
            value = float(fn(prompt, completion, record))
        except Exception as e:  # a user's reward failing on one odd completion must not end a long run
            warnings.warn(f"reward {name} raised {type(e).__name__}: {e}; scored 0")
            value = 0.0
        total += value if math.isfinite(value) else 0.0
    return total
