"""Tests of the sampled TaskSet families (Metz et al. 2020, arXiv:2009.11243, App. I.2, and
the released TaskSet code where the paper gives no range).

Default run: 100 configs per family are checked against the paper's ranges, for determinism
in the key and for a JSON round trip; two tasks per family are built at tiny size on
synthetic data and must give finite init / loss / gradient; flows, LOSG problems and the
data helpers are checked against hand computations. Real-data builds are ``slow``.
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from learnopt.tasks.base import TaskFamily, config_to_dict
from learnopt.tasks.families import registry as family_registry
from learnopt.tasks.families import synthetic, taskset_data
from learnopt.tasks.families import taskset as ts
from learnopt.tasks.families import taskset_parts as taskset_components
from learnopt.tasks.families.quadratic import QuadraticConfig, QuadraticTask
from learnopt.tasks.families.taskset_data import (
    PAPER_BYTE_DATASETS,
    PAPER_IMAGE_DATASETS,
    PAPER_SUBWORD_DATASETS,
    ImageDataConfig,
    TextDataConfig,
)
from learnopt.tasks.families.taskset_parts import (
    ACTIVATION_WEIGHTS,
    INITIALIZER_WEIGHTS,
    RNN_WEIGHTS,
    SCALED_INITIALIZERS,
    InitConfig,
    RNNCoreConfig,
)
from learnopt.tasks.models import flows

N_CONFIGS = 100
# Compile time dominates these tiny programs; XLA's cheap settings cut it several-fold.
CHEAP = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def run_cheap(fn, *args):
    """``fn(*args)``, jitted and compiled with :data:`CHEAP` settings."""
    return jax.jit(fn).lower(*args).compile(compiler_options=CHEAP)(*args)


FAMILY_NAMES = (
    "mlp",
    "mlp_ae",
    "mlp_vae",
    "conv_pooling",
    "conv_fc",
    "char_rnn_language_model",
    "word_rnn_language_model",
    "rnn_text_classification",
    "losg_tasks",
    "maf",
    "nvp",
)


# --- range checks (the paper's numbers, written out independently of the code) ------------


def in_range(x, lo, hi):
    assert isinstance(x, int | float) and not isinstance(x, bool), x
    assert lo <= x <= hi, (x, lo, hi)


def check_sizes(sizes, n_lo, n_hi, lo, hi):
    assert isinstance(sizes, tuple)
    assert n_lo <= len(sizes) <= n_hi, sizes
    for s in sizes:
        assert isinstance(s, int)
        in_range(s, lo, hi)


def check_init(w: InitConfig):
    assert w.name in INITIALIZER_WEIGHTS
    if w.name in SCALED_INITIALIZERS:
        in_range(w.scale, 0.1, 10.0)
    else:
        assert w.scale is None


def check_activation(a):
    assert a in ACTIVATION_WEIGHTS


def check_image_data(d: ImageDataConfig):
    assert d.dataset in PAPER_IMAGE_DATASETS
    assert isinstance(d.just_train, bool)
    if d.dataset in ("mnist", "fashion_mnist"):
        in_range(d.batch_size, 8, 512)
        in_range(d.num_train, 1000, 55000)
    elif d.dataset in ("cifar10", "cifar100"):
        in_range(d.batch_size, 8, 256)
        in_range(d.num_train, 1000, 50000)
    else:
        in_range(d.batch_size, 8, 256)
        assert d.num_train is None
    if d.augmentation is not None:
        assert d.augmentation.crop_amount in (0, 1, 2)


def check_text_data(d: TextDataConfig, names, patch_hi, train_hi):
    assert d.dataset in names
    in_range(d.patch_length, 8 if patch_hi == 64 else 10, patch_hi)
    in_range(d.batch_size, 8, 512)
    if d.num_train is not None:
        in_range(d.num_train, 1000, train_hi)
    assert isinstance(d.just_train, bool)


def check_core(c: RNNCoreConfig):
    assert c.core in ("vrnn", "gru", "lstm")
    in_range(c.core_dim, 32, 128)
    assert len(c.inits) == len(RNN_WEIGHTS[c.core])
    for w in c.inits:
        check_init(w)
    assert (c.act_fn in ACTIVATION_WEIGHTS) if c.core == "vrnn" else c.act_fn is None


def check_conv(c):
    n = len(c.strides)
    assert 1 <= n <= 5
    patterns = {tuple(([2] * 5)[:n]), tuple(([1, 2] * 5)[:n]), tuple(([2, 1] * 5)[:n])}
    assert tuple(c.strides) in patterns
    check_sizes(c.channels, n, n, 8, 64)
    assert len(c.paddings) == n and set(c.paddings) <= {"SAME", "VALID"}
    assert isinstance(c.use_bias, bool)


def check_mlp(c):
    check_sizes(c.hidden_sizes, 1, 6, 16, 128)
    check_activation(c.activation)
    check_init(c.w_init)
    check_image_data(c.data)
    assert isinstance(c.center_data, bool)


def check_mlp_ae(c):
    check_sizes(c.hidden_sizes, 1, 6, 16, 128)  # 2-7 layers, the last back to the input
    check_activation(c.activation)
    check_init(c.w_init)
    check_image_data(c.data)
    assert c.output_type in ("tanh", "sigmoid", "linear_center", "linear")
    assert c.loss_type in ("l2", "l1")
    assert c.reduction in ("mean", "sum")


def check_mlp_vae(c):
    check_sizes(c.enc_hidden_sizes, 1, 3, 32, 128)
    check_sizes(c.dec_hidden_sizes, 1, 3, 32, 128)
    in_range(c.latent_dim, 32, 128)
    check_activation(c.activation)
    check_init(c.w_init)
    check_image_data(c.data)


def check_conv_pooling(c):
    check_conv(c)
    assert c.pool_type in ("mean", "max", "squared_mean")
    check_activation(c.activation)
    check_init(c.w_init)
    check_image_data(c.data)


def check_conv_fc(c):
    check_conv(c)
    check_sizes(c.fc_hidden_sizes, 0, 4, 32, 128)
    check_activation(c.activation)
    check_init(c.w_init)
    check_image_data(c.data)


def check_char_lm(c):
    in_range(c.embed_dim, 8, 128)
    in_range(c.vocab_size, 100, 256)
    check_init(c.w_init)
    check_core(c.core)
    assert isinstance(c.trainable_init, bool)
    check_text_data(c.data, PAPER_BYTE_DATASETS, 160, 50000)


def check_word_lm(c):
    in_range(c.embed_dim, 8, 128)
    in_range(c.vocab_size, 1000, 30000)
    check_init(c.w_init)
    check_core(c.core)
    check_text_data(c.data, PAPER_SUBWORD_DATASETS, 256, 50000)


def check_text_classification(c):
    in_range(c.embed_dim, 8, 128)
    in_range(c.vocab_size, 100, 10000)
    check_init(c.w_init)
    check_core(c.core)
    assert c.readout in ("last", "mean", "max")
    check_text_data(c.data, ("imdb_reviews/subwords8k",), 64, 55000)
    assert c.data.num_train is not None


def check_flow(c):
    check_sizes(c.hidden_sizes, 1, 2, 16, 128)
    assert c.num_bijectors in (1, 2, 3, 4)
    check_activation(c.activation)
    check_init(c.w_init)
    check_image_data(c.data)


def check_losg_base(c):
    p = c.problem
    noisy = p in (
        "quadratic",
        "bowl",
        "sparse_softmax_regression",
        "optimization_test_problems",
        "min_max_well",
    )
    if noisy:
        assert c.noise_std == 0.0 or 0.01 <= c.noise_std <= 10.0
    else:
        assert c.noise_std == 0.0
    if p == "quadratic":
        in_range(c.dim, 10, 1000)
    elif p == "bowl":
        in_range(c.condition_number, 0.01, 100.0)
        assert c.angle in (0.0, math.pi / 4, math.pi / 3)
    elif p == "sparse_softmax_regression":
        in_range(c.n_features, 2, 100)
        assert c.n_classes == 2
    elif p == "optimization_test_problems":
        assert c.function in synthetic.LOSG_TEST_FUNCTIONS
        assert len(synthetic.LOSG_TEST_FUNCTIONS) == 8
    elif p == "fully_connected":
        in_range(c.n_features, 1, 16)
        assert c.n_classes == 2
        check_activation(c.activation)
        check_sizes(c.hidden_sizes, 2, 5, 4, 32)
    elif p == "norm":
        in_range(c.dim, 3, 1000)
        in_range(c.norm_power, 0.1, 5.0)
    elif p in ("dependency_chain", "outward_snake", "sum_of_quadratics", "projection_quadratic"):
        in_range(c.dim, 3, 100)
    elif p == "min_max_well":
        in_range(c.dim, 10, 1000)
    else:
        raise AssertionError(p)


def check_losg(c):
    assert c.kind in synthetic.LOSG_KINDS and len(synthetic.LOSG_KINDS) == 14
    if c.kind in synthetic.LOSG_TRANSFORMATIONS:
        assert c.problem in synthetic.LOSG_BASE_PROBLEMS
        assert c.problem != "sparse_softmax_regression"
    else:
        assert c.problem == c.kind
    check_losg_base(c)
    if c.kind == "sparse_problems":
        in_range(c.zero_probability, 0.9, 0.99)
        assert c.sparse_noise_std == 0.0 or 0.01 <= c.sparse_noise_std <= 10.0
    if c.kind == "rescale_problems":
        in_range(c.loss_scale, 0.001, 1000.0)


CHECKS = {
    "mlp": check_mlp,
    "mlp_ae": check_mlp_ae,
    "mlp_vae": check_mlp_vae,
    "conv_pooling": check_conv_pooling,
    "conv_fc": check_conv_fc,
    "char_rnn_language_model": check_char_lm,
    "word_rnn_language_model": check_word_lm,
    "rnn_text_classification": check_text_classification,
    "losg_tasks": check_losg,
    "maf": check_flow,
    "nvp": check_flow,
}


def get_family(name, limits=None, substitutes=None, synthetic=False):
    """The TaskSet family ``taskset_<name>`` from the family registry."""
    return family_registry.get_family(
        f"taskset_{name}", limits=limits, substitutes=substitutes, synthetic=synthetic
    )


def test_registry_lists_every_family():
    names = [n for n, _ in family_registry.list_families() if n.startswith("taskset_")]
    assert tuple(n.removeprefix("taskset_") for n in names) == FAMILY_NAMES
    assert get_family("mlp").name == "taskset_mlp"
    assert all(isinstance(get_family(n), TaskFamily) for n in FAMILY_NAMES)
    with pytest.raises(ValueError, match="valid families:"):
        family_registry.get_family("taskset_nope")


@pytest.fixture(scope="module")
def sampled_configs():
    out = {}
    for name in FAMILY_NAMES:
        family = get_family(name)
        out[name] = [family.sample(jax.random.PRNGKey(i)) for i in range(N_CONFIGS)]
    return out


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_sampled_configs_in_paper_ranges_and_round_trip(name, sampled_configs):
    configs = sampled_configs[name]
    family = get_family(name)
    for i, cfg in enumerate(configs):
        assert isinstance(cfg, family.config_type)
        CHECKS[name](cfg)
        text = json.dumps(config_to_dict(cfg))  # JSON-ready: plain Python types only
        assert ts.taskset_config_from_dict(json.loads(text)) == cfg
        if i < 5:
            assert family.sample(jax.random.PRNGKey(i)) == cfg  # deterministic in the key
    assert len({json.dumps(config_to_dict(c)) for c in configs}) > N_CONFIGS // 2


def test_sampled_distributions_cover_the_choices(sampled_configs):
    conv = sampled_configs["conv_pooling"]
    assert {c.pool_type for c in conv} == {"mean", "max", "squared_mean"}
    assert {len(c.strides) for c in conv} == {1, 2, 3, 4, 5}
    char = sampled_configs["char_rnn_language_model"]
    full = sum(c.vocab_size == 256 for c in char)
    assert 65 <= full <= 95  # 80 % full byte vocabulary
    cores = {c.core.core for c in char}
    assert cores == {"vrnn", "gru", "lstm"}
    kinds = {c.kind for c in sampled_configs["losg_tasks"]}
    assert len(kinds) >= 12  # 14 kinds, uniform
    datasets = {c.data.dataset for c in sampled_configs["mlp"]}
    assert len(datasets) >= 8  # 10 image data sets, uniform
    relu = sum(c.activation == "relu" for c in sampled_configs["mlp"])
    assert 15 <= relu <= 60  # weight 6 of 16


def test_sample_accepts_typed_keys():
    family = get_family("mlp")
    assert family.sample(jax.random.key(3)) == family.sample(jax.random.PRNGKey(3))
    assert family.sample(jax.random.PRNGKey(3)) != family.sample(jax.random.PRNGKey(4))


def test_config_of_wrong_family_is_rejected(sampled_configs):
    with pytest.raises(TypeError, match="MLPConfig"):
        get_family("mlp").task(sampled_configs["nvp"][0])


# --- tiny tasks on synthetic data --------------------------------------------------------------

# Two fixed keys per family (sampling is deterministic). Initializer scales up to 10 can make
# other sampled tasks overflow at init, as in the paper, whose rejection sampling removed tasks
# that cannot be optimised; the normalizers map such losses to their maximum.
TINY_KEYS = (0, 1)


def _init_loss_grad(task):
    def run(key):
        k_init, k_batch, k_loss = jax.random.split(key, 3)
        params = task.init(k_init)
        batch = task.datasets.train.sample(k_batch)
        loss, grads = jax.value_and_grad(task.loss)(params, k_loss, batch)
        leaves = jax.tree_util.tree_leaves((params, grads))
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
        return loss, task.normalizer(loss), finite

    return run_cheap(run, jax.random.PRNGKey(7))


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_tiny_tasks_have_finite_init_loss_and_gradient(name):
    family = get_family(name, limits=ts.TaskSetLimits.tiny(), synthetic=True)
    for i in TINY_KEYS:
        config = family.sample(jax.random.PRNGKey(i))
        task = family.task(config)
        assert task.config == config and task.name.startswith(f"taskset_{name}_")
        loss, normalized, finite = _init_loss_grad(task)
        assert np.isfinite(float(loss)), (config, float(loss))
        assert bool(finite), config
        assert np.isfinite(float(normalized)) and float(normalized) >= 0.0
        if name != "losg_tasks":
            assert task.sizes["batch_size"] <= 4


def test_tiny_limits_clamp_sizes(sampled_configs):
    family = get_family("word_rnn_language_model", ts.TaskSetLimits.tiny(), synthetic=True)
    task = family.task(sampled_configs["word_rnn_language_model"][0])
    assert task.sizes["vocab_size"] == 64 and task.sizes["patch_length"] <= 9
    batch = task.datasets.train.sample(jax.random.PRNGKey(0))
    assert batch["tokens"].shape == (task.sizes["batch_size"], task.sizes["patch_length"])
    assert int(batch["tokens"].max()) < 64
    family = get_family("mlp", ts.TaskSetLimits.tiny(), synthetic=True)
    task = family.task(sampled_configs["mlp"][0])
    assert task.sizes["image_size"] == 8


def test_classification_normalizer_is_clipped_cross_entropy():
    family = get_family("mlp", ts.TaskSetLimits.tiny(), synthetic=True)
    task = family.task(family.sample(jax.random.PRNGKey(0)))
    top = 1.5 * math.log(10)
    out = task.normalizer(jnp.array([0.5, 100.0, jnp.nan, -1.0]))
    np.testing.assert_allclose(out, [0.5, top, top, 0.0], rtol=1e-6)


def test_autoencoder_loss_and_normalizer_by_hand():
    data = ImageDataConfig("fashion_mnist", 8, None, False)
    cfg = ts.MLPAEConfig((16,), "relu", InitConfig("he_normal"), data, "linear", "l2", "sum")
    family = get_family("mlp_ae", ts.TaskSetLimits.tiny(), synthetic=True)
    task = family.task(cfg)
    params = jax.tree_util.tree_map(jnp.zeros_like, task.init(jax.random.PRNGKey(0)))
    batch = task.datasets.train.sample(jax.random.PRNGKey(1))
    x = np.asarray(batch["image"]).reshape(4, -1)
    # zero weights predict 0: loss = mean over the batch of sum_d x_d^2
    expected = float(np.mean(np.sum(x**2, -1)))
    np.testing.assert_allclose(task.loss(params, None, batch), expected, rtol=1e-5)
    # per-dimension l2 over 0.25 for [0, 1] targets
    np.testing.assert_allclose(task.normalizer(64 * 0.1), 0.4, rtol=1e-6)


def test_effective_paddings_replace_valid_below_kernel():
    paddings, final = ts.effective_paddings(8, (2, 2, 2, 2), ("VALID",) * 4)
    assert paddings == ("VALID", "VALID", "SAME", "SAME")  # 8 -> 3 -> 1 -> 1 -> 1
    assert final == 1
    assert ts.effective_paddings(16, (1, 2), ("SAME", "VALID")) == (("SAME", "VALID"), 7)


# --- flows -------------------------------------------------------------------------------------


def _zero_output_layers(params, shift=0.0, log_scale=0.0):
    """Set every bijector's output layer so that shift and log-scale are constants."""

    def fix(path, x):
        names = [getattr(p, "key", "") for p in path]
        if "output" in names:
            if names[-1] == "kernel":
                return jnp.zeros_like(x)
            half = x.shape[-1] // 2
            return jnp.concatenate([jnp.full(half, shift), jnp.full(x.shape[-1] - half, log_scale)])
        return x

    return jax.tree_util.tree_map_with_path(fix, params)


@pytest.mark.parametrize("kind", flows.FLOW_KINDS)
def test_identity_flow_gives_standard_normal_log_density(kind):
    model = flows.Flow(kind, (8,), 3)
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 6))

    def log_prob(x):
        params = _zero_output_layers(model.init(jax.random.PRNGKey(1), x)["params"])
        return model.apply({"params": params}, x)

    expected = -0.5 * np.sum(np.asarray(x) ** 2, -1) - 3 * math.log(2 * math.pi)
    np.testing.assert_allclose(run_cheap(log_prob, x), expected, rtol=1e-5)


def test_constant_shift_and_scale_nvp_by_hand():
    # One NVP bijector, D = 2: z = (x0, (x1 - t) e^{-s}), log p = log N(z) - s.
    t, s = 0.3, 0.7
    model = flows.Flow("nvp", (4,), 1)
    x = jnp.array([[0.5, -1.0], [2.0, 0.25]])

    def log_prob(x):
        params = _zero_output_layers(model.init(jax.random.PRNGKey(0), x)["params"], t, s)
        return model.apply({"params": params}, x)

    xn = np.asarray(x)
    z1 = (xn[:, 1] - t) * math.exp(-s)
    expected = -0.5 * (xn[:, 0] ** 2 + z1**2) - math.log(2 * math.pi) - s
    np.testing.assert_allclose(run_cheap(log_prob, x), expected, rtol=1e-5)


def test_constant_maf_two_bijectors_by_hand():
    # Every MAF bijector maps z -> (z - t) e^{-s} elementwise: after two, (x - t - t e^s) e^{-2s}
    # in every dimension (the permutation does not change a constant shift), log det = -2 s D.
    t, s, d = -0.2, 0.4, 3
    model = flows.Flow("maf", (5,), 2)
    x = jax.random.normal(jax.random.PRNGKey(2), (4, d))

    def log_prob(x):
        params = _zero_output_layers(model.init(jax.random.PRNGKey(0), x)["params"], t, s)
        return model.apply({"params": params}, x)

    z = ((np.asarray(x) - t) * math.exp(-s) - t) * math.exp(-s)
    expected = -0.5 * np.sum(z**2, -1) - 0.5 * d * math.log(2 * math.pi) - 2 * s * d
    np.testing.assert_allclose(run_cheap(log_prob, x), expected, rtol=1e-5)


def test_flow_z_is_clipped():
    # One NVP bijector, D = 2: z1 = (x1 - t) e^{-s} = 2.7e4 (x1 + 1e4) / 1e4 is clipped to 1e4;
    # the log-determinant still counts the log-scale.
    t, s = -1e4, -1.0
    model = flows.Flow("nvp", (4,), 1)
    x = jnp.array([[0.5, 0.2], [2.0, 0.9]])

    def log_prob(x):
        params = _zero_output_layers(model.init(jax.random.PRNGKey(0), x)["params"], t, s)
        return model.apply({"params": params}, x)

    xn = np.asarray(x)
    expected = -0.5 * (xn[:, 0] ** 2 + flows.Z_CLIP**2) - math.log(2 * math.pi) - s
    np.testing.assert_allclose(run_cheap(log_prob, x), expected, rtol=1e-5)
    # below the bound the flow is exact: z1 = (x1 - 0.3) e^{-s}
    small = jnp.array([[0.5, 0.2]])

    def log_prob_small(x):
        params = _zero_output_layers(model.init(jax.random.PRNGKey(0), x)["params"], 0.3, s)
        return model.apply({"params": params}, x)

    z1 = (0.2 - 0.3) * math.exp(-s)
    expected = -0.5 * (0.25 + z1**2) - math.log(2 * math.pi) - s
    np.testing.assert_allclose(run_cheap(log_prob_small, small), [expected], rtol=1e-5)


# Sampled flow configs whose z ran past 1e19 unclipped (loss inf, gradient NaN) at tiny size,
# with the keys of tests/tasks/test_all_families.py; maf 16176 (cos units) overflowed in the
# gradient alone with z bounded only through a clipped shift.
RUNAWAY_FLOW_KEYS = {"maf": (73, 96, 16176), "nvp": (67, 68)}


@pytest.mark.parametrize("kind", flows.FLOW_KINDS)
def test_runaway_flow_initialisations_stay_finite(kind):
    family = get_family(kind, ts.TaskSetLimits.tiny(), synthetic=True)
    for i in RUNAWAY_FLOW_KEYS[kind]:
        task = family.task(family.sample(jax.random.PRNGKey(i)))
        assert task.config.num_bijectors >= 3 and task.config.w_init.scale > 2.0

        def run(key, task=task, i=i):
            params = task.init(key)
            batch = task.datasets.train.sample(jax.random.PRNGKey(i + 1))
            return jax.value_and_grad(task.loss)(params, jax.random.PRNGKey(i + 2), batch)

        loss, grads = run_cheap(run, jax.random.PRNGKey(i))
        assert np.isfinite(float(loss)), (i, float(loss))
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads)), i


def test_made_is_autoregressive():
    d = 5
    made = flows.MADE((7, 6))
    x = jax.random.normal(jax.random.PRNGKey(0), (d,))

    def jacobian(x):
        params = made.init(jax.random.PRNGKey(1), x[None])
        return jax.jacobian(lambda v: jnp.concatenate(made.apply(params, v[None]), -1)[0])(x)

    jac = run_cheap(jacobian, x)
    for block in (jac[:d], jac[d:]):  # shift, log-scale: output i depends on x_<i only
        assert np.all(np.triu(np.asarray(block)) == 0)
        assert np.any(np.tril(np.asarray(block), -1) != 0)


def test_flow_normalizer_floor_is_noise_entropy():
    family = get_family("maf", ts.TaskSetLimits.tiny(), synthetic=True)
    task = family.task(family.sample(jax.random.PRNGKey(0)))
    h = 0.5 * math.log(2 * math.pi * math.e * 1e-4)
    np.testing.assert_allclose(task.normalizer(task.dim * (h + 1.0)), 1.0, rtol=1e-5)
    assert float(task.normalizer(task.dim * (h - 1.0))) == 0.0


# --- LOSG ----------------------------------------------------------------------------------------


def _losg(**kw):
    base = {"kind": kw.get("problem"), "seed": 3}
    base.update(kw)
    return synthetic.LOSGTask(synthetic.LOSGConfig(**base))


def test_losg_quadratic_reuses_quadratic_task():
    cfg = dict(problem="quadratic", dim=12, min_singular=0.2, max_singular=3.0)
    task = _losg(**cfg)
    ref = QuadraticTask(QuadraticConfig(12, 0.2, 3.0, 0.0, 3))
    params = task.init(jax.random.PRNGKey(0))
    expected = ref.loss({"x": params["p0"]}, jax.random.PRNGKey(0), {})
    np.testing.assert_allclose(task.loss(params, jax.random.PRNGKey(1), {}), expected, rtol=1e-5)


def test_losg_gradient_noise_keeps_value_and_perturbs_gradient():
    clean = _losg(problem="bowl", condition_number=4.0, angle=0.0)
    noisy = _losg(problem="bowl", condition_number=4.0, angle=0.0, noise_std=2.0)
    params = {"p0": jnp.array([1.0, -2.0])}
    key = jax.random.PRNGKey(5)
    # 0.5 * (4 * 1 + 4) = 4, gradient (4 x0, x1) = (4, -2)
    np.testing.assert_allclose(clean.loss(params, key, {}), 4.0, rtol=1e-6)
    np.testing.assert_allclose(noisy.loss(params, key, {}), 4.0, rtol=1e-6)
    g_clean = jax.grad(clean.loss)(params, key, {})["p0"]
    np.testing.assert_allclose(g_clean, [4.0, -2.0], rtol=1e-6)
    k_noise = jax.random.split(key, 3)[0]
    xi = jax.random.normal(jax.random.split(k_noise, 1)[0], (2,))
    g_noisy = jax.grad(noisy.loss)(params, key, {})["p0"]
    np.testing.assert_allclose(g_noisy, g_clean + 2.0 * xi, rtol=1e-5)


def test_losg_sparse_gradients_are_mostly_zero():
    task = _losg(kind="sparse_problems", problem="min_max_well", dim=400, zero_probability=0.95)
    params = {"p0": jnp.linspace(1.0, 2.0, 400)}
    nonzero = []
    for i in range(10):
        g = jax.grad(task.loss)(params, jax.random.PRNGKey(i), {})["p0"]
        nonzero.append(int(jnp.sum(g != 0)))
    assert max(nonzero) <= 2  # min_max_well has 2 non-zero entries; both survive w.p. 0.05
    assert 0 < sum(nonzero) < 10  # some survive over 10 draws (expected 1)
    # max x^2 + 1 / min x^2 - 2 = 4 + 1 - 2
    np.testing.assert_allclose(task.loss(params, jax.random.PRNGKey(0), {}), 3.0, rtol=1e-6)


def test_losg_transformations_by_hand():
    params = {"p0": jnp.array([[1.0, 2.0]])}
    batch = {"x": jnp.array([[1.0, 0.0], [-1.0, 0.0]])}
    kw = dict(problem="projection_quadratic", dim=2, batch_size=2, n_samples=100)
    base = 1.0 + 1.0  # sum_b sum_i (x_i d_bi)^2
    key = jax.random.PRNGKey(0)
    np.testing.assert_allclose(_losg(**kw).loss(params, key, batch), base)
    scaled = _losg(kind="rescale_problems", loss_scale=10.0, **kw)
    np.testing.assert_allclose(scaled.loss(params, key, batch), 10 * base)
    logged = _losg(kind="log_objective", **kw)
    np.testing.assert_allclose(logged.loss(params, key, batch), math.log(2 / 1e-6 + 1), rtol=1e-5)


def test_losg_normalizer_is_fraction_of_initial_loss():
    task = _losg(problem="dependency_chain", dim=5)
    assert task.init_loss > 0
    np.testing.assert_allclose(task.normalizer(task.init_loss), 1.0, rtol=1e-5)
    assert float(task.normalizer(jnp.nan)) == 1.5
    assert float(task.normalizer(-5.0)) == 0.0


def test_losg_test_functions_at_known_minima():
    minima = {
        "beale": (3.0, 0.5, 0.0),
        "rosenbrock": (1.0, 1.0, 0.0),
        "matyas": (0.0, 0.0, 0.0),
        "ackley": (0.0, 0.0, 0.0),
        "branin": (math.pi, 2.275, 0.397887),
        "styblinski_tang": (-2.903534, -2.903534, 80 - 2 * 39.16617),
    }
    for name, (x, y, f) in minima.items():
        task = _losg(problem="optimization_test_problems", function=name)
        value = task.loss({"p0": jnp.array([x, y])}, jax.random.PRNGKey(0), {})
        np.testing.assert_allclose(value, f, atol=1e-4)


def test_losg_data_problems_tile_small_data():
    task = _losg(
        problem="fully_connected",
        n_features=3,
        n_classes=2,
        hidden_sizes=(4, 4),
        activation="relu",
        batch_size=50,
        n_samples=7,
    )
    batch = task.datasets.train.sample(jax.random.PRNGKey(0))
    assert batch["x"].shape == (50, 3) and set(np.unique(batch["y"])) <= {0, 1}
    assert [p.shape for p in task.init(jax.random.PRNGKey(0)).values()] == [
        (3, 4),
        (4,),
        (4, 4),
        (4,),
        (4, 2),
        (2,),
    ]


# --- components and data ------------------------------------------------------------------------


def test_initializers_match_their_names():
    key = jax.random.PRNGKey(0)
    shape = (400, 300)
    w = taskset_components.make_initializer(InitConfig("random_uniform", 0.5))(key, shape)
    assert float(jnp.max(jnp.abs(w))) <= 0.5 and float(jnp.max(jnp.abs(w))) > 0.49
    w = taskset_components.make_initializer(InitConfig("truncated_normal", 2.0))(key, shape)
    assert float(jnp.max(jnp.abs(w))) <= 4.0 + 1e-5
    w = taskset_components.make_initializer(InitConfig("he_normal"))(key, shape)
    np.testing.assert_allclose(float(jnp.std(w)), math.sqrt(2 / 400), rtol=0.05)
    q = taskset_components.make_initializer(InitConfig("orthogonal", 3.0))(key, (50, 50))
    np.testing.assert_allclose(q.T @ q, 9 * np.eye(50), atol=1e-3)
    with pytest.raises(ValueError, match="valid"):
        taskset_components.make_initializer(InitConfig("nope"))


@pytest.mark.parametrize("core", taskset_components.RNN_CORES)
def test_rnn_cores_run_with_per_matrix_initializers(core):
    inits = tuple(InitConfig("glorot_uniform") for _ in RNN_WEIGHTS[core])
    cfg = RNNCoreConfig(core, 6, inits, "tanh" if core == "vrnn" else None)
    model = taskset_components.SampledRNN(cfg, trainable_init=True)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 3))

    def run(x):
        params = model.init(jax.random.PRNGKey(1), x)
        # causal: the output at time t does not depend on inputs after t
        return params, model.apply(params, x), model.apply(params, x.at[:, 3:].set(0.0))

    params, y, y2 = run_cheap(run, x)
    assert y.shape == (2, 5, 6)
    np.testing.assert_allclose(y[:, :3], y2[:, :3], rtol=1e-6)
    assert params["params"]["initial_state"].shape == (2 if core == "lstm" else 1, 6)


def test_nested_configs_round_trip_through_json():
    core = RNNCoreConfig("gru", 40, tuple(InitConfig("orthogonal", 1.5) for _ in range(6)))
    data = TextDataConfig("lm1b/subwords8k", 20, 16, None, False)
    cfg = ts.WordRNNLMConfig(16, InitConfig("he_uniform"), 5000, core, True, data)
    back = ts.taskset_config_from_dict(json.loads(json.dumps(config_to_dict(cfg))))
    assert back == cfg and isinstance(back.core.inits[0], InitConfig)
    assert dataclasses.asdict(back) == dataclasses.asdict(cfg)


def test_substitutes_cover_every_paper_dataset():
    for name in PAPER_IMAGE_DATASETS + PAPER_BYTE_DATASETS + PAPER_SUBWORD_DATASETS:
        assert ts.DATASET_SUBSTITUTES[name] in (
            "digits",
            "fashion_mnist",
            "mnist1d",
            "shakespeare",
            "kjv",
            "austen",
        )
    assert "lm1b/bytes" in PAPER_BYTE_DATASETS
    assert "tokenized_wikipedia/20190301.en_subwords8k" in PAPER_SUBWORD_DATASETS


def test_image_size_snaps_to_cached_sizes():
    limits = ts.TaskSetLimits()
    assert taskset_data.image_size_for("imagenet_resized/16x16", limits) == 16
    assert taskset_data.image_size_for("cifar10", limits) == 16
    assert taskset_data.image_size_for("cifar10", ts.TaskSetLimits.paper()) == 28
    assert taskset_data.image_size_for("mnist", ts.TaskSetLimits(max_image_size=15)) == 14


def test_word_ranking_and_clipping():
    toks = taskset_data.words("The cat, the DOG's bone; the cat.")
    assert toks == ["the", "cat", ",", "the", "dog's", "bone", ";", "the", "cat", "."]
    vocab = taskset_data.rank_words([toks])
    assert vocab["the"] == 0 and vocab["cat"] == 1  # by frequency, ties alphabetical
    assert list(vocab)[:2] == ["the", "cat"]


def test_augmentation_crops_and_flips():
    aug = taskset_data.ImageAugmentationConfig(2, True, False, True, 0.1, 0.1, 0.1, 0.1)
    images = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3) / 400
    out = taskset_data.augment_images(jax.random.PRNGKey(0), images, aug)
    assert out.shape == (2, 6, 6, 3)
    grey = taskset_data.ImageAugmentationConfig(1, False, True, True, 0.1, 0.1, 0.1, 0.1)
    out = taskset_data.augment_images(jax.random.PRNGKey(1), images[..., :1], grey)
    assert out.shape == (2, 7, 7, 1)  # colour augmentation skips greyscale images
    for b in range(2):  # each image is a 7x7 crop of its input, maybe flipped up-down
        got = np.asarray(out[b, ..., 0])
        crops = [np.asarray(images[b, i : i + 7, j : j + 7, 0]) for i in (0, 1) for j in (0, 1)]
        assert any(np.array_equal(got, c) or np.array_equal(got, c[::-1]) for c in crops)


def test_augmented_split_reports_cropped_shape():
    aug = taskset_data.ImageAugmentationConfig(1, True, True, False, 0.01, 0.1, 0.1, 0.1)
    data = ImageDataConfig("fashion_mnist", 8, None, False, aug)
    datasets, sizes = taskset_data.image_datasets(data, ts.TaskSetLimits.tiny(), synthetic=True)
    assert sizes["input_shape"] == (7, 7, 1)
    assert datasets.train.abstract_batch()["image"].shape == (4, 7, 7, 1)
    assert next(datasets.test.iterator(0))["image"].shape == (4, 7, 7, 1)


def test_just_train_uses_the_train_split_everywhere():
    data = ImageDataConfig("mnist", 8, 1000, True)
    datasets, _ = taskset_data.image_datasets(data, ts.TaskSetLimits.tiny(), synthetic=True)
    assert datasets.test is datasets.train and datasets.outer_valid is datasets.train


# --- real data (slow) ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_real_data_tasks_build_and_run(name):
    from learnopt.tasks.data import registry

    needed = {"fashion_mnist", "digits", "mnist1d", "shakespeare", "kjv", "austen"}
    if not all(registry.is_present(n) for n in needed):
        pytest.skip("offline data sets not installed")
    family = get_family(name)
    for i in (0, 1):
        task = family.task(family.sample(jax.random.PRNGKey(100 + i)))
        loss, normalized, _ = _init_loss_grad(task)
        assert np.isfinite(float(normalized))
        next(task.datasets.test.iterator(0))
