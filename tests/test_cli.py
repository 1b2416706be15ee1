"""The command line: listings and clear errors for unknown names."""

import jax
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
        (["time-model", "--families", "mlpp"], "valid families:"),
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


def test_time_model_calibrates_and_saves_a_loadable_model(tmp_path, capsys):
    from learnopt.tasks.families import velo as F
    from learnopt.tasks import timing as T

    out = tmp_path / "time_model.json"
    argv = ["time-model", "--families", "mlp", "--samples", "3", "--size", "tiny"]
    assert main([*argv, "--out", str(out)]) == 0
    assert "written to" in capsys.readouterr().out
    model = T.TimeModel.load(out)
    assert model.families == ["mlp"] and len(model.info["measurements"]) == 3
    config = F.make_family("mlp", size="tiny").sample(jax.random.PRNGKey(0))
    assert 0 < model.predict(config) < 1.0  # seconds per step of a tiny MLP
