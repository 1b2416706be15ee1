"""Meta-gradients on Ray actors: one worker repeats the single-process run; a killed worker is
replaced and the run applies its number of gradients; failing workers end the run clearly."""

import json
import os
import signal

import jax
import numpy as np
import pytest

from learnopt.distributed import worker as worker_mod
from learnopt.learned.registry import get_learned_optimizer
from learnopt.meta.learner import Learner
from learnopt.meta.train import MetaTrainConfig, build_estimator_over_tasks

ray = pytest.importorskip("ray")
# Ray starts its processes with fork+exec from a process where JAX runs threads: harmless.
pytestmark = pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")

TINY = MetaTrainConfig(
    task="quadratic_d10",
    lopt="learnable_sgd",
    estimator="pes",
    num_tasks=4,
    horizon=30,
    trunc_length=5,
    outer_lr=1e-2,
    seed=3,
)


@pytest.fixture(scope="module")
def ray_session():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def single_process_theta(config, steps):
    """The MetaTrainer loop written out: its keys, estimator and learner."""
    lopt = get_learned_optimizer(config.lopt, config.lopt_config)
    key = jax.random.PRNGKey(config.seed)
    theta_key, est_key = jax.random.split(jax.random.fold_in(key, -1 % 2**31))
    theta = lopt.init(theta_key)
    estimator = build_estimator_over_tasks(config, lopt)
    learner = Learner(config.outer_lr, config.clip, max_staleness=0)
    state, est_state = learner.init(theta), estimator.init_state(theta, est_key)
    for k in range(steps):
        _, grad, est_state, _ = estimator.estimate(state.theta, est_state,
                                                   jax.random.fold_in(key, k))
        state, ok = learner.apply(state, grad)
        assert ok
    return state.theta


def test_worker_seeds_keep_worker_zero_on_the_run_seed():
    assert worker_mod.worker_seed(3, 0) == 3
    assert worker_mod.worker_seed(3, 2) == 3 + 2 * 1_000_003
    w0, w1 = worker_mod.MetaGradientWorker(TINY, 0), worker_mod.MetaGradientWorker(TINY, 1)
    theta = worker_mod.initial_theta(TINY)
    g0, g1 = w0.compute(theta, 0).grad, w1.compute(theta, 0).grad
    leaves = lambda t: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(t)])
    assert not np.allclose(leaves(g0), leaves(g1))  # different draws and perturbations


def test_one_ray_worker_at_staleness_zero_repeats_the_single_process_run(ray_session):
    from learnopt.distributed import RayMetaGradients, initial_theta, run_learner

    steps = 4
    learner = Learner(TINY.outer_lr, TINY.clip, max_staleness=0)
    with RayMetaGradients(TINY.to_dict(), num_workers=1) as grads:
        state, records = run_learner(grads, learner, learner.init(initial_theta(TINY)), steps)
    assert [r["version"] for r in records] == [0, 1, 2, 3]
    assert all(r["applied"] for r in records) and int(state.num_stale) == 0
    want = single_process_theta(TINY, steps)
    for a, b in zip(jax.tree_util.tree_leaves(state.theta), jax.tree_util.tree_leaves(want),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # and theta moved: the equality is not between two initial thetas
    init = jax.tree_util.tree_leaves(initial_theta(TINY))
    assert any(np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-4
               for a, b in zip(jax.tree_util.tree_leaves(want), init, strict=True))


def test_a_killed_worker_is_replaced_and_the_run_applies_all_its_gradients(ray_session):
    from learnopt.distributed import RayMetaGradients, initial_theta, run_learner

    steps = 8
    learner = Learner(TINY.outer_lr, TINY.clip, max_staleness=1)
    killed = []
    with RayMetaGradients(TINY, num_workers=2) as grads:

        def kill_once(record):  # the worker that delivered the 2nd update: it contributed
            if record["step"] == 2 and not killed:
                killed.append(int(record["worker"]))
                # SIGKILL (as the OOM killer would): dead before the next call reaches it
                actor = grads.workers[killed[0]]
                os.kill(ray.get(actor.pid.remote()), signal.SIGKILL)
                # ...and known to Ray to be dead, or the other worker may finish the run first
                with pytest.raises(ray.exceptions.RayActorError):
                    ray.get(actor.pid.remote(), timeout=60)

        state, records = run_learner(grads, learner, learner.init(initial_theta(TINY)), steps,
                                     on_record=kill_once)
        assert sorted(grads.workers) == sorted({0, 1, 2} - set(killed))  # replaced by serial 2
        assert grads.num_failures == 1 and f"worker {killed[0]}: " in grads.failures[0]
    assert int(state.step) == steps == sum(r["applied"] for r in records)
    stale = sum(r["staleness"] > 1 for r in records)
    assert int(state.num_stale) == stale and int(state.num_dropped) == 0
    assert len(records) == steps + stale
    kill_at = next(i for i, r in enumerate(records) if r["step"] == 2)
    assert int(records[kill_at]["worker"]) == killed[0]
    assert killed[0] not in {int(r["worker"]) for r in records[kill_at + 1:]}


def test_workers_that_keep_failing_end_the_run_with_the_error(ray_session):
    from learnopt.distributed import RayMetaGradients, WorkerFailures

    with RayMetaGradients(TINY, num_workers=1, max_failures=1) as grads:
        with pytest.raises(WorkerFailures, match="2 worker failures \\(max_failures=1\\)"):
            grads.next({"not": np.zeros(3)}, 0)  # not theta's structure: every estimate raises
        assert grads.num_failures == 2


def test_the_command_line_writes_theta_and_one_metrics_line_per_gradient(ray_session, tmp_path):
    from learnopt.distributed.__main__ import main
    from learnopt.io import load_checkpoint

    (tmp_path / "config.json").write_text(TINY.to_json())
    (tmp_path / "learner.json").write_text('{"learning_rate": 0.01, "max_staleness": 0}')
    assert main(["--config", str(tmp_path / "config.json"), "--learner",
                 str(tmp_path / "learner.json"), "--workers", "1", "--steps", "3",
                 "--out", str(tmp_path / "run")]) == 0
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["version"], r["step"], r["applied"]) for r in lines] == [
        (0, 1, True), (1, 2, True), (2, 3, True)]
    ckpt = load_checkpoint(tmp_path / "run" / "theta.msgpack")
    assert MetaTrainConfig.from_dict(ckpt.config) == TINY
    want = single_process_theta(TINY, 3)  # outer_lr 1e-2 and clip 3 as the file says
    np.testing.assert_array_equal(np.asarray(ckpt.state["log_lr"]), np.asarray(want["log_lr"]))


def test_meta_train_with_one_worker_matches_the_single_process_run(ray_session, tmp_path):
    """``learnopt meta-train --workers 1`` (staleness 0) reaches MetaTrainer's own theta."""
    import dataclasses

    from learnopt.distributed import RayMetaGradients
    from learnopt.meta.train import MetaTrainer

    config = dataclasses.replace(TINY, outer_steps=4, learner={"max_staleness": 0})
    local = MetaTrainer(config, tmp_path / "local").run(progress=False)
    with RayMetaGradients(config.to_dict(), num_workers=1) as g:
        remote = MetaTrainer(config, tmp_path / "ray").run(progress=False, gradients=g)
    for a, b in zip(jax.tree_util.tree_leaves(local["state"]["learner"].theta),
                    jax.tree_util.tree_leaves(remote["state"]["learner"].theta), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    lines = (tmp_path / "ray" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4 and "num_stale" in lines[-1]
    # a distributed run resumes theta and the learner from its checkpoint
    longer = dataclasses.replace(config, outer_steps=5)
    with RayMetaGradients(longer.to_dict(), num_workers=1) as g:
        more = MetaTrainer(longer, tmp_path / "ray").run(progress=False, gradients=g)
    assert more["resumed"] and int(more["state"]["learner"].step) == 5
