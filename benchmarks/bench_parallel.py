"""Training on several processes with torch.distributed (gloo) on this box: tokens/s and all-to-all bytes.

Each layout is a real `frugallm train --nproc N --ep E --dp D` run (torchrun, gloo, one thread per
rank) of the same model, data and global batch (`grad_accum` micro-batches per step in all, shared
by the data ranks), so every row computes the same steps (tests/test_parallel.py checks that).
Per layout it prints the median tokens/s of the metrics lines after the first few steps, and for
expert parallelism the all-to-all payload bytes per step the run counted (parallel/expert.py:
forward dispatch + combine, summed over ranks) against the formula

    bytes/step = L_moe * T * K * (ep - 1) / ep * ((d + 1) + d) * element bytes

(T tokens per step, K experts per token, the routing weight riding as column d + 1; uniform
routing sends (ep - 1)/ep of the pairs off-rank; the backward moves as much again).

Every run records its second-last step's per-rank timeline (`trace_step`, parallel/timeline.py): the
bubble per rank, the time in all-to-alls and how much of it compute did not cover; the pipelined
rows are set beside the schedule simulator (parallel/schedule.py) fed the measured action times.

Said plainly: on a 2-core box, 4 ranks oversubscribe the cores (2 processes per core), so the
4-rank rows measure correctness of the layout and overhead, not a speed-up.

    python benchmarks/bench_parallel.py [--preset tiny] [--steps 12] [--layouts 1 dp2 ep2 pp2 pp2-zbv ep4 ep2xdp2 pp2xep2 pp2xep2-overlap]
                                        [--precision fp32] [--save [VARIANT]]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _host import add_host_args, print_host_header, save_output  # noqa: E402

from frugallm.config import get_preset  # noqa: E402

LAYOUTS = {"1": (1, 1, 1, 1, "", False), "dp2": (2, 1, 1, 2, "", False), "ep2": (2, 2, 1, 1, "", False),
           "pp2": (2, 1, 2, 1, "dualpipev", False), "pp2-zbv": (2, 1, 2, 1, "zbv", False),
           "dp4": (4, 1, 1, 4, "", False), "ep4": (4, 4, 1, 1, "", False), "ep2xdp2": (4, 2, 1, 2, "", False),
           "pp2xep2": (4, 2, 2, 1, "dualpipev", False), "pp2xep2-overlap": (4, 2, 2, 1, "dualpipev", True),
           }  # name -> (ranks, ep, pp, dp, pipeline schedule, overlapped forward & backward pairs)


def run_layout(name: str, args, work: Path) -> dict:
    nproc, ep, pp, dp, schedule, overlap = LAYOUTS[name]
    out = work / name
    cmd = [sys.executable, "-m", "frugallm", "train", "--preset", args.preset, "--out", str(out),
           "--steps", str(args.steps), "--no-sample", "--set", f"precision={args.precision}",
           "--set", f"seq_len={args.seq}", "--set", f"batch_size={args.batch}", "--set", f"grad_accum={args.grad_accum}",
           "--set", "log_every=1", "--set", f"eval_every={10 * args.steps}", "--set", f"save_every={10 * args.steps}",
           "--set", f"trace_step={args.steps - 1}"]
    if nproc > 1:
        cmd += ["--nproc", str(nproc), "--ep", str(ep), "--pp", str(pp), "--dp", str(dp)]
        if schedule:
            cmd += ["--set", f"pp_schedule={schedule}", "--set", f"overlap={str(overlap).lower()}"]
    else:
        cmd += ["--set", "threads=1"]  # one thread per rank everywhere (torchrun sets OMP_NUM_THREADS=1)
    t0 = time.perf_counter()
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode:
        raise RuntimeError(f"{name} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in rows if r["step"] > args.skip and r["step"] not in (args.steps - 1, args.steps)]
    trace = json.loads((out / "trace" / "timeline.json").read_text())
    return {"name": name, "nproc": nproc, "ep": ep, "pp": pp, "dp": dp, "schedule": schedule, "trace": trace,
            "wall": time.perf_counter() - t0,
            "tok_s": statistics.median(r["tokens_per_s"] for r in steady),
            "ep_bytes": statistics.median(r["ep_bytes_per_step"] for r in steady) if ep > 1 else 0,
            "loss": rows[-1]["loss"], "precision": rows[-1]["precision"]}


def formula_bytes(cfg, tokens_per_step: int, ep: int, element: int) -> float:
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers + cfg.n_mtp))
    return moe_layers * tokens_per_step * cfg.n_activated_experts * (ep - 1) / ep * ((cfg.dim + 1) + cfg.dim) * element


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--skip", type=int, default=3, help="steps left out of the median (warm-up)")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=8)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--layouts", nargs="+", default=["1", "dp2", "ep2", "pp2", "pp2-zbv", "ep4", "ep2xdp2", "pp2xep2", "pp2xep2-overlap"], choices=list(LAYOUTS))
    ap.add_argument("--work", default="", help="run directories (default: a temporary directory)")
    add_host_args(ap)
    args = ap.parse_args()
    save_output("bench_parallel", args.save)
    print_host_header()
    cfg = get_preset(args.preset)
    tokens = args.seq * args.batch * args.grad_accum
    print(f"preset {args.preset}, {args.steps} steps x {tokens:,} tokens ({args.grad_accum} micro-batches of "
          f"{args.batch}x{args.seq} per step, shared by the data ranks), {args.precision}, gloo, 1 thread per rank, "
          f"{os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        results = []
        for name in args.layouts:
            r = run_layout(name, args, work)
            results.append(r)
            print(f"  {name:8s} done in {r['wall']:.0f}s", flush=True)
    base = next((r for r in results if r["nproc"] == 1), None)
    element = 4 if args.precision == "fp32" else 2
    print()
    print("| layout | ranks | ep | pp | dp | tokens/s | x 1 rank | final loss | a2a bytes/step (measured) | formula | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        speed = f"{r['tok_s'] / base['tok_s']:.2f}" if base else "-"
        if r["ep"] > 1:
            f = formula_bytes(cfg, tokens, r["ep"], element)
            comm = f"{r['ep_bytes'] / 2**20:.2f} MiB | {f / 2**20:.2f} MiB | {r['ep_bytes'] / f:.3f}"
        else:
            comm = "- | - | -"
        print(f"| {r['name']} | {r['nproc']} | {r['ep']} | {r['pp']} | {r['dp']} | {r['tok_s']:,.0f} | {speed} "
              f"| {r['loss']:.4f} | {comm} |")

    print(f"\nstep {args.steps - 1} of every run, traced (run/trace/timeline.png): per rank, bubble = idle share of the"
          " step's span; a2a = time in expert-parallel all-to-alls (forward and backward, counts included); exposed ="
          " a2a time while no thread of the rank computes (all of it, except where overlap.py runs a forward and a"
          " backward side by side)")
    print("| layout | span ms | bubble per rank | a2a ms per rank | exposed a2a ms per rank | exposed share of the span |")
    print("|---|---|---|---|---|---|")
    for r in results:
        t = r["trace"]
        cells = [", ".join(f"{x['bubble']:.1%}" for x in t["ranks"]), ", ".join(f"{x['comm_ms']:.0f}" for x in t["ranks"]),
                 ", ".join(f"{x['exposed_comm_ms']:.0f}" for x in t["ranks"]),
                 ", ".join(f"{x['exposed_comm_ms'] / t['span_ms']:.1%}" for x in t["ranks"])]
        print(f"| {r['name']} | {t['span_ms']:.0f} | " + " | ".join(cells) + " |")

    pipelined = [r for r in results if r["pp"] > 1 and not LAYOUTS[r["name"]][5]]  # overlap: pairs are 2 threads
    if pipelined:
        from frugallm.parallel.schedule import Durations, run

        print("\npipeline bubble, measured against the simulator (frugallm/parallel/schedule.py) fed the measured mean"
              " action times (F forward, I backward-input, W backward-weight, FB DualPipeV's overlapped pair):")
        print("| layout | chunks | F / I / W / FB ms | measured span ms | simulated span ms | measured bubble | simulated bubble |")
        print("|---|---|---|---|---|---|---|")
        for r in pipelined:
            t = r["trace"]
            means = {}
            for kind in ("F", "I", "W", "FB", "B"):
                values = [x["mean_ms"][kind] for x in t["ranks"] if kind in x["mean_ms"]]
                if values:
                    means[kind] = sum(values) / len(values)
            d = Durations(f=means["F"], b=means.get("I", means.get("B", 0) / 2), w=means.get("W", means.get("B", 0) / 2),
                          fb=means.get("FB"))
            chunks = args.grad_accum // (r["ep"] * r["dp"])  # micro-batches per pipeline
            sim = run(r["schedule"], r["pp"], chunks, d)
            sim_bubble = ", ".join(f"{b / sim.makespan:.1%}" for b in sim.bubble)
            measured = ", ".join(f"{x['bubble']:.1%}" for x in t["ranks"])
            times = " / ".join(f"{means[k]:.0f}" if k in means else "-" for k in ("F", "I", "W", "FB"))
            print(f"| {r['name']} | {chunks} | {times} | {t['span_ms']:.0f} | {sim.makespan:.0f} | {measured} "
                  f"| {sim_bubble} |")
    if any(r["nproc"] > (os.cpu_count() or 1) for r in results):
        print(f"\n{os.cpu_count()} cores: the rows with more ranks than cores oversubscribe them; they show the "
              "overhead of the layout, not a speed-up.")


if __name__ == "__main__":
    main()
