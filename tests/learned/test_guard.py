"""The divergence guard: hand-computed rollbacks on a diverging SGD, the blow-up rule's exact
boundary, NaN gradients for every registered architecture, a bitwise no-op on a healthy run,
and the guard inside learnopt.step.inner_step under lax.scan and vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from learnopt import step
from learnopt.learned.guard import GuardState, guarded
from learnopt.learned.registry import get_learned_optimizer, list_learned_optimizers
from learnopt.tasks.fixed.registry import get_task
from learnopt.trees import tree_all_finite


def half_square(params):
    """f(x) = x^2 / 2 summed over the leaf ``x`` (curvature 1: SGD with lr > 2 diverges)."""
    return 0.5 * jnp.sum(jnp.asarray(params["x"], jnp.float32) ** 2)


def trajectory(opt, x0, steps):
    """``(final (params, state), per-step (loss, x, state))`` of ``steps`` scan steps on
    :func:`half_square` from ``x = x0``; jitted once per (opt, shapes)."""

    def body(carry, _):
        params, state = carry
        loss, grads = jax.value_and_grad(half_square)(params)
        updates, state = opt.update(grads, state, params, loss=loss)
        params = optax.apply_updates(params, updates)
        return (params, state), (loss, carry[0]["x"], state)

    params = {"x": jnp.asarray(x0)}
    return jax.lax.scan(body, (params, opt.init(params)), None, length=steps)


run = jax.jit(trajectory, static_argnums=(0, 2))


# -------------------------------------------------------------------------------------------
# Hand-computed: SGD with lr = 3 on x^2/2 maps x -> (1 - 3) x = -2x, the loss times 4 a step.


def test_diverging_sgd_is_rolled_back_and_converges_as_computed_by_hand():
    sgd = optax.sgd(3.0)
    _, (losses, xs, _) = run(sgd, 1.0, 70)
    # Unguarded: x_t = (-2)^t, loss 4^t / 2, until float32 overflows.
    np.testing.assert_array_equal(np.asarray(xs[:10]), (-2.0) ** np.arange(10))
    np.testing.assert_array_equal(np.asarray(losses[:10]), 0.5 * 4.0 ** np.arange(10))
    assert not np.isfinite(float(losses[-1]))

    opt = guarded(sgd, blowup_factor=1.0, shrink=0.5, patience=1)
    (params, state), (losses, xs, states) = run(opt, 1.0, 70)
    # Step 0: L0 = 0.5 passes (threshold 0.5 + 1 * 0.5 = 1), x -> 1 - 3 = -2.
    # Step 1: loss 2 > 1: roll back, update = 1 - (-2) = 3, scale 1 -> 0.5.
    # Step 2 on: x = 1 again and x -> (1 - 0.5 * 3) x = -x / 2, every loss below 1.
    x_hand = [1.0, -2.0, 1.0, -0.5, 0.25, -0.125, 0.0625, -0.03125]
    np.testing.assert_array_equal(np.asarray(xs[:8]), x_hand)
    np.testing.assert_array_equal(np.asarray(losses[:8]), 0.5 * np.square(x_hand))
    np.testing.assert_array_equal(np.asarray(states.scale[:8]), [1.0] + [0.5] * 7)
    np.testing.assert_array_equal(np.asarray(states.num_rollbacks[:8]), [0] + [1] * 7)
    np.testing.assert_array_equal(np.asarray(states.initial_loss[:3]), [0.5] * 3)
    # the snapshot is the last point whose loss passed: x_0, x_0 (step 1 failed), x_2, x_3, ...
    np.testing.assert_array_equal(np.asarray(states.snapshot_params["x"][:5]),
                                  [1.0, 1.0, 1.0, -0.5, 0.25])
    # After 70 steps: x = (-1/2)^68, finite and far below L0; one rollback in all.
    assert float(params["x"]) == 0.5**68
    assert int(state.num_rollbacks) == 1 and float(state.scale) == 0.5
    assert int(state.num_sanitized) == 0


def test_patience_tolerates_high_losses_until_the_patience_th_in_a_row_by_hand():
    # The same SGD (x -> -2x, loss x^2/2) with the default patience 5. L0 = 0.5, threshold 1.
    #  0: L 0.5 passes: snapshot x = 1; x -> -2
    #  1-4: L 2, 8, 32, 128 are high (1st-4th in a row): tolerated, x -> 4, -8, 16, -32;
    #       the snapshot stays x = 1
    #  5: L 512 is the 5th high loss in a row: roll back to x = 1, scale 0.5
    #  6 on: x = 1 passes, x -> -x/2, every loss below 1
    opt = guarded(optax.sgd(3.0))
    (params, state), (losses, xs, states) = run(opt, 1.0, 12)
    x_hand = [1.0, -2.0, 4.0, -8.0, 16.0, -32.0, 1.0, -0.5, 0.25]
    np.testing.assert_array_equal(np.asarray(xs[:9]), x_hand)
    np.testing.assert_array_equal(np.asarray(states.num_high[:8]), [0, 1, 2, 3, 4, 0, 0, 0])
    np.testing.assert_array_equal(np.asarray(states.num_rollbacks[:8]),
                                  [0, 0, 0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(np.asarray(states.scale[:8]), [1, 1, 1, 1, 1, .5, .5, .5])
    np.testing.assert_array_equal(np.asarray(states.snapshot_params["x"][:9]),
                                  [1.0] * 7 + [-0.5, 0.25])
    assert float(params["x"]) == 0.5**6 and int(state.num_rollbacks) == 1

    # A high loss between passing ones resets the count: losses given, gradients 0 (lr 1).
    opt = guarded(optax.sgd(1.0), patience=2)
    params, zero = {"x": jnp.asarray(1.0)}, {"x": jnp.asarray(0.0)}
    state = opt.init(params)
    counts = []
    for loss in (1.0, 3.0, 1.0, 3.0, 3.0, 3.0, np.nan):
        _, state = jax.jit(opt.update)(zero, state, params, loss=jnp.float32(loss))
        counts.append((int(state.num_high), int(state.num_rollbacks)))
    # high, pass (reset), high, high -> the 2nd in a row rolls back (count back to 0), high
    # (1st of a new run), NaN: a rollback at once
    assert counts == [(0, 0), (1, 0), (0, 0), (1, 0), (0, 1), (1, 1), (0, 2)]


def test_momentum_state_is_rolled_back_with_the_parameters():
    # Heavy ball m <- g + 0.5 m, x <- x - 5 * scale * m on x^2/2, by hand from x = 1, m = 0:
    #  0: L 0.5 passes (threshold 1); m = 1, x -> 1 - 5 = -4
    #  1: L 8 fails: x -> 1, m -> 0 (the state at x = 1), scale 0.5
    #  2: L 0.5 passes; m = 1, x -> 1 - 2.5 = -1.5
    #  3: L 1.125 fails: x -> 1, m -> 0 (the state at step 2's x = 1), scale 0.25
    #  4: L 0.5 passes; m = 1, x -> 1 - 1.25 = -0.25
    #  5: L 1/32 passes; m = -0.25 + 0.5 = 0.25, x -> -0.25 - 1.25 * 0.25 = -0.5625
    #  6: L 0.158 passes; m = -0.5625 + 0.125 = -0.4375, x -> -0.5625 + 0.546875 = -1/64
    opt = guarded(optax.sgd(5.0, momentum=0.5), patience=1)
    (params, state), (losses, xs, states) = run(opt, 1.0, 7)
    np.testing.assert_array_equal(np.asarray(xs), [1.0, -4.0, 1.0, -1.5, 1.0, -0.25, -0.5625])
    assert float(params["x"]) == -1.0 / 64
    np.testing.assert_array_equal(np.asarray(states.inner[0].trace["x"]),
                                  [1.0, 0.0, 1.0, 0.0, 1.0, 0.25, -0.4375])
    np.testing.assert_array_equal(np.asarray(states.scale), [1, .5, .5, .25, .25, .25, .25])
    np.testing.assert_array_equal(np.asarray(states.num_rollbacks), [0, 1, 1, 2, 2, 2, 2])
    assert float(losses[-1]) < float(losses[0])


def test_blowup_rule_boundary_for_positive_negative_and_zero_first_losses():
    opt = guarded(optax.sgd(0.0), blowup_factor=2.0, min_loss_scale=1e-3, patience=1)
    params = {"x": jnp.asarray(1.0)}
    grads = {"x": jnp.asarray(1.0)}

    @jax.jit
    def rollbacks(l0, later):
        state = opt.update(grads, opt.init(params), params, loss=l0)[1]
        return state.initial_loss, opt.update(grads, state, params, loss=later)[1].num_rollbacks

    # threshold = L0 + 2 * max(|L0|, 1e-3): 3 L0 for L0 > 0, -L0 (= |L0|) for L0 < 0
    cases = [(2.0, 6.0, 0), (2.0, 6.0001, 1), (2.0, 5.9, 0),  # positive: noise below 3 L0 passes
             (-4.0, 4.0, 0), (-4.0, 4.001, 1), (-4.0, -9.0, 0),  # negative NLL-like losses
             (0.0, 2e-3, 0), (0.0, 2.1e-3, 1),  # L0 = 0: margin 2 * 1e-3, never 0
             (1.0, np.nan, 1), (1.0, np.inf, 1), (1.0, -np.inf, 1)]
    for l0, later, expected in cases:
        first, n = rollbacks(jnp.float32(l0), jnp.float32(later))
        assert float(first) == np.float32(l0)
        assert int(n) == expected, (l0, later)
    # L0 is the first *finite* loss: a NaN first loss is a rollback and records nothing.
    state = opt.update(grads, opt.init(params), params, loss=jnp.nan)[1]
    assert not bool(state.has_initial_loss) and int(state.num_rollbacks) == 1
    state = opt.update(grads, state, params, loss=3.0)[1]
    assert float(state.initial_loss) == 3.0 and int(state.num_rollbacks) == 1


def test_unusable_proposal_is_rejected_before_it_is_applied():
    # The loss passes but x + u overflows float32: update 0, scale halved.
    opt = guarded(optax.sgd(1.0))
    params = {"x": jnp.asarray(3e38, jnp.float32)}
    updates, state = opt.update({"x": jnp.asarray(-3e38)}, opt.init(params), params, loss=1.0)
    assert float(updates["x"]) == 0.0
    assert int(state.num_rollbacks) == 1 and float(state.scale) == 0.5

    # An inner state that would turn NaN (log(-1)) is not accepted; the old state stays.
    def nan_state_update(updates, state, params=None):
        return updates, jnp.log(state - 1.0)

    bad = guarded(optax.GradientTransformation(lambda p: jnp.zeros(()), nan_state_update))
    params = {"x": jnp.asarray([1.0, 2.0])}
    updates, state = bad.update({"x": jnp.ones(2)}, bad.init(params), params, loss=1.0)
    np.testing.assert_array_equal(np.asarray(updates["x"]), [0.0, 0.0])
    assert float(state.inner) == 0.0 and int(state.num_rollbacks) == 1


def test_counters_accumulate_and_saturate_and_buffers_can_be_donated():
    opt = guarded(optax.sgd(0.1))
    params = {"x": jnp.ones(3), "y": jnp.ones(())}
    grads = {"x": jnp.asarray([jnp.nan, 1.0, -jnp.inf]), "y": jnp.asarray(jnp.inf)}

    def step_fn(params, state):
        updates, state = opt.update(grads, state, params, loss=half_square(params))
        return optax.apply_updates(params, updates), state

    # donating both: the snapshot must not alias the parameters' buffers
    donated = jax.jit(step_fn, donate_argnums=(0, 1))
    state = opt.init(params)
    for _ in range(3):
        params, state = donated(params, state)
    assert int(state.num_sanitized) == 9 and int(state.num_rollbacks) == 0
    # only x[1] moved: 1 - 0.1 per step, the sanitised elements got a zero gradient
    np.testing.assert_allclose(np.asarray(params["x"]), [1.0, 0.7, 1.0], rtol=1e-6)
    assert float(params["y"]) == 1.0
    full = state._replace(num_sanitized=jnp.asarray(2**31 - 2, jnp.int32))
    assert int(jax.jit(step_fn)(params, full)[1].num_sanitized) == 2**31 - 1


# -------------------------------------------------------------------------------------------
# One NaN gradient element, every registered architecture.

NAN_PARAMS = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.full((4,), 0.1),
              "s": jnp.asarray(0.3)}
NAN_GRADS = jax.tree.map(lambda p: 0.5 * p + 0.01, NAN_PARAMS)
NAN_GRADS["w"] = NAN_GRADS["w"].at[1, 2].set(jnp.nan)
# What one such step does to the unguarded optimizers (observed, asserted so that a change
# shows): every update has a NaN (the NaN element's own update at least) and every
# architecture with accumulators keeps the NaN in its state; learnable_sgd has no state.
UNGUARDED_STATE_POISONED = {"small_fc_lopt": True, "fc_lopt": True, "nn_adam": True,
                            "rnn_fc_lopt": True, "hierarchical_rnn": True, "velo": True,
                            "velo_small": True, "learnable_sgd": False,
                            "learnable_sgdm": True, "learnable_adam": True}


@pytest.mark.parametrize("name", [name for name, _ in list_learned_optimizers()])
def test_nan_gradient_element_never_reaches_the_state_of_any_architecture(name):
    assert name in UNGUARDED_STATE_POISONED, "a new architecture: record its behaviour"
    lopt = get_learned_optimizer(name)
    opt = lopt.optimizer(lopt.init(jax.random.PRNGKey(0)), 100)
    extra = {"loss": jnp.float32(1.0), "valid_loss": jnp.float32(1.0)}

    safe = guarded(opt)
    plain_step = jax.jit(lambda g: opt.update(g, opt.init(NAN_PARAMS), NAN_PARAMS, **extra))
    u, s = plain_step(NAN_GRADS)
    cu, cs = plain_step(jax.tree.map(jnp.nan_to_num, NAN_GRADS))  # the NaN element as a 0
    gu, gs = jax.jit(lambda: safe.update(NAN_GRADS, safe.init(NAN_PARAMS), NAN_PARAMS, **extra))()
    assert not bool(tree_all_finite(u))
    assert bool(tree_all_finite(s)) != UNGUARDED_STATE_POISONED[name]
    assert bool(tree_all_finite(gu)) and bool(tree_all_finite(gs))
    assert int(gs.num_sanitized) == 1 and int(gs.num_rollbacks) == 0
    assert float(gs.scale) == 1.0 and float(gs.initial_loss) == 1.0
    # the guarded step is the wrapped step on the sanitised gradient
    for a, b in zip(jax.tree.leaves((gu, gs.inner)), jax.tree.leaves((cu, cs)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


# -------------------------------------------------------------------------------------------
# No-op when healthy; dtypes, empty trees, vmap.


A = jnp.arange(12.0, dtype=jnp.float32).reshape(3, 4) / 12.0
QPARAMS = {"w": jnp.full((4, 4), 0.5, jnp.float32), "b": jnp.zeros(4, jnp.float32)}


def least_squares(params):
    """Mean squared error of a 4->4 linear map on 3 fixed inputs (minimum 0 is reachable)."""
    return jnp.mean((A @ params["w"] + params["b"] - jnp.array([1.0, -1.0, 0.5, 2.0])) ** 2)


def eager_run(opt, steps):
    """Per-step losses, final params and state of ``steps`` op-by-op (unjitted) steps."""
    params, state, losses = QPARAMS, opt.init(QPARAMS), []
    for _ in range(steps):
        loss, grads = jax.value_and_grad(least_squares)(params)
        updates, state = opt.update(grads, state, params, loss=loss)
        params = optax.apply_updates(params, updates)
        losses.append(np.asarray(loss))
    return np.asarray(losses), params, state


def test_healthy_run_is_unchanged():
    adam = optax.adam(0.05)
    l_plain, p_plain, s_plain = eager_run(adam, 50)
    l_safe, p_safe, s_safe = eager_run(guarded(adam), 50)
    assert l_plain[-1] < 0.05 * l_plain[0]  # it trains, and never above L0
    # op by op the guard's arithmetic is the identity: x * 1.0, where(True, x, .)
    np.testing.assert_array_equal(l_safe, l_plain)
    for a, b in zip(jax.tree.leaves((p_safe, s_safe.inner)), jax.tree.leaves((p_plain, s_plain)),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(s_safe.num_rollbacks) == 0 and int(s_safe.num_sanitized) == 0
    assert float(s_safe.scale) == 1.0 and float(s_safe.initial_loss) == l_plain[0]
    # jitted, XLA fuses the two programs differently: equal to float32 rounding
    (p_jit, _), (l_jit, _, s_jit) = jax.jit(lambda: scan_guarded(adam, 50))()
    np.testing.assert_allclose(np.asarray(l_jit), l_plain, rtol=1e-6, atol=1e-7)
    for a, b in zip(jax.tree.leaves(p_jit), jax.tree.leaves(p_plain), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    assert int(s_jit.num_rollbacks[-1]) == 0


def scan_guarded(opt, steps):
    """:func:`eager_run` of ``guarded(opt)`` as one lax.scan."""
    opt = guarded(opt)

    def body(carry, _):
        params, state = carry
        loss, grads = jax.value_and_grad(least_squares)(params)
        updates, state = opt.update(grads, state, params, loss=loss)
        return (optax.apply_updates(params, updates), state), (loss, None, state)

    return jax.lax.scan(body, (QPARAMS, opt.init(QPARAMS)), None, length=steps)


def test_bfloat16_rollback_is_exact_under_vmap_and_empty_trees_pass():
    opt = guarded(optax.sgd(3.0), patience=1)
    x0 = jnp.asarray([[1.0, 0.5], [3.0, -0.25]], jnp.bfloat16)  # two runs of a 2-vector
    (params, state), (losses, xs, states) = jax.jit(
        jax.vmap(lambda x: trajectory(opt, x, 6)))(x0)
    assert params["x"].dtype == jnp.bfloat16
    for i in range(2):
        # x0, -2 x0 (fails), x0 exactly again, then x -> -x / 2 (all exact in bfloat16)
        expected = np.asarray(x0[i], np.float32)[None] * np.array([1, -2, 1, -.5, .25, -.125])[
            :, None]
        np.testing.assert_array_equal(np.asarray(xs[i], np.float32), expected)
        np.testing.assert_array_equal(np.asarray(states.num_rollbacks[i]), [0, 1, 1, 1, 1, 1])
        _, (single, _, _) = run(opt, x0[i], 6)
        np.testing.assert_array_equal(np.asarray(losses[i]), np.asarray(single))

    empty = guarded(optax.adam(0.1))
    updates, state = jax.jit(lambda s: empty.update({}, s, {}, loss=2.0))(empty.init({}))
    assert updates == {} and float(state.initial_loss) == 2.0
    assert int(state.num_sanitized) == 0 and int(state.num_rollbacks) == 0


# -------------------------------------------------------------------------------------------
# Inside learnopt.step.inner_step.


def inner_run(task, opt, key, steps):
    """Losses of ``steps`` inner steps from ``task.init(key)`` in a lax.scan, and the final
    train state."""

    def body(state, k):
        batch, valid = step.sample_batches(task, opt, k)
        return step.inner_step(task, opt, state, batch, k, valid)

    state = step.init_train_state(task, opt, task.init(key))
    return jax.lax.scan(body, state, jax.random.split(key, steps))


def test_guard_inside_inner_step_scan_on_quadratic_d10():
    task = get_task("quadratic_d10")  # 0.5 ||Ax - b||^2, curvatures up to 1: lr 3 diverges
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    sgd = optax.sgd(3.0)
    final_loss = lambda st: jax.vmap(lambda p: task.loss(p, None, {}))(st.params)
    plain_state, plain = jax.jit(jax.vmap(lambda k: inner_run(task, sgd, k, 60)))(keys)
    assert np.all(~np.isfinite(np.asarray(final_loss(plain_state))) |
                  (np.asarray(final_loss(plain_state)) > 1e6 * np.asarray(plain[:, 0])))
    opt = guarded(sgd, patience=1)
    state, losses = jax.jit(jax.vmap(lambda k: inner_run(task, opt, k, 60)))(keys)
    end = np.asarray(final_loss(state))
    assert np.all(np.isfinite(np.asarray(losses))) and np.all(np.isfinite(end))
    assert np.all(end < np.asarray(losses[:, 0]))
    guard = state.opt_state
    # each loss above the threshold 2 L0 (f = 1) is one rollback, and there were some
    above = np.sum(np.asarray(losses) > 2.0 * np.asarray(losses[:, :1]), axis=1)
    np.testing.assert_array_equal(np.asarray(guard.num_rollbacks), above)
    assert np.all(above >= 1)
    np.testing.assert_array_equal(np.asarray(guard.scale),
                                  0.5 ** np.asarray(guard.num_rollbacks))
    np.testing.assert_array_equal(np.asarray(guard.initial_loss), np.asarray(losses[:, 0]))


def test_guard_keeps_declaring_what_the_wrapped_optimizer_reads():
    lopt = get_learned_optimizer("rnn_fc_lopt")
    rnn = lopt.optimizer(lopt.init(jax.random.PRNGKey(0)), 10)
    assert step.reads_extra_args(guarded(rnn)) == ("loss", "valid_loss")
    assert step.reads_extra_args(guarded(optax.adam(0.1))) == ("loss",)

    def echo_update(updates, state, params=None, *, valid_loss=None, **extra):
        del state, params, extra  # records the valid_loss it was given
        return jax.tree.map(lambda g: -0.1 * g, updates), jnp.asarray(valid_loss, jnp.float32)

    echo = step.declare_extra_args(optax.GradientTransformationExtraArgs(
        lambda p: jnp.zeros((), jnp.float32), echo_update), ("valid_loss",))
    opt = guarded(echo)
    task = get_task("quadratic_d10")
    state, losses = jax.jit(lambda k: inner_run(task, opt, k, 3))(jax.random.PRNGKey(1))
    # the last step's valid_loss is the loss at that step's parameters (no data: same loss)
    np.testing.assert_allclose(float(state.opt_state.inner), float(losses[-1]), rtol=1e-6)
    with pytest.raises(ValueError, match="reads valid_loss"):
        st = step.init_train_state(task, opt, task.init(jax.random.PRNGKey(0)))
        step.inner_step(task, opt, st, {}, jax.random.PRNGKey(0))


def test_missing_loss_or_params_and_bad_settings_raise():
    opt = guarded(optax.adam(0.1))
    params = {"x": jnp.ones(2)}
    state = opt.init(params)
    assert isinstance(state, GuardState)
    with pytest.raises(ValueError, match="needs the loss at the current parameters"):
        opt.update(params, state, params)
    with pytest.raises(ValueError, match="inner_step"):
        opt.update(params, state, params, valid_loss=1.0)
    with pytest.raises(ValueError, match="needs the current parameters"):
        opt.update(params, state, loss=1.0)
    with pytest.raises(ValueError, match="scalar"):
        opt.update(params, state, params, loss=jnp.ones(2))
    for bad in ({"shrink": 1.0}, {"shrink": 0.0}, {"blowup_factor": 0.0},
                {"min_loss_scale": 0.0}, {"patience": 0}, {"patience": 1.5},
                {"patience": True}):
        with pytest.raises(ValueError):
            guarded(optax.adam(0.1), **bad)
