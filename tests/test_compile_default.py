"""generate, chat and serve compile the decode step by default where it works here (--compile auto), and
work with default flags where it does not (issue 28 item 4): the plan says which and why. The CLI runs
are real processes with PATH holding no C++ compiler (sys.executable is called by its full path)."""

import json
import os
import subprocess
import sys
import urllib.request

import pytest

from conftest import serve_process, tiny_config
from frugallm.cli import build_parser
from frugallm.config import get_preset
from frugallm.kernels.compiled import planned_unavailable_reason
from frugallm.plan import compile_choice, inductor_cache_dir, resolve

NO_COMPILER = "compile auto -> off: torch.compile's CPU backend needs a C++ compiler"


@pytest.fixture
def no_compiler_env(tmp_path):
    """The environment of a host without g++ / c++ / clang++ (an empty PATH), with the default --compile:
    conftest's FRUGALLM_COMPILE=off removed."""
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("FRUGALLM_COMPILE", "CXX")}  # CXX: a compiler by path
    return {**env, "PATH": str(empty), "OMP_NUM_THREADS": "1"}


def _cli(*args, env, stdin=None):
    return subprocess.run([sys.executable, "-m", "frugallm.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=120, env=env)


def test_generate_with_default_flags_without_a_compiler(tiny_run, no_compiler_env):
    r = _cli("generate", str(tiny_run), "--prompt", "the cat", "--max-new-tokens", "4", env=no_compiler_env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("the cat") and "tokens/s" in r.stderr
    assert NO_COMPILER in r.stderr and "compiling" not in r.stderr


def test_chat_with_default_flags_without_a_compiler(tiny_run, no_compiler_env):
    r = _cli("chat", str(tiny_run), "--max-new-tokens", "3", "--temperature", "0", env=no_compiler_env,
             stdin="hello\n")
    assert r.returncode == 0, r.stderr
    assert "tokens/s]" in r.stdout and NO_COMPILER in r.stderr and "compiling" not in r.stderr


def test_serve_with_default_flags_without_a_compiler(tiny_run, no_compiler_env):
    pytest.importorskip("fastapi")
    env = {**no_compiler_env, "FRUGALLM_COMPILE": ""}  # serve_process starts from os.environ: "" is unset
    with serve_process(tiny_run, "k", "--slots", "1", env=env) as (base, proc):
        body = json.dumps({"model": tiny_run.name, "prompt": "the cat", "max_tokens": 3}).encode()
        req = urllib.request.Request(base + "/v1/completions", data=body, headers={
            "Authorization": "Bearer k", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200 and json.loads(r.read())["choices"][0]["text"] is not None
    out = proc.stdout.read().decode()
    assert NO_COMPILER in out and "compiling" not in out


def test_auto_compiles_where_a_compiler_works():
    """Plan level, nothing compiled: auto is on here unless this host cannot compile (then off, saying why)."""
    reason = planned_unavailable_reason(tiny_config())
    plan = resolve("inference", compile="auto", config=tiny_config())
    if reason:
        assert not plan.compile and f"compile auto -> off: {reason}" in plan.reasons
        pytest.skip(reason)
    assert plan.compile and not plan.prepack and any(r.startswith("compile auto -> on") for r in plan.reasons)
    assert resolve("inference", compile="on").compile and not resolve("inference", compile="off").compile


def test_auto_stays_eager_where_compiling_cannot_work(monkeypatch):
    """Unit test: the C++ compiler hidden by patching shutil.which; V4 hybrid attention; fp8 weight codes.
    Each time auto decodes eagerly and the plan says why."""
    monkeypatch.setattr("shutil.which", lambda name: None)
    plan = resolve("inference", compile="auto")
    assert not plan.compile and any(r.startswith(NO_COMPILER) for r in plan.reasons)
    monkeypatch.undo()
    hybrid = resolve("inference", compile="auto", config=get_preset("tiny-v4"))
    assert not hybrid.compile and any("compile auto -> off" in r and "hybrid" in r for r in hybrid.reasons)
    if planned_unavailable_reason() is None:  # the codes' rule comes after the host's: fp8 codes do not compile
        quantized = resolve("inference", compile="auto", quantized="fp8")
        assert not quantized.compile and any(r.startswith("compile auto -> off") and "--dtype bf16" in r
                                             for r in quantized.reasons)
    assert not resolve("train", compile="auto").compile  # training compiles only when asked


def test_compile_flag_and_its_default(monkeypatch):
    parse = build_parser().parse_args
    assert parse(["generate", "r", "--prompt", "x"]).compile is None  # the default: read when the plan is made
    assert parse(["generate", "r", "--prompt", "x", "--compile"]).compile == "on"  # old command lines
    assert parse(["generate", "r", "--prompt", "x", "--compile", "off"]).compile == "off"
    assert parse(["serve", "r", "--compile", "auto"]).compile == "auto"
    with pytest.raises(SystemExit):
        parse(["chat", "r", "--compile", "maybe"])
    monkeypatch.delenv("FRUGALLM_COMPILE", raising=False)
    assert compile_choice(None) == "auto" and compile_choice(True) == "on" and compile_choice(False) == "off"
    monkeypatch.setenv("FRUGALLM_COMPILE", "off")
    assert compile_choice(None) == "off" and compile_choice("on") == "on"
    monkeypatch.setenv("FRUGALLM_COMPILE", "yes")
    with pytest.raises(ValueError, match="FRUGALLM_COMPILE='yes' must be one of auto, on, off"):
        compile_choice(None)


def test_compiled_graphs_are_cached_under_frugallms_cache(tmp_path, monkeypatch):
    """inductor's default cache is a folder in /tmp; frugallm's outlives a reboot. A user's own
    TORCHINDUCTOR_CACHE_DIR wins; the value torch writes there itself (its default) does not."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("FRUGALLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    assert inductor_cache_dir() == str(tmp_path / "cache" / "inductor")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    assert inductor_cache_dir() == str(tmp_path / "cache" / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert inductor_cache_dir() == str(tmp_path / "mine")


def test_default_flags_compile_into_frugallms_cache(tiny_run, tmp_path):
    """With a compiler, default flags compile the decode step, and the compiled graph lands in inductor's
    FX graph cache under FRUGALLM_CACHE: what a later start loads instead of compiling again. (Freezing's
    oneDNN-packed weights made inductor skip that cache: kernels/compiled.py turns the packing off.)"""
    reason = planned_unavailable_reason()
    if reason:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k not in ("FRUGALLM_COMPILE", "TORCHINDUCTOR_CACHE_DIR")}
    env.update(FRUGALLM_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    r = _cli("generate", str(tiny_run), "--prompt", "the cat", "--max-new-tokens", "4", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("the cat") and "compile auto -> on" in r.stderr and "compiling" in r.stderr
    assert any((tmp_path / "cache" / "inductor" / "fxgraph").rglob("*")), "no FX graph cache entry was written"
