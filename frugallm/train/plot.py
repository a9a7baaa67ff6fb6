"""`frugallm plot RUN`: PNGs of a run's metrics.jsonl (loss and val loss, lr, MaxVio, HC gains; a GRPO
run's reward and accuracy, KL, clip fraction, completion length and all-equal groups)."""

from __future__ import annotations

from pathlib import Path

from ..names import METRICS
from .metrics_file import read_metrics


def plot_run(run_dir: str | Path, warn=None) -> list[Path]:
    """The PNGs written into run_dir; warn(message) is told of a torn last line of metrics.jsonl (dropped)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    path = run_dir / METRICS
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; is {run_dir} a frugallm run directory?")
    rows = read_metrics(path, warn)
    if not rows:
        raise ValueError(f"{path} holds no metrics yet")
    steps = [r["step"] for r in rows]
    panels = [("loss", [("loss", "train loss"), ("lm_loss", "main head"), ("val_loss", "val loss")]),
              ("lr", [("lr", "learning rate")]),
              ("max_violation", [("max_violation_mean", "MaxVio (mean over MoE layers)")]),
              ("hc_gain", [("hc_gain_fwd", "forward gain"), ("hc_gain_bwd", "backward gain")]),
              # a GRPO run's (frugallm/rl/trainer.py); a panel is drawn only where its keys are logged
              ("reward", [("reward_mean", "mean reward"), ("accuracy", "accuracy (verifier)")]),
              ("kl", [("kl", "KL to the reference (k3, per token)")]),
              ("clip_fraction", [("clip_fraction", "clipped share of tokens")]),
              ("length", [("length_mean", "mean completion length (tokens)")]),
              ("equal_groups", [("equal_groups", "share of groups whose rewards are all equal")])]
    written = []
    for name, series in panels:
        fig, ax = plt.subplots(figsize=(7, 4))
        drawn = False
        for key, label in series:
            points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), label=label, marker="o" if key == "val_loss" else None, markersize=3)
                drawn = True
        if drawn:
            ax.set_xlabel("step")
            ax.set_xlim(0, max(steps))
            ax.grid(alpha=0.3)
            ax.legend()
            ax.set_title(f"{run_dir.name}: {name}")
            out = run_dir / f"{name}.png"
            fig.savefig(out, dpi=100, bbox_inches="tight")
            written.append(out)
        plt.close(fig)
    return written
