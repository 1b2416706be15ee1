"""learnopt.torch follows the JAX optimizers: same parameters, theta, gradients and losses
give the same parameters over 200 steps, to 1e-5 relative (docs/torch.md)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import learnopt.torch as lt  # noqa: E402
from learnopt import pretrained as jax_pretrained  # noqa: E402
from learnopt.learned.guard import guarded  # noqa: E402
from learnopt.learned.registry import get_learned_optimizer  # noqa: E402

STEPS = 200
RTOL = 1e-5
# rank 0, 1, 2 (with a tie between equal dims) and 4 (a conv kernel, out x in x kh x kw)
SHAPES = {"scalar": (), "bias": (5,), "dense": (3, 4), "square": (3, 3), "tall": (7, 2),
          "conv": (4, 3, 3, 3)}
#: the largest relative differences measured, per case (printed by -s, read by the report)
MEASURED: dict[str, float] = {}


def _params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def _grads(seed: int = 1, hostile: bool = False) -> dict[str, np.ndarray]:
    """A fixed gradient sequence: noisy, decaying, on tensors of every rank (``[STEPS, *shape]``
    per name). ``hostile`` adds NaN, inf and a huge element the guard must handle."""
    rng = np.random.default_rng(seed)
    t = np.arange(STEPS, dtype=np.float32)
    out = {}
    for k, s in SHAPES.items():
        scale = (0.5 + np.exp(-t / 80.0)).reshape((STEPS,) + (1,) * len(s))
        out[k] = (rng.normal(size=(STEPS,) + s) * scale + 0.1).astype(np.float32)
    if hostile:
        out["dense"][45, 1, 2] = np.nan
        out["conv"][90, 0, 1, 2, 0] = np.inf
        out["bias"][120, 3] = 1e30  # finite, but its square overflows: an unusable proposal
        out["scalar"][150] = -np.inf
    return out


def _losses(hostile: bool = False) -> np.ndarray:
    losses = (2.0 * np.exp(-np.arange(STEPS) / 150.0) + 0.1).astype(np.float32)
    if hostile:
        losses[30] = 10.0  # high, tolerated (the guard's patience is 5)
        losses[35:41] = 7.0  # a sustained blow-up: its 5th high loss in a row is rolled back
        losses[60] = np.nan
        losses[100] = np.inf
    return losses


def _jax_run(opt, params, grads, losses) -> list[dict[str, np.ndarray]]:
    state = opt.init(params)

    def body(carry, xs):
        p, s = carry
        g, loss = xs
        u, s = opt.update(g, s, p, loss=loss)
        p = optax.apply_updates(p, u)
        return (p, s), p

    run = jax.jit(lambda p, s, g, ls: jax.lax.scan(body, (p, s), (g, ls)))
    (_, final_state), traj = run(params, state, grads, jnp.asarray(losses))
    traj = jax.tree.map(np.asarray, traj)
    return [{k: v[i] for k, v in traj.items()} for i in range(STEPS)], final_state


def _torch_run(make, params, grads, losses, guard_reads_loss: bool):
    tp = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in params.items()}
    opt = make(list(tp.values()))
    traj = []
    for i in range(STEPS):
        for k, p in tp.items():
            p.grad = torch.tensor(grads[k][i])
        if guard_reads_loss:
            opt.step(loss=float(losses[i]))
        else:
            opt.step()
        traj.append({k: p.detach().numpy().copy() for k, p in tp.items()})
    return traj, opt


def _max_rel(jax_traj, torch_traj) -> float:
    """The largest ``|torch - jax|`` over steps and elements, relative to the tensor's scale
    (its largest ``|jax|`` over the run): float32 rounding is relative to the magnitudes a
    tensor's values pass through, and an element crossing zero keeps its absolute error."""
    worst = 0.0
    for k in jax_traj[0]:
        if not jax_traj[0][k].size:
            continue
        scale = max(float(np.abs(a[k]).max()) for a in jax_traj)
        diff = max(float(np.abs(b[k].astype(np.float64) - a[k]).max())
                   for a, b in zip(jax_traj, torch_traj, strict=True))
        worst = max(worst, diff / max(scale, 1e-12))
    return worst


def _compare(case, jax_opt, make, *, guard=False, hostile=False, seed=0):
    params, grads, losses = _params(seed), _grads(seed + 1, hostile), _losses(hostile)
    jp = {k: jnp.asarray(v) for k, v in params.items()}
    jg = {k: jnp.asarray(v) for k, v in grads.items()}
    jax_traj, jax_state = _jax_run(jax_opt, jp, jg, losses)
    torch_traj, opt = _torch_run(make, params, grads, losses, guard)
    for a in jax_traj[-1].values():
        assert np.all(np.isfinite(a))
    # the parameters moved (a vacuous comparison would pass too)
    moved = max(float(np.abs(jax_traj[-1][k] - params[k]).max()) for k in params)
    assert moved > 1e-3, moved
    rel = _max_rel(jax_traj, torch_traj)
    MEASURED[case] = rel
    print(f"{case}: max relative difference over {STEPS} steps {rel:.3g}")
    assert rel <= RTOL, (case, rel)
    return opt, jax_state


def _theta_np(theta):
    return jax.tree.map(np.asarray, theta)


# -------------------------------------------------------------------------------------------


def test_small_fc_lopt_random_theta():
    lopt = get_learned_optimizer("small_fc_lopt")
    theta = lopt.init(jax.random.PRNGKey(3))
    k = jax.random.split(jax.random.PRNGKey(4), 3)  # decays away from their initial values
    for i, name in enumerate(("momentum_decays", "rms_decays", "adafactor_decays")):
        theta[name] = 0.1 * jax.random.normal(k[i], theta[name].shape)
    tn = _theta_np(theta)
    _compare("small_fc_lopt (init, key 3)", lopt.optimizer(theta, STEPS),
             lambda ps: lt.TorchSmallFcLOpt(ps, tn, STEPS, **lopt.config()))


def test_small_fc_lopt_concat_config_same_function():
    lopt = get_learned_optimizer("small_fc_lopt", {"compute": "concat", "hidden_size": 8})
    theta = lopt.init(jax.random.PRNGKey(5))
    tn = _theta_np(theta)
    _compare("small_fc_lopt (concat, hidden 8)", lopt.optimizer(theta, STEPS),
             lambda ps: lt.TorchSmallFcLOpt(ps, tn, STEPS, **lopt.config()), seed=2)


def test_fc_lopt_random_theta():
    lopt = get_learned_optimizer("fc_lopt")
    theta = lopt.init(jax.random.PRNGKey(7))
    tn = _theta_np(theta)
    _compare("fc_lopt (init, key 7)", lopt.optimizer(theta, STEPS),
             lambda ps: lt.TorchFcLOpt(ps, tn, STEPS, **lopt.config()))


@pytest.mark.parametrize("config", [{}, {"output_mode": "increment", "step_rule": "released"},
                                    {"progress_features": True}])
def test_nn_adam_random_theta(config):
    lopt = get_learned_optimizer("nn_adam", config)
    theta = lopt.init(jax.random.PRNGKey(11))
    k1, k2 = jax.random.split(jax.random.PRNGKey(12))
    # The initial output layer is zero (plain Adam): give the LSTM a say. In increment mode
    # the outputs accumulate, so a smaller layer keeps the run from reaching lr = 1e3.
    w, b = (2.0, 0.5) if lopt.output_mode == "absolute" else (0.05, 0.0)
    theta["out"] = {"w": w * jax.random.normal(k1, (lopt.lstm_size, 4)),
                    "b": b * jax.random.normal(k2, (4,))}
    tn = _theta_np(theta)
    _compare(f"nn_adam {config or '(defaults)'}", lopt.optimizer(theta, STEPS),
             lambda ps: lt.TorchNNAdam(ps, tn, STEPS, **lopt.config()))


@pytest.mark.parametrize("name", jax_pretrained.available())
@pytest.mark.parametrize("guard", [None, False, True])
def test_pretrained_matches_jax(name, guard):
    jopt = jax_pretrained.optimizer(name, STEPS, guard=guard)
    is_guarded = guard is True or (guard is None and "guard" in jax_pretrained.read(name)[0])
    opt, state = _compare(f"{name} guard={guard}", jopt,
                          lambda ps: lt.pretrained(name, ps, STEPS, guard=guard),
                          guard=is_guarded, hostile=is_guarded)
    assert (opt.guard is not None) == is_guarded
    if is_guarded:  # the hostile sequence rolled back and sanitised, as in JAX
        gs = opt.guard_state
        assert int(state.num_rollbacks) == gs["num_rollbacks"] >= 4
        assert int(state.num_sanitized) == gs["num_sanitized"] == 3
        assert float(state.scale) == gs["scale"] < 1.0
        assert float(state.initial_loss) == gs["initial_loss"]


def test_guarded_adam_like_nn_adam_with_generic_guard():
    """guard=True on an architecture class is the JAX ``guarded(opt)``."""
    lopt = get_learned_optimizer("nn_adam")
    theta = lopt.init(jax.random.PRNGKey(1))
    tn = _theta_np(theta)
    _compare("nn_adam guarded (hostile)", guarded(lopt.optimizer(theta, STEPS)),
             lambda ps: lt.TorchNNAdam(ps, tn, STEPS, guard=True), guard=True, hostile=True)
