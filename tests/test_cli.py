"""The command line: listings and clear errors for unknown names."""

import pytest

from learnopt.cli import main


def test_listings(capsys):
    assert main(["tasks"]) == 0
    assert "fmnist_mlp_28x28" in capsys.readouterr().out
    assert main(["optimizers"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("sgd", "momentum", "adam", "nadamw"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--task", "nope", "--optimizer", "adam", "--steps", "1"], "valid tasks:"),
        (["train", "--task", "quadratic_d10", "--optimizer", "adamz", "--steps", "1"], "adam"),
        (
            [
                "train",
                "--task",
                "quadratic_d10",
                "--optimizer",
                "adam",
                "--lr",
                "-1",
                "--steps",
                "1",
            ],
            "learning",
        ),
        (["evaluate"], "exactly one of --run DIR or --pretrained NAME"),
        (["evaluate", "--pretrained", "nope"], "unknown pretrained optimizer"),
    ],
)
def test_bad_input_gets_one_clear_error(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("learnopt: error:") and message in err


def test_train_writes_metrics_png_and_summary(tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--task", "quadratic_d10", "--optimizer", "adam", "--lr", "0.1"]
    assert main([*argv, "--steps", "30", "--out", str(out)]) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 30
    assert (out / "loss.png").stat().st_size > 1000 and (out / "summary.json").exists()
