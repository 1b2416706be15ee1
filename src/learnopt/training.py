"""Inner training: run any optax optimizer (hand-designed or learned) on a Task.

Every step is :func:`learnopt.step.inner_step`, so hand-designed and learned
optimizers, and augmented tasks, are trained and measured identically.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import optax
from tqdm.auto import tqdm

from learnopt.step import TrainState, init_train_state, inner_step, needs_valid_batch
from learnopt.tasks.base import ArraySplit, NoDataSplit, Task


@dataclasses.dataclass
class TrainResult:
    """Per-step training losses, periodic evaluations and the final parameters."""

    train_loss: np.ndarray
    evals: list[dict[str, float]]
    params: Any
    seconds: float

    @property
    def final_eval(self) -> dict[str, float]:
        return self.evals[-1] if self.evals else {}


def make_train_step(task: Task, opt: optax.GradientTransformation):
    """A jitted :func:`learnopt.step.inner_step` for ``task`` and ``opt``:
    ``(state, batch, key, valid_batch=None) -> (state, loss)``."""

    def step_fn(state: TrainState, batch, key, valid_batch=None):
        return inner_step(task, opt, state, batch, key, valid_batch)

    return jax.jit(step_fn)


def _eval_batches(task: Task, split_name: str, max_batches: int) -> Iterator[Any]:
    split = task.datasets.split(split_name)
    if isinstance(split, ArraySplit):
        data, n = split.full(), split.num_examples
        chunk = 1000
        for i in range(0, n, chunk):
            yield {k: v[i : i + chunk] for k, v in data.items()}
    elif isinstance(split, NoDataSplit):
        yield {}
    else:  # windows of a stream: a fixed, seeded sample of batches
        it = split.iterator(seed=12345)
        for _ in range(max_batches):
            yield next(it)


def evaluate(task: Task, params, split: str = "test", max_batches: int = 20) -> dict[str, float]:
    """Mean loss (and the task's metrics, e.g. accuracy) over a split.

    Example splits are evaluated exhaustively, weighted by batch size; text
    streams on ``max_batches`` fixed windows batches.
    """
    metrics_fn = _jitted_metrics(task)
    totals: dict[str, float] = {}
    count = 0
    for batch in _eval_batches(task, split, max_batches):
        m = metrics_fn(params, batch)
        n = len(next(iter(batch.values()))) if batch else 1
        for k, v in m.items():
            totals[k] = totals.get(k, 0.0) + float(v) * n
        count += n
    return {k: v / count for k, v in totals.items()}


_METRICS_CACHE: dict[int, Any] = {}


def _jitted_metrics(task: Task):
    key = id(task)
    if key not in _METRICS_CACHE:

        def fn(params, batch):
            m = dict(task.metrics(params, batch))
            if "loss" not in m:
                m["loss"] = task.loss(params, jax.random.PRNGKey(0), batch)
            return m

        _METRICS_CACHE[key] = jax.jit(fn)
    return _METRICS_CACHE[key]


def train(
    task: Task,
    opt: optax.GradientTransformation,
    num_steps: int,
    seed: int = 0,
    eval_every: int | None = None,
    eval_split: str = "test",
    log_path: str | os.PathLike | None = None,
    progress: bool = True,
    desc: str | None = None,
) -> TrainResult:
    """Train ``task`` with ``opt`` for ``num_steps`` steps on the train split.

    Batches come from ``task.datasets.train.iterator(seed)``; parameters from
    ``task.init(PRNGKey(seed))``. Every ``eval_every`` steps (and at the end)
    the ``eval_split`` is evaluated. With ``log_path``, one JSON line per
    logged step is written (``{"step", "train_loss"}`` plus eval metrics).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    opt = optax.with_extra_args_support(opt)
    key = jax.random.PRNGKey(seed)
    init_key, loop_key = jax.random.split(key)
    state = init_train_state(task, opt, task.init(init_key))
    step_fn = make_train_step(task, opt)
    batches = task.datasets.train.iterator(seed)
    valid_batches = task.datasets.inner_valid.iterator(seed) if needs_valid_batch(opt) else None
    eval_every = eval_every or max(1, num_steps // 10)
    losses = np.zeros(num_steps, np.float32)
    evals: list[dict[str, float]] = []
    log = open(log_path, "w") if log_path else None  # noqa: SIM115
    bar = tqdm(
        total=num_steps, disable=not progress, desc=desc or task.name, mininterval=1.0
    )
    start = time.perf_counter()
    try:
        for i in range(num_steps):
            step_key = jax.random.fold_in(loop_key, i)
            valid_batch = next(valid_batches) if valid_batches is not None else None
            state, loss = step_fn(state, next(batches), step_key, valid_batch)
            losses[i] = float(loss)
            bar.update(1)  # the step is done: the bar ends at num_steps/num_steps
            record: dict[str, float] = {"step": i + 1, "train_loss": losses[i].item()}
            if (i + 1) % eval_every == 0 or i + 1 == num_steps:
                ev = evaluate(task, state.params, eval_split)
                ev = {f"{eval_split}_{k}": v for k, v in ev.items()}
                evals.append({"step": i + 1, **ev})
                record.update(ev)
                bar.set_postfix(loss=f"{losses[i]:.4f}", **{k: f"{v:.4f}" for k, v in ev.items()})
            if log:
                log.write(json.dumps(record) + "\n")
    finally:
        bar.refresh()  # the last count and postfix, even within mininterval
        bar.close()
        if log:
            log.close()
    return TrainResult(losses, evals, state.params, time.perf_counter() - start)


def smooth(values: np.ndarray, window: int = 50) -> np.ndarray:
    """A trailing moving average over up to ``window`` steps, for plotting noisy losses."""
    values = np.asarray(values, np.float64)
    c = np.concatenate([[0.0], np.cumsum(values)])
    end = np.arange(1, len(values) + 1)
    start = np.maximum(0, end - max(1, window))
    return (c[end] - c[start]) / (end - start)
