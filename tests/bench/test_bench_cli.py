"""`learnopt bench` from the command line: a tiny run end to end, and refused inputs."""

import json

import pytest

from learnopt.cli import main


@pytest.mark.parametrize("argv, message", [
    (["--optimizer", "bogus"], "unknown optimizer 'bogus'"),
    (["--optimizer", "adam", "--seeds", "0"], "--seeds must be >= 1"),
    (["--optimizer", "adam", "--nadamw-trials", "-1"], "--nadamw-trials must be >= 0"),
    (["--optimizer", "adam", "--task", "fmnist_mlp_8x8"], "not in the 'quick' suite"),
    (["--optimizer", "adam", "--baselines", "lbfgs"], "unknown baselines ['lbfgs']"),
    (["--optimizer", "adam", "--baseline-factor", "0.5"], "baseline_factor must be >= 1"),
    (["--optimizer", "adam lr=1e-3"], "unknown optimizer"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, capsys):
    assert main(["bench", *argv, "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("learnopt: error:") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


TASK = "Synthetic_SparseGradBowl_d100_cond1e2_zero90"  # not in the committed cache


def test_a_cheap_task_end_to_end(tmp_path, capsys):
    argv = ["bench", "--optimizer", "sgd:lr=1e-3", "--suite", "full", "--task", TASK,
            "--seeds", "1", "--baselines", "", "--cache", str(tmp_path / "cache"),
            "--out", str(tmp_path / "out"), "--no-progress"]
    assert main(argv) == 0
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert result["optimizers"] == ["sgd:lr=1e-3", "adam lr=1e-3", "adam (tuned)"]
    assert [t["task"] for t in result["tasks"]] == [TASK]
    assert result["cache"] == {"hits": 0, "misses": 15}
    assert "| sgd:lr=1e-3 |" in capsys.readouterr().out
    assert main(argv) == 0  # the second run reads the Adam grid from the cache
    again = json.loads((tmp_path / "out" / "results.json").read_text())
    assert again["cache"] == {"hits": 15, "misses": 0}
    assert again["aggregate"] == result["aggregate"]
