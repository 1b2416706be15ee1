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
        (["meta-train", "--out", "/nonexistent/x", "--ray-address", "auto"], "needs --workers"),
        (["meta-train", "--out", "/nonexistent/x", "--workers", "-1"], "--workers must be"),
        (["meta-eval", "--run", "/nonexistent/run"], "not a meta-training run"),
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
    from learnopt.tasks import timing as T
    from learnopt.tasks.families import velo as F

    out = tmp_path / "time_model.json"
    argv = ["time-model", "--families", "mlp", "--samples", "3", "--size", "tiny"]
    assert main([*argv, "--out", str(out)]) == 0
    assert "written to" in capsys.readouterr().out
    model = T.TimeModel.load(out)
    assert model.families == ["mlp"] and len(model.info["measurements"]) == 3
    config = F.MLPFamily(size="tiny").sample(jax.random.PRNGKey(0))
    assert 0 < model.predict(config) < 1.0  # seconds per step of a tiny MLP


def test_tasks_families_lists_every_family_with_one_line(capsys):
    assert main(["tasks", "--families"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    # 9 VeLO + 11 TaskSet families, the Wichrowska et al. synthetic ensemble, quadratics.
    assert len(lines) == 22
    names = [line.split()[0] for line in lines]
    assert names[:2] == ["velo_mlp", "velo_conv"] and "velo_lopt" in names
    assert "taskset_losg_tasks" in names and names[-2:] == ["synthetic", "quadratic"]
    assert all(len(line.split(None, 1)) == 2 for line in lines)  # a name and a description


def test_optimizers_lists_hand_designed_learned_and_pretrained_one_line_each(capsys):
    from learnopt import pretrained
    from learnopt.learned.registry import LEARNED
    from learnopt.optimizers.registry import list_optimizers

    assert main(["optimizers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    first = {line.split()[0]: line for line in lines if line.startswith("  ")}
    names = [n for n, _ in list_optimizers()] + list(LEARNED) + pretrained.available()
    assert pretrained.available() == ["small_fc_lopt_fmnist8", "small_fc_lopt_general"]
    assert len(first) == len(names) == len(list_optimizers()) + 10 + 2
    for name in names:
        assert len(first[name].split(maxsplit=1)) == 2, f"{name} has no description"
    assert "197 meta-params" in first["small_fc_lopt"]
    assert "fmnist_mlp_8x8" in first["small_fc_lopt_fmnist8"]
    titles = [line for line in lines if line and not line.startswith(" ")]
    assert [t.split()[0] for t in titles] == ["hand-designed", "learned", "pretrained"]


def test_meta_train_takes_estimator_and_lopt_configs_and_resumes_the_saved_config(tmp_path):
    import json

    out = tmp_path / "run"
    argv = ["meta-train", "--out", str(out), "--task", "quadratic_d10", "--no-progress"]
    tiny = ["--num-tasks", "2", "--horizon", "10", "--trunc-length", "5", "--outer-steps", "2"]
    assert main([*argv, *tiny, "--lopt", "learnable_sgdm", "--lopt-config",
                 '{"initial_momentum": 0.5}', "--std", "0.02"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["lopt_config"] == {"initial_lr": 0.01, "initial_momentum": 0.5}
    assert saved["estimator"] == "pes"
    assert saved["estimator_options"] == {"std": 0.02, "num_pairs": 1}
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
    ]
    # A bare rerun with a longer budget continues the saved run, configs included.
    assert main(["meta-train", "--out", str(out), "--no-progress", "--outer-steps", "3"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    assert json.loads((out / "config.json").read_text())["estimator_options"] == {
        "std": 0.02, "num_pairs": 1
    }


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--estimator", "tbptt", "--std", "0.1"], "unknown options ['std'] for estimator 'tbptt'"),
        (["--lopt-config", "[1]"], "--lopt-config must be a JSON object"),
        (["--lopt-config", '{"width": 2}'], "unknown config keys ['width']"),
    ],
)
def test_meta_train_bad_configs_get_one_clear_error(argv, message, tmp_path, capsys):
    assert main(["meta-train", "--out", str(tmp_path / "r"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("learnopt: error:") and message in err


def test_meta_train_estimator_choices_come_from_the_registry(tmp_path, capsys):
    from learnopt.meta.estimators.registry import ESTIMATORS

    with pytest.raises(SystemExit):
        main(["meta-train", "--out", str(tmp_path), "--estimator", "reinforce"])
    err = capsys.readouterr().err
    assert all(f"'{name}'" in err for name in ESTIMATORS)
