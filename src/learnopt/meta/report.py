"""Reports of meta-training runs: the meta-loss curve and the main job's summary."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_meta_training(run_dir: str | os.PathLike) -> Path:
    """``meta_loss.png``: meta-loss per outer step (raw and moving average)."""
    from learnopt.plotting import plot_curves
    from learnopt.training import smooth

    rows = read_metrics(run_dir)
    loss = np.asarray([r["meta_loss"] for r in rows], np.float64)
    out = Path(run_dir) / "meta_loss.png"
    window = max(1, len(loss) // 50)
    plot_curves(
        out,
        {"meta-loss (moving average)": smooth(loss, window)},
        f"meta-training: {len(loss)} outer steps",
        ylabel="mean normalised training loss over a truncation",
    )
    return out


def plot_heldout(path: str | os.PathLike, steps, result, title: str) -> Path:
    """``heldout.png``: held-out meta-loss per outer step, the mean and each task faintly."""
    from learnopt.plotting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in result.per_task:
        ax.plot(steps, row, color="0.6", lw=0.8, alpha=0.6)
    ax.plot(steps, result.mean, color="C0", marker="o", lw=2,
            label=f"mean over {len(result.tasks)} held-out tasks")
    ax.set(xlabel="outer step", ylabel="mean normalised training loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
