"""Plots people would rather look at than read: loss curves of training runs."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from learnopt.training import smooth


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training(
    path: str | os.PathLike,
    train_loss: np.ndarray,
    evals: Sequence[Mapping[str, float]],
    title: str,
) -> None:
    """Training loss per step (raw and smoothed) and, beside it, the eval metrics."""
    plt = pyplot()
    eval_keys = [k for k in (evals[0] if evals else {}) if k != "step"]
    fig, axes = plt.subplots(1, 1 + bool(eval_keys), figsize=(6 + 5 * bool(eval_keys), 4))
    axes = np.atleast_1d(axes)
    steps = np.arange(1, len(train_loss) + 1)
    ax = axes[0]
    ax.plot(steps, train_loss, alpha=0.25, lw=0.7, color="C0", label="train loss")
    ax.plot(steps, smooth(train_loss), color="C0", label="train loss (moving average)")
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    if eval_keys:
        ax2 = axes[1]
        es = [e["step"] for e in evals]
        for i, k in enumerate(eval_keys):
            ax2.plot(es, [e[k] for e in evals], marker="o", color=f"C{i + 1}", label=k)
        ax2.set(xlabel="step", title="evaluation")
        ax2.grid(alpha=0.3)
        ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(
    path: str | os.PathLike,
    curves: Mapping[str, np.ndarray],
    title: str,
    ylabel: str = "train loss",
    bands: Mapping[str, np.ndarray] | None = None,
    log_y: bool = False,
) -> None:
    """Several named learning curves on one axis, optionally with +-std bands."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, y) in enumerate(curves.items()):
        x = np.arange(1, len(y) + 1)
        ax.plot(x, y, color=f"C{i}", label=name)
        if bands and name in bands:
            ax.fill_between(x, y - bands[name], y + bands[name], color=f"C{i}", alpha=0.2)
    ax.set(xlabel="step", ylabel=ylabel, title=title)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
