"""Before/after speed of two source trees of frugallm on this host, in one run: bench_model, bench_generate
and bench_serve, each tree running its own copy of the benchmark (cwd and PYTHONPATH = the tree, the same
Python), in the order before, after, after, before per benchmark so that machine drift hits both alike.
frugallm's own figures are read off the printed tables (regexes) and one table is printed: figure,
before (median of its runs), after (median), after/before, and whether that is better or worse (for
times, such as TTFT, lower is better).

    python benchmarks/compare_trees.py --before /work/before --after . --run RUN
        [--bench model generate serve] [--order b a a b] [--logs DIR]
        [--model-args ...] [--generate-args ...] [--serve-args ...]

Made for issue 24 (a restructuring meant to change no figure): "No benchmark figure gets worse". A git
worktree gives the before tree: `git worktree add ../before <commit>`.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEFAULTS = {
    "model": "--no-compile --rounds 5",
    "generate": "--skip hf spec --rounds 3",
    "serve": "--levels 1 8 --requests 2 --new 32",
}
NUM = r"([\d,]+(?:\.\d+)?)"


def _f(text: str) -> float:
    return float(text.replace(",", ""))


def parse_model(out: str) -> dict[str, tuple[float, bool]]:
    """bench_model's table rows (frugallm tok/s) and the grouped-vs-loop line: {figure: (value, higher_better)}."""
    figs = {}
    for label, name in (("train step (fwd+loss+bwd)", "train step"), ("train step, frugallm compiled", "train step compiled"),
                        ("prefill (fwd, inference_mode)", "prefill"), ("prefill, frugallm compiled", "prefill compiled")):
        m = re.search(rf"^{re.escape(label)}\s*\|\s*(\w+)\s*\|\s*{NUM}\s*\|", out, re.M)
        if m:
            figs[f"model: {name} tok/s ({m.group(1)})"] = (_f(m.group(2)), True)
    m = re.search(r"grouped vs loop \(eager\): train \((\w+)\) [\d,]+ vs ([\d,]+) tok/s.*?prefill \((\w+)\) [\d,]+ vs "
                  r"([\d,]+) tok/s", out)
    if m:
        figs[f"model: train step, loop experts tok/s ({m.group(1)})"] = (_f(m.group(2)), True)
        figs[f"model: prefill, loop experts tok/s ({m.group(3)})"] = (_f(m.group(4)), True)
    return figs


def parse_generate(out: str) -> dict[str, tuple[float, bool]]:
    """bench_generate: the quantization table's decode ms/token (as tok/s), section 2's frugallm decode
    rows and TTFT, the speculative section's plain/speculative seconds (whichever sections ran)."""
    figs = {}
    for m in re.finditer(r"^\| ([^|]+?) \| [\d.]+ \| [\d.]+× \| [^|]+ \| ([\d.]+) \|", out, re.M):
        figs[f"generate: decode tok/s, {m.group(1)} (batch 1)"] = (1e3 / float(m.group(2)), True)
    section = None
    for line in out.splitlines():
        m = re.match(r"^(decode tok/s, batch \d+)\s+" + NUM, line)
        if m:
            section = m.group(1)
            figs[f"generate: {section}, compiled"] = (_f(m.group(2)), True)
            continue
        m = re.match(r"^time to first token, ms\s+" + NUM, line)
        if m:
            figs["generate: TTFT ms, compiled"] = (_f(m.group(1)), False)
            section = "ttft"
            continue
        m = re.match(r"^  (eager, prepacked|eager, plain weights)\s+" + NUM, line)
        if m and section == "ttft":
            figs[f"generate: TTFT ms, {m.group(1)}"] = (_f(m.group(2)), False)
        elif m and section:
            figs[f"generate: {section}, {m.group(1)}"] = (_f(m.group(2)), True)
    for m in re.finditer(r"^  (eager(?:, prepacked)?|compiled): same tokens as greedy: (\w+);.*?\(([\d.]+) s -> "
                         r"([\d.]+) s\)", out, re.M):
        figs[f"generate: speculative section, plain greedy s, {m.group(1)}"] = (float(m.group(3)), False)
        figs[f"generate: speculative section, speculative s, {m.group(1)}"] = (float(m.group(4)), False)
    return figs


def parse_serve(out: str) -> dict[str, tuple[float, bool]]:
    """bench_serve's markdown table: output tok/s and TTFT p50 / p99 of both policies per client level."""
    figs = {}
    row = re.compile(rf"^\| (\d+) \| {NUM} \| {NUM} / {NUM} \| {NUM} \| {NUM} / {NUM} \|", re.M)
    for m in row.finditer(out):
        c = m.group(1)
        for policy, (tok, p50, p99) in (("batch", m.group(2, 3, 4)), ("round-robin", m.group(5, 6, 7))):
            figs[f"serve {policy}, {c} clients: output tok/s"] = (_f(tok), True)
            figs[f"serve {policy}, {c} clients: TTFT p50 s"] = (_f(p50), False)
            figs[f"serve {policy}, {c} clients: TTFT p99 s"] = (_f(p99), False)
    return figs


BENCH = {"model": ("bench_model.py", parse_model), "generate": ("bench_generate.py", parse_generate),
         "serve": ("bench_serve.py", parse_serve)}


def which_frugallm(tree: Path, env: dict) -> str:
    return subprocess.run([sys.executable, "-c", "import frugallm; print(frugallm.__file__)"], cwd=tree, env=env,
                          capture_output=True, text=True, check=True).stdout.strip()


def foreign_benchmarks(mine: set[int]) -> list[str]:
    """Other benchmark, training or test processes on this machine (not ours, not our children's): on a
    few cores, one of them makes a run worthless (oversubscribed OpenMP threads slow both several times)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) in mine:
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid in mine:
            continue
        if re.search(r"benchmarks/(bench_|compare_trees)|frugallm(\.cli)? (train|serve)|pytest", cmd):
            found.append(f"{d.name}: {cmd[:120]}")
    return found


def run_one(tree: Path, script: str, args: list[str], log: Path, timeout: int, wait: int) -> tuple[str, bool]:
    """Run one benchmark in `tree`; (its stdout, whether a foreign benchmark ran beside it at any time)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    where = which_frugallm(tree, env)
    if not where.startswith(str(tree) + "/"):
        raise SystemExit(f"frugallm resolves to {where}, not inside {tree}")
    deadline = time.time() + wait
    while (others := foreign_benchmarks({os.getpid()})) and time.time() < deadline:
        print(f"  waiting: another benchmark runs here ({others[0]})", flush=True)
        time.sleep(15)
    cmd = [sys.executable, f"benchmarks/{script}", *args]
    t = time.perf_counter()
    with open(log.with_suffix(".stdout"), "w+") as out, open(log.with_suffix(".stderr"), "w+") as err:
        proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=out, stderr=err, text=True)
        seen = set()
        while proc.poll() is None:
            if time.perf_counter() - t > timeout:
                proc.kill()
            seen.update(foreign_benchmarks({os.getpid(), proc.pid}))
            time.sleep(1)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    log.with_suffix(".stdout").unlink(), log.with_suffix(".stderr").unlink()
    seconds = time.perf_counter() - t
    log.write_text(f"# cwd={tree} PYTHONPATH={tree} frugallm={where}\n# {shlex.join(cmd)}\n# rc={proc.returncode} "
                   f"{seconds:.0f} s; other benchmarks seen beside it: {sorted(seen) or 'none'}\n{stdout}\n"
                   f"--- stderr ---\n{stderr}")
    note = f"  CONTENDED by {len(seen)} other process(es), e.g. {sorted(seen)[0]}" if seen else ""
    print(f"  {script:<18} {tree.name:<8} {seconds:5.0f} s  rc {proc.returncode}  log {log}{note}", flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"{script} failed in {tree}:\n{stderr[-3000:]}")
    return stdout, bool(seen)


def host_header(tree: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "benchmarks/_host.py"], cwd=tree, env=env, capture_output=True,
                         text=True).stdout.strip()
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "?")
    return f"CPU model name: {model}; {os.cpu_count()} logical CPUs\n{out}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=Path, required=True)
    ap.add_argument("--after", type=Path, default=Path(__file__).resolve().parent.parent)
    ap.add_argument("--run", required=True, help="a trained run for bench_generate and bench_serve (--run)")
    ap.add_argument("--bench", nargs="+", default=list(BENCH), choices=list(BENCH))
    ap.add_argument("--order", nargs="+", default=["b", "a", "a", "b"], choices=["b", "a"])
    ap.add_argument("--logs", type=Path, default=Path("/tmp/compare_trees_logs"))
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per benchmark run")
    ap.add_argument("--wait", type=int, default=900, help="seconds to wait, before each run, for other benchmarks "
                    "on this machine to end")
    for name, default in DEFAULTS.items():
        ap.add_argument(f"--{name}-args", default=default, help=f"bench_{name}'s flags (default: {default!r})")
    args = ap.parse_args()
    trees = {"b": args.before.resolve(), "a": args.after.resolve()}
    args.logs.mkdir(parents=True, exist_ok=True)

    print(f"# {shlex.join([Path(sys.executable).name, *sys.argv])}   ({time.strftime('%Y-%m-%d %H:%M')})")
    print(f"before: {trees['b']}  after: {trees['a']}  order per benchmark: {' '.join(args.order)}")
    print(host_header(trees["a"]))
    values: dict[str, dict[str, list[float]]] = {}  # figure -> {"b": [...], "a": [...]}
    higher_better: dict[str, bool] = {}
    disturbed: set[str] = set()
    for bench in args.bench:
        script, parse = BENCH[bench]
        flags = shlex.split(getattr(args, f"{bench}_args"))
        if bench in ("generate", "serve"):
            flags += ["--run", str(Path(args.run).resolve())]
        print(f"\nbench_{bench}: {shlex.join(flags)}", flush=True)
        for i, side in enumerate(args.order):
            out, contended = run_one(trees[side], script, flags, args.logs / f"{bench}_{i}_{side}.txt", args.timeout,
                                     args.wait)
            if contended:
                disturbed.add(bench)
            figs = parse(out)
            if not figs:
                raise SystemExit(f"no figures parsed from {script}'s output in {trees[side]}")
            for name, (v, hb) in figs.items():
                values.setdefault(name, {"b": [], "a": []})[side].append(v)
                higher_better[name] = hb

    w = max(len(k) for k in values) + 2
    print(f"\n{'figure':<{w}}{'before':>10}{'after':>10}{'a/b':>7}  verdict   runs before | after")
    print("-" * (w + 70))
    for name, v in values.items():
        if not v["b"] or not v["a"]:
            print(f"{name:<{w}}  (missing on one side: before {v['b']}, after {v['a']})")
            continue
        b, a = statistics.median(v["b"]), statistics.median(v["a"])
        ratio = a / b if b else float("nan")
        gain = ratio if higher_better[name] else 1 / ratio  # > 1: after is better
        verdict = "same" if 0.95 <= gain <= 1.05 else ("better" if gain > 1 else "WORSE")
        runs = " ".join(f"{x:g}" for x in v["b"]) + " | " + " ".join(f"{x:g}" for x in v["a"])
        print(f"{name:<{w}}{b:>10.4g}{a:>10.4g}{ratio:>7.3f}  {verdict:<8}  {runs}")
    if disturbed:
        print(f"\nWARNING: other benchmarks ran beside {', '.join(sorted(disturbed))} (see the logs): those figures "
              f"are not a fair comparison")
    print("\n(a/b = after / before of the medians; verdict: 'same' within 5 %, else better/WORSE taking the "
          "direction into account: tok/s higher is better, seconds and ms lower is better)")


if __name__ == "__main__":
    main()
