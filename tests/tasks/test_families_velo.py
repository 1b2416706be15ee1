"""The sampled VeLO task families (arXiv:2211.09760, App. C.1-C.3, D.4), cheap and tiny.

Sampling tests draw many configs (no compilation); model tests build ``size="tiny"`` tasks on
synthetic in-memory data. Full-size (``size="cpu"``) tasks on installed data are ``slow``.
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from learnopt.tasks.base import config_to_dict
from learnopt.tasks.data import registry
from learnopt.tasks.families import registry as family_registry
from learnopt.tasks.families import velo as F
from learnopt.tasks.families import velo_data as fd
from learnopt.tasks.models import sampled as fm

FAMILY_NAMES = family_registry.velo_names()  # the nine of App. C.3, lopt included


def make_family(name: str, **kwargs) -> F.SampledFamily:
    return family_registry.get_family(f"velo_{name}", **kwargs)


def keys(n: int, seed: int = 0) -> list[jax.Array]:
    base = jax.random.PRNGKey(seed)
    return [jax.random.fold_in(base, i) for i in range(n)]


# --- sampling ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size,n", [("cpu", 100), ("paper", 40)])
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_100_samples_valid_deterministic_and_round_trip(name, size, n):
    family = make_family(name, size=size, data="synthetic")
    ks = keys(n)
    configs = [family.sample(k) for k in ks]
    for k, c in zip(ks, configs, strict=True):
        family.check(c)
        assert family.sample(k) == c
        assert family.sample_static(k) == c.static
        assert family.sample_dynamic(k) == c.dynamic
        blob = json.dumps(config_to_dict(c))
        assert family_registry.family_config_from_dict(json.loads(blob)) == c
        hash(c.static)  # static configs key compiled-program caches
    assert len({c.static for c in configs}) > n // 2  # the distribution is not degenerate
    # Every paper data set is drawn and mapped through the substitutes.
    assert {c.static.paper_dataset for c in configs} == set(family.PAPER_DATASETS)
    assert all(c.static.dataset == fd.DATASET_SUBSTITUTES[c.static.paper_dataset] for c in configs)


def test_log_uniform_int_reaches_both_ends_with_log_median():
    rng = np.random.default_rng(0)
    draws = np.array([F.log_uniform_int(rng, 8, 128) for _ in range(20_000)])
    assert draws.min() == 8 and draws.max() == 128
    # The median of a log-uniform variable on [8, 129) is sqrt(8 * 129) = 32.1.
    assert 30 <= np.median(draws) <= 34
    assert F.log_uniform_int(rng, 5, 5) == 5
    with pytest.raises(ValueError, match="1 <= lo <= hi"):
        F.log_uniform_int(rng, 0, 4)


def test_typed_and_raw_keys_give_the_same_configs():
    family = F.MLPFamily()
    raw = jax.random.PRNGKey(7)
    typed = jax.random.wrap_key_data(raw)
    assert family.sample(raw) == family.sample(typed)


def test_vit_dropout_probability_and_patch_validity():
    family = F.ViTFamily(size="paper")
    configs = [family.sample(k) for k in keys(400, seed=3)]
    used = np.mean([c.dynamic.dropout > 0 for c in configs])
    assert 0.6 < used < 0.8  # C.3.8: dropout with probability 0.7
    assert all(c.static.patch_size <= c.static.image_size for c in configs)
    few = [c.static.head_dim for c in configs if c.static.num_heads < 4]
    many = [c.static.head_dim for c in configs if c.static.num_heads >= 4]
    assert max(few) > 32 and max(many) <= 32


def test_text_configs_use_bytes_or_truncated_words():
    family = F.RNNFamily(size="paper")
    configs = [family.sample(k) for k in keys(200)]
    for c in configs:
        if c.static.paper_dataset.endswith("_bytes"):
            assert (c.static.tokenizer, c.static.vocab_size) == ("bytes", 256)
        else:
            assert c.static.tokenizer == "words" and 100 <= c.static.vocab_size <= 10_000
    assert {c.static.cell for c in configs} == set(fm.RNN_CELLS)


def test_check_names_the_bad_field_and_custom_substitutes():
    family = F.MLPFamily(size="cpu")
    c = family.sample(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="hidden_size=1000"):
        family.check(dataclasses.replace(c, static=dataclasses.replace(c.static, hidden_size=1000)))
    bad_dyn = F.InitActDynamic(init_index=3, init_scale=1.0, activation=0)
    with pytest.raises(ValueError, match="init_index"):
        family.check(dataclasses.replace(c, dynamic=bad_dyn))
    custom = F.MLPFamily(substitutes={**fd.DATASET_SUBSTITUTES, "cifar10": "cifar10"})
    drawn = [custom.sample(k).static for k in keys(60)]
    assert any(s.paper_dataset == "cifar10" and s.dataset == "cifar10" for s in drawn)
    assert all(s.channels == (3 if s.dataset == "cifar10" else 1) for s in drawn)
    with pytest.raises(ValueError, match="no entry for"):
        F.MLPFamily(substitutes={"mnist": "digits"})
    with pytest.raises(ValueError, match="size must be one of"):
        F.MLPFamily(size="huge")
    with pytest.raises(ValueError, match="unknown family"):
        make_family("l_opt")


# --- parameter counts and normalizers (numbers) -----------------------------------------------


def test_hand_computed_parameter_count():
    # C.3.1 MLP on 8x8 digits, one hidden layer of 32: 64*32 + 32 + 32*10 + 10.
    static = F.MLPStatic(dataset="digits", image_size=8, hidden_size=32, num_layers=1)
    task = F.MLPFamily().task(F.MLPConfig(static, F.InitActDynamic()))
    assert task.num_params() == 2410
    assert static.cost_features()["params"] == 2410
    # RNN LM, LSTM (4 gates), V=256, E=8, H=16: 256*8 + 4*(8+16+1)*16 + 2*16 + 16*256 + 256.
    rnn = F.RNNStatic(vocab_size=256, cell="lstm", embed_size=8, rnn_size=16)
    task = F.RNNFamily().task(F.RNNConfig(rnn, F.InitDynamic()))
    assert task.num_params() == 2048 + 1600 + 32 + 4096 + 256


@pytest.mark.parametrize("name", ["mlp", "conv", "mlp_ae", "mlp_vae", "rnn_lm", "transformer_lm"])
def test_analytic_parameter_counts_match_the_models(name):
    family = make_family(name, size="cpu", data="synthetic")
    for k in keys(3):
        c = family.sample(k)
        assert c.static.cost_features()["params"] == family.task(c).num_params(), c.static


def test_classification_normalizer_numbers():
    n = lambda x: float(F.classification_normalizer(jnp.asarray(x), 10))
    assert n(math.log(20)) == pytest.approx(10.0)  # clipped at ln 2C, mapped to 10
    assert n(100.0) == pytest.approx(10.0)
    assert n(float("nan")) == pytest.approx(10.0)
    assert n(0.0) == pytest.approx(-10 * math.log(2) / math.log(10))  # -3.0103
    assert n(math.log(10)) == pytest.approx(10 * (math.log(10) - math.log(2)) / math.log(10))


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_normalizers_stay_within_plus_minus_10(name):
    family = make_family(name, size="cpu", data="synthetic")
    losses = jnp.asarray([-1e9, -20.0, -1.0, 0.0, 1e-3, 0.5, 2.0, 7.0, 1e3, 1e9])
    losses = jnp.concatenate([losses, jnp.asarray([jnp.nan, jnp.inf, -jnp.inf])])
    for k in keys(3):
        task = family.task(family.sample(k))
        out = np.asarray(task.normalizer(losses))
        assert np.all(np.isfinite(out)) and np.all(out >= -10) and np.all(out <= 10), out


def test_ae_and_vae_normalizer_numbers():
    static = F.AEStatic(image_size=4, hidden_size=8)
    ae = F.AEFamily().task(F.AEConfig(static, F.AEDynamic(log_loss=False)))
    assert float(ae.normalizer(jnp.asarray(1.0))) == pytest.approx(9.5)  # log(1) * 0.5 + 9.5
    assert float(ae.normalizer(jnp.asarray(1e-9))) == pytest.approx(3.5)  # clipped at -12
    ae_log = F.AEFamily().task(F.AEConfig(static, F.AEDynamic(log_loss=True)))
    assert float(ae_log.normalizer(jnp.asarray(-2.0))) == pytest.approx(8.5)
    vstatic = F.VAEStatic(image_size=4)  # 16 pixels
    vae = F.VAEFamily().task(F.VAEConfig(vstatic, F.VAEDynamic(per_dim_loss=False)))
    assert float(vae.normalizer(jnp.asarray(48.0))) == pytest.approx(3.0)
    vae_dim = F.VAEFamily().task(F.VAEConfig(vstatic, F.VAEDynamic(per_dim_loss=True)))
    assert float(vae_dim.normalizer(jnp.asarray(48.0))) == pytest.approx(10.0)


# --- shared components --------------------------------------------------------------------


def test_initializers_match_their_definitions():
    shapes = {"kernel": jax.ShapeDtypeStruct((200, 150), jnp.float32)}
    conv = {"kernel": jax.ShapeDtypeStruct((3, 3, 8, 16), jnp.float32),
            "bias": jax.ShapeDtypeStruct((16,), jnp.float32)}  # fmt: skip

    @jax.jit
    def draw(key, index, scale):
        concrete = [fm.init_params(shapes, key, i, s)["kernel"] for i, s in [(0, 1.0), (1, 2.0)]]
        normal = fm.init_params(shapes, key, 2, 0.5)["kernel"]
        traced = fm.init_params(shapes, key, index, scale)["kernel"]  # the vmap path
        return (*concrete, normal, traced, fm.init_params(conv, key, 2, 1.0))

    orth, unif, norm, traced, conv_out = draw(jax.random.PRNGKey(0), 1, 2.0)
    orth, unif, norm = np.asarray(orth), np.asarray(unif), np.asarray(norm)
    np.testing.assert_allclose(orth.T @ orth, np.eye(150), atol=1e-4)  # orthonormal columns
    assert np.abs(unif).max() <= 2.0 * math.sqrt(3 / 200) + 1e-6
    assert np.std(unif) == pytest.approx(2.0 * math.sqrt(1 / 200), rel=0.03)
    assert np.std(norm) == pytest.approx(0.5 * math.sqrt(1 / 200), rel=0.03)
    # Traced index and scale give the same tensor as concrete ones.
    np.testing.assert_allclose(np.asarray(traced), unif, rtol=1e-6)
    # Rank-4 conv kernels use fan_in = kh * kw * c_in; vectors are zero.
    assert np.std(np.asarray(conv_out["kernel"])) == pytest.approx(math.sqrt(1 / 72), rel=0.1)
    assert not np.any(np.asarray(conv_out["bias"]))


def test_activation_selection_in_graph_matches_direct_call():
    x = jnp.linspace(-3, 3, 7)
    assert len(fm.ACTIVATIONS) == 11  # C.2.2 lists eleven

    @jax.jit
    def both(x):
        concrete = jnp.stack([fm.activation(x, i) for i in range(11)])
        batched = jax.vmap(fm.activation, in_axes=(None, 0))(x, jnp.arange(11))
        return concrete, batched

    concrete, batched = both(x)
    direct = jnp.stack([fn(x) for _, fn in fm.ACTIVATIONS])
    np.testing.assert_allclose(concrete, direct, rtol=1e-6)
    np.testing.assert_allclose(batched, direct, rtol=1e-6)


def test_quantized_normal_is_a_distribution():
    # Summing the bin probabilities over a fine grid of bins covering the mass gives 1.
    grid = jnp.arange(-2000, 2001) / 255.0
    mu = jnp.asarray([0.1, 0.5, 0.0])[:, None]
    log_sigma = jnp.asarray([-2.0, 0.0, -6.0])[:, None]
    mass = jax.jit(lambda: jnp.exp(fm.log_quantized_normal(grid, mu, log_sigma, 1 / 255.0)))()
    np.testing.assert_allclose(np.asarray(mass.sum(axis=1)), 1.0, atol=2e-3)


# --- tiny tasks: init, loss, gradient -------------------------------------------------------


def _init_loss_grad(task, dyn, key):
    k_init, k_batch, k_loss = jax.random.split(key, 3)
    params = task.init_dynamic(dyn, k_init)
    batch = task.datasets.train.sample(k_batch)
    loss, grads = jax.value_and_grad(lambda p: task.loss_dynamic(dyn, p, k_loss, batch))(params)
    return params, loss, grads, task.normalizer_dynamic(dyn, loss)


def _assert_finite(task, params, loss, grads, norm):
    leaves = jax.tree_util.tree_leaves(grads)
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(norm)), task.name
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves), task.name
    assert sum(float(jnp.sum(g**2)) for g in leaves) > 0, task.name
    expected = jax.tree_util.tree_leaves(task.param_shapes)
    got = jax.tree_util.tree_leaves(params)  # possibly with a leading vmap axis
    assert [g.shape[g.ndim - e.ndim :] for g, e in zip(got, expected, strict=True)] == [
        e.shape for e in expected
    ]


# Vectorised over 3 dynamic configs where that compiles in a couple of seconds; the VAE and
# the ResNet (many in-graph activation switches) and the ViT run one config, specialised.
_ONE_CONFIG = ("mlp_vae", "resnet", "vit")


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_tiny_tasks_have_finite_init_loss_and_gradient(name):
    family = make_family(name, size="tiny", data="synthetic")
    static = family.sample_static(jax.random.PRNGKey(11))
    configs = [family.config_type(static, family.sample_dynamic(k)) for k in keys(3, seed=12)]
    for c in configs:
        family.check(c)
    task = family.task(configs[0])
    if name in _ONE_CONFIG:
        out = jax.jit(lambda k: _init_loss_grad(task, task.config.dynamic, k))
        _assert_finite(task, *out(jax.random.PRNGKey(0)))
    else:
        run = jax.jit(jax.vmap(lambda d, k: _init_loss_grad(task, d, k)))
        params, loss, grads, norm = run(F.stack_configs(configs), jnp.stack(keys(3, seed=13)))
        assert loss.shape == (3,)
        _assert_finite(task, params, loss, grads, norm)


@pytest.mark.parametrize("name", ["mlp", "mlp_ae"])
def test_vmap_over_three_dynamic_configs_matches_separate_tasks(name):
    """C.1: tasks that share a static config train as one vmapped program."""
    family = make_family(name, size="tiny", data="synthetic")
    static = family.sample_static(jax.random.PRNGKey(5))
    dynamics = [family.sample_dynamic(k) for k in keys(3, seed=21)]
    configs = [family.config_type(static, d) for d in dynamics]
    task = family.task(configs[0])
    batch = task.datasets.train.sample(jax.random.PRNGKey(1))
    init_keys = jnp.stack(keys(3, seed=99))
    stacked = F.stack_configs(configs)

    @jax.jit
    def vmapped(dyn, ks):
        params = jax.vmap(task.init_dynamic)(dyn, ks)
        return jax.vmap(task.loss_dynamic, in_axes=(0, 0, None, None))(dyn, params, None, batch)

    losses = vmapped(stacked, init_keys)
    assert losses.shape == (3,)
    own = [family.task(c) for c in configs]  # specialised single-task programs
    expected = jax.jit(lambda ks: [t.loss(t.init(ks[i]), None, batch) for i, t in enumerate(own)])
    np.testing.assert_allclose(losses, jnp.stack(expected(init_keys)), rtol=2e-5, atol=1e-6)
    assert len({round(float(x), 5) for x in losses}) == 3  # three different tasks


def test_stack_configs_requires_one_static():
    family = F.MLPFamily()
    a, b = family.sample(jax.random.PRNGKey(0)), family.sample(jax.random.PRNGKey(1))
    assert a.static != b.static
    with pytest.raises(ValueError, match="share their static part"):
        F.stack_configs([a, b])


# --- data substitutes -----------------------------------------------------------------------


def test_substitute_table_covers_the_paper_data_sets():
    paper = set(fd.PAPER_IMAGE_DATASETS) | set(fd.PAPER_TEXT_DATASETS)
    assert set(fd.DATASET_SUBSTITUTES) == paper
    for name in fd.PAPER_IMAGE_DATASETS:
        assert fd.DATASET_SUBSTITUTES[name] in fd.IMAGE_INFO
    for name in fd.PAPER_TEXT_DATASETS:
        assert fd.DATASET_SUBSTITUTES[name] in fd.TEXT_CORPORA


def test_truncate_vocab_folds_like_the_released_code():
    out = fd.truncate_vocab(np.array([0, 1, 99, 100, 101, 250]), 100)
    np.testing.assert_array_equal(out, [0, 1, 99, 1 + 100 % 99, 1 + 101 % 99, 1 + 250 % 99])
    assert out.max() < 100


def test_small_validation_splits_repeat_to_one_batch():
    x = np.random.default_rng(0).uniform(size=(30, 4, 4, 1)).astype(np.float32)
    ds = fd.split_image_datasets(x, np.arange(30) % 10, x[:5], np.arange(5), 8, 10)
    assert ds.inner_valid.num_examples >= 8 and ds.test.num_examples >= 8
    assert ds.inner_valid.sample(jax.random.PRNGKey(0))["image"].shape == (8, 4, 4, 1)


@pytest.mark.skipif(not registry.is_present("digits"), reason="scikit-learn digits not installed")
def test_digits_substitute_resized_to_a_sampled_size():
    d = fd.image_arrays("digits", 5)
    assert d["train_images"].shape == (1437, 5, 5, 1) and d["test_images"].shape == (360, 5, 5, 1)
    assert d["train_images"].dtype == np.float32
    assert 0.0 <= d["train_images"].min() and d["train_images"].max() <= 1.0


@pytest.mark.skipif(not registry.is_present("mnist1d"), reason="mnist1d not installed")
def test_mnist1d_becomes_an_image_in_unit_range():
    d = fd.image_arrays("mnist1d", 6)
    x = d["train_images"]
    assert x.shape[1:] == (6, 6, 1) and 0.0 <= x.min() and x.max() <= 1.0
    np.testing.assert_array_equal(x[:, 0], x[:, 5])  # constant along the rows


# --- full size (slow) -----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_cpu_size_tasks_on_installed_data(name):
    family = make_family(name, size="cpu")
    for k in keys(2, seed=5):
        config = family.sample(k)
        try:
            task = family.task(config)
            task.datasets  # noqa: B018 (loads the data)
        except registry.DatasetNotFoundError as e:
            pytest.skip(str(e))
        out = jax.jit(lambda k, task=task: _init_loss_grad(task, task.config.dynamic, k))
        _assert_finite(task, *out(jax.random.PRNGKey(0)))
