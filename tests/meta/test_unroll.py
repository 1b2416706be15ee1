"""The truncated unroll: offsets, resets at the horizon, resumability, keys, remat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from learnopt.learned.learnable import LearnableSGD
from learnopt.meta.unroll import TruncatedUnroll, UnrollOutput, meta_loss, meta_loss_per_task
from learnopt.tasks.base import ArraySplit, Datasets, Task
from learnopt.tasks.families.quadratic import QuadraticConfig, QuadraticTask

H = 20
LR = 0.3
TASK = QuadraticTask(QuadraticConfig(dim=5, min_singular=0.3, max_singular=1.5, seed=0))
LOPT = LearnableSGD(initial_lr=LR)
THETA = LOPT.init(jax.random.PRNGKey(0))


def _make(num_tasks, trunc_length, **kw):
    u = TruncatedUnroll(TASK, LOPT, num_tasks=num_tasks, horizon=H, trunc_length=trunc_length, **kw)
    return u, jax.jit(u.init_state), jax.jit(u.unroll, static_argnames="theta_batched")


def _task_keys(key, trunc_length, num_tasks):
    """The documented key derivation: [T, N, 3] keys (init, data, loss) per step and task."""
    per_task = jax.vmap(lambda k: jax.random.split(k, 3))
    return jax.vmap(lambda k: per_task(jax.random.split(k, num_tasks)))(
        jax.random.split(key, trunc_length)
    )


def test_random_offsets_differ_per_task_and_params_are_fresh():
    u, init, _ = _make(64, 5)
    state = init(THETA, jax.random.PRNGKey(1))
    steps = np.asarray(state.step)
    assert steps.min() >= 0 and steps.max() < H
    assert len(np.unique(steps)) >= 12  # 64 draws from 20 values
    # Parameters are freshly initialised whatever the offset: they are N(0, 1) draws.
    x = np.asarray(state.params["x"])
    assert x.shape == (64, 5)
    assert abs(x.mean()) < 0.2 and 0.8 < x.std() < 1.2
    _, init0, _ = _make(64, 5, random_offset=False)
    np.testing.assert_array_equal(np.asarray(init0(THETA, jax.random.PRNGKey(1)).step), 0)


def test_reset_exactly_at_horizon():
    n, t = 3, 5
    _, init, unroll = _make(n, t, random_offset=False)
    state = init(THETA, jax.random.PRNGKey(2))
    outs = []
    for i in range(4):  # 4 x 5 steps: one whole run, not yet reset
        state, out = unroll(THETA, state, jax.random.PRNGKey(10 + i))
        outs.append(out)
    np.testing.assert_array_equal(np.asarray(state.step), H)  # finished, resets lazily
    steps = np.concatenate([np.asarray(o.step) for o in outs])
    np.testing.assert_array_equal(steps, np.tile(np.arange(H)[:, None], (1, n)))
    assert not np.any(np.concatenate([np.asarray(o.is_reset) for o in outs]))
    final_params = state.params

    key = jax.random.PRNGKey(99)
    state, out = unroll(THETA, state, key)
    np.testing.assert_array_equal(np.asarray(out.step), np.tile(np.arange(t)[:, None], (1, n)))
    np.testing.assert_array_equal(np.asarray(out.is_reset[0]), True)
    np.testing.assert_array_equal(np.asarray(out.is_reset[1:]), False)
    np.testing.assert_array_equal(np.asarray(state.step), t)
    # The reset step re-initialises from the step's init key: its loss is the loss of
    # task.init(k_init), and the next loss is one SGD step from there.
    keys = _task_keys(key, t, n)
    for i in range(n):
        x0 = TASK.init(keys[0, i, 0])
        assert not np.allclose(np.asarray(x0["x"]), np.asarray(final_params["x"][i]))
        l0, g0 = jax.value_and_grad(TASK.loss)(x0, None, {})
        x1 = {"x": x0["x"] - jnp.exp(THETA["log_lr"]) * g0["x"]}
        np.testing.assert_allclose(float(out.losses[0, i]), float(l0), rtol=1e-6)
        np.testing.assert_allclose(
            float(out.losses[1, i]), float(TASK.loss(x1, None, {})), rtol=1e-5
        )


def test_each_task_resets_when_its_step_reaches_horizon():
    n, t = 16, 5
    _, init, unroll = _make(n, t)
    state = init(THETA, jax.random.PRNGKey(3))
    offsets = np.asarray(state.step)
    prev = offsets.copy()
    num_resets = np.zeros(n, int)
    for i in range(5):
        state, out = unroll(THETA, state, jax.random.PRNGKey(20 + i))
        for s, r in zip(np.asarray(out.step), np.asarray(out.is_reset), strict=True):
            np.testing.assert_array_equal(r, prev == H)
            np.testing.assert_array_equal(s, np.where(r, 0, prev))
            num_resets += r
            prev = s + 1
        np.testing.assert_array_equal(np.asarray(state.step), prev)
    # Steps 0..24 from offsets in [0, 20): resets at steps H - offset, 2H - offset, ...
    np.testing.assert_array_equal(num_resets, (24 - (H - offsets)) // H + 1)


def test_truncations_resume_the_same_run():
    # The quadratic takes no data, so 4 truncations of 5 steps are one unroll of 20.
    _, init5, unroll5 = _make(4, 5, random_offset=False)
    _, _, unroll20 = _make(4, 20, random_offset=False)
    state = init5(THETA, jax.random.PRNGKey(4))
    _, full = unroll20(THETA, state, jax.random.PRNGKey(5))
    parts = []
    for i in range(4):
        state, out = unroll5(THETA, state, jax.random.PRNGKey(6 + i))
        parts.append(np.asarray(out.losses))
    np.testing.assert_allclose(np.concatenate(parts), np.asarray(full.losses), rtol=1e-6)
    # Training makes progress: the mean loss of the last 5 steps is below the first 5.
    assert np.all(parts[-1].mean(0) < 0.5 * parts[0].mean(0))


def test_checkpoint_and_task_map_do_not_change_results():
    key = jax.random.PRNGKey(7)
    results = {}
    for name, kw in {
        "remat": {},
        "no_remat": {"checkpoint": False},
        "map": {"task_map": "map"},
    }.items():
        u, init, _ = _make(3, 8, **kw)
        state = init(THETA, jax.random.PRNGKey(8))

        def loss_fn(theta, u=u, state=state):
            out = u.unroll(theta, state, key)[1]
            return meta_loss(out), out.losses

        (value, losses), grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(THETA)
        results[name] = (np.asarray(losses), float(value), float(grad["log_lr"]))
    for name in ("no_remat", "map"):
        np.testing.assert_allclose(results[name][0], results["remat"][0], rtol=1e-6)
        np.testing.assert_allclose(results[name][1], results["remat"][1], rtol=1e-6)
        np.testing.assert_allclose(results[name][2], results["remat"][2], rtol=1e-5)
    assert results["remat"][2] < 0  # a larger learning rate helps on this quadratic


class _DataTask(Task):
    """A task whose loss reads only its batch, so the loss shows which batch was drawn."""

    name = "data_probe"

    def __init__(self):
        x = np.random.default_rng(0).normal(size=(256, 2)).astype(np.float32)
        split = ArraySplit({"x": x}, batch_size=4)
        self.datasets = Datasets(split, split, split, split)

    def init(self, key):
        return {"w": jax.random.normal(key, (2,))}

    def loss(self, params, key, batch):
        return jnp.mean(batch["x"]) + 0.0 * jnp.sum(params["w"])


@pytest.mark.parametrize("task_map", ["vmap", "map"])
def test_antithetic_members_see_identical_batches(task_map):
    n, t = 6, 7
    u = TruncatedUnroll(_DataTask(), LOPT, n, horizon=5, trunc_length=t, task_map=task_map)
    unroll = jax.jit(u.unroll, static_argnames="theta_batched")
    state = u.init_state(THETA, jax.random.PRNGKey(0))
    eps = 0.5 * jax.random.normal(jax.random.PRNGKey(1), (n,))
    plus = {"log_lr": THETA["log_lr"] + eps}
    minus = {"log_lr": THETA["log_lr"] - eps}
    key = jax.random.PRNGKey(2)
    s_plus, o_plus = unroll(plus, state, key, theta_batched=True)
    s_minus, o_minus = unroll(minus, state, key, theta_batched=True)
    np.testing.assert_array_equal(np.asarray(o_plus.losses), np.asarray(o_minus.losses))
    np.testing.assert_array_equal(np.asarray(o_plus.is_reset), np.asarray(o_minus.is_reset))
    assert np.any(np.asarray(o_plus.is_reset))  # horizon 5 < 7 steps: resets happened
    # ... and the reset re-initialisations agree too.
    np.testing.assert_array_equal(np.asarray(s_plus.params["w"]), np.asarray(s_minus.params["w"]))
    # The batches are not all the same: they differ across steps and tasks, and with the key.
    losses = np.asarray(o_plus.losses)
    assert len(np.unique(losses)) == losses.size
    _, o_other = unroll(plus, state, jax.random.PRNGKey(3), theta_batched=True)
    assert not np.any(np.asarray(o_other.losses) == losses)


def test_theta_batched_shape_is_checked():
    u = TruncatedUnroll(TASK, LOPT, num_tasks=4, horizon=H, trunc_length=2)
    state = u.init_state(THETA, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="leading axis of num_tasks=4"):
        u.unroll({"log_lr": jnp.zeros(3)}, state, jax.random.PRNGKey(1), theta_batched=True)
    with pytest.raises(ValueError, match="horizon must be a positive int"):
        TruncatedUnroll(TASK, LOPT, num_tasks=4, horizon=0, trunc_length=2)
    with pytest.raises(ValueError, match="task_map"):
        TruncatedUnroll(TASK, LOPT, num_tasks=4, horizon=4, trunc_length=2, task_map="pmap")


def test_meta_loss_averages_valid_steps_per_task():
    losses = jnp.array([[1.0, 10.0], [3.0, 20.0], [5.0, 99.0]])
    mask = jnp.array([[True, True], [True, True], [True, False]])
    zeros = jnp.zeros((3, 2), bool)
    out = UnrollOutput(losses, losses, mask, zeros, jnp.zeros((3, 2), jnp.int32))
    np.testing.assert_allclose(np.asarray(meta_loss_per_task(out)), [3.0, 15.0])
    np.testing.assert_allclose(float(meta_loss(out)), 9.0)


def test_resets_built_before_the_scan_equal_resets_built_in_the_step(monkeypatch):
    # Two code paths: the fresh states of a truncation built once before the scan (the
    # default when trunc_length <= horizon), and built inside every step (as when a task can
    # reset more than once). Bitwise equal, with resets at several steps of a truncation.
    from learnopt.learned.learnable import LearnableAdam

    lopt = LearnableAdam()
    theta = lopt.init(jax.random.PRNGKey(0))
    runs = []
    for hoisted in (True, False):
        u = TruncatedUnroll(TASK, lopt, num_tasks=6, horizon=7, trunc_length=5)
        if not hoisted:
            monkeypatch.setattr(u, "_fresh_states", lambda *args: None)
        state = u.init_state(theta, jax.random.PRNGKey(1))
        losses = []
        for i in range(5):
            state, out = u.unroll(theta, state, jax.random.PRNGKey(30 + i))
            losses.append(np.asarray(out.losses))
            assert i == 0 or np.any(out.is_reset)
        runs.append((np.concatenate(losses), jax.tree_util.tree_leaves(state)))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    for a, b in zip(runs[0][1], runs[1][1], strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
