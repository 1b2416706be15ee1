"""The bench report: strict JSON, markdown tables (VeLO Tables 1-2) and the plots."""

import json
import math

import numpy as np
import pytest

from learnopt.bench.report import (
    _seed_stats,
    fmt_num,
    plot_task_curves,
    render_markdown,
    speedup_profile,
    to_strict_json,
    write_report,
)

LOPT, ADAM3, TUNED = "lopt", "adam lr=1e-3", "adam (tuned)"
NAN, INF = float("nan"), float("inf")


def _entry(setting, curves, final, speedup, clipped=None, diverged=False, steps=None):
    n = len(curves[0])
    return {
        "setting": setting,
        "curve_steps": steps if steps is not None else list(range(1, 10 * n, 10)),
        "curves": curves,
        "final_loss": final,
        "speedup": speedup,
        "clipped": clipped,
        "diverged": diverged,
    }


def make_result():
    """2 tasks x 3 optimizers x 2 seeds; task 2 has negative losses and a diverged Adam."""
    quad = {
        "task": "quad_small",
        "kind": "quadratic",
        "steps": 50,
        "initial_loss": 10.0,
        "envelope": {"steps": list(range(1, 151, 15)), "loss": list(np.geomspace(10, 0.01, 10))},
        "results": {
            LOPT: _entry("meta-trained", np.array([[9, 3, 1, 0.3, 0.1], [8, 2.5, 0.8, 0.2, 0.05]]),
                         0.07, 3.0, clipped="high"),
            ADAM3: _entry("lr=0.001", [[9.5, 8, 7, 6, 5], [9.6, 8.1, 7.2, 6.1, 5.2]],
                          5.1, 1 / 3, clipped="low"),
            TUNED: _entry("lr=0.03", [[9, 4, 2, 1, 0.5], [9, 4.2, 2.1, 1.1, 0.6]], 0.55, 1.0),
        },
    }
    vae = {
        "task": "vae/neg loss",  # a "/" that must not reach the file name
        "kind": "vae",
        "steps": 40,
        "initial_loss": 5.0,
        "envelope": {"steps": [1, 30, 60, 90, 120], "loss": [5.0, 1.0, -1.0, -1.5, -1.8]},
        "results": {
            LOPT: _entry("meta-trained", [[5, 1, -1, -1.5], [5, 0.8, -1.2, -1.6]], -1.55, 1.7),
            ADAM3: _entry("lr=0.001", [[5, 3, 2, 1.5], [5, 40.0, NAN, INF]], INF, NAN,
                          diverged=True),
            TUNED: _entry("lr=0.01", [[5, 2, 0, -1], [5, 2.2, 0.1, -0.9]], -0.95, 0.83),
        },
    }
    return {
        "suite": "quick",
        "seeds": 2,
        "baseline_factor": 3.0,
        "seconds": 123.4,
        "machine": {"cpu_count": 2, "processor": "x86_64", "jax": "0.4", "backend": "cpu"},
        "command": "learnopt bench --suite quick",
        "optimizers": [LOPT, ADAM3, TUNED],
        "reference": TUNED,
        "tasks": [quad, vae],
        "aggregate": {
            LOPT: {"mean": 2.35, "mean_inverse": 0.4608, "p5": 1.77, "p10": 1.83, "p25": 2.03,
                   "p50": 2.35, "p75": 3.0, "n": 2, "beats_tuned_adam": 1.0,
                   "beats_adam_1e-3": 1.0, "divergences": 0},
            ADAM3: {"mean": 0.3333, "mean_inverse": np.float64(INF), "p5": 0.0333, "p10": 0.05,
                    "p25": 0.2, "p50": 1.7, "p75": 0.99, "n": 2, "beats_tuned_adam": 0.0,
                    "beats_adam_1e-3": 0.0, "divergences": np.int64(1)},
            TUNED: {"mean": 0.915, "mean_inverse": 1.1, "p5": 0.83, "p10": 0.84, "p25": 0.87,
                    "p50": 0.915, "p75": 0.96, "n": 2, "beats_tuned_adam": 0.0,
                    "beats_adam_1e-3": 1.0, "divergences": 0},
        },
    }


def _strict_loads(text):
    def bad(token):
        raise ValueError(f"non-strict JSON token {token}")

    return json.loads(text, parse_constant=bad)


def _resolve(doc, pointer):
    for tok in pointer.split("/")[1:]:
        tok = tok.replace("~1", "/").replace("~0", "~")
        doc = doc[int(tok)] if isinstance(doc, list) else doc[tok]
    return doc


def test_to_strict_json_replaces_nonfinite_and_records_json_pointers():
    paths = []
    obj = {
        "a/b~c": [1.0, np.float32(np.nan), {"x": np.array([[1.0, np.inf], [-np.inf, 2.0]])}],
        "n": np.int64(3),
        "ok": np.bool_(True),
        "t": (np.float64(2.5), None, "s"),
    }
    out = to_strict_json(obj, paths)
    assert paths == ["/a~1b~0c/1", "/a~1b~0c/2/x/0/1", "/a~1b~0c/2/x/1/0"]
    assert out == {
        "a/b~c": [1.0, None, {"x": [[1.0, None], [None, 2.0]]}],
        "n": 3,
        "ok": True,
        "t": [2.5, None, "s"],
    }
    assert type(out["n"]) is int and type(out["ok"]) is bool
    json.dumps(out, allow_nan=False)
    for p in paths:
        assert _resolve(out, p) is None
    with pytest.raises(TypeError, match="/z"):
        to_strict_json({"z": object()})


def test_write_report_files_json_and_markdown(tmp_path):
    result = make_result()
    paths = write_report(result, tmp_path / "rep")
    assert set(paths) == {"json", "markdown", "speedups", "curves"}
    assert paths["json"] == tmp_path / "rep" / "results.json"

    # --- strict JSON, exactly the expected non-finite locations -----------------------
    doc = _strict_loads(paths["json"].read_text())
    adam = "/tasks/1/results/adam lr=1e-3"
    assert doc["nonfinite"] == [
        f"{adam}/curves/1/2",
        f"{adam}/curves/1/3",
        f"{adam}/final_loss",
        f"{adam}/speedup",
        "/aggregate/adam lr=1e-3/mean_inverse",
    ]
    for p in doc["nonfinite"]:
        assert _resolve(doc, p) is None
    assert doc["tasks"][1]["results"][ADAM3]["curves"][1] == [5.0, 40.0, None, None]
    assert doc["tasks"][0]["results"][LOPT]["curves"][1] == [8, 2.5, 0.8, 0.2, 0.05]
    assert doc["aggregate"][ADAM3]["divergences"] == 1
    assert "nonfinite" not in result  # the input is not modified

    # --- markdown ----------------------------------------------------------------------
    md = paths["markdown"].read_text()
    assert md.startswith("# learnopt bench: suite `quick`\n")
    header = md.splitlines()[2]
    for part in ("2 seeds", "2 tasks", "baseline factor 3 ", "2 min 03 s", "2 CPUs"):
        assert part in header, (part, header)
    assert "learnopt bench --suite quick" in md
    assert "run 3× longer" in md and "first step" in md and "[0.01, 3]" in md
    lines = md.splitlines()
    assert (
        "| lopt | 2.35 | 0.46 | 1.77 | 1.83 | 2.03 | 2.35 | ≥3.00 | 1.00 | 1.00 | 0 | 2 |" in lines
    )
    assert (
        "| adam lr=1e-3 | 0.33 | ∞ | 0.0333 | 0.05 | 0.20 | 1.70 | 0.99 | 0.00 | 0.00 | 1 | 2 |"
        in lines
    )
    assert "| `quad_small` | quadratic | 50 | ≥3.00 | ≤0.33 | 1.00 |" in lines
    assert "| `vae/neg loss` | vae | 40 | 1.70 | div | 0.83 |" in lines
    # final losses and chosen settings
    assert "| `vae/neg loss` | 5 | -1.55 | ∞ | -0.95 |" in lines
    assert "| `quad_small` | 10 | 0.07 | 5.1 | 0.55 |" in lines
    assert "| `quad_small` | meta-trained | lr=0.001 | lr=0.03 |" in lines
    assert "(curves/vae_neg_loss.png)" in md and "(speedups.png)" in md

    # --- plots -------------------------------------------------------------------------
    for p in (paths["speedups"], *paths["curves"].iterdir()):
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, p
    assert sorted(f.name for f in paths["curves"].iterdir()) == [
        "quad_small.png",
        "vae_neg_loss.png",
    ]
    assert not list((tmp_path / "rep").glob(".*.tmp"))  # no leftovers of atomic writes


def test_speedup_profile_is_the_sorted_step_function_of_velo_fig1():
    r = make_result()
    xs, ys, ndiv = speedup_profile(r, LOPT)
    np.testing.assert_allclose(xs, [0, 0.5, 0.5, 1.0])
    np.testing.assert_allclose(ys, [3.0, 3.0, 1.7, 1.7])
    assert ndiv == 0
    xs, ys, ndiv = speedup_profile(r, ADAM3)  # the diverged task counts in n, not drawn
    np.testing.assert_allclose(xs, [0, 0.5])
    np.testing.assert_allclose(ys, [1 / 3, 1 / 3])
    assert ndiv == 1


def test_seed_band_is_min_max_of_finite_values():
    mean, lo, hi, n_bad = _seed_stats([[1.0, 4.0, np.nan, 1.0], [3.0, np.inf, np.nan, 1e-8]])
    np.testing.assert_allclose(mean, [2.0, 4.0, np.nan, (1 + 1e-8) / 2])
    np.testing.assert_allclose(lo, [1.0, 4.0, np.nan, 1e-8])
    np.testing.assert_allclose(hi, [3.0, 4.0, np.nan, 1.0])
    assert n_bad == 2
    assert np.nanmin(lo) > 0  # positive losses never give a band down to zero


def test_task_curves_use_log_axis_unless_a_loss_is_not_positive(tmp_path):
    r = make_result()
    assert plot_task_curves(r, r["tasks"][0], tmp_path / "a.png") == "log"
    assert plot_task_curves(r, r["tasks"][1], tmp_path / "b.png") == "symlog"
    assert (tmp_path / "a.png").stat().st_size > 5000
    # the same from results.json, where nan/inf became null
    doc = json.loads(json.dumps(to_strict_json(r)))
    assert plot_task_curves(doc, doc["tasks"][1], tmp_path / "c.png") == "symlog"


def test_number_formats():
    assert [fmt_num(x) for x in (1.7, 0.0333, 0, -1.55, None, NAN, INF, -INF)] == [
        "1.70", "0.0333", "0.00", "-1.55", "–", "–", "∞", "-∞",
    ]
    assert math.isclose(float(fmt_num(np.float32(2.345678))), 2.35)
    # a result without aggregate entries still renders
    r = make_result()
    r["aggregate"] = {}
    assert "| lopt | – |" in render_markdown(r)
