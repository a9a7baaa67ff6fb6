"""Per-rank timelines of a real training step: one Chrome trace per rank and one PNG of all ranks.

`TrainConfig.trace_step = K` records step K on every rank with the torch profiler
(`run/trace/rank<r>.json`, open in chrome://tracing or Perfetto). What the timeline reads from it:
  - compute: torch.distributed.pipelining's actions ("PP:<stage><F|I|W|B><micro-batch>": forward,
    backward for inputs, backward for weights, full backward; "PP:(<s>F<m>;<s>B<m>)OVERLAP_F_B":
    DualPipeV's forward-and-backward pair), or, without a pipeline, the trainer's
    own "frugallm:F<k>" / "frugallm:B<k>" around each micro-batch's forward and backward;
  - communication: "frugallm:a2a" around every expert-parallel all-to-all (parallel/expert.py).
Busy time is the union of compute and communication intervals; the bubble is the step's span minus
that. An all-to-all blocks its thread; its time is exposed unless another thread of the rank computes
meanwhile (overlap.py's forward-and-backward pairs). The clocks
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
    from torch._C._profiler import _ExperimentalConfig
    from torch.profiler import ProfilerActivity, profile

    # every thread: overlap.py runs backwards on a helper thread, which a default profile leaves out
    with profile(activities=[ProfilerActivity.CPU], experimental_config=_ExperimentalConfig(profile_all_threads=True)) as prof:
        yield
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))


def intervals(trace: Path) -> dict[str, list[tuple[str, float, float, int]]]:
    """{"compute": [(kind, start_us, end_us, thread)], "comm": [...]} from one rank's Chrome trace;
    kind is F, I, W, B (a full backward) or FB (DualPipeV's overlapped pair, one micro-batch's forward
    with another's full backward). An FB action run by overlap.py holds its own F and B events, on two
    threads: those are kept and the envelope (which also spans the wait for the helper thread) is not."""
    events = json.loads(Path(trace).read_text())
    events = events.get("traceEvents", events) if isinstance(events, dict) else events
    out: dict[str, list] = {"compute": [], "comm": []}
    ours = []  # frugallm:F/B events: (start, end)
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        name, start, end = e.get("name", ""), float(e["ts"]), float(e["ts"]) + float(e["dur"])
        m = COMPUTE.match(name)
        if m:
            kind = m.group(1) or (m.group(2) + m.group(3) if m.group(2) else m.group(4))
            out["compute"].append((kind, start, end, int(e.get("tid", 0))))
            if m.group(4):
                ours.append((start, end))
        elif name == COMM:
            out["comm"].append(("a2a", start, end, int(e.get("tid", 0))))
    out["compute"] = [c for c in out["compute"]
                      if c[0] != "FB" or not any(c[1] <= a and b <= c[2] for a, b in ours)]
    return out


def _merge(spans) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def _minus(spans, holes) -> list[tuple[float, float]]:
    """The parts of `spans` outside `holes` (both lists of intervals)."""
    out, holes = [], _merge(holes)
    for a, b in _merge(spans):
        for h0, h1 in holes:
            if h1 <= a or h0 >= b:
                continue
            if h0 > a:
                out.append((a, h0))
            a = max(a, h1)
        if a < b:
            out.append((a, b))
    return out


def _length(spans) -> float:
    return sum(b - a for a, b in _merge(spans))


def summarize(ranks: list[dict]) -> dict:
    """The step's span, and per rank, in ms: busy (computing or communicating), bubble (span - busy),
    compute (some thread computing: inside a compute box and outside that thread's all-to-alls), comm
    (some thread in an all-to-all), exposed comm (in an all-to-all while no thread computes: what an
    overlap has not hidden), and each kind of action's mean duration."""
    spans = [(c[1], c[2]) for r in ranks for c in r["compute"] + r["comm"]]
    if not spans:
        raise ValueError("the traces hold no compute actions: was the step recorded with trace_step?")
    start, end = min(a for a, _ in spans), max(b for _, b in spans)
    span = end - start
    rows = []
    for r in ranks:
        comm = [(a, b) for _, a, b, _ in r["comm"]]
        threads = {t for *_, t in r["compute"]}
        computing = [piece for t in threads for piece in _minus(
            [(a, b) for _, a, b, u in r["compute"] if u == t], [(a, b) for _, a, b, u in r["comm"] if u == t])]
        busy = _length([(a, b) for _, a, b, _ in r["compute"]] + comm)
        kinds = {}
        for kind, a, b, _ in r["compute"]:
            kinds.setdefault(kind, []).append(b - a)
        rows.append({"busy_ms": busy / 1e3, "bubble_ms": (span - busy) / 1e3, "bubble": (span - busy) / span,
                     "compute_ms": _length(computing) / 1e3, "comm_ms": _length(comm) / 1e3,
                     "exposed_comm_ms": _length(_minus(comm, computing)) / 1e3,
                     "mean_ms": {k: sum(v) / len(v) / 1e3 for k, v in sorted(kinds.items())}})
    return {"span_ms": span / 1e3, "ranks": rows}


def plot(ranks: list[dict], path: Path, title: str = "") -> None:
    """One row per rank: forward / backward-input / backward-weight / full-backward boxes (overlap.py's
    helper thread in a lower band), all-to-alls as thin black bars under their thread's boxes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"F": "#4c72b0", "I": "#dd8452", "W": "#55a868", "B": "#c44e52", "FB": "#8172b3"}
    t0 = min(c[1] for r in ranks for c in r["compute"] + r["comm"])
    fig, ax = plt.subplots(figsize=(12, 1.4 + 0.7 * len(ranks)))
    for i, r in enumerate(ranks):
        y = len(ranks) - 1 - i
        main = min((c[3] for c in r["compute"]), default=0)  # the schedule's thread; overlap.py's helper below it
        for kind, a, b, t in r["compute"]:
            band = (y + 0.55, 0.35) if t == main else (y + 0.2, 0.3)
            ax.broken_barh([((a - t0) / 1e3, (b - a) / 1e3)], band, facecolors=colours[kind], edgecolor="white",
                           linewidth=0.3)
        for _, a, b, t in r["comm"]:
            ax.broken_barh([((a - t0) / 1e3, (b - a) / 1e3)], (y + (0.5 if t == main else 0.15), 0.05),
                           facecolors="black")
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
