"""The report of ``learnopt bench``: strict JSON, a markdown summary and the plots.

The summary follows VeLO (Metz et al. 2022, "VeLO: Training Versatile Learned Optimizers by
Scaling Up", arXiv:2211.09760): optimizers are compared by their *speedup* over
learning-rate-tuned Adam (Fig. 1), summarised over tasks by the mean, the mean of the
inverse and percentiles (Tables 1-2), and shown as Fig. 1 shows them: each optimizer's task
speedups sorted in decreasing order against the fraction of tasks.

Speedup of an optimizer on a task: the first step at which LR-tuned Adam's lower envelope
(the pointwise best over its learning-rate grid, run ``baseline_factor`` times longer than
the optimizer) reaches the optimizer's final loss, divided by the optimizer's number of
steps. It is clipped to ``[min_speedup, baseline_factor]`` (0.01 and 3 by default); a value
clipped high is a lower bound (Adam never got there within its longer run) and is written
``≥3.00``, one clipped low an upper bound, written ``≤0.01``; a diverged run is written ``div``.

Files written by :func:`write_report` into ``out_dir``:

* ``results.json`` -- the result as strict JSON (no ``NaN``/``Infinity`` tokens): every
  non-finite float is replaced by ``null`` and its location is listed, as an RFC 6901 JSON
  Pointer, in the top-level ``"nonfinite"`` list, so a reader knows which nulls were nan/inf;
* ``report.md`` -- header, aggregate table, speedup definition, per-task tables;
* ``speedups.png`` -- the Fig. 1 plot of VeLO (the reference optimizer itself is omitted:
  its speedups are ≤ 1 by construction);
* ``curves/<task>.png`` -- training-loss curves per task (see :func:`plot_task_curves`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from learnopt.io import atomic_open, atomic_write_text
from learnopt.plotting import pyplot

PERCENTILES = (5, 10, 25, 50, 75)
MAX_LEGEND_SETTING = 48

# --- strict JSON ----------------------------------------------------------------------------


def _pointer_token(key: Any) -> str:
    """One reference token of an RFC 6901 JSON Pointer ("~" -> "~0", "/" -> "~1")."""
    return str(key).replace("~", "~0").replace("/", "~1")


def to_strict_json(obj: Any, nonfinite: list[str] | None = None, path: str = "") -> Any:
    """``obj`` as plain JSON values with every non-finite float replaced by ``None``.

    Handles dicts (keys become strings), lists, tuples, numpy arrays and scalars (and any
    object with ``__array__``, e.g. JAX arrays), ``Path`` objects (as strings), and Python
    numbers. The location of each replaced value is appended to ``nonfinite`` (if given) as
    an RFC 6901 JSON Pointer relative to ``path`` (``""`` is the document root), e.g.
    ``"/tasks/0/results/adam lr=1e-3/curves/1/4"``, in document order. Anything else raises
    ``TypeError`` naming its location.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        if math.isfinite(x):
            return x
        if nonfinite is not None:
            nonfinite.append(path)
        return None
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Mapping):
        return {
            str(k): to_strict_json(v, nonfinite, f"{path}/{_pointer_token(k)}")
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [to_strict_json(v, nonfinite, f"{path}/{i}") for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray) or hasattr(obj, "__array__"):
        arr = np.asarray(obj)
        if arr.dtype == object:
            return to_strict_json(arr.tolist(), nonfinite, path)
        if arr.ndim == 0:
            return to_strict_json(arr[()], nonfinite, path)
        return [to_strict_json(v, nonfinite, f"{path}/{i}") for i, v in enumerate(arr)]
    raise TypeError(f"cannot write {type(obj).__name__} at {path or '/'} as JSON")


def strict_json_text(result: Mapping[str, Any]) -> str:
    """``result`` as strict JSON text with the top-level ``"nonfinite"`` list of pointers."""
    nonfinite: list[str] = []
    doc = to_strict_json({k: v for k, v in result.items() if k != "nonfinite"}, nonfinite)
    doc["nonfinite"] = nonfinite
    return json.dumps(doc, indent=2, allow_nan=False) + "\n"


# --- formatting -----------------------------------------------------------------------------


def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def fmt_num(x: Any) -> str:
    """Two decimals (``1.70``); three significant digits below 0.1; ``–`` if missing/nan."""
    v = _finite(x)
    if v is None:
        if x is not None and isinstance(x, (float, np.floating)) and math.isinf(x):
            return "∞" if x > 0 else "-∞"
        return "–"
    if v != 0 and abs(v) < 0.1:
        return f"{v:.3g}"
    return f"{v:.2f}"


def fmt_factor(x: Any) -> str:
    """The baseline factor as written in text: ``3.0`` -> ``3``."""
    v = _finite(x)
    return "?" if v is None else f"{v:g}"


def fmt_loss(x: Any) -> str:
    """A loss to four significant digits (``0.07123``, ``-1.55``); ``∞``/``–`` as fmt_num."""
    v = _finite(x)
    return fmt_num(x) if v is None else f"{v:.4g}"


def fmt_speedup(entry: Mapping[str, Any] | None) -> str:
    """A per-task speedup cell: ``div`` if diverged, ``≥x`` clipped high, ``≤x`` clipped low."""
    if entry is None:
        return "–"
    if entry.get("diverged"):
        return "div"
    text = fmt_num(entry.get("speedup"))
    clipped = entry.get("clipped")
    if clipped == "high":
        return "≥" + text
    if clipped == "low":
        return "≤" + text
    return text


def fmt_duration(seconds: Any) -> str:
    """``123.4`` -> ``"2 min 03 s"``; hours shown past 3600 s."""
    v = _finite(seconds)
    if v is None:
        return "–"
    s = int(round(v))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    if h:
        return f"{h} h {m:02d} min {sec:02d} s"
    if m:
        return f"{m} min {sec:02d} s"
    return f"{v:.1f} s"


def _cell(text: Any) -> str:
    """Markdown table cell text: pipes escaped, newlines flattened."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "l") -> list[str]:
    sep = ["---" if i == 0 else ("---:" if align == "r" else "---") for i in range(len(head))]
    return [_row(head), "| " + " | ".join(sep) + " |", *(_row(r) for r in rows)]


def safe_filename(name: str) -> str:
    """A file-system-safe stem for a task name (runs of other characters become ``_``)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "task"
    return stem[:150]


def _curve_files(tasks: Sequence[Mapping[str, Any]]) -> list[str]:
    """Distinct ``<task>.png`` names, in task order (a suffix ``-2``... on collisions)."""
    names, seen = [], set()
    for t in tasks:
        stem = safe_filename(str(t.get("task", "task")))
        name, k = f"{stem}.png", 2
        while name in seen:
            name, k = f"{stem}-{k}.png", k + 1
        seen.add(name)
        names.append(name)
    return names


# --- report.md ------------------------------------------------------------------------------


def _machine_text(machine: Any) -> str:
    if not isinstance(machine, Mapping):
        return "unknown machine"
    parts = []
    cpus = machine.get("cpu_count", machine.get("cpus"))
    if cpus is not None:
        parts.append(f"{cpus} CPUs")
    if machine.get("processor"):
        parts.append(str(machine["processor"]))
    if machine.get("backend"):
        jax_v = f"JAX {machine['jax']} " if machine.get("jax") else ""
        parts.append(f"{jax_v}on {machine['backend']}")
    return ", ".join(parts) or "unknown machine"


def render_markdown(result: Mapping[str, Any], curve_files: Sequence[str] | None = None) -> str:
    """The text of ``report.md`` (see the module docstring)."""
    labels = list(result.get("optimizers", []))
    ref = result.get("reference")
    factor = _finite(result.get("baseline_factor")) or float("nan")
    tasks = list(result.get("tasks", []))
    agg = result.get("aggregate", {}) or {}
    curve_files = list(curve_files) if curve_files is not None else _curve_files(tasks)

    out = [f"# learnopt bench: suite `{result.get('suite', '?')}`", ""]
    out.append(
        f"{result.get('seeds', '?')} seeds per task · {len(tasks)} tasks · baseline factor "
        f"{factor:g} · wall time {fmt_duration(result.get('seconds'))} · machine: "
        f"{_machine_text(result.get('machine'))}"
    )
    if result.get("command"):
        out += ["", "```", str(result["command"]), "```"]

    out += ["", "## Speedup over LR-tuned Adam (aggregate over tasks)", ""]
    out.append(
        f"*Speedup* on a task: the first step at which LR-tuned Adam (`{ref}`)'s best-of-grid "
        f"lower envelope, run {factor:g}× longer than the optimizer, reaches the "
        f"optimizer's final (EMA-smoothed) training loss, divided by the optimizer's number of "
        f"steps (Metz et al. 2022, VeLO, arXiv:2211.09760, Fig. 1). It is clipped to "
        f"[{result.get('min_speedup', 0.01):g}, {factor:g}]: `≥` marks a value clipped high "
        f"(Adam did not reach that loss even in its longer run, so the true speedup is at "
        f"least this), "
        f"`≤` one clipped low, and `div` a diverged run. Columns as in VeLO Tables 1-2: mean "
        f"speedup, mean of 1/speedup, percentiles of speedup over tasks, the fraction of tasks "
        f"on which the optimizer beats tuned Adam (speedup > 1) and Adam with lr=1e-3, and the "
        f"number of diverged runs. The reference's own speedup is ≤ 1 by construction."
    )
    head = [
        "optimizer",
        "mean speedup",
        "mean 1/speedup",
        *(f"{p}%" for p in PERCENTILES),
        "beats tuned Adam",
        "beats Adam 1e-3",
        "divergences",
        "tasks",
    ]
    rows = []
    for label in labels:
        a = agg.get(label)
        if a is None:
            rows.append([label, *["–"] * (len(head) - 1)])
            continue
        pct = []
        for p in PERCENTILES:
            v = a.get(f"p{p}")
            text = fmt_num(v)
            # A percentile at the clip is only a lower bound of the true one.
            fv = _finite(v)
            if fv is not None and math.isfinite(factor) and fv >= factor * (1 - 1e-9):
                text = "≥" + text
            pct.append(text)
        div = a.get("divergences")
        rows.append(
            [
                label,
                fmt_num(a.get("mean")),
                fmt_num(a.get("mean_inverse")),
                *pct,
                fmt_num(a.get("beats_tuned_adam")),
                fmt_num(a.get("beats_adam_1e-3")),
                "–" if div is None else str(int(div)),
                "–" if a.get("n") is None else str(int(a["n"])),
            ]
        )
    out += [""] + _table(head, rows, align="r")
    out += ["", "![speedups over LR-tuned Adam, sorted, against the fraction of tasks]"
                "(speedups.png)"]

    out += ["", "## Per task: speedup", ""]
    head = ["task", "kind", "steps", *labels]
    rows = []
    for t in tasks:
        res = t.get("results", {}) or {}
        rows.append(
            [f"`{t.get('task')}`", t.get("kind", ""), t.get("steps", ""),
             *(fmt_speedup(res.get(lb)) for lb in labels)]
        )
    out += _table(head, rows)

    out += ["", "## Per task: final training loss (EMA-smoothed; `∞` = diverged)", ""]
    head = ["task", "initial loss", *labels]
    rows = []
    for t in tasks:
        res = t.get("results", {}) or {}
        rows.append(
            [f"`{t.get('task')}`", fmt_loss(t.get("initial_loss")),
             *(fmt_loss((res.get(lb) or {}).get("final_loss")) for lb in labels)]
        )
    out += _table(head, rows)

    out += ["", "## Per task: chosen hyperparameters", ""]
    head = ["task", *labels]
    rows = []
    for t in tasks:
        res = t.get("results", {}) or {}
        rows.append(
            [f"`{t.get('task')}`", *((res.get(lb) or {}).get("setting") or "–" for lb in labels)]
        )
    out += _table(head, rows)

    if tasks:
        out += ["", "## Loss curves", ""]
        for t, name in zip(tasks, curve_files, strict=True):
            out.append(f"- [`{t.get('task')}`](curves/{name})")
    return "\n".join(out) + "\n"


# --- plots ----------------------------------------------------------------------------------


def _color(labels: Sequence[str], label: str) -> str:
    i = labels.index(label) if label in labels else len(labels)
    return f"C{i % 10}"


def _save(fig, path: Path) -> None:
    """Lay out, write atomically and close ``fig``."""
    fig.tight_layout()
    with atomic_open(path) as f:
        fig.savefig(f, format="png", dpi=110)
    pyplot().close(fig)


def speedup_profile(
    result: Mapping[str, Any], label: str
) -> tuple[np.ndarray, np.ndarray, int]:
    """The Fig. 1 curve of one optimizer (Metz et al. 2022, VeLO, arXiv:2211.09760, Fig. 1).

    Its task speedups sorted in decreasing order as a step function ``(xs, ys)``: on
    ``((i-1)/n, i/n]`` the curve is at the i-th largest speedup, so at x the value is the
    speedup reached on at least a fraction x of the n tasks. Diverged tasks (and ones without
    a finite positive speedup) count in n but are not drawn, so the curve of an optimizer with
    divergences stops short of x = 1. Also returns the number of diverged tasks.
    """
    tasks = list(result.get("tasks", []))
    n = len(tasks)
    vals, ndiv = [], 0
    for t in tasks:
        e = (t.get("results", {}) or {}).get(label)
        if e is None:
            continue
        if e.get("diverged"):
            ndiv += 1
            continue
        v = _finite(e.get("speedup"))
        if v is not None and v > 0:
            vals.append(v)
    if not vals:
        return np.zeros(0), np.zeros(0), ndiv
    s = np.sort(np.asarray(vals))[::-1]
    xs = np.repeat(np.arange(len(s) + 1) / n, 2)[1:-1]
    return xs, np.repeat(s, 2), ndiv


def plot_speedups(result: Mapping[str, Any], path: Path, include_reference: bool = False) -> None:
    """VeLO Fig. 1 (Metz et al. 2022, arXiv:2211.09760): sorted speedups vs fraction of tasks.

    One step curve per optimizer (:func:`speedup_profile`), log y, a line at 1 (LR-tuned
    Adam) and dotted lines at the clip values. The reference is left out unless
    ``include_reference`` (its speedups are ≤ 1 by construction).
    """
    plt = pyplot()
    labels = list(result.get("optimizers", []))
    ref = result.get("reference")
    factor = _finite(result.get("baseline_factor"))
    n = len(result.get("tasks", []))
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    drawn: list[float] = []
    for label in labels:
        if label == ref and not include_reference:
            continue
        xs, ys, ndiv = speedup_profile(result, label)
        if not ys.size:
            continue
        name = label + (f" ({ndiv} diverged)" if ndiv else "")
        ax.plot(xs, ys, color=_color(labels, label), lw=2, label=name)
        drawn.extend(ys.tolist())
    ax.axhline(1.0, color="k", lw=1, label=f"LR-tuned Adam ({ref})")
    if factor is not None and factor > 1:
        low = float(result.get("min_speedup", 0.01))
        ax.axhline(factor, color="gray", ls=":", lw=1, label=f"clips ({low:g}, {factor:g}×)")
        ax.axhline(low, color="gray", ls=":", lw=1)
        lo, hi = low, factor
    else:
        lo, hi = 1.0, 1.0
    if drawn:
        lo, hi = min(lo, min(drawn)), max(hi, max(drawn))
    ax.set_yscale("log")
    ax.set_ylim(lo / 1.25, hi * 1.25)
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(0, 1)
    ax.set(
        xlabel="fraction of tasks with at least this speedup",
        ylabel="speedup over LR-tuned Adam",
        title=f"suite {result.get('suite', '?')}: {n} tasks",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save(fig, path)


def _seed_stats(curves: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(mean, min, max) over seeds of the finite values, and the number of seeds with nan/inf.

    Non-finite values are dropped (a step where every seed is non-finite is nan, a gap in the
    line). min..max equals the band computed in log space (the log is monotone), so unlike
    mean ± std it never reaches zero or below on a log axis.
    """
    arr = np.asarray(curves, dtype=float)
    if arr.ndim == 1:
        arr = arr[None]
    bad = ~np.isfinite(arr)
    n_bad = int(bad.any(axis=1).sum())
    a = np.where(bad, np.nan, arr)
    ok = (~bad).any(axis=0)
    mean = np.full(a.shape[1], np.nan)
    lo, hi = mean.copy(), mean.copy()
    if ok.any():
        mean[ok] = np.nanmean(a[:, ok], axis=0)
        lo[ok] = np.nanmin(a[:, ok], axis=0)
        hi[ok] = np.nanmax(a[:, ok], axis=0)
    return mean, lo, hi, n_bad


def _short(text: str, n: int = MAX_LEGEND_SETTING) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def plot_task_curves(result: Mapping[str, Any], task: Mapping[str, Any], path: Path) -> str:
    """Training-loss curves of one task; returns the y-axis scale used (``log``/``symlog``).

    Each optimizer: the mean over seeds (solid) and the min..max band over seeds. LR-tuned
    Adam's best-of-grid envelope is dashed over its ``baseline_factor`` times longer horizon,
    with a vertical line at the optimizers' ``steps``. Legend entries carry each optimizer's
    chosen setting.

    Scale: log when every plotted value is positive. Flows and VAEs can have negative losses
    (densities > 1), so if any plotted value is ≤ 0 the axis is ``symlog`` with its linear
    range set to the largest magnitude of the final values: the end of training, where the
    optimizers are compared, reads linearly, while the large early losses stay compressed
    logarithmically. The top of the axis is capped (3x the largest starting loss on a log
    axis, 10x on symlog) so a run blowing up before it diverges does not flatten the rest.
    """
    plt = pyplot()
    labels = list(result.get("optimizers", []))
    ref = result.get("reference")
    steps = task.get("steps")
    seeds = result.get("seeds", "?")
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    plotted: list[np.ndarray] = []
    starts: list[float] = []
    finals: list[float] = []
    res = task.get("results", {}) or {}
    for label in labels:
        e = res.get(label)
        if e is None or e.get("curves") is None:
            continue
        mean, lo, hi, n_bad = _seed_stats(e["curves"])
        xs = e.get("curve_steps")
        x = np.arange(1, mean.size + 1) if xs is None else np.asarray(xs, dtype=float)
        if x.size != mean.size or not np.isfinite(mean).any():
            continue
        c = _color(labels, label)
        name = label
        if e.get("setting"):
            name += f": {_short(str(e['setting']))}"
        if n_bad:
            name += f" ({n_bad}/{len(np.atleast_2d(e['curves']))} seeds nan/inf)"
        if e.get("diverged"):
            name += " [diverged]"
        ax.plot(x, mean, color=c, lw=1.6, label=name)
        ax.fill_between(x, lo, hi, color=c, alpha=0.18, lw=0)
        fin = mean[np.isfinite(mean)]
        starts.append(float(fin[0]))
        finals.append(float(fin[-1]))
        plotted += [mean, lo, hi]
    env = task.get("envelope") or {}
    ey = np.asarray([] if env.get("loss") is None else env["loss"], dtype=float).ravel()
    ex = np.asarray([] if env.get("steps") is None else env["steps"], dtype=float).ravel()
    if ey.size and ey.size == ex.size:
        ey = np.where(np.isfinite(ey), ey, np.nan)
        if np.isfinite(ey).any():
            ax.plot(ex, ey, color=_color(labels, ref), ls="--", lw=1.2,
                    label=f"{ref} envelope: best of LR grid, "
                          f"{fmt_factor(result.get('baseline_factor'))}× steps")
            plotted.append(ey)
            starts.append(float(ey[np.isfinite(ey)][0]))
    if steps is not None:
        ax.axvline(float(steps), color="gray", ls=":", lw=1, label=f"{steps} steps")
    init = _finite(task.get("initial_loss"))
    if init is not None:
        starts.append(init)

    vals = np.concatenate(plotted) if plotted else np.zeros(0)
    vals = vals[np.isfinite(vals)]
    scale = "log"
    if vals.size:
        top_ref = max(starts) if starts else float(vals.max())
        if vals.min() > 0:
            ax.set_yscale("log")
            top = min(float(vals.max()), 3 * top_ref) if top_ref > 0 else float(vals.max())
            ax.set_ylim(float(vals.min()) / 1.3, top * 1.3)
        else:
            scale = "symlog"
            lin = max([abs(v) for v in finals] + [1e-3])
            ax.set_yscale("symlog", linthresh=lin)
            top = min(float(vals.max()), 10 * max(top_ref, lin))
            bottom = float(vals.min())
            bottom = bottom - 0.1 * lin if bottom > -lin else 1.3 * bottom
            top = top + 0.1 * lin if top < lin else 1.3 * top
            ax.set_ylim(bottom, top)
    ylabel = (
        f"training loss (minibatch, per step)\nmean over {seeds} seeds, band = min..max"
        + ("" if scale == "log" else "; symlog axis: some losses ≤ 0")
    )
    ax.set(
        xlabel="step",
        ylabel=ylabel,
        title=f"{task.get('task')} ({task.get('kind', '?')}, {steps} steps)",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    _save(fig, path)
    return scale


# --- everything -----------------------------------------------------------------------------


def write_report(result: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``results.json``, ``report.md``, ``speedups.png`` and ``curves/<task>.png``.

    Returns ``{"json": ..., "markdown": ..., "speedups": ..., "curves": <dir>}``. Every file
    is written atomically (a half-written report is never left behind).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tasks = list(result.get("tasks", []))
    names = _curve_files(tasks)

    json_path = atomic_write_text(out / "results.json", strict_json_text(result))
    md_path = atomic_write_text(out / "report.md", render_markdown(result, names))
    sp_path = out / "speedups.png"
    plot_speedups(result, sp_path)
    curves_dir = out / "curves"
    curves_dir.mkdir(exist_ok=True)
    for t, name in zip(tasks, names, strict=True):
        plot_task_curves(result, t, curves_dir / name)
    return {"json": json_path, "markdown": md_path, "speedups": sp_path, "curves": curves_dir}
