"""Meta-training that survives faults and bad input: the run lock, SIGINT/SIGTERM, kept
checkpoints with fallback, divergence, strict JSON, validation before writing, and a time
budget that leaves out compile time."""

import contextlib
import dataclasses
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from test_train import TINY  # the tiny run of the meta-training tests

from learnopt.cli import main
from learnopt.io import load_checkpoint
from learnopt.meta.train import MetaTrainer

# TINY on the command line.
TINY_FLAGS = ["--task", "quadratic_d10", "--lopt", "learnable_sgd", "--num-tasks", "4",
              "--horizon", "30", "--trunc-length", "5", "--seed", "3", "--no-progress"]


def strict(text: str):
    """``json.loads`` that refuses the non-JSON words NaN, Infinity and -Infinity."""
    def refuse(word):
        raise ValueError(f"not strict JSON: {word}")

    return json.loads(text, parse_constant=refuse)


def metrics(run: Path) -> list[dict]:
    return [strict(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


class FakeGradients:
    """A gradient source as ``MetaTrainer.run(gradients=...)`` takes (the distributed
    interface): meta-gradient ``grad_value`` everywhere and meta-loss ``meta_loss``; calls
    ``on_call(n)`` at the start of the ``n``-th request (1-based)."""

    def __init__(self, on_call=None, meta_loss=1.0, grad_value=0.0):
        self.on_call, self.meta_loss, self.grad_value = on_call, meta_loss, grad_value
        self.calls = 0

    def next(self, theta, version):
        self.calls += 1
        if self.on_call is not None:
            self.on_call(self.calls)
        grad = jax.tree_util.tree_map(lambda x: jnp.full_like(x, self.grad_value), theta)
        return [(grad, version, {"meta_loss": self.meta_loss})]


def _spin():
    """Let Python run a pending signal handler (it does so at a backward jump)."""
    for _ in range(10_000):
        pass


# --- 1. the run lock -------------------------------------------------------------------------

HOLD = """
import fcntl, os, sys, time
f = open(sys.argv[1], "a+")
fcntl.flock(f, fcntl.LOCK_EX)
f.truncate(0)
f.write(f"{os.getpid()}\\n")
f.flush()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_writer_is_refused_naming_the_holders_pid_before_it_writes(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run / ".lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        argv = ["meta-train", "--out", str(run), *TINY_FLAGS, "--outer-steps", "2"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("learnopt: error: ")
        assert f"{run} is in use: process {holder.pid} is meta-training into it" in err
        assert os.listdir(run) == [".lock"]  # refused before writing anything
    finally:
        holder.kill()
        holder.wait()
    # Two trainers of one process conflict as well (a flock belongs to an open file).
    from learnopt.meta.train import RunLockedError

    other = tmp_path / "other"
    with MetaTrainer(TINY, other).lock():
        assert (other / ".lock").read_text() == f"{os.getpid()}\n"
        with pytest.raises(RunLockedError, match=f"process {os.getpid()} is meta-training"):
            MetaTrainer(TINY, other).run(progress=False)
        assert os.listdir(other) == [".lock"]
    # The holder's death released its lock: the stale .lock file does not block a run.
    assert main(argv) == 0
    assert [r["step"] for r in metrics(run)] == [1, 2]


# --- 2. SIGINT and SIGTERM -------------------------------------------------------------------


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_checkpoints_the_last_step_and_exits_with_one_line(tmp_path, sig, code):
    run = tmp_path / "run"
    run.mkdir()
    config = dataclasses.replace(TINY, outer_steps=100_000, checkpoint_every=100_000)
    (run / "config.json").write_text(config.to_json())
    proc = subprocess.Popen(
        [sys.executable, "-m", "learnopt.cli", "meta-train", "--out", str(run), "--no-progress"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    path = run / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before the signal"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == code
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    found = re.fullmatch(r"learnopt: interrupted at outer step (\d+); checkpoint saved to "
                         r"(\S+); rerun the same command to resume", err.strip())
    assert found, err
    step = int(found[1])
    assert Path(found[2]) == run / "checkpoint.msgpack"
    # The checkpoint holds the step named (checkpoint_every alone would have written none),
    # and metrics.jsonl ends there: a rerun resumes exactly.
    assert int(load_checkpoint(run / "checkpoint.msgpack").state["step"]) == step >= 5
    assert [r["step"] for r in metrics(run)] == list(range(1, step + 1))


def test_run_stops_at_a_step_boundary_restores_the_handlers_and_a_second_signal_abandons(
    tmp_path,
):
    from learnopt.meta.train import RunInterrupted

    received = []

    def mine(signum, frame):
        received.append(signum)

    def interrupt(times):
        def on_call(n):
            if n == 3:
                for _ in range(times):
                    os.kill(os.getpid(), signal.SIGINT)
                    _spin()
        return on_call

    previous = signal.signal(signal.SIGINT, mine)
    try:
        config = dataclasses.replace(TINY, outer_steps=50, checkpoint_every=100)
        # One signal during step 3: the step is finished, checkpointed, and run() stops.
        with pytest.raises(RunInterrupted) as stopped:
            MetaTrainer(config, tmp_path / "a").run(progress=False,
                                                    gradients=FakeGradients(interrupt(1)))
        assert stopped.value.step == 3 and stopped.value.exit_code == 130
        assert str(stopped.value).startswith("interrupted at outer step 3; checkpoint saved")
        assert int(load_checkpoint(tmp_path / "a" / "checkpoint.msgpack").state["step"]) == 3
        assert len(metrics(tmp_path / "a")) == 3
        assert signal.getsignal(signal.SIGINT) is mine and received == []
        # A second signal abandons the step under way: the checkpoint is of step 2.
        with pytest.raises(RunInterrupted) as stopped:
            MetaTrainer(config, tmp_path / "b").run(progress=False,
                                                    gradients=FakeGradients(interrupt(2)))
        assert stopped.value.step == 2
        assert int(load_checkpoint(tmp_path / "b" / "checkpoint.msgpack").state["step"]) == 2
        assert [r["step"] for r in metrics(tmp_path / "b")] == [1, 2]
        assert signal.getsignal(signal.SIGINT) is mine and received == []
    finally:
        signal.signal(signal.SIGINT, previous)


# --- 3. kept checkpoints, verified on resume -------------------------------------------------


def test_the_last_checkpoints_are_kept_and_a_corrupt_latest_falls_back(tmp_path):
    from learnopt.io import CheckpointError
    from learnopt.meta.train import CheckpointFallbackWarning

    config = dataclasses.replace(TINY, outer_steps=12, checkpoint_every=4, keep_checkpoints=2)
    run = tmp_path / "run"
    MetaTrainer(config, run).run(progress=False)

    def names():
        return sorted(p.name for p in run.glob("checkpoint*.msgpack"))

    assert names() == ["checkpoint.msgpack", "checkpoint_0000008.msgpack",
                       "checkpoint_0000012.msgpack"]
    data = (run / "checkpoint.msgpack").read_bytes()
    (run / "checkpoint.msgpack").write_bytes(data[: len(data) // 2])  # cut short
    (run / "checkpoint_0000012.msgpack").write_bytes(b"\xc1 not msgpack")
    longer = dataclasses.replace(config, outer_steps=16, keep_checkpoints=3)  # budget fields
    with pytest.warns(CheckpointFallbackWarning) as caught:
        resumed = MetaTrainer(longer, run).run(progress=False)
    message = str(next(w.message for w in caught
                       if issubclass(w.category, CheckpointFallbackWarning)))
    assert message.startswith(f"resuming from {run / 'checkpoint_0000008.msgpack'} (outer step 8)")
    assert f"{run / 'checkpoint.msgpack'}: not a readable checkpoint" in message
    assert f"{run / 'checkpoint_0000012.msgpack'}: not a readable checkpoint" in message
    assert resumed["resumed"] and resumed["start_step"] == 8
    full = tmp_path / "full"
    MetaTrainer(longer, full).run(progress=False)
    assert (run / "theta.msgpack").read_bytes() == (full / "theta.msgpack").read_bytes()
    assert [r["step"] for r in metrics(run)] == list(range(1, 17))
    assert names() == ["checkpoint.msgpack", "checkpoint_0000008.msgpack",
                       "checkpoint_0000012.msgpack", "checkpoint_0000016.msgpack"]
    # Nothing usable: one error naming every file and what to do; and io's own error too.
    for path in run.glob("checkpoint*.msgpack"):
        path.write_bytes(b"\x00")
    with pytest.raises(CheckpointError) as error:
        MetaTrainer(longer, run).restore()
    assert all(str(run / name) in str(error.value) for name in names())
    assert "delete them to start the run over" in str(error.value)
    with pytest.raises(CheckpointError, match=r"checkpoint_0000016.msgpack: not a checkpoint "
                       r".*; replace it with a good copy, or delete it"):
        load_checkpoint(run / "checkpoint_0000016.msgpack")


# --- 4 and 5. divergence; strict JSON --------------------------------------------------------


@pytest.fixture(scope="module")
def diverged(tmp_path_factory):
    """A TBPTT run of TINY with outer_lr 1e10: theta jumps to a learning rate of inf after
    one step, and every later meta-gradient is NaN (PES's capped losses would instead give
    finite ones)."""
    run = tmp_path_factory.mktemp("diverged") / "run"
    argv = ["meta-train", "--out", str(run), *TINY_FLAGS, "--estimator", "tbptt",
            "--outer-lr", "1e10", "--outer-steps", "200", "--max-nonfinite-steps", "5"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue(), run, argv


def test_a_diverging_run_checkpoints_and_stops_with_exit_code_3(diverged, capsys):
    code, err, run, argv = diverged
    assert code == 3
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("learnopt: error: meta-training diverged: the meta-gradients of the "
                          "last 5 outer steps")
    records = metrics(run)
    step = records[-1]["step"]
    assert f"checkpoint saved to {run / 'checkpoint.msgpack'}" in err
    assert step < 200 and records[-1]["nonfinite_streak"] == 5
    assert [r["applied"] for r in records[-5:]] == [False] * 5
    assert int(load_checkpoint(run / "checkpoint.msgpack").state["step"]) == step
    # The same command again stops at once (the streak is read back), ...
    assert main(argv) == 3
    assert "meta-training diverged" in capsys.readouterr().err
    assert len(metrics(run)) == step
    # ... and a higher limit (a budget field; 0: never stop) goes on.
    more = [*argv[:-4], "--outer-steps", str(step + 2), "--max-nonfinite-steps", "0"]
    assert main(more) == 0
    assert [r["step"] for r in metrics(run)][-2:] == [step + 1, step + 2]


def test_every_json_file_and_metrics_line_the_trainer_writes_is_strict(diverged, tmp_path):
    _, _, run, _ = diverged
    records = metrics(run)  # every line parses strictly
    bad = [r for r in records if not r["applied"]]
    assert bad and all(r["grad_norm"] is None and r["nonfinite"] == ["grad_norm"] for r in bad)
    strict((run / "config.json").read_text())
    strict((run / "machine.json").read_text())
    # A NaN meta-loss (here from a gradient source) is written as null and named.
    config = dataclasses.replace(TINY, outer_steps=3, max_nonfinite_steps=None)
    source = FakeGradients(meta_loss=math.nan, grad_value=math.inf)
    MetaTrainer(config, tmp_path / "nan").run(progress=False, gradients=source)
    records = metrics(tmp_path / "nan")
    assert len(records) == 3
    for r in records:
        assert r["meta_loss"] is None and r["grad_norm"] is None
        assert r["nonfinite"] == ["grad_norm", "meta_loss"]


# --- 6. bad input is refused before anything is written --------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--outer-steps", "0"], "--outer-steps must be a positive integer, got 0: nothing to "
                                 "train"),
        (["--checkpoint-every", "0"], "--checkpoint-every must be a positive integer, got 0"),
        (["--num-tasks", "-2"], "--num-tasks must be a positive integer, got -2"),
        (["--keep-theta-every", "0"], "--keep-theta-every must be a positive integer, got 0"),
        (["--keep-checkpoints", "0"], "--keep-checkpoints must be a positive integer, got 0"),
        (["--max-nonfinite-steps", "-1"], "--max-nonfinite-steps must be >= 0"),
        (["--max-seconds", "-5"], "--max-seconds must be a finite number > 0, got -5.0: "
                                  "nothing to train"),
        (["--max-seconds", "nan"], "--max-seconds must be a finite number > 0, got nan"),
        (["--outer-lr", "0"], "--outer-lr must be a finite number > 0, got 0.0"),
        (["--std", "-1"], "--std must be a finite number > 0, got -1.0"),
    ],
)
def test_bad_numbers_get_one_line_and_create_nothing(argv, message, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["meta-train", "--out", out, *TINY_FLAGS, "--outer-steps", "3", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("learnopt: error: ") and message in err, err
    assert os.listdir(tmp_path) == []


def test_an_out_that_is_a_file_or_cannot_be_created_gets_one_line_and_creates_nothing(
    tmp_path, capsys
):
    file = tmp_path / "file"
    file.write_text("x")
    cases = [(file, f"the run directory {file} exists and is not a directory"),
             (file / "run", f"cannot create the run directory {file / 'run'}: {file} is not a "
                            "directory")]
    system = Path("/sys/learnopt-test-run")  # not writable, even by root
    if Path("/sys").is_dir():
        cases.append((system, str(system)))
    for out, message in cases:
        assert main(["meta-train", "--out", str(out), *TINY_FLAGS, "--outer-steps", "2"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("learnopt: error: ") and message in err
        assert "cannot" in err or "not a directory" in err
    assert os.listdir(tmp_path) == ["file"] and file.read_text() == "x"
    assert not system.exists()


def test_a_refused_command_leaves_nothing_that_refuses_the_corrected_one(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["meta-train", "--out", str(run), *TINY_FLAGS, "--outer-steps", "2"]
    # Refused only where the estimator is built, after the run directory was taken.
    assert main([*argv, "--estimator-options", '{"std": -1}']) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "std must be > 0" in err
    assert not run.exists()
    assert main([*argv, "--lopt", "nope"]) == 2
    assert "unknown" in capsys.readouterr().err and not run.exists()
    assert main([*argv, "--estimator-options", '{"std": 0.02}']) == 0
    assert strict((run / "config.json").read_text())["estimator_options"]["std"] == 0.02


def test_the_task_flag_sets_the_task_that_is_trained(tmp_path):
    """``--task`` used to leave the default config's task distribution (fmnist_mlp_8x8) in
    place: ``learnopt meta-train --task quadratic_d10`` trained on Fashion-MNIST."""
    from learnopt.cli import _meta_config, build_parser

    args = build_parser().parse_args(["meta-train", "--out", str(tmp_path / "r"),
                                      "--task", "quadratic_d10"])
    config = _meta_config(args, tmp_path / "r")
    assert config.task == "quadratic_d10"
    assert [e.task for e in config.mixture().entries] == ["quadratic_d10"]


# --- 7. the time budget leaves out compile time ----------------------------------------------


def test_the_time_budget_leaves_out_compile_time_and_the_bar_counts_its_seconds(
    tmp_path, monkeypatch, capsys
):
    import learnopt.meta.train as train

    seen = {}
    real_tqdm = train.tqdm

    def bar(*args, **kwargs):
        seen.update(kwargs)
        return real_tqdm(*args, **{**kwargs, "disable": True})

    monkeypatch.setattr(train, "tqdm", bar)
    config = dataclasses.replace(TINY, outer_steps=100_000, max_seconds=1.0)
    trainer = MetaTrainer(config, tmp_path)
    real_estimate = trainer.estimator.estimate
    calls = []

    def slow_first_compile(*args):  # a compile of 1.5 s, longer than the whole budget
        if not calls:
            time.sleep(1.5)
            trainer.estimator.compile_seconds += 1.5
        calls.append(1)
        return real_estimate(*args)

    monkeypatch.setattr(trainer.estimator, "estimate", slow_first_compile)
    start = time.perf_counter()
    trainer.run(progress=True)
    wall = time.perf_counter() - start
    records = metrics(tmp_path)
    last = records[-1]
    assert len(records) > 1 and last["compile_seconds"] >= 1.5
    assert 0.9 <= last["seconds"] <= wall - last["compile_seconds"]
    assert seen["total"] == 1.0 and seen["unit"] == "s"
    with pytest.raises(SystemExit):
        main(["meta-train", "--help"])
    assert "not counting compile time" in " ".join(capsys.readouterr().out.split())
