"""The report's plots (matplotlib, Agg): bars, curves over training, load per expert over time, pipeline
timelines. Each writes one PNG and returns its path relative to the report directory (plots/NAME.png)."""

from __future__ import annotations

import io as _bytes
from pathlib import Path

COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")


def _figure(*size):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(*size[2:], figsize=size[:2], squeeze=False)


def _save(plt, fig, path: Path, tight: bool = True) -> str:
    from ..io import write_file

    if tight:  # a colorbar shared by several axes does not fit tight_layout
        fig.tight_layout()
    buf = _bytes.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, buf.getvalue())
    return f"{path.parent.name}/{path.name}"


def bar_chart(path: Path, names: list[str], values: list[float], ylabel: str, title: str, log: bool = False,
              second: list[float] | None = None, labels: tuple[str, str] = ("", "")) -> str:
    """Horizontal bars, one per name; `second` draws a second bar beside each (labels name the two)."""
    plt, fig, ax = _figure(8, 0.9 + 0.38 * len(names) * (2 if second else 1))
    ax = ax[0][0]
    h = 0.4 if second else 0.7
    ys = list(range(len(names)))
    ax.barh([y - (h / 2 if second else 0) for y in ys], values, h, color=COLOURS[0], label=labels[0] or None)
    if second:
        ax.barh([y + h / 2 for y in ys], second, h, color=COLOURS[1], label=labels[1] or None)
        ax.legend(fontsize=8)
    ax.set_yticks(ys, names, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel=ylabel, title=title, xscale="log" if log else "linear")
    ax.grid(True, axis="x", alpha=0.3)
    return _save(plt, fig, path)


def curves(path: Path, panels: list[tuple[str, str, dict[str, list[float]]]], title: str, smooth: int = 1,
           logy: tuple[bool, ...] = ()) -> str:
    """One panel per (title, y label, {series name: values by step}); `smooth` = a running mean's width."""
    plt, fig, axes = _figure(5.2 * len(panels), 3.6, 1, len(panels))
    for i, (sub, ylabel, series) in enumerate(panels):
        ax = axes[0][i]
        for j, (name, ys) in enumerate(series.items()):
            k = max(1, min(smooth, len(ys) // 5 or 1))
            sm = [sum(ys[max(0, t - k + 1):t + 1]) / len(ys[max(0, t - k + 1):t + 1]) for t in range(len(ys))]
            ax.plot(range(1, len(sm) + 1), sm, color=COLOURS[j % len(COLOURS)], label=name, lw=1.3)
        ax.set(title=sub, xlabel="step", ylabel=ylabel, yscale="log" if i < len(logy) and logy[i] else "linear")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save(plt, fig, path)


def expert_load(path: Path, loads: dict[str, list[list[int]]], title: str) -> str:
    """One heat map per arm: the share of routed tokens each expert got (rows) at each step (columns);
    1/E everywhere is perfect balance."""
    import numpy as np

    plt, fig, axes = _figure(5.2 * len(loads), 3.4, 1, len(loads))
    image = None
    for i, (name, steps) in enumerate(loads.items()):
        a = np.asarray(steps, dtype=float).T  # (E, steps)
        share = a / np.maximum(a.sum(0, keepdims=True), 1) * a.shape[0]  # 1 = the mean load
        image = axes[0][i].imshow(share, aspect="auto", cmap="viridis", vmin=0, vmax=3, interpolation="nearest")
        axes[0][i].set(title=name, xlabel="step", ylabel="expert")
    fig.colorbar(image, ax=[a for row in axes for a in row], label="load / mean load", shrink=0.9)
    fig.suptitle(title, fontsize=10)
    return _save(plt, fig, path, tight=False)


def timeline(path: Path, result, title: str) -> str:
    """The simulated schedule (parallel/schedule.py Result): one row per rank, one box per op."""
    plt, fig, ax = _figure(11, 1.2 + 0.55 * result.pp)
    ax = ax[0][0]
    colours = {"F": COLOURS[0], "B": COLOURS[1], "W": COLOURS[2], "BW": COLOURS[3], "FB": COLOURS[4]}
    for r, (ops, times) in enumerate(zip(result.ops, result.times)):
        y = result.pp - 1 - r
        for op, (a, b) in zip(ops, times):
            ax.broken_barh([(a, b - a)], (y + 0.1, 0.8), facecolors=colours.get(op.kind, "grey"), edgecolor="white",
                           linewidth=0.4)
    ax.set_yticks([result.pp - 1 - r + 0.5 for r in range(result.pp)], [f"rank {r}" for r in range(result.pp)])
    ax.set_xlabel("time (the durations measured here, ms)")
    names = {"F": "forward", "B": "backward (input)", "W": "backward (weight)", "BW": "backward (full)",
             "FB": "forward & backward (overlapped)"}
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    ax.legend(handles, list(names.values()), fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.25),
              frameon=False)
    ax.set_title(title, fontsize=9)
    return _save(plt, fig, path)
