"""Meta-gradients from several tasks in one outer step: per-task unit-norm averaging, slot
replacement, the compile cache and exact resume."""

import dataclasses
import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from learnopt.io import checkpoint_bytes, restore_state
from learnopt.learned.learnable import LearnableSGD
from learnopt.meta.estimators.registry import build_estimator
from learnopt.meta.multitask import MultiTaskEstimator, combine
from learnopt.meta.sources import TaskDraw
from learnopt.meta.unroll import TruncatedUnroll
from learnopt.tasks.base import Task, no_data


class Quadratic(Task):
    """``scale * 0.5 * ||x - 1||^2`` from a random start; ``scale`` sets the gradient size."""

    datasets = no_data()

    def __init__(self, scale: float, nan: bool = False):
        self.scale, self.nan = scale, nan
        self.name = f"quadratic_x{scale:g}" + ("_nan" if nan else "")

    def init(self, key):
        return {"x": jax.random.normal(key, (3,))}

    def loss(self, params, key, batch):
        loss = self.scale * 0.5 * jnp.sum((params["x"] - 1.0) ** 2)
        return loss * jnp.nan if self.nan else loss

    def normalizer(self, loss):
        return loss  # keep the scale: the meta-gradients differ by ``scale``


class ListSource:
    """A task source that cycles through a list of tasks (draw ``i`` is ``tasks[i % n]``)."""

    def __init__(self, tasks):
        self.tasks = tasks
        self.mixture = SimpleNamespace(entries=[None, None], augment=False)

    def draw(self, index):
        task = self.tasks[index % len(self.tasks)]
        return TaskDraw(index, task, {"entry": task.name})


LOPT = LearnableSGD()
THETA = LOPT.init(jax.random.PRNGKey(0))
SETTINGS = dict(num_tasks=2, horizon=6, trunc_length=3, estimator="tbptt", random_offset=False)


def tree_close(a, b, rtol=1e-5):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-7)


def test_combine_by_hand_on_gradients_1000x_apart():
    g1 = {"a": jnp.array([3.0, 4.0]), "b": jnp.array(0.0)}  # norm 5
    g2 = {"a": jnp.array([0.0, 0.0]), "b": jnp.array(-2000.0)}  # norm 2000
    mean, dropped = combine([g1, g2], normalize=True)
    tree_close(mean, {"a": jnp.array([0.3, 0.4]), "b": jnp.array(-0.5)})
    plain, _ = combine([g1, g2], normalize=False)
    tree_close(plain, {"a": jnp.array([1.5, 2.0]), "b": jnp.array(-1000.0)})
    bad = {"a": jnp.array([jnp.nan, 1.0]), "b": jnp.array(1.0)}
    mean, dropped = combine([g1, bad], normalize=True)
    assert dropped == 1
    tree_close(mean, {"a": jnp.array([0.6, 0.8]), "b": jnp.array(0.0)})
    _, dropped = combine([bad, bad], normalize=True)
    assert dropped == 2


def reference_grad(task, slot_key, step_key):
    """TBPTT's meta-gradient of one task alone, with the keys the engine gives its slot."""
    unroll = TruncatedUnroll(task, LOPT, num_tasks=2, horizon=6, trunc_length=3,
                             random_offset=False)
    est = build_estimator("tbptt", unroll)
    state = est.init_state(THETA, slot_key)
    return est.estimate(THETA, state, step_key).grad


def test_two_tasks_1000x_apart_count_equally():
    tasks = [Quadratic(1.0), Quadratic(1000.0)]
    engine = MultiTaskEstimator(ListSource(tasks), LOPT, num_slots=2, lifetime=100, **SETTINGS)
    k0, k1 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    state = engine.init_state(THETA, k0)
    est = engine.estimate(THETA, state, k1)
    refs = [reference_grad(t, jax.random.fold_in(k0, i), jax.random.fold_in(k1, i))
            for i, t in enumerate(tasks)]
    g1, g2 = (float(r["log_lr"]) for r in refs)
    assert abs(g2 / g1) > 100  # the raw meta-gradients are orders of magnitude apart
    expected = 0.5 * (np.sign(g1) + np.sign(g2))  # one scalar: unit length is its sign
    assert float(est.grad["log_lr"]) == pytest.approx(expected, abs=1e-6)
    plain = MultiTaskEstimator(ListSource(tasks), LOPT, num_slots=2, lifetime=100,
                               normalize=False, **SETTINGS)
    raw = plain.estimate(THETA, plain.init_state(THETA, k0), k1)
    assert float(raw.grad["log_lr"]) == pytest.approx(0.5 * (g1 + g2), rel=1e-5)


def test_a_nonfinite_task_is_left_out_and_counted():
    tasks = [Quadratic(1.0), Quadratic(1.0, nan=True)]
    engine = MultiTaskEstimator(ListSource(tasks), LOPT, num_slots=2, lifetime=100,
                                normalize=False, **SETTINGS)
    k0, k1 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    est = engine.estimate(THETA, engine.init_state(THETA, k0), k1)
    assert est.metrics["tasks_nonfinite"] == 1.0
    ref = reference_grad(tasks[0], jax.random.fold_in(k0, 0), jax.random.fold_in(k1, 0))
    tree_close(est.grad, ref)


def test_slots_are_replaced_after_their_lifetime_and_resume_exactly():
    tasks = [Quadratic(1.0), Quadratic(2.0), Quadratic(3.0)]
    make = lambda: MultiTaskEstimator(  # noqa: E731
        ListSource(tasks), LOPT, num_slots=2, lifetime=2, cache_size=2, **SETTINGS
    )
    engine = make()
    state = engine.init_state(THETA, jax.random.PRNGKey(0))
    assert [s["age"] for s in state["slots"]] == [0, 1]  # staggered
    grads, saved = [], None
    for step in range(5):
        out = engine.estimate(THETA, state, jax.random.PRNGKey(10 + step))
        state = out.state
        grads.append(out.grad)
        if step == 2:
            saved = checkpoint_bytes(state)
    # slot 1 is replaced at steps 1 and 3, slot 0 at steps 2 and 4: draws 2, 3, 4, 5
    assert int(state["next_draw"]) == 6 and [s["draw"] for s in state["slots"]] == [5, 4]
    assert out.metrics["cache_misses"] >= 3 and out.metrics["cache_hits"] >= 1
    # resume from the checkpoint after step 2 with a fresh engine
    from flax import serialization

    raw = serialization.msgpack_restore(saved)["state"]
    fresh = make()
    state = restore_state(fresh.state_template(THETA, raw), raw)
    for step in (3, 4):
        out = fresh.estimate(THETA, state, jax.random.PRNGKey(10 + step))
        state = out.state
        tree_close(out.grad, grads[step], rtol=0)


def test_a_multitask_run_resumes_to_the_same_theta_and_evaluates_held_out(tmp_path, capsys):
    from learnopt.cli import main
    from learnopt.meta.train import MetaTrainConfig, MetaTrainer

    config = MetaTrainConfig(
        lopt="learnable_sgd", estimator="pes", num_tasks=2, horizon=4, trunc_length=2,
        outer_steps=5, checkpoint_every=1, keep_theta_every=2, task_slots=2, task_lifetime=2,
        tasks={"entries": [{"family": "quadratic", "options": {"min_dim": 2, "max_dim": 4}},
                           {"task": "quadratic_d10"}],
               "augment": True},
    )
    full = MetaTrainer(config, tmp_path / "full").run(progress=False)
    MetaTrainer(dataclasses.replace(config, outer_steps=3), tmp_path / "cut").run(progress=False)
    resumed = MetaTrainer(config, tmp_path / "cut").run(progress=False)
    assert resumed["resumed"] and resumed["start_step"] == 3
    assert int(full["state"]["estimator"]["next_draw"]) > 2  # slots were replaced
    tree_close(resumed["state"]["learner"].theta, full["state"]["learner"].theta, rtol=0)
    kept = sorted(p.name for p in (tmp_path / "full" / "thetas").iterdir())
    assert kept == ["theta_0000002.msgpack", "theta_0000004.msgpack"]
    argv = ["meta-eval", "--run", str(tmp_path / "full"), "--draws", "2", "--steps", "5"]
    assert main(argv) == 0
    report = json.loads((tmp_path / "full" / "heldout.json").read_text())
    assert report["steps"] == [0, 2, 4, 5] and len(report["mean"]) == 4
    assert all(np.isfinite(report["mean"])) and len(report["per_task"]) == 2
    assert (tmp_path / "full" / "heldout.png").stat().st_size > 0
    assert main(["meta-eval", "--run", str(tmp_path), "--draws", "1"]) == 2
    assert "not a meta-training run" in capsys.readouterr().err


def test_schedules_set_each_drawn_tasks_horizon_and_truncation():
    from learnopt.meta.schedules import LinearCurriculum, UniformLength

    tasks = [Quadratic(1.0), Quadratic(2.0)]
    engine = MultiTaskEstimator(
        ListSource(tasks), LOPT, num_slots=1, num_tasks=2, estimator="tbptt",
        horizon_schedule=LinearCurriculum(4, 12, 4), trunc_schedule=UniformLength(2, 3),
    )
    state = engine.init_state(THETA, jax.random.PRNGKey(0))
    seen = []
    for step in range(12):  # the slot each outer step used
        state = engine.estimate(THETA, state, jax.random.PRNGKey(step)).state
        slot = state["slots"][0]
        seen.append((int(slot["draw"]), int(slot["horizon"]), int(slot["trunc"])))
    starts = {}
    for draw, horizon, trunc in seen:
        starts.setdefault(draw, (horizon, trunc))
    assert starts[0][0] == 4  # drawn at outer step 0: the curriculum's start
    assert [h for h, _ in starts.values()] == sorted(h for h, _ in starts.values())
    assert max(h for h, _ in starts.values()) > 4
    assert all(t in (2, 3) for _, t in starts.values())
    for draw, (horizon, trunc) in list(starts.items())[:-1]:  # each lives ceil(horizon / trunc)
        assert sum(d == draw for d, _, _ in seen) == -(-horizon // trunc)


def test_a_hung_task_is_reported_and_replaced(recwarn):
    import time

    tasks = [Quadratic(1.0), Quadratic(2.0)]
    engine = MultiTaskEstimator(ListSource(tasks), LOPT, num_slots=2, lifetime=100,
                                watchdog={"first_s": 5.0, "floor_s": 0.3}, **SETTINGS)
    state = engine.init_state(THETA, jax.random.PRNGKey(0))
    est = engine.estimator_for(1, 6, 3)
    real, hang = est.estimate, []
    est.estimate = lambda *a: (time.sleep(2.0 if hang else 0.0), real(*a))[1]
    for step in (1, 2, 3):  # the first compiles (first_s), the next set the usual time
        state = engine.estimate(THETA, state, jax.random.PRNGKey(step)).state
    hang.append(True)  # draw 1 now "hangs" for 2 s
    start = time.perf_counter()
    out = engine.estimate(THETA, state, jax.random.PRNGKey(2))
    assert time.perf_counter() - start < 1.9  # abandoned at the 0.3 s floor, not waited for
    assert out.metrics["tasks_hung"] == 1.0
    assert [int(s["draw"]) for s in out.state["slots"]] == [0, 2]  # a fresh draw took over
    assert any("quadratic_x2" in str(w.message) for w in recwarn)
    assert np.isfinite(float(out.grad["log_lr"]))


def test_a_slot_keeps_the_time_scale_it_was_drawn_under_and_restores_to_the_same_task():
    import pathlib

    from flax import serialization

    from learnopt.meta.sources import MixtureEntry, TaskMixture, TaskSource, TimeBudget

    model = pathlib.Path(__file__).resolve().parents[2] / "benchmarks/results/time_model.json"
    mixture = TaskMixture(
        (MixtureEntry(family="velo_mlp", options={"size": "tiny"}),),
        time_budget=TimeBudget(str(model), time_scale=0.5,
                               curriculum={"start": 1.0, "end": 100.0, "num_steps": 10}),
    )
    make = lambda: MultiTaskEstimator(  # noqa: E731
        TaskSource(mixture, 0), LOPT, num_slots=2, num_tasks=2, horizon=4, trunc_length=2,
        estimator="tbptt", random_offset=False,
    )
    engine = make()
    state = engine.init_state(THETA, jax.random.PRNGKey(0))  # draws 0 and 1 at outer step 0
    # slot 1 replaced by draw 4 at outer step 10, the curriculum's end: scale 0.5 * 100
    state["slots"][1] = engine._new_slot(THETA, jax.random.PRNGKey(1), 4, 10, 0)
    assert [s["scale"] for s in state["slots"]] == pytest.approx([0.5, 50.0], rel=1e-6)
    assert [s["draw"] for s in state["slots"]] == [0, 4]
    # draw 4's config depends on the scale: a restore that ignored it would build another task
    end_scale = state["slots"][1]["scale"]
    assert engine.draw(4, end_scale).task.name != engine.draw(4, 0.5).task.name
    raw = serialization.msgpack_restore(checkpoint_bytes(state))["state"]
    fresh = make()
    restored = restore_state(fresh.state_template(THETA, raw), raw)
    for old, new in zip(state["slots"], restored["slots"], strict=True):
        assert float(new["scale"]) == old["scale"]
        before = engine.draw(old["draw"], old["scale"])
        after = fresh.draw(int(new["draw"]), float(new["scale"]))
        assert after.task.name == before.task.name and after.spec == before.spec
        assert after.spec["time_scale"] == old["scale"]
    assert engine.estimator_for(4, 4, 2, scale=state["slots"][1]["scale"]).cache_key == (
        fresh.estimator_for(4, 4, 2, scale=float(restored["slots"][1]["scale"])).cache_key
    )
