"""The one inner step: every caller (plain training, benchmark curves, the meta-training unroll,
the learned-optimizer-training task) trains the same trajectory and passes the same extra
arguments to every learned optimizer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from learnopt import step, training
from learnopt.bench.curves import loss_curves
from learnopt.learned.base import LearnedOptimizer
from learnopt.learned.registry import LEARNED, get_learned_optimizer
from learnopt.meta.unroll import TruncatedUnroll
from learnopt.tasks.base import Task, no_data
from learnopt.tasks.families import lopt as lopt_family

STEPS = 3
SHAPES = {"a": (), "b": (3,), "c": (2, 3), "d": (2, 1, 2, 3)}  # ranks 0, 1, 2 and 4


class FixedQuadratic(Task):
    """``sum_k 0.5 * w_k * ||x_k - c_k||^2`` over tensors of rank 0, 1, 2 and 4, started at a
    fixed point (the key is ignored), so that every caller starts from the same parameters."""

    name = "fixed_quadratic"
    datasets = no_data()

    def init(self, key):
        del key
        return {k: jnp.full(s, 1.0 + i, jnp.float32) for i, (k, s) in enumerate(SHAPES.items())}

    def loss(self, params, key, batch):
        del key, batch
        terms = [
            0.5 * (i + 1) * jnp.sum((params[k] - 0.1 * i) ** 2) for i, k in enumerate(SHAPES)
        ]
        return sum(terms)


class Recording(LearnedOptimizer):
    """A learned optimizer that records, at trace time, the extra arguments its update gets."""

    def __init__(self, inner: LearnedOptimizer):
        self.inner = inner
        self.name = inner.name
        self.seen: list[tuple[str, ...]] = []

    def init(self, key):
        return self.inner.init(key)

    def optimizer(self, theta, num_steps):
        opt = self.inner.optimizer(theta, num_steps)

        def update(grads, state, params=None, **extra):
            self.seen.append(tuple(sorted(extra)))
            return opt.update(grads, state, params, **extra)

        wrapped = optax.GradientTransformationExtraArgs(opt.init, update)
        return step.declare_extra_args(wrapped, step.reads_extra_args(opt))


def four_callers(lopt: LearnedOptimizer, theta):
    """Loss before each update and the final parameters, from each of the four callers."""
    task = FixedQuadratic()
    out = {}

    result = training.train(task, lopt.optimizer(theta, STEPS), STEPS, progress=False)
    out["training"] = (result.train_loss, result.params)

    losses, params = loss_curves(
        task, lambda h: lopt.optimizer(theta, STEPS), jnp.zeros(1), [0], STEPS
    )
    out["curves"] = (losses[0, 0], jax.tree_util.tree_map(lambda x: x[0, 0], params))

    unroll = TruncatedUnroll(
        task, lopt, num_tasks=1, horizon=STEPS, trunc_length=STEPS, random_offset=False
    )
    state, record = unroll.unroll(theta, unroll.init_state(theta, jax.random.PRNGKey(0)),
                                  jax.random.PRNGKey(1))
    out["unroll"] = (record.raw_losses[:, 0], jax.tree_util.tree_map(lambda x: x[0], state.params))
    return task, out


def lopt_task_loss(task: FixedQuadratic, lopt: LearnedOptimizer, theta):
    """The lopt family's meta-loss of one inner run of ``task`` trained by ``lopt``."""
    key = jax.random.PRNGKey(0)
    return lopt_family.unrolled_meta_loss(task, lopt, theta, STEPS, key, {}, valid_batches={})


def assert_same(out, task, lopt_loss):
    ref_losses, ref_params = out["training"]
    for name, (losses, params) in out.items():
        np.testing.assert_allclose(np.asarray(losses), ref_losses, rtol=2e-5, err_msg=name)
        for k in SHAPES:
            np.testing.assert_allclose(params[k], ref_params[k], rtol=2e-5, atol=1e-6,
                                       err_msg=f"{name} {k}")
    # the lopt family scores the losses after updates 1..T: its own trajectory must match
    after = np.append(ref_losses[1:], float(task.loss(ref_params, None, {})))
    expected = np.mean(np.asarray(task.normalizer(jnp.asarray(after))))
    np.testing.assert_allclose(float(lopt_loss), expected, rtol=2e-5)


def test_four_callers_train_the_same_trajectory_with_adam():
    class AdamLOpt(LearnedOptimizer):
        def init(self, key):
            return {"lr": jnp.asarray(0.1)}

        def optimizer(self, theta, num_steps):
            return optax.adam(theta["lr"])

    lopt = AdamLOpt()
    theta = lopt.init(None)
    task, out = four_callers(lopt, theta)
    assert_same(out, task, lopt_task_loss(task, lopt, theta))
    # and by hand: Adam's first step moves every coordinate by lr (sign of the gradient)
    ref_params = out["training"][1]
    p1 = training.train(task, optax.adam(0.1), 1, progress=False).params
    np.testing.assert_allclose(p1["d"], 4.0 - 0.1, rtol=1e-6)
    assert float(jnp.max(ref_params["d"])) < 4.0 - 0.25


# velo at paper size (2.3M meta-parameters) is velo_small's code with a larger LSTM
ARCHITECTURES = [name for name in LEARNED if name != "velo"]


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_every_learned_optimizer_runs_under_every_caller_with_the_same_extra_args(name):
    lopt = Recording(get_learned_optimizer(name))
    theta = lopt.init(jax.random.PRNGKey(0))
    task, out = four_callers(lopt, theta)
    lopt_loss = lopt_task_loss(task, lopt, theta)
    assert_same(out, task, lopt_loss)
    expected = tuple(sorted({"loss", *step.reads_extra_args(lopt.optimizer(theta, STEPS))}))
    traced = set(lopt.seen)
    assert traced == {expected}, f"{name}: callers passed {traced}, expected {expected}"


def test_inner_step_refuses_an_optimizer_that_reads_valid_loss_without_a_batch():
    task = FixedQuadratic()
    opt = step.declare_extra_args(optax.sgd(0.1), ("loss", "valid_loss"))
    state = step.init_train_state(task, opt, task.init(None))
    with pytest.raises(ValueError, match="valid_loss"):
        step.inner_step(task, opt, state, {}, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="unknown extra arguments"):
        step.declare_extra_args(optax.sgd(0.1), ("los",))


def test_velo_and_rnn_fc_lopt_name_the_loss_they_need():
    task = FixedQuadratic()
    params = task.init(None)
    grads = jax.grad(task.loss)(params, None, {})
    for name in ("velo_small", "rnn_fc_lopt"):
        lopt = get_learned_optimizer(name)
        opt = lopt.optimizer(lopt.init(jax.random.PRNGKey(0)), 10)
        with pytest.raises(ValueError, match="loss"):
            opt.update(grads, opt.init(params), params)


def test_learnopt_train_gives_a_delayed_task_the_previous_steps_gradient(tmp_path):
    """``learnopt train --augment delay=1``: SGD's step t uses the gradient at x_{t-1}."""
    import json

    from learnopt.cli import main
    from learnopt.tasks.fixed.registry import get_task

    lr, steps = 0.3, 6
    argv = ["train", "--task", "quadratic_d10", "--optimizer", "sgd", "--lr", str(lr),
            "--steps", str(steps)]
    assert main([*argv, "--augment", "delay=1", "--out", str(tmp_path / "delay")]) == 0
    assert main([*argv, "--out", str(tmp_path / "plain")]) == 0

    def logged(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return np.array([json.loads(line)["train_loss"] for line in lines])

    task = get_task("quadratic_d10")
    x = task.init(jax.random.split(jax.random.PRNGKey(0))[0])  # training.train's init, seed 0
    grad = jax.value_and_grad(task.loss)
    previous, expected = x, []
    for _ in range(steps):  # x_{t+1} = x_t - lr * grad(x_{t-1}); the loss logged is L(x_{t-1})
        loss, g = grad(previous, None, {})
        expected.append(float(loss))
        previous, x = x, jax.tree_util.tree_map(lambda p, d: p - lr * d, x, g)
    np.testing.assert_allclose(logged("delay"), expected, rtol=1e-5)
    assert logged("delay")[0] == logged("delay")[1]  # steps 0 and 1 both see x_0
    assert not np.allclose(logged("plain"), expected, rtol=1e-3)
    summary = json.loads((tmp_path / "delay" / "summary.json").read_text())
    assert summary["augment"] == "delay=1"


def test_learnopt_train_names_a_bad_augmentation(capsys):
    from learnopt.cli import main

    argv = ["train", "--task", "quadratic_d10", "--optimizer", "sgd", "--steps", "2"]
    assert main([*argv, "--augment", "delay=soon"]) == 2
    assert "delay takes int" in capsys.readouterr().err
    assert main([*argv, "--augment", "lag=1"]) == 2
    assert "expected FIELD=VALUE with FIELD one of" in capsys.readouterr().err
