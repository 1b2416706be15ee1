"""A model of seconds per training step, and time-budgeted task sampling.

VeLO (Metz et al. 2022, VeLO, arXiv:2211.09760, §3.2, App. C.4, C.5) times about 10,000 sampled
tasks per family and trains one neural run-time predictor per family on the flattened config
(C.4); tasks are then rejection-sampled to fit a maximum time per step drawn from {2e-5 s (p
0.65), 1e-4 (0.3), 4e-4 (0.1), 1e-3 (0.05)} (C.5; the probabilities sum to 1.1 and are
renormalised, as ``jax.random.choice`` does in the released code). Below 1e-4 s only the image
MLP, ConvNet, MLP auto-encoder, MLP VAE and ViT families are allowed; from 1e-4 s on also the
RNN and Transformer LMs, ResNets (and learned-optimizer tasks, which C.5 lists in neither set;
we leave ``lopt`` out of both).

What we do instead of the neural predictor, so that calibration takes minutes on a 2-core CPU:

* **Features** from the static config alone, by hand-written analytic counts
  (``static.cost_features()`` in :mod:`learnopt.tasks.families`): training FLOPs per step
  (3x forward), activation floats per step, parameter count, sequential depth and input floats
  per step (the batch size enters through the per-step counts). C.4's validity classifier is
  not needed: the families make every sampled config valid by construction.
* **Model**: an additive cost ``t = overhead_family + flops * rate_family
  + sum_k w_k * feature_k`` with every coefficient >= 0 (a per-family fixed cost and compute
  efficiency, shared per-element costs), fitted to minimise the squared error of
  ``log t`` (the paper's loss) with a non-negative least-squares start
  (:func:`fit_time_model`). Being linear in the counts, it extrapolates sanely to sizes not
  seen in calibration, which a small network fitted on a few dozen timings would not.
* **Measurement** (:func:`measure_step_time`): one jitted ``lax.scan`` of ``steps`` SGD steps
  (``value_and_grad`` of the loss, then the update) on a fixed random batch of the task's
  shapes; the fastest of several calls, divided by ``steps``. Parameters are drawn
  on the host, so no data is loaded and only the step is compiled; batch sampling and the
  optimizer's own cost are not part of the time (the latter scales with the parameter count,
  which is a feature, so a learned optimizer's cost can be added on top).

:func:`calibrate` samples and times configs and fits the model; :class:`TimeModel` predicts,
saves and loads JSON. :func:`sample_within_budget` is C.5's rejection sampler for one family,
:func:`sample_velo_config` the whole §3.2 / C.5 distribution. ``time_scale`` maps the paper's
TPU budgets onto this machine: at ``size="cpu"`` the median measured step on the 2-core CPU is
0.03-0.5 ms for the image MLP / ConvNet / auto-encoders / ViT, about 1 ms for the language
models and 7 ms for ResNets, so ``time_scale=10`` turns 2e-5 / 1e-4 / 4e-4 / 1e-3 s into
budgets that admit a similar spread of tasks (``benchmarks/time_model.py`` reports the measured
ranges and the fraction of tasks under each scaled budget).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from learnopt.io import atomic_write_text, machine_info
from learnopt.tasks.base import config_to_dict
from learnopt.tasks.families import velo as fam
from learnopt.tasks.families.registry import family_config_from_dict
from learnopt.tasks.families.velo import FamilyConfig, SampledFamily, SampledTask

SHARED_FEATURES = ("activations", "params", "layers", "inputs")
PER_FAMILY_FEATURES = ("overhead", "flops")
FORMAT_VERSION = 1

# VeLO App. C.5 (phase 1) and the phase-two distribution of the released VeLO code.
PHASE_ONE_THRESHOLDS = (2e-5, 1e-4, 4e-4, 1e-3)
PHASE_ONE_PROBS = (0.65, 0.3, 0.1, 0.05)
PHASE_TWO_THRESHOLDS = (1e-4, 4e-4, 1e-3, 3e-3)
PHASE_TWO_PROBS = (0.4, 0.2, 0.2, 0.2)
SMALL_BUDGET_LIMIT = 1e-4


class BudgetError(RuntimeError):
    """No sampled config was predicted to fit the time budget."""


# --- features -------------------------------------------------------------------------------


def cost_features(config: FamilyConfig) -> dict[str, float]:
    """The analytic cost features of a config's static part (see the module docstring)."""
    if not isinstance(config, FamilyConfig):
        raise TypeError(f"expected a sampled-family config, got {type(config).__name__}")
    return config.static.cost_features()


def _columns(families: Sequence[str]) -> list[str]:
    cols = [f"{feat}:{f}" for feat in PER_FAMILY_FEATURES for f in families]
    return cols + list(SHARED_FEATURES)


def _row(family: str, feats: Mapping[str, float], columns: Sequence[str]) -> np.ndarray:
    row = np.zeros(len(columns))
    for j, col in enumerate(columns):
        name, _, owner = col.partition(":")
        if owner and owner != family:
            continue
        row[j] = 1.0 if name == "overhead" else float(feats[name])
    return row


# --- the model ------------------------------------------------------------------------------


@dataclasses.dataclass
class TimeModel:
    """Predicted seconds per training step: ``row(config) . weights`` (all weights >= 0).

    ``columns`` name the weights: ``overhead:<family>`` (seconds), ``flops:<family>``
    (seconds per FLOP) and the shared per-unit costs of ``SHARED_FEATURES``. ``info`` records
    how and where the model was fitted.
    """

    columns: list[str]
    weights: list[float]
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def families(self) -> list[str]:
        return [c.partition(":")[2] for c in self.columns if c.startswith("overhead:")]

    def predict(self, config: FamilyConfig) -> float:
        """Predicted seconds per step of ``config`` on the calibrated machine."""
        family = fam.family_of(config)
        if family not in self.families:
            raise KeyError(
                f"time model has no family {family!r}; calibrated: {', '.join(self.families)}"
            )
        row = _row(family, cost_features(config), self.columns)
        return float(row @ np.asarray(self.weights))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "columns": list(self.columns),
            "weights": [float(w) for w in self.weights],
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TimeModel:
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"time model format {data.get('format_version')!r} unsupported "
                f"(this code reads {FORMAT_VERSION})"
            )
        if len(data["columns"]) != len(data["weights"]):
            raise ValueError("time model has different numbers of columns and weights")
        return cls(list(data["columns"]), [float(w) for w in data["weights"]], data.get("info", {}))

    def save(self, path: str | os.PathLike) -> Path:
        """Write JSON atomically (temporary file, then rename)."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: str | os.PathLike) -> TimeModel:
        """A model saved by :meth:`save` (``learnopt time-model``), or the ``model`` entry of
        a ``benchmarks/time_model.py`` result file."""
        data = json.loads(Path(path).read_text())
        if "format_version" not in data and isinstance(data.get("model"), dict):
            data = data["model"]
        return cls.from_dict(data)


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One timed config: family name, config (as ``config_to_dict``) and seconds per step."""

    family: str
    config: dict
    seconds: float

    def as_config(self) -> FamilyConfig:
        return family_config_from_dict(self.config)


def fit_time_model(measurements: Sequence[Measurement], info: dict | None = None) -> TimeModel:
    """Fit the additive model to timings by least squares on ``log t`` with weights >= 0.

    Columns are rescaled to unit median before fitting. The start is the non-negative least
    squares fit of relative errors; ``scipy.optimize.least_squares`` (bounded) then minimises
    the log residuals.
    """
    from scipy.optimize import least_squares, nnls

    if not measurements:
        raise ValueError("need at least one measurement to fit a time model")
    families = sorted({m.family for m in measurements})
    columns = _columns(families)
    x = np.stack([_row(m.family, cost_features(m.as_config()), columns) for m in measurements])
    t = np.asarray([m.seconds for m in measurements], float)
    if np.any(~np.isfinite(t)) or np.any(t <= 0):
        raise ValueError("measured times must be finite and positive")
    scale = np.array([np.median(c[c > 0]) if np.any(c > 0) else 1.0 for c in x.T])
    xs = x / scale
    w0, _ = nnls(xs / t[:, None], np.ones_like(t))
    w0 = np.maximum(w0, 1e-12)

    def residual(w):
        return np.log(np.maximum(xs @ w, 1e-30)) - np.log(t)

    fit = least_squares(residual, w0, bounds=(0.0, np.inf), x_scale="jac", max_nfev=2000)
    w = fit.x / scale
    res = residual(fit.x)
    meta = {
        "num_measurements": len(measurements),
        "fit_rms_log_error": float(np.sqrt(np.mean(res**2))),
        "fit_within_factor_2": float(np.mean(np.abs(res) <= math.log(2.0))),
        **(info or {}),
    }
    return TimeModel(columns, [float(v) for v in w], meta)


# --- measurement ----------------------------------------------------------------------------


def host_params(task: SampledTask, seed: int = 0):
    """Parameters of the task's shapes drawn on the host (N(0, 1/fan_in) weights, zero
    vectors): no device compile, for timing only."""
    rng = np.random.default_rng(seed)

    def leaf(s):
        if len(s.shape) < 2:
            return np.zeros(s.shape, s.dtype)
        fan_in = math.prod(s.shape[:-1])
        return (rng.standard_normal(s.shape) / math.sqrt(fan_in)).astype(s.dtype)

    return jax.tree_util.tree_map(leaf, task.param_shapes)


def measure_step_time(
    task: SampledTask,
    *,
    steps: int | None = None,
    min_time: float = 0.2,
    min_repeats: int = 8,
    max_repeats: int = 50,
    learning_rate: float = 1e-3,
) -> float:
    """Seconds per training step of ``task``: the fastest of several timed calls.

    A step is ``value_and_grad`` of the loss and an SGD update, on a fixed batch of the task's
    shapes (random values) with a fixed key; ``steps`` of them run in one jitted ``lax.scan``.
    The compiled scan is called once to warm up, then until ``min_time`` seconds have been
    spent (at least ``min_repeats``, at most ``max_repeats`` calls). The minimum, not the
    median, is returned: on a machine shared with other jobs the median of the same task
    varied by 2-10x between runs while the minimum stayed within about 20%. ``steps=None``
    picks 4 steps per call for tasks under 2e7 training FLOPs and 1 above, so that slow tasks
    also get short calls, which are the ones likely to run uncontended.
    """
    if steps is None:
        steps = 4 if task.static.cost_features()["flops"] < 2e7 else 1
    rng = np.random.default_rng(0)

    def batch_leaf(s):
        if np.issubdtype(s.dtype, np.integer):
            return rng.integers(0, 2, size=s.shape).astype(s.dtype)
        return rng.uniform(size=s.shape).astype(s.dtype)

    batch = jax.tree_util.tree_map(batch_leaf, task.abstract_batch())

    def run(params, key, batch):
        def body(p, _):
            loss, grads = jax.value_and_grad(task.loss)(p, key, batch)
            p = jax.tree_util.tree_map(lambda a, g: a - learning_rate * g, p, grads)
            return p, loss

        return jax.lax.scan(body, params, None, length=steps)

    params = host_params(task)
    key = jax.random.PRNGKey(0)
    compiled = jax.jit(run).lower(params, key, batch).compile()
    jax.block_until_ready(compiled(params, key, batch))
    times: list[float] = []
    spent = 0.0
    while len(times) < min_repeats or (spent < min_time and len(times) < max_repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, key, batch))
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
    return min(times) / steps


def _as_family_map(families) -> dict[str, SampledFamily]:
    if isinstance(families, Mapping):
        return dict(families)
    return {f.name: f for f in families}


def measure_families(
    families: Mapping[str, SampledFamily] | Sequence[SampledFamily],
    num_samples: int,
    key: jax.Array,
    *,
    measure: Callable[[SampledTask], float] = measure_step_time,
    log: Callable[[str], None] | None = None,
) -> list[Measurement]:
    """Sample ``num_samples`` configs per family with keys ``fold_in(key, i)`` and time each
    (on synthetic data of the same shapes)."""
    out = []
    for name, family in _as_family_map(families).items():
        fkey = jax.random.fold_in(key, _stable_hash(name))
        for i in range(num_samples):
            config = family.sample(jax.random.fold_in(fkey, i))
            seconds = measure(family.task(config, data="synthetic"))
            out.append(Measurement(name, config_to_dict(config), float(seconds)))
            if log is not None:
                log(f"{name} {i}: {seconds * 1e3:.3f} ms/step")
    return out


def _stable_hash(text: str) -> int:
    return zlib.crc32(text.encode()) % (2**31)


def calibrate(
    families: Mapping[str, SampledFamily] | Sequence[SampledFamily],
    num_samples: int,
    key: jax.Array,
    *,
    path: str | os.PathLike | None = None,
    measure: Callable[[SampledTask], float] = measure_step_time,
    log: Callable[[str], None] | None = None,
) -> TimeModel:
    """Time ``num_samples`` sampled configs of each family on this machine, fit a
    :class:`TimeModel` and (if ``path`` is given) save it as JSON.

    The measurements are kept in ``model.info["measurements"]`` so a model can be refitted.
    """
    t0 = time.perf_counter()
    measurements = measure_families(families, num_samples, key, measure=measure, log=log)
    info = {
        "machine": machine_info(),
        "num_samples_per_family": num_samples,
        "calibration_seconds": time.perf_counter() - t0,
        "sizes": {n: f.size for n, f in _as_family_map(families).items()},
        "measurements": [dataclasses.asdict(m) for m in measurements],
    }
    model = fit_time_model(measurements, info)
    if path is not None:
        model.save(path)
    return model


# --- budgeted sampling (C.5) ----------------------------------------------------------------


def sample_within_budget(
    family: SampledFamily,
    key: jax.Array,
    max_seconds_per_step: float,
    model: TimeModel,
    max_tries: int = 100,
) -> FamilyConfig:
    """Rejection sampling (C.5): the first of ``family.sample(fold_in(key, i))``,
    ``i < max_tries``, whose predicted step time is at most ``max_seconds_per_step``.

    Raises :class:`BudgetError` (naming the fastest prediction seen) if none fits.
    """
    if max_tries < 1:
        raise ValueError(f"max_tries must be >= 1, got {max_tries}")
    if not max_seconds_per_step > 0:
        raise ValueError(f"max_seconds_per_step must be > 0, got {max_seconds_per_step}")
    fastest = math.inf
    for i in range(max_tries):
        config = family.sample(jax.random.fold_in(key, i))
        predicted = model.predict(config)
        if predicted <= max_seconds_per_step:
            return config
        fastest = min(fastest, predicted)
    raise BudgetError(
        f"no {family.name} config in {max_tries} tries is predicted under "
        f"{max_seconds_per_step:.3g} s/step (fastest: {fastest:.3g} s/step)"
    )


def sample_budget(
    key: jax.Array,
    thresholds: Sequence[float] = PHASE_ONE_THRESHOLDS,
    probs: Sequence[float] = PHASE_ONE_PROBS,
) -> float:
    """A maximum time per step drawn from ``thresholds`` with ``probs`` renormalised to sum 1
    (C.5's phase-one probabilities sum to 1.1: 0.65 / 0.3 / 0.1 / 0.05 become about
    0.591 / 0.273 / 0.091 / 0.045)."""
    if len(thresholds) != len(probs) or not thresholds:
        raise ValueError("thresholds and probs must be non-empty and of equal length")
    p = np.asarray(probs, float)
    if np.any(p < 0) or p.sum() <= 0:
        raise ValueError(f"probs must be non-negative with a positive sum, got {probs}")
    rng = fam.numpy_rng(key, 2)
    return float(thresholds[int(rng.choice(len(p), p=p / p.sum()))])


def sample_velo_config(
    key: jax.Array,
    model: TimeModel,
    families: Mapping[str, SampledFamily],
    *,
    thresholds: Sequence[float] = PHASE_ONE_THRESHOLDS,
    probs: Sequence[float] = PHASE_ONE_PROBS,
    time_scale: float = 1.0,
    max_tries: int = 100,
) -> FamilyConfig:
    """One draw from the time-budgeted task distribution of VeLO App. C.5.

    Draws a maximum step time from ``thresholds`` with ``probs`` (renormalised), the allowed
    families (those of ``SMALL_BUDGET_FAMILIES`` below 1e-4 s, ``LARGE_BUDGET_FAMILIES`` from
    there on, intersected with ``families``), then one family uniformly and a config within
    ``threshold * time_scale`` seconds by :func:`sample_within_budget`. If that family has no
    config under the budget in ``max_tries`` draws, the other allowed families are tried in a
    random order (our addition: the paper does not say what happens then).
    """
    threshold = sample_budget(key, thresholds, probs)
    rng = fam.numpy_rng(key, 3)
    allowed_names = (
        fam.SMALL_BUDGET_FAMILIES if threshold < SMALL_BUDGET_LIMIT else fam.LARGE_BUDGET_FAMILIES
    )
    allowed = [n for n in allowed_names if n in families]
    if not allowed:
        raise ValueError(
            f"none of the families {sorted(families)} is allowed at {threshold:g} s "
            f"(allowed: {', '.join(allowed_names)})"
        )
    order = [allowed[i] for i in rng.permutation(len(allowed))]
    errors = []
    for j, name in enumerate(order):
        try:
            return sample_within_budget(
                families[name],
                jax.random.fold_in(key, 1000 + j),
                threshold * time_scale,
                model,
                max_tries,
            )
        except BudgetError as e:
            errors.append(str(e))
    raise BudgetError("; ".join(errors))


__all__ = [
    "BudgetError",
    "Measurement",
    "PHASE_ONE_PROBS",
    "PHASE_ONE_THRESHOLDS",
    "PHASE_TWO_PROBS",
    "PHASE_TWO_THRESHOLDS",
    "TimeModel",
    "calibrate",
    "cost_features",
    "fit_time_model",
    "host_params",
    "measure_families",
    "measure_step_time",
    "sample_budget",
    "sample_velo_config",
    "sample_within_budget",
]
