"""Inner-run lengths and curricula for meta-training.

Two kinds of schedule, each a small frozen dataclass called as ``schedule(outer_step, key)``:

* **Length samplers**, drawn once per inner run: :class:`FixedLength`, :class:`UniformLength`
  (an integer uniform in ``[lo, hi]``) and :class:`LogUniformLength` (log-uniform in
  ``[lo, hi]``; VeLO samples inner lengths log-uniformly in [200, 20K], later [200, 200K],
  Metz et al. 2022, VeLO, arXiv:2211.09760, App. D.1). They ignore ``outer_step``.
* **Curricula** over outer steps, deterministic (they ignore ``key``): :class:`LinearCurriculum`
  (an inner horizon from ``start`` to ``end`` over ``num_steps`` outer steps; Metz et al. 2020,
  arXiv:2009.11243, App. B grows truncations from 300 to 10k this way),
  :class:`PiecewiseCurriculum` (``(outer_step, horizon)`` breakpoints, held constant or
  interpolated between them; the schedules compared in VeLO, §3.3, Fig. 20) and
  :class:`TimeBudgetCurriculum` (a time budget growing geometrically so that larger problems
  enter later, as in VeLO's phases, App. D.3: either the maximum seconds per inner step for the
  time-budgeted sampling of :mod:`learnopt.tasks.timing`, or, as the ``curriculum`` of
  :class:`learnopt.meta.sources.TimeBudget`, a factor on its ``time_scale``).

Every call is a pure jax function of ``(outer_step, key)`` returning a scalar array (int32 for
lengths and horizons, float32 for budgets): it traces under ``jit`` and ``vmap`` (one length
per inner run: ``jax.vmap(lambda k: sched(step, k))(keys)``); ``int(...)`` / ``float(...)`` give
a host value. ``to_dict`` / :func:`schedule_from_dict` round-trip through JSON.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp


def _check_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_step(step: Any) -> None:
    if isinstance(step, numbers.Integral) and not isinstance(step, bool) and step < 0:
        raise ValueError(f"outer step must be >= 0, got {step}")


class _Schedule:
    kind: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        """``{"kind": ..., **fields}``, JSON-ready; :func:`schedule_from_dict` inverts it."""
        data = {"kind": self.kind}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            data[f.name] = [list(v) for v in value] if f.name == "breakpoints" else value
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Any:
        data = dict(data)
        kind = data.pop("kind", cls.kind)
        if kind != cls.kind:
            raise ValueError(f"{cls.__name__}.from_dict needs kind {cls.kind!r}, got {kind!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(
                f"unknown keys {unknown} for schedule {cls.kind!r}; accepted: {sorted(names)}"
            )
        required = [
            f.name for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [name for name in required if name not in data]
        if missing:
            raise ValueError(f"schedule {cls.kind!r} needs keys {missing}; got {sorted(data)}")
        return cls(**data)


# -- inner-run lengths, sampled per run ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FixedLength(_Schedule):
    """Every inner run has ``length`` steps."""

    length: int
    kind: ClassVar[str] = "fixed"

    def __post_init__(self):
        _check_int("length", self.length)

    def __call__(self, outer_step: Any, key: jax.Array | None = None) -> jax.Array:
        _check_step(outer_step)
        return jnp.asarray(self.length, jnp.int32)


@dataclasses.dataclass(frozen=True)
class _LengthRange(_Schedule):
    """A length sampled in ``[lo, hi]`` (both positive integers, ``lo <= hi``)."""

    lo: int
    hi: int

    def __post_init__(self):
        _check_int("lo", self.lo)
        _check_int("hi", self.hi)
        if self.hi < self.lo:
            raise ValueError(f"need lo <= hi, got lo={self.lo}, hi={self.hi}")


@dataclasses.dataclass(frozen=True)
class UniformLength(_LengthRange):
    """An integer uniform in ``[lo, hi]`` (both included): ``P(n) = 1 / (hi - lo + 1)``."""

    kind: ClassVar[str] = "uniform"

    def __call__(self, outer_step: Any, key: jax.Array) -> jax.Array:
        _check_step(outer_step)
        return jax.random.randint(key, (), self.lo, self.hi + 1, jnp.int32)


@dataclasses.dataclass(frozen=True)
class LogUniformLength(_LengthRange):
    """``floor(exp(u))``, ``u ~ U[log lo, log(hi + 1))``: an integer log-uniform in ``[lo, hi]``.

    ``P(n) = log((n + 1) / n) / log((hi + 1) / lo)``, the integer version of a density
    ``1 / (n log(hi / lo))``: each factor of 10 in length gets about the same probability.
    """

    kind: ClassVar[str] = "log_uniform"

    def __call__(self, outer_step: Any, key: jax.Array) -> jax.Array:
        _check_step(outer_step)
        u = jax.random.uniform(
            key, (), jnp.float32, math.log(self.lo), math.log(self.hi + 1)
        )
        return jnp.clip(jnp.floor(jnp.exp(u)), self.lo, self.hi).astype(jnp.int32)


# -- curricula over outer steps --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LinearCurriculum(_Schedule):
    """``round(start + (end - start) * min(k, num_steps) / num_steps)`` at outer step ``k``.

    Rounded to the nearest integer (ties to even); ``end < start`` (a shrinking horizon) is
    allowed.
    """

    start: int
    end: int
    num_steps: int
    kind: ClassVar[str] = "linear"

    def __post_init__(self):
        _check_int("start", self.start)
        _check_int("end", self.end)
        _check_int("num_steps", self.num_steps)

    def __call__(self, outer_step: Any, key: jax.Array | None = None) -> jax.Array:
        _check_step(outer_step)
        frac = jnp.clip(jnp.asarray(outer_step, jnp.float32) / self.num_steps, 0.0, 1.0)
        return jnp.round(self.start + (self.end - self.start) * frac).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class PiecewiseCurriculum(_Schedule):
    """Horizons at ``(outer_step, horizon)`` breakpoints, the first at outer step 0.

    ``interpolation="constant"``: the horizon of the last breakpoint at or before the outer
    step. ``"linear"``: linear between breakpoints (rounded), constant after the last.
    """

    breakpoints: tuple[tuple[int, int], ...]
    interpolation: str = "constant"
    kind: ClassVar[str] = "piecewise"

    def __post_init__(self):
        points = tuple(tuple(p) for p in self.breakpoints)
        object.__setattr__(self, "breakpoints", points)
        if not points:
            raise ValueError("breakpoints must list at least one (outer_step, horizon) pair")
        for point in points:
            if len(point) != 2:
                raise ValueError(f"each breakpoint is (outer_step, horizon), got {point!r}")
            _check_int("breakpoint outer_step", point[0], minimum=0)
            _check_int("breakpoint horizon", point[1])
        steps = [p[0] for p in points]
        if steps[0] != 0:
            raise ValueError(f"the first breakpoint must be at outer step 0, got {steps[0]}")
        if any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
            raise ValueError(f"breakpoint outer steps must increase strictly, got {steps}")
        if self.interpolation not in ("constant", "linear"):
            raise ValueError(
                f"interpolation must be 'constant' or 'linear', got {self.interpolation!r}"
            )

    def __call__(self, outer_step: Any, key: jax.Array | None = None) -> jax.Array:
        _check_step(outer_step)
        steps = jnp.asarray([p[0] for p in self.breakpoints], jnp.float32)
        k = jnp.asarray(outer_step, jnp.float32)
        if self.interpolation == "linear":
            values = jnp.asarray([p[1] for p in self.breakpoints], jnp.float32)
            return jnp.round(jnp.interp(k, steps, values)).astype(jnp.int32)
        values = jnp.asarray([p[1] for p in self.breakpoints], jnp.int32)
        return values[jnp.maximum(jnp.searchsorted(steps, k, side="right") - 1, 0)]


@dataclasses.dataclass(frozen=True)
class TimeBudgetCurriculum(_Schedule):
    """A time budget at outer step ``k``: ``start * (end / start) ** min(k / num_steps, 1)``.

    Geometric from ``start`` to ``end`` over ``num_steps`` outer steps (budgets span orders of
    magnitude), then ``end``; ``end < start`` (a shrinking budget) is refused. The value is in
    seconds per inner step, or a unitless factor where it scales a budget (the ``curriculum``
    of :class:`learnopt.meta.sources.TimeBudget` multiplies ``time_scale`` by it).
    """

    start: float
    end: float
    num_steps: int
    kind: ClassVar[str] = "time_budget"

    def __post_init__(self):
        _check_positive("start", self.start)
        _check_positive("end", self.end)
        _check_int("num_steps", self.num_steps)
        if self.end < self.start:
            raise ValueError(f"the time budget must not shrink: start={self.start}, end={self.end}")

    def __call__(self, outer_step: Any, key: jax.Array | None = None) -> jax.Array:
        _check_step(outer_step)
        frac = jnp.clip(jnp.asarray(outer_step, jnp.float32) / self.num_steps, 0.0, 1.0)
        log_ratio = math.log(self.end / self.start)
        return jnp.asarray(self.start, jnp.float32) * jnp.exp(log_ratio * frac)


SCHEDULES: dict[str, type[_Schedule]] = {
    cls.kind: cls
    for cls in (
        FixedLength,
        UniformLength,
        LogUniformLength,
        LinearCurriculum,
        PiecewiseCurriculum,
        TimeBudgetCurriculum,
    )
}


def schedule_from_dict(data: Mapping[str, Any]) -> Any:
    """The schedule ``to_dict`` wrote: ``{"kind": one of SCHEDULES, **fields}``."""
    kind = data.get("kind")
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule kind {kind!r}; valid: {', '.join(SCHEDULES)}")
    return SCHEDULES[kind].from_dict(data)


__all__ = [
    "SCHEDULES",
    "FixedLength",
    "LinearCurriculum",
    "LogUniformLength",
    "PiecewiseCurriculum",
    "TimeBudgetCurriculum",
    "UniformLength",
    "schedule_from_dict",
]
