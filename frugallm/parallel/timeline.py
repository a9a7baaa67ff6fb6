"""Per-rank timelines of a real training step: one Chrome trace per rank and one PNG of all ranks.

`TrainConfig.trace_step = K` records step K on every rank with the torch profiler
(`run/trace/rank<r>.json`, open in chrome://tracing or Perfetto). What the timeline reads from it:
  - compute: torch.distributed.pipelining's actions ("PP:<stage><F|I|W|B><micro-batch>": forward,
    backward for inputs, backward for weights, full backward; "PP:(<s>F<m>;<s>B<m>)OVERLAP_F_B":
    DualPipeV's forward-and-backward pair), or, without a pipeline, the trainer's
    own "frugallm:F<k>" / "frugallm:B<k>" around each micro-batch's forward and backward;
  - communication: "frugallm:a2a" around every expert-parallel all-to-all (parallel/expert.py).
Busy time is the union of compute and communication intervals; the bubble is the step's span minus
that. The all-to-alls block (nothing overlaps them yet), so their time is all exposed: it sits inside
the forward and backward boxes, and `compute_ms` is busy time without it. The clocks
of the ranks are the host's (one machine, or NTP across machines), so all ranks share the span.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

COMPUTE = re.compile(r"^(?:PP:\d+([FIWB])\d+|PP:\(\d+F\d+;\d+B\d+\)OVERLAP_(F)_(B)|frugallm:([FB])\d+)$")
COMM = "frugallm:a2a"


@contextlib.contextmanager
def record(path: Path):
    """Profile the block on this rank; its Chrome trace goes to `path`."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        yield
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))


def intervals(trace: Path) -> dict[str, list[tuple[str, float, float]]]:
    """{"compute": [(kind, start_us, end_us)], "comm": [...]} from one rank's Chrome trace; kind is
    F, I, W, B (a full backward) or FB (DualPipeV's overlapped pair: one micro-batch's forward with
    another's full backward)."""
    events = json.loads(Path(trace).read_text())
    events = events.get("traceEvents", events) if isinstance(events, dict) else events
    out: dict[str, list] = {"compute": [], "comm": []}
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        name, start, end = e.get("name", ""), float(e["ts"]), float(e["ts"]) + float(e["dur"])
        m = COMPUTE.match(name)
        if m:
            out["compute"].append((m.group(1) or (m.group(2) + m.group(3) if m.group(2) else m.group(4)), start, end))
        elif name == COMM:
            out["comm"].append(("a2a", start, end))
    return out


def _union(spans: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def summarize(ranks: list[dict]) -> dict:
    """The step's span, and per rank: busy (compute or communication), bubble (span - busy), compute
    (busy outside all-to-alls), comm (time in all-to-alls), and each kind of action's mean duration, in ms."""
    spans = [(a, b) for r in ranks for _, a, b in r["compute"] + r["comm"]]
    if not spans:
        raise ValueError("the traces hold no compute actions: was the step recorded with trace_step?")
    start, end = min(a for a, _ in spans), max(b for _, b in spans)
    span = end - start
    rows = []
    for r in ranks:
        compute = [(a, b) for _, a, b in r["compute"]]
        comm = [(a, b) for _, a, b in r["comm"]]
        busy = _union(compute + comm)
        kinds = {}
        for kind, a, b in r["compute"]:
            kinds.setdefault(kind, []).append(b - a)
        rows.append({"busy_ms": busy / 1e3, "bubble_ms": (span - busy) / 1e3, "bubble": (span - busy) / span,
                     "compute_ms": (busy - _union(comm)) / 1e3, "comm_ms": _union(comm) / 1e3,
                     "mean_ms": {k: sum(v) / len(v) / 1e3 for k, v in sorted(kinds.items())}})
    return {"span_ms": span / 1e3, "ranks": rows}


def plot(ranks: list[dict], path: Path, title: str = "") -> None:
    """One row per rank: forward / backward-input / backward-weight / full-backward boxes, all-to-alls
    as thin bars below them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"F": "#4c72b0", "I": "#dd8452", "W": "#55a868", "B": "#c44e52", "FB": "#8172b3"}
    spans = [(a, b) for r in ranks for _, a, b in r["compute"] + r["comm"]]
    t0 = min(a for a, _ in spans)
    fig, ax = plt.subplots(figsize=(12, 1.4 + 0.7 * len(ranks)))
    for i, r in enumerate(ranks):
        y = len(ranks) - 1 - i
        for kind, a, b in r["compute"]:
            ax.broken_barh([((a - t0) / 1e3, (b - a) / 1e3)], (y + 0.25, 0.6), facecolors=colours[kind],
                           edgecolor="white", linewidth=0.3)
        for _, a, b in r["comm"]:
            ax.broken_barh([((a - t0) / 1e3, (b - a) / 1e3)], (y + 0.05, 0.15), facecolors="black")
    ax.set_yticks([len(ranks) - 1 - i + 0.5 for i in range(len(ranks))], [f"rank {i}" for i in range(len(ranks))])
    ax.set_xlabel("ms")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()] + [plt.Rectangle((0, 0), 1, 1, color="black")]
    ax.legend(handles, ["forward", "backward (input)", "backward (weight)", "backward (full)",
                        "forward & backward (overlapped pair)", "all-to-all"], loc="upper center", fontsize=7, ncol=6,
              bbox_to_anchor=(0.5, -0.35 - 0.1 / len(ranks)), frameon=False)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(trace_dir: Path, world: int, title: str = "") -> dict:
    """Read every rank's trace under trace_dir, write timeline.png and timeline.json there; return the summary."""
    ranks = [intervals(trace_dir / f"rank{r}.json") for r in range(world)]
    summary = summarize(ranks)
    plot(ranks, trace_dir / "timeline.png", title)
    (trace_dir / "timeline.json").write_text(json.dumps(summary, indent=2))
    return summary
