"""The outer learner and the meta-training loop: clipping, NaN handling, exact resume."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from learnopt.meta.learner import Learner
from learnopt.meta.train import MetaTrainConfig, MetaTrainer

TINY = MetaTrainConfig(
    task="quadratic_d10",
    lopt="learnable_sgd",
    estimator="pes",
    num_tasks=4,
    horizon=30,
    trunc_length=5,
    outer_lr=1e-2,
    outer_steps=40,
    checkpoint_every=4,
    seed=3,
)


def test_learner_clips_each_value_at_3_then_applies_adam():
    learner = Learner(learning_rate=0.1, clip=3.0)
    a = b = learner.init({"w": jnp.zeros(2)})
    for _ in range(3):
        a, _ = learner.apply(a, {"w": jnp.asarray([10.0, -0.5])})
        b, _ = learner.apply(b, {"w": jnp.asarray([3.0, -0.5])})
    np.testing.assert_allclose(a.theta["w"], b.theta["w"], rtol=0, atol=0)
    # Adam's first step is -lr * sign(g): check the value, not just the direction.
    c, _ = Learner(learning_rate=0.1).apply(
        Learner(0.1).init({"w": jnp.zeros(2)}), {"w": jnp.ones(2)}
    )
    np.testing.assert_allclose(c.theta["w"], [-0.1, -0.1], rtol=1e-5)
    unclipped = Learner(learning_rate=0.1, clip=0.0)
    u = unclipped.init({"w": jnp.zeros(2)})
    v = unclipped.init({"w": jnp.zeros(2)})
    u, _ = unclipped.apply(u, {"w": jnp.asarray([10.0, 1.0])})
    u, _ = unclipped.apply(u, {"w": jnp.asarray([1.0, 1.0])})
    v, _ = unclipped.apply(v, {"w": jnp.asarray([3.0, 1.0])})
    v, _ = unclipped.apply(v, {"w": jnp.asarray([1.0, 1.0])})
    assert not np.allclose(u.theta["w"], v.theta["w"])


def test_learner_drops_and_counts_non_finite_gradients():
    learner = Learner(learning_rate=0.1)
    s = learner.init({"w": jnp.ones(3)})
    s, ok = learner.apply(s, {"w": jnp.asarray([1.0, jnp.nan, 0.0])})
    assert not ok and int(s.num_dropped) == 1 and int(s.step) == 0
    np.testing.assert_array_equal(s.theta["w"], np.ones(3))
    s, ok = learner.apply(s, {"w": jnp.asarray([1.0, 1.0, jnp.inf])})
    assert not ok and int(s.num_dropped) == 2
    s, ok = learner.apply(s, {"w": jnp.ones(3)})
    assert ok and int(s.step) == 1
    np.testing.assert_allclose(s.theta["w"], 0.9 * np.ones(3), rtol=1e-5)
    mean, used = Learner(0.1, max_staleness=1).aggregate(
        [
            ({"w": jnp.ones(1)}, 5),
            ({"w": 3 * jnp.ones(1)}, 4),
            ({"w": jnp.ones(1)}, 2),
            ({"w": jnp.full(1, jnp.nan)}, 5),
        ],
        current_step=5,
    )
    assert used == 2 and float(mean["w"][0]) == pytest.approx(2.0)


def test_meta_training_improves_learnable_sgd_and_refuses_a_changed_config(tmp_path):
    result = MetaTrainer(TINY, tmp_path).run(progress=False)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 41))
    # The initial lr 0.01 is far too small for this quadratic: the meta-gradient raises it.
    assert float(result["state"]["learner"].theta["log_lr"]) > np.log(0.01) + 0.2
    with pytest.raises(ValueError, match="different config"):
        MetaTrainer(dataclasses.replace(TINY, outer_lr=1e-3), tmp_path)
    # A longer budget resumes from step 40 and runs 5 more steps.
    more = MetaTrainer(dataclasses.replace(TINY, outer_steps=45), tmp_path).run(progress=False)
    assert more["resumed"] and more["start_step"] == 40 and more["state"]["step"] == 45


def _launch(out: Path) -> subprocess.Popen:
    # `learnopt meta-train --out DIR` with no other flags resumes DIR's config.json.
    return subprocess.Popen(
        [sys.executable, "-m", "learnopt.cli", "meta-train", "--out", str(out), "--no-progress"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


def test_sigkill_then_resume_reaches_the_same_theta(tmp_path):
    config = dataclasses.replace(TINY, outer_steps=1500, checkpoint_every=7)
    full, killed = tmp_path / "full", tmp_path / "killed"
    for d in (full, killed):
        d.mkdir()
        (d / "config.json").write_text(config.to_json())
    proc = _launch(killed)
    deadline = time.time() + 120
    metrics = killed / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if (killed / "checkpoint.msgpack").exists() and metrics.exists():
            n = len(metrics.read_text().splitlines())
            if n >= 20 and n % 7 != 0:  # mid-way between two checkpoints
                break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps_at_kill = len(metrics.read_text().splitlines())
    assert 0 < steps_at_kill < config.outer_steps
    assert _launch(killed).wait() == 0
    assert _launch(full).wait() == 0
    assert (killed / "theta.msgpack").read_bytes() == (full / "theta.msgpack").read_bytes()
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps == list(range(1, config.outer_steps + 1))
    full_losses = [
        json.loads(x)["meta_loss"] for x in (full / "metrics.jsonl").read_text().splitlines()
    ]
    killed_losses = [json.loads(x)["meta_loss"] for x in metrics.read_text().splitlines()]
    assert full_losses == killed_losses


def test_config_round_trips_through_json_and_reads_an_older_file():
    config = dataclasses.replace(
        TINY, lopt="small_fc_lopt", lopt_config={"hidden_size": 8}, estimator_options={"std": 0.02}
    )
    # Completed with the defaults on construction: every hyperparameter is recorded.
    assert config.lopt_config["hidden_size"] == 8 and config.lopt_config["hidden_layers"] == 2
    assert config.estimator_options == {"std": 0.02, "num_pairs": 1}
    assert MetaTrainConfig.from_json(config.to_json()) == config
    assert json.loads(config.to_json())["lopt_config"]["initial_rms_decays"] == [0.999]
    # A config.json written before estimator options: PES's std was a top-level field.
    old = {k: v for k, v in json.loads(TINY.to_json()).items()
           if k not in ("lopt_config", "estimator_options")}
    migrated = MetaTrainConfig.from_json(json.dumps({**old, "std": 0.03}))
    assert migrated.estimator_options == {"std": 0.03, "num_pairs": 1} and migrated.lopt_config == {
        "initial_lr": 0.01
    }
    tbptt = MetaTrainConfig.from_json(json.dumps({**old, "estimator": "tbptt", "std": 0.01}))
    assert tbptt.estimator_options == {}
    with pytest.raises(ValueError, match="unknown options \\['sigma'\\] for estimator 'pes'"):
        dataclasses.replace(TINY, estimator_options={"sigma": 0.1})
    with pytest.raises(ValueError, match="unknown config keys \\['width'\\]"):
        dataclasses.replace(TINY, lopt_config={"width": 3})
    with pytest.raises(ValueError, match="unknown estimator 'reinforce'; valid: pes"):
        dataclasses.replace(TINY, estimator="reinforce")


def test_checkpoints_hold_config_and_format_version_and_resume_only_their_run(tmp_path):
    from learnopt.io import CHECKPOINT_FORMAT_VERSION, load_checkpoint

    config = dataclasses.replace(TINY, outer_steps=4)
    trainer = MetaTrainer(config, tmp_path)
    result = trainer.run(progress=False)
    for name in ("checkpoint.msgpack", "theta.msgpack"):
        ckpt = load_checkpoint(tmp_path / name)
        assert ckpt.format_version == CHECKPOINT_FORMAT_VERSION == 1
        assert MetaTrainConfig.from_dict(ckpt.config) == config
    template = trainer.lopt.init(jax.random.PRNGKey(0))
    theta = load_checkpoint(tmp_path / "theta.msgpack", template).state
    assert float(theta["log_lr"]) == float(result["state"]["learner"].theta["log_lr"])
    assert int(load_checkpoint(tmp_path / "checkpoint.msgpack").state["step"]) == 4
    assert json.loads((tmp_path / "machine.json").read_text())["cpu_count"] == os.cpu_count()
    # A checkpoint copied in from another run is refused, naming the file.
    other = tmp_path / "other"
    MetaTrainer(dataclasses.replace(config, seed=4), other).run(progress=False)
    (tmp_path / "checkpoint.msgpack").write_bytes((other / "checkpoint.msgpack").read_bytes())
    with pytest.raises(ValueError, match="checkpoint.msgpack was written under a different"):
        MetaTrainer(dataclasses.replace(config, outer_steps=6), tmp_path).run(progress=False)


@pytest.mark.parametrize("old_layout", [0, 1])
def test_a_checkpoint_of_an_old_accumulator_layout_resumes_with_fresh_inner_runs(tmp_path,
                                                                                 old_layout):
    from learnopt.io import checkpoint_bytes, load_checkpoint
    from learnopt.learned.common import ACCUMULATOR_LAYOUT

    config = dataclasses.replace(TINY, outer_steps=3)
    MetaTrainer(config, tmp_path).run(progress=False)
    ckpt = load_checkpoint(tmp_path / "checkpoint.msgpack")
    assert ckpt.state["accumulator_layout"] == ACCUMULATOR_LAYOUT == 2
    # Layout 0 was written before the layout marker (inner optimizer states were S + (K,));
    # layout 1 held PES's plus and minus members apart.
    old = {k: v for k, v in ckpt.state.items() if k != "accumulator_layout"}
    if old_layout:
        old["accumulator_layout"] = old_layout
    (tmp_path / "checkpoint.msgpack").write_bytes(checkpoint_bytes(old, ckpt.config))
    trainer = MetaTrainer(dataclasses.replace(config, outer_steps=5), tmp_path)
    with pytest.warns(UserWarning,
                      match=f"accumulator layout {old_layout} .* the inner runs restart"):
        state = trainer.restore()
    fresh = trainer.init_state()
    jax.tree.map(np.testing.assert_array_equal, state["estimator"], fresh["estimator"])
    np.testing.assert_array_equal(state["learner"].theta["log_lr"],
                                  ckpt.state["learner"]["theta"]["log_lr"])
    assert int(state["step"]) == 3
    with pytest.warns(UserWarning, match=f"accumulator layout {old_layout}"):
        resumed = trainer.run(progress=False)
    assert resumed["resumed"] and resumed["start_step"] == 3
    assert (load_checkpoint(tmp_path / "checkpoint.msgpack").state["accumulator_layout"]
            == ACCUMULATOR_LAYOUT)


def test_a_checkpoint_from_before_format_versions_still_resumes(tmp_path):
    from flax import serialization

    config = dataclasses.replace(TINY, outer_steps=4)
    full = MetaTrainer(dataclasses.replace(config, outer_steps=6), tmp_path / "full").run(
        progress=False
    )
    MetaTrainer(config, tmp_path / "old").run(progress=False)
    trainer = MetaTrainer(dataclasses.replace(config, outer_steps=6), tmp_path / "old")
    state = trainer.restore()
    # The old format: the bare msgpack'd state, no config, no version.
    (tmp_path / "old" / "checkpoint.msgpack").write_bytes(serialization.to_bytes(state))
    resumed = trainer.run(progress=False)
    assert resumed["resumed"] and resumed["start_step"] == 4
    np.testing.assert_array_equal(
        resumed["state"]["learner"].theta["log_lr"], full["state"]["learner"].theta["log_lr"]
    )


def test_init_theta_starts_a_run_from_another_runs_theta(tmp_path):
    """``init_theta`` names a theta file: the new run's initial theta is that theta, not
    ``lopt.init`` of its seed; a missing file or another architecture's theta is refused."""
    from learnopt.io import save_checkpoint
    from learnopt.meta.train import initial_theta

    lopt = MetaTrainer(TINY, tmp_path / "a").lopt
    theta = {"log_lr": jnp.asarray(np.log(0.123), jnp.float32)}
    save_checkpoint(tmp_path / "theta.msgpack", theta)
    config = dataclasses.replace(TINY, init_theta=str(tmp_path / "theta.msgpack"))
    got = initial_theta(config, lopt)
    assert float(got["log_lr"]) == pytest.approx(np.log(0.123))
    assert float(initial_theta(TINY, lopt)["log_lr"]) != pytest.approx(np.log(0.123))
    state = MetaTrainer(config, tmp_path / "b").init_state(with_estimator=False)
    assert float(state["learner"].theta["log_lr"]) == pytest.approx(np.log(0.123))
    with pytest.raises(FileNotFoundError, match="neither a shipped pretrained"):
        initial_theta(dataclasses.replace(TINY, init_theta=str(tmp_path / "none")), lopt)
    with pytest.raises(ValueError, match="small_fc_lopt"):  # the shipped file is another arch
        initial_theta(dataclasses.replace(TINY, init_theta="small_fc_lopt_fmnist8"), lopt)
