"""hierarchical_rnn (Wichrowska et al. 2017, arXiv:1703.04813): parameter count by hand, RNN
inputs by hand after one and two updates, output = direction x step length, learning-rate dynamics,
attention bookkeeping, rank 0/1/2/4 tensors, jit / vmap, optax usage and meta-gradients."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax_loops import scan_run, train_run

from learnopt.learned.hierarchical_rnn import (
    HierarchicalRNN,
    HierarchicalRNNState,
    gru_num_params,
    timescale_decays,
)

LOPT = HierarchicalRNN()  # attention on (default)
PLAIN = HierarchicalRNN(use_attention=False)

# Tensors of rank 0, 1, 2 and 4.
SHAPES = {"s": (), "v": (3,), "w": (2, 3), "k": (2, 1, 3, 2)}
NUM_ELEMENTS = 1 + 3 + 6 + 12  # 22
KEY = jax.random.PRNGKey(42)
S = 4  # timescales
EPS = 1e-16


def _tree(seed: int, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.normal(size=s) * scale, jnp.float32) for k, s in SHAPES.items()}


PARAMS, G1, G2 = _tree(0), _tree(1), _tree(2, scale=3.0)

# Per-parameter state is flat, tensor after tensor in jax.tree.leaves order (sorted dict keys):
# k -> [0, 12), s -> [12, 13), v -> [13, 16), w -> [16, 22). Tensor-level rows in that order.
ORDER = ("k", "s", "v", "w")
START = {"k": 0, "s": 12, "v": 13, "w": 16}


def _leaf(x, name: str) -> np.ndarray:
    """The slice of a flat per-parameter array that belongs to tensor ``name``, reshaped."""
    x = np.asarray(x, np.float64)
    n = math.prod(SHAPES[name])
    return x[START[name]:START[name] + n].reshape(SHAPES[name] + x.shape[1:])


def _two_steps(lopt: HierarchicalRNN):
    """init_state + two steps (params moved by the first update)."""

    def run(theta, params, g1, g2):
        s0 = lopt.init_state(theta, params, KEY)
        u1, s1, a1 = lopt.step(theta, g1, s0, params)
        p1 = optax.apply_updates(params, u1)
        u2, s2, a2 = lopt.step(theta, g2, s1, p1)
        return s0, (u1, s1, a1), (u2, s2, a2)

    return run


# The shared compiled functions (compiling dominates this file's run time): the plain run, and
# the attention run vmapped over a batch of two problems, so every attention check below also
# checks that the state survives vmap.
RUN_PLAIN = jax.jit(_two_steps(PLAIN))
RUN_ATT = jax.jit(jax.vmap(_two_steps(LOPT)))
INIT = jax.jit(LOPT.init)


def _theta(lopt: HierarchicalRNN, seed: int = 0):
    """``lopt.init``; the plain theta is the attention theta without its attention leaves."""
    theta = INIT(jax.random.PRNGKey(seed))
    if lopt.use_attention:
        return theta
    ro = {k: v for k, v in theta["readout"].items() if k != "w_attn"}
    drop = ("attn_shortcut", "attention_lr_offset", "readout")
    return dict({k: v for k, v in theta.items() if k not in drop}, readout=ro)


def _stack(xs):
    return jax.tree.map(lambda *a: jnp.stack(a), *xs)


def _index(tree, i: int):
    return jax.tree.map(lambda x: x[i], tree)


# Hand-set readouts: decay readout weights zero, so the decay logits are the biases (2.2, 3.2);
# learning-rate change = b_lr = 0.5 everywhere; direction = mean_s m_s (shortcut 1/4 each, RNN
# readout zero), the same for the attention direction; attention log-step offset c = 0.7.
B_LR, C_ATT = 0.5, 0.7


def _hand_theta(lopt: HierarchicalRNN, seed: int = 0):
    theta = _theta(lopt, seed)
    ro = dict(theta["readout"], w_decay=jnp.zeros((10, 2)), b_lr=jnp.asarray(B_LR),
              w_dir=jnp.zeros(10))
    theta = dict(theta, readout=ro, shortcut=jnp.full((S,), 0.25))
    if lopt.use_attention:
        ro["w_attn"] = jnp.zeros(10)
        theta.update(attn_shortcut=jnp.full((S,), 0.25), attention_lr_offset=jnp.asarray(C_ATT))
    return theta


OTHER = (_tree(10), _tree(11), _tree(12, scale=0.01))  # a second problem in the batch


@functools.cache
def _att_batch(swapped: bool = False):
    """Element 0: the hand theta on (PARAMS, G1, G2); element 1: a random theta on OTHER."""
    items = [(_hand_theta(LOPT), PARAMS, G1, G2), (_theta(LOPT, 1),) + OTHER]
    if swapped:
        items = items[::-1]
    return RUN_ATT(*(_stack([it[j] for it in items]) for j in range(4)))


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# Decays of the second step, by hand: sigmoid(b) ** (2 ** -s).
C_G = np.array([_sigmoid(2.2) ** (2.0**-s) for s in range(S)])  # 0.900, 0.949, 0.974, 0.987
C_L = np.array([_sigmoid(3.2) ** (2.0**-s) for s in range(S)])  # 0.961, 0.980, 0.990, 0.995
LR_MOM = _sigmoid(3.2)


def _np(x):
    return np.asarray(x, np.float64)


def _hand_inputs(g1, g2, log_lr0_all, log_lr1_all, log_lr0, log_lr1):
    """Parameter-RNN inputs after one and two updates (Eqs. 1-4, eta_rel), flat, float64."""
    g1, g2 = _np(g1).reshape(-1, 1), _np(g2).reshape(-1, 1)
    # step 1: all decays 0 -> gbar_s = g1, lambda_s = g1^2
    gbar1, lam1 = np.repeat(g1, S, 1), np.repeat(g1**2, S, 1)
    # step 2
    gbar2 = C_G * gbar1 + (1 - C_G) * g2
    lam2 = C_L * lam1 + (1 - C_L) * gbar2**2
    out = []
    for gbar, lam, lr, lr_all in ((gbar1, lam1, log_lr0, log_lr0_all),
                                  (gbar2, lam2, log_lr1, log_lr1_all)):
        m = gbar / np.sqrt(lam + EPS)
        gamma = np.log(lam + EPS) - np.log(lam + EPS).mean(-1, keepdims=True)
        eta_rel = _np(lr).reshape(-1, 1) - np.mean(np.concatenate(
            [_np(x).ravel() for x in lr_all]))
        out.append((gbar, lam, m, gamma, eta_rel))
    return out


# -------------------------------------------------------------------------------------------


def test_meta_parameter_count_by_hand():
    kp, kt, kg = 10, 20, 20
    f = 2 * S + 1  # m_s (4) + gamma_s (4) + eta_rel (1) = 9
    # a GRU with input i and hidden k: gates [x, h] -> 2k (+2k bias), candidate -> k (+k bias)
    param_rnn = (f + kp) * 2 * kp + 2 * kp + (f + kp) * kp + kp  # 19*20+20 + 19*10+10 = 600
    tensor_rnn = (kp + f + kt) * 3 * kt + 3 * kt  # input 10 + 9: 39*60 + 60 = 2400
    global_rnn = (kt + kg) * 3 * kg + 3 * kg  # input 20: 40*60 + 60 = 2460
    bias_maps = (kt * 3 * kp + 3 * kp) + (kg * 3 * kp + 3 * kp) + (kg * 3 * kt + 3 * kt)
    assert bias_maps == 630 + 630 + 1260
    init_states = kp + kt + kg  # 50
    readouts = kp + kp + (kp + 1) + (2 * kp + 2)  # d_theta, d_phi (no bias), d_eta, 2 decays
    assert readouts == 53
    shortcuts = 2 * S  # to d_theta and d_phi
    scalars = 2  # learning-rate momentum logit, attention offset c
    expected = (param_rnn + tensor_rnn + global_rnn + bias_maps + init_states + readouts
                + shortcuts + scalars)
    assert param_rnn == 600 and tensor_rnn == 2400 and global_rnn == 2460
    assert expected == 8093
    assert LOPT.num_meta_params() == 8093
    assert gru_num_params(f, kp) == param_rnn
    # without attention: no w_attn (10), attention shortcut (4) or c (1)
    assert PLAIN.num_meta_params() == 8093 - 10 - 4 - 1 == 8078
    # gradient products add S - 1 = 3 inputs to the parameter and tensor RNNs: 3 * 30 + 3 * 60
    products = HierarchicalRNN(use_grad_products=True)
    assert products.num_inputs == 12 and len(products.input_names) == 12
    assert products.num_meta_params() == 8093 + 3 * 3 * kp + 3 * 3 * kt == 8363
    assert LOPT.input_names == ("m0", "m1", "m2", "m3", "gamma0", "gamma1", "gamma2",
                                "gamma3", "eta_rel")


def test_initial_meta_parameters():
    theta = _theta(LOPT)
    np.testing.assert_allclose(theta["param_rnn"]["b_gates"], 2.2)
    np.testing.assert_allclose(theta["readout"]["b_decay"], [2.2, 3.2])
    np.testing.assert_array_equal(theta["readout"]["w_attn"], theta["readout"]["w_dir"])
    assert not np.any(_np(theta["readout"]["w_lr"])) and float(theta["readout"]["b_lr"]) == 0
    assert float(theta["lr_momentum_logit"]) == pytest.approx(3.2)
    assert float(theta["attention_lr_offset"]) == 1.0
    assert np.all(np.abs(_np(theta["init_tensor_hidden"])) <= 1.0)
    assert abs(float(jnp.mean(theta["shortcut"])) - 0.25) < 0.2
    for lopt in (LOPT, PLAIN):  # the test's theta helper matches init's structure
        assert jax.tree.structure(_theta(lopt)) == jax.tree.structure(
            jax.eval_shape(lopt.init, jax.random.PRNGKey(0)))


def test_initial_learning_rates_and_layout():
    s0 = RUN_PLAIN(_theta(PLAIN), PARAMS, G1, G2)[0]
    assert s0.log_lr.shape == (NUM_ELEMENTS,) and s0.tensor_hidden.shape == (4, 20)
    lr = {k: _leaf(s0.log_lr, k) for k in SHAPES}
    assert np.all(_np(s0.log_lr) >= math.log(1e-6)) and np.all(_np(s0.log_lr) <= math.log(1e-2))
    assert len({round(float(np.mean(x)), 4) for x in lr.values()}) == 4  # per-tensor offsets
    # unflatten gives the documented layout
    views = PLAIN.unflatten(s0.grad_avg + jnp.arange(NUM_ELEMENTS)[:, None], PARAMS)
    for k in SHAPES:
        np.testing.assert_array_equal(views[k], _leaf(jnp.arange(NUM_ELEMENTS), k)[..., None]
                                      + np.zeros(S))
    # key derived from the parameter values when none is given: deterministic, value dependent
    theta = _theta(PLAIN)
    init_lr = jax.jit(lambda p: PLAIN.optimizer(theta, 5).init(p).log_lr)
    a, b, c = init_lr(PARAMS), init_lr(PARAMS), init_lr(G1)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    fixed = HierarchicalRNN(init_lr_range=(1e-3, 1e-3)).optimizer(theta, 5).init(PARAMS)
    np.testing.assert_allclose(fixed.log_lr, math.log(1e-3), rtol=1e-6)


def test_timescale_decays():
    """Eq. 1: each further timescale raises the decay to the power 2^-s (doubles 1/(1-c))."""
    np.testing.assert_allclose(timescale_decays(jnp.array([[2.2]]), S)[0], C_G, rtol=1e-6)
    np.testing.assert_allclose(C_G, [0.9002495, 0.9488148, 0.9740712, 0.9869505], rtol=1e-6)
    one = timescale_decays(jnp.array([[3.2]]), S, multiple=False)[0]  # the reference's default
    np.testing.assert_allclose(one, [LR_MOM] * S, rtol=1e-6)


@pytest.mark.parametrize("name", ["v", "w"])
def test_rnn_inputs_by_hand(name):
    """Momentum per timescale, RMS-scaled gradients, relative log gradient magnitudes and the
    relative log learning rate after one and two updates (a vector and a 2x3 matrix)."""
    theta = _hand_theta(PLAIN)
    s0, (_, s1, a1), (_, s2, a2) = RUN_PLAIN(theta, PARAMS, G1, G2)
    hand = _hand_inputs(G1[name], G2[name], [s0.log_lr], [s1.log_lr], _leaf(s0.log_lr, name),
                        _leaf(s1.log_lr, name))
    n = math.prod(SHAPES[name])
    for (gbar, lam, m, gamma, eta_rel), state, aux in ((hand[0], s1, a1), (hand[1], s2, a2)):
        np.testing.assert_allclose(_leaf(state.grad_avg, name).reshape(n, S), gbar, rtol=1e-5)
        np.testing.assert_allclose(_leaf(state.grad_sq_avg, name).reshape(n, S), lam, rtol=1e-5)
        x = _leaf(aux["inputs"], name).reshape(n, 2 * S + 1)
        np.testing.assert_allclose(x[:, :S], m, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(x[:, S:2 * S], gamma, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(x[:, 2 * S:], eta_rel, rtol=1e-5, atol=1e-5)
        # decays of the next step: logits = readout biases (w_decay = 0)
        np.testing.assert_allclose(_leaf(state.decay_logits, name).reshape(n, 2),
                                   np.tile([2.2, 3.2], (n, 1)), rtol=1e-6)
    # step 1: m = sign(g1), gamma = 0; step 2 by the explicit numbers for element 0
    np.testing.assert_allclose(hand[0][2], np.sign(np.repeat(_np(G1[name]).reshape(-1, 1), S, 1)),
                               rtol=1e-6)
    g1, g2 = float(_np(G1[name]).ravel()[0]), float(_np(G2[name]).ravel()[0])
    gbar = [0.9002495 ** (2.0**-s) * g1 + (1 - 0.9002495 ** (2.0**-s)) * g2 for s in range(S)]
    np.testing.assert_allclose(_leaf(s2.grad_avg, name).reshape(n, S)[0], gbar, rtol=1e-5)
    # the learning-rate state moved by (1 - sigmoid(3.2)) * b_lr, so eta_rel is unchanged
    np.testing.assert_allclose(_np(s1.log_lr), _np(s0.log_lr) + (1 - LR_MOM) * B_LR, rtol=1e-6)


def test_output_is_direction_times_step_length():
    """Eqs. 5, 7-8 with a hand theta: Delta theta = -exp(eta) * d / rms(d), d = mean_s m_s,
    eta = log_lr + b_lr, log_lr <- log_lr + (1 - sigmoid(3.2)) * b_lr."""
    theta = _hand_theta(PLAIN)
    s0, (u1, s1, a1), (u2, s2, a2) = RUN_PLAIN(theta, PARAMS, G1, G2)
    for name in SHAPES:
        g1, g2 = _np(G1[name]).reshape(-1, 1), _np(G2[name]).reshape(-1, 1)
        gbar2 = C_G * g1 + (1 - C_G) * g2
        lam2 = C_L * g1**2 + (1 - C_L) * gbar2**2
        d2 = (gbar2 / np.sqrt(lam2 + EPS)).mean(-1)
        d2 = d2 / np.sqrt(np.mean(d2**2) + EPS)
        lr = _leaf(s0.log_lr, name).ravel()
        step1 = -np.exp(lr + B_LR) * np.sign(g1.ravel())  # d1 = sign(g1), already unit RMS
        step2 = -np.exp(lr + (1 - LR_MOM) * B_LR + B_LR) * d2
        np.testing.assert_allclose(_np(u1[name]).ravel(), step1, rtol=1e-5)
        np.testing.assert_allclose(_np(u2[name]).ravel(), step2, rtol=1e-5)
        np.testing.assert_allclose(_leaf(a2["eta"], name).ravel(),
                                   lr + (1 - LR_MOM) * B_LR + B_LR, rtol=1e-6)
        np.testing.assert_allclose(_leaf(s2.log_lr, name).ravel(), lr + 2 * (1 - LR_MOM) * B_LR,
                                   rtol=1e-6)
        # unit RMS direction per tensor: |step| / exp(eta) has mean square 1
        ratio = _np(u2[name]).ravel() / np.exp(_leaf(a2["eta"], name).ravel())
        assert np.mean(ratio**2) == pytest.approx(1.0, rel=1e-5)
    assert s2.attention_offset is None and a2["phi_step"] is None


def test_attention_point_bookkeeping():
    """phi^{n+1} = theta^n + Delta phi^n, theta^{n+1} = theta^n + Delta theta^n (§3.2.1): the
    caller's params are phi, real_params gives theta. With the hand theta the RNN dynamics are
    those of the plain run, so theta follows the plain run and Delta phi = e^c Delta theta."""
    _, (u1, s1, a1), (u2, s2, a2) = _index(_att_batch(), 0)
    _, (pu1, _, _), (pu2, _, _) = RUN_PLAIN(_hand_theta(PLAIN), PARAMS, G1, G2)
    phi1 = optax.apply_updates(PARAMS, u1)
    phi2 = optax.apply_updates(phi1, u2)
    for name in SHAPES:
        p0 = _np(PARAMS[name])
        th1, th2 = p0 + _np(pu1[name]), p0 + _np(pu1[name]) + _np(pu2[name])
        np.testing.assert_allclose(_leaf(a1["theta_step"], name), _np(pu1[name]), rtol=1e-5)
        np.testing.assert_allclose(_leaf(a1["phi_step"], name),
                                   math.exp(C_ATT) * _np(pu1[name]), rtol=1e-5)
        np.testing.assert_allclose(_np(phi1[name]), p0 + math.exp(C_ATT) * _np(pu1[name]),
                                   rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(_np(LOPT.real_params(phi1, s1)[name]), th1, rtol=1e-5,
                                   atol=1e-7)
        # the second attended point is offset from theta^1, not from phi^1
        np.testing.assert_allclose(_np(phi2[name]), th1 + math.exp(C_ATT) * _np(pu2[name]),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(_np(LOPT.real_params(phi2, s2)[name]), th2, rtol=1e-5,
                                   atol=1e-6)
        np.testing.assert_allclose(_leaf(s2.attention_offset, name),
                                   (math.exp(C_ATT) - 1) * _np(pu2[name]), rtol=1e-5, atol=1e-7)
    assert PLAIN.real_params(PARAMS, s2._replace(attention_offset=None)) is PARAMS


def test_ranks_0_1_2_4_and_tensor_means():
    """Per-tensor means (Tensor-RNN input) over all axes of rank 0, 1, 2 and 4 tensors."""
    s0, (u1, s1, a1), (u2, s2, a2) = _index(_att_batch(), 1)
    assert isinstance(s2, HierarchicalRNNState) and int(s2.iteration) == 2
    n_all = NUM_ELEMENTS
    assert s2.param_hidden.shape == (n_all, 10) and s2.decay_logits.shape == (n_all, 2)
    assert s2.grad_avg.shape == s2.grad_sq_avg.shape == (n_all, S)
    assert s2.log_lr.shape == s2.attention_offset.shape == (n_all,)
    assert s2.tensor_hidden.shape == (4, 20) and s2.global_hidden.shape == (20,)
    assert a2["inputs"].shape == (n_all, 2 * S + 1) and a2["tensor_inputs"].shape == (4, 19)
    for t, name in enumerate(ORDER):
        shape, n = SHAPES[name], math.prod(SHAPES[name])
        assert u1[name].shape == shape and u2[name].shape == shape
        assert np.all(np.isfinite(_np(u2[name]))) and np.abs(_np(u2[name])).max() > 0
        for state, aux in ((s1, a1), (s2, a2)):
            want = np.concatenate([_leaf(state.param_hidden, name).reshape(n, 10).mean(0),
                                   _leaf(aux["inputs"], name).reshape(n, 2 * S + 1).mean(0)])
            np.testing.assert_allclose(_np(aux["tensor_inputs"][t]), want, rtol=1e-5,
                                       atol=1e-6)
            # the directions have unit RMS over each tensor, whatever its rank
            ratio = _leaf(aux["theta_step"], name) / np.exp(_leaf(aux["eta"], name))
            assert np.mean(ratio**2) == pytest.approx(1.0, rel=1e-4)
    for state, aux in ((s1, a1), (s2, a2)):
        np.testing.assert_allclose(_np(aux["global_input"]), _np(state.tensor_hidden).mean(0),
                                   rtol=1e-5, atol=1e-6)
    assert not np.allclose(_np(s2.global_hidden), _np(s0.global_hidden))
    assert jax.tree.structure(s0) == jax.tree.structure(s2)
    assert all(a.dtype == b.dtype for a, b in zip(jax.tree.leaves(s0), jax.tree.leaves(s2),
                                                  strict=True))


def test_vmap_batch_elements_are_independent():
    """The attention runs above are vmapped over two problems; swapping the problems in the
    batch swaps the results (no mixing across the batch), and the hand-checked element 0
    (test_attention_point_bookkeeping) matches the un-vmapped plain run."""
    out, swapped = _att_batch(), _att_batch(swapped=True)
    for i in range(2):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                     _index(out, i), _index(swapped, 1 - i))
    s0 = out[0]
    assert s0.global_hidden.shape == (2, 20) and s0.param_hidden.shape == (2, NUM_ELEMENTS, 10)
    assert not np.allclose(_np(out[2][1].global_hidden[0]), _np(out[2][1].global_hidden[1]))


# -------------------------------------------------------------------------------------------
# A user trains a tiny MLP exactly as with optax; meta-gradients through a 3-step unroll.

X = jnp.asarray(np.random.default_rng(5).normal(size=(16, 2)), jnp.float32)
Y = jnp.sin(X[:, :1] * 2.0) + X[:, 1:]
MLP = {"w1": jnp.asarray(np.random.default_rng(6).normal(size=(2, 8)) * 0.5, jnp.float32),
       "b1": jnp.zeros(8), "w2": jnp.asarray(np.random.default_rng(7).normal(size=(8, 1)) * 0.3,
                                             jnp.float32), "b2": jnp.zeros(1)}


def _mlp_loss(params):
    h = jnp.tanh(X @ params["w1"] + params["b1"])
    return jnp.mean((h @ params["w2"] + params["b2"] - Y) ** 2)


def _train(opt: optax.GradientTransformationExtraArgs, steps: int):
    """The user's loop, written once for optax.adam and the learned optimizer alike."""
    return train_run(opt, _mlp_loss, MLP, steps)


def test_user_trains_like_with_adam():
    adam, _, _ = _train(optax.adam(1e-2), 20)
    lopt = HierarchicalRNN(init_lr_range=(3e-2, 3e-2))  # deterministic, visible progress
    losses, params, state = _train(lopt.optimizer(_theta(LOPT), 20), 20)
    assert np.all(np.isfinite(adam)) and np.all(np.isfinite(losses))
    assert losses[-1] < 0.9 * losses[0] and adam[-1] < adam[0]
    real = lopt.real_params(params, state)
    assert np.isfinite(float(_mlp_loss(real))) and float(_mlp_loss(real)) < losses[0]
    assert int(state.iteration) == 20
    assert jax.tree.structure(state) == jax.tree.structure(
        lopt.optimizer(_theta(LOPT), 20).init(MLP))


XQ = jnp.asarray(np.random.default_rng(8).normal(size=(6, 3)), jnp.float32)
YQ = jnp.asarray(np.random.default_rng(9).normal(size=(6, 2)), jnp.float32)
QPARAMS = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}


def _quadratic_loss(params):
    return jnp.mean((XQ @ params["w"] + params["b"] - YQ) ** 2)


def _unroll_loss(theta):
    """Mean log loss (Wichrowska et al. 2017, Eq. 14 without the constant) over a 3-step unroll
    on a tiny least-squares quadratic, plus the log loss at the final real parameters."""
    opt = LOPT.optimizer(theta, num_steps=3)
    (params, state), losses = scan_run(opt, _quadratic_loss, QPARAMS, 3)
    final = _quadratic_loss(LOPT.real_params(params, state))
    return jnp.mean(jnp.log(losses)) + jnp.log(final), losses


def test_init_theta_finite_and_meta_gradient():
    theta = _theta(LOPT)
    (_, losses), grad = jax.jit(jax.value_and_grad(_unroll_loss, has_aux=True))(theta)
    assert np.all(np.isfinite(_np(losses)))
    flat = jax.tree_util.tree_flatten_with_path(grad)[0]
    assert all(np.all(np.isfinite(_np(x))) for _, x in flat)
    for path in (("param_rnn", "w_gates"), ("tensor_rnn", "w_cand"), ("global_rnn", "w_gates"),
                 ("global_to_param", "w"), ("readout", "w_dir"), ("readout", "w_lr"),
                 ("readout", "w_decay"), ("shortcut",), ("attn_shortcut",),
                 ("attention_lr_offset",), ("init_global_hidden",)):
        g = grad
        for p in path:
            g = g[p]
        assert np.abs(_np(g)).max() > 0, path


def test_bad_input_errors():
    opt = LOPT.optimizer(_theta(LOPT), 10)
    state = jax.eval_shape(opt.init, PARAMS)  # the checks fire before any computation
    with pytest.raises(ValueError, match="needs the current parameters"):
        opt.update(PARAMS, state)
    with pytest.raises(ValueError, match="different tree structures"):
        opt.update({"w": PARAMS["w"]}, state, PARAMS)
    with pytest.raises(ValueError, match=r"gradient 3 has shape \(3, 2\)"):
        opt.update(dict(G1, w=jnp.zeros((3, 2))), state, PARAMS)
    with pytest.raises(ValueError, match="state was built for 22 parameters in 4 tensors"):
        opt.update(dict(G1, w=jnp.zeros((2, 4))), state, dict(PARAMS, w=jnp.zeros((2, 4))))
    with pytest.raises(ValueError, match="param_hidden must be a positive int"):
        HierarchicalRNN(param_hidden=0)
    with pytest.raises(ValueError, match="init_lr_range"):
        HierarchicalRNN(init_lr_range=(1e-2, 1e-6))
