"""Speedup over learning-rate-tuned Adam, VeLO's headline metric, and its aggregates.

Metz et al. 2022, VeLO, arXiv:2211.09760, §4.1.2, App. F.1:

* The baseline is Adam run ``T'`` steps (longer than the ``T`` steps of the optimizer under
  test) at every learning rate of a grid, with several seeds. Per learning rate the seeds
  are averaged and the curve smoothed by an EMA (decay 0.95); the pointwise minimum over
  learning rates, made monotone non-increasing with a cumulative minimum, is the *envelope*
  (:func:`adam_envelope`): the best loss Adam reaches by each step.
* The optimizer under test reaches loss ``L`` after ``T`` steps (:func:`final_loss`, with
  the same seed averaging and smoothing). The first step ``s*`` at which the envelope
  reaches ``L`` is found by linear inverse interpolation, and the speedup is ``s*/T``
  (:func:`speedup`): 2 means Adam needs twice as many steps. It can only be measured up to
  ``T'/T``; larger values are clipped there.
* Over a set of tasks the tables report the mean speedup (each task clipped at 30x), the
  mean inverse speedup or "cost" (each clipped at 10), and percentiles (:func:`aggregate`).

Diverged runs (NaN or infinite losses) count as ``+inf`` loss throughout: worse than any
finite loss, never silently dropped from an average.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

EMA_DECAY = 0.95
PERCENTILES = (5, 10, 25, 50, 75)


def _as_loss(x) -> np.ndarray:
    """float64 copy with every non-finite value (NaN, +-inf) replaced by +inf."""
    x = np.array(x, dtype=np.float64)
    x[~np.isfinite(x)] = np.inf
    return x


def _seed_mean(curves: np.ndarray) -> np.ndarray:
    """Mean over the seed axis (second to last); a diverged seed makes the mean +inf."""
    return _as_loss(curves).mean(axis=-2)


def ema(curves: np.ndarray, decay: float = EMA_DECAY) -> np.ndarray:
    """Exponential moving average along the last axis, started at the first value.

    ``y_0 = x_0`` and ``y_t = decay * y_{t-1} + (1 - decay) * x_t``. Non-finite inputs count
    as ``+inf``, which then stays in the average: once a run diverges it stays diverged.
    """
    x = _as_loss(curves)
    y = np.empty_like(x)
    if x.shape[-1] == 0:
        return y
    y[..., 0] = x[..., 0]
    for t in range(1, x.shape[-1]):
        y[..., t] = decay * y[..., t - 1] + (1.0 - decay) * x[..., t]
    return y


def adam_envelope(curves: np.ndarray) -> np.ndarray:
    """The best smoothed loss the baseline reaches by each step, ``[T']``.

    ``curves`` are raw per-step training losses ``[H, S, T']`` of ``H`` learning rates by
    ``S`` seeds. Seeds are averaged (a diverged seed makes its learning rate +inf), each
    mean is smoothed by :func:`ema`, the minimum is taken over learning rates and then the
    cumulative minimum over steps, so the envelope is non-increasing.
    """
    curves = np.asarray(curves)
    if curves.ndim != 3 or curves.shape[-1] == 0:
        raise ValueError(f"curves must be [H, S, T'] with T' > 0, got shape {curves.shape}")
    smoothed = ema(_seed_mean(curves))
    return np.minimum.accumulate(smoothed.min(axis=0))


def final_loss(curves: np.ndarray) -> float:
    """The smoothed loss an optimizer ends at: the last value of EMA(mean over seeds).

    ``curves`` are per-step training losses ``[S, T]`` (a 1-D curve is one seed). The
    smoothing is that of :func:`adam_envelope`, so the two can be compared. ``+inf`` if
    any seed diverged.
    """
    curves = np.atleast_2d(np.asarray(curves))
    if curves.ndim != 2 or curves.shape[-1] == 0:
        raise ValueError(f"curves must be [S, T] with T > 0, got shape {curves.shape}")
    return float(ema(_seed_mean(curves))[-1])


@dataclasses.dataclass(frozen=True)
class Speedup:
    """The speedup of one run over the envelope.

    ``value``: the clipped speedup. ``step``: the (fractional, 1-based) envelope step at
    which the baseline reaches the run's loss; ``len(envelope)`` when clipped high, ``inf``
    for a diverged run. ``clipped``: ``"high"`` if the loss is below the whole envelope,
    ``"low"`` if the value was raised to ``min_speedup``, else ``None``.
    """

    value: float
    step: float
    clipped: str | None


def speedup(loss: float, envelope: np.ndarray, steps: int, min_speedup: float = 0.01) -> Speedup:
    """Speedup of a run reaching ``loss`` after ``steps`` steps, over ``envelope``.

    Index ``i`` of ``envelope`` is the loss after ``i + 1`` steps. ``s*`` is the first step
    at which the envelope reaches ``loss``, linearly interpolated between the two envelope
    points around it; this is VeLO's ``interp(loss, envelope[::-1], steps[::-1])``, with
    ties on flat stretches resolved to the first step. The speedup ``s*/steps`` is clipped
    to ``[min_speedup, len(envelope)/steps]``. A loss at or above ``envelope[0]`` gives
    ``s* = 1``; a non-finite loss gives ``min_speedup``.
    """
    env = _as_loss(envelope)
    if env.ndim != 1 or env.size == 0:
        raise ValueError(f"envelope must be a non-empty 1-D array, got shape {env.shape}")
    with np.errstate(invalid="ignore"):  # inf - inf on a diverged prefix
        increasing = np.any(np.diff(env) > 0)
    if increasing:
        raise ValueError("envelope must be non-increasing (see adam_envelope)")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    max_speedup = env.size / steps

    def clip_low(value: float, step: float) -> Speedup:
        if value < min_speedup:
            return Speedup(float(min_speedup), float(step), "low")
        return Speedup(float(value), float(step), None)

    if not np.isfinite(loss):
        return Speedup(float(min_speedup), float("inf"), "low")
    loss = float(loss)
    if loss < env[-1]:
        return Speedup(float(max_speedup), float(env.size), "high")
    # First index whose envelope value is <= loss (env is non-increasing, so -env is sorted).
    i = int(np.searchsorted(-env, -loss, side="left"))
    if i == 0:
        return clip_low(1.0 / steps, 1.0)
    # env[i - 1] > loss >= env[i]; index i - 1 is step i, index i is step i + 1.
    hi, lo = env[i - 1], env[i]
    frac = 1.0 if not np.isfinite(hi) else (hi - loss) / (hi - lo)
    step = i + frac
    return clip_low(step / steps, step)


def aggregate(
    speedups: Sequence[float], max_speedup: float = 30.0, max_cost: float = 10.0
) -> dict[str, float]:
    """The summary statistics of VeLO's Tables 1-2 over per-task speedups.

    ``mean``: mean of ``min(s, max_speedup)``. ``mean_inverse``: mean of
    ``min(1/s, max_cost)`` (a speedup of 0 costs ``max_cost``). ``p5`` .. ``p75``: linear
    percentiles of the unclipped speedups. ``n``: the number of tasks.
    """
    s = np.asarray(speedups, dtype=np.float64).reshape(-1)
    if s.size == 0:
        raise ValueError("aggregate needs at least one speedup")
    if np.any(np.isnan(s)) or np.any(s < 0):
        raise ValueError(f"speedups must be non-negative numbers, got {s.tolist()}")
    with np.errstate(divide="ignore"):
        inverse = 1.0 / s
    out = {
        "mean": float(np.minimum(s, max_speedup).mean()),
        "mean_inverse": float(np.minimum(inverse, max_cost).mean()),
    }
    for q in PERCENTILES:
        out[f"p{q}"] = float(np.percentile(s, q))
    out["n"] = float(s.size)
    return out


def beats(speedups: Sequence[float], threshold: float = 1.0) -> float:
    """Fraction of tasks whose speedup is strictly above ``threshold``."""
    s = np.asarray(speedups, dtype=np.float64).reshape(-1)
    if s.size == 0:
        raise ValueError("beats needs at least one speedup")
    return float(np.mean(s > threshold))
