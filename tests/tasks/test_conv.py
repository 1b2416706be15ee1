"""learnopt.tasks.models.conv.Conv / conv2d equal flax nn.Conv: parameters, outputs, gradients
(first and second order), under vmap and lax.scan; the models using it keep nn.Conv's parameter
trees; and inside lax.scan every convolution XLA compiles is in the canonical (fast) form."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from learnopt.tasks.models import sampled as family_models
from learnopt.tasks.models import standard as models
from learnopt.tasks.models.conv import Conv, conv2d

# (batch, H, W, cin, cout, kernel, stride, padding): non-square images, cin = 1, kernels
# 1/3/5, strides 1/2 (and 3), SAME and VALID, sizes where the stride leaves unused rows.
CASES = [
    (2, 8, 8, 1, 3, 3, 2, "SAME"),
    (2, 7, 5, 2, 4, 3, 1, "SAME"),
    (2, 7, 5, 2, 4, 3, 2, "VALID"),
    (1, 9, 6, 3, 2, 5, 1, "SAME"),
    (2, 9, 6, 1, 2, 5, 2, "VALID"),
    (2, 8, 6, 3, 5, 1, 2, "SAME"),
    (2, 8, 6, 3, 5, 1, 1, "VALID"),
    (2, 6, 10, 2, 3, 3, 3, "SAME"),
    (1, 8, 8, 2, 4, 4, 4, "VALID"),  # ViT patch embedding
]


def _inputs(case, seed=0):
    b, h, w, cin, cout, k, s, pad = case
    kx, kp = jax.random.split(jax.random.PRNGKey(seed))
    return jax.random.normal(kx, (b, h, w, cin)), kp


def _modules(case, **kw):
    *_, cout, k, s, pad = case
    return (
        nn.Conv(cout, (k, k), strides=(s, s), padding=pad, **kw),
        Conv(cout, (k, k), strides=(s, s), padding=pad, **kw),
    )


def _close(a, b, tol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        scale = max(1.0, float(jnp.max(jnp.abs(x))))
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=0, atol=tol * scale)


@pytest.mark.parametrize("case", CASES)
def test_matches_flax_conv_outputs_and_gradients(case):
    x, kp = _inputs(case)
    ref, mine = _modules(case)
    params = ref.init(kp, x)
    params_mine = mine.init(kp, x)
    assert jax.tree.structure(params) == jax.tree.structure(params_mine)
    _close(params, params_mine, tol=0)  # same names, shapes, initialisers

    def loss(module):
        return lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))

    _close(ref.apply(params, x), mine.apply(params, x))
    g_ref = jax.jit(jax.grad(loss(ref), argnums=(0, 1)))(params, x)
    g_mine = jax.jit(jax.grad(loss(mine), argnums=(0, 1)))(params, x)
    _close(g_ref, g_mine)


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[5]])
def test_second_order_gradients_match(case):
    """Gradients of gradients (truncated backprop through training) use the custom rules."""
    x, kp = _inputs(case)
    ref, mine = _modules(case)
    params = ref.init(kp, x)

    def meta(module):
        def inner(p):
            return jnp.sum(jnp.sin(module.apply(p, x)))

        return lambda p: jnp.sum(jax.tree.leaves(jax.grad(inner)(p))[1] ** 2)

    _close(jax.grad(meta(ref))(params), jax.grad(meta(mine))(params), tol=1e-4)


@pytest.mark.parametrize("axes", [(0, 0), (0, None), (None, 0)])
@pytest.mark.parametrize("stride", [1, 2])
def test_vmap_and_scan_match(axes, stride):
    """vmap over tasks (both operands batched), data only, or kernels only; inside a scan."""
    tasks = 3
    x = jax.random.normal(jax.random.PRNGKey(0), (tasks, 2, 7, 6, 2))
    w = jax.random.normal(jax.random.PRNGKey(1), (tasks, 3, 3, 2, 4))
    x = x if axes[0] == 0 else x[0]
    w = w if axes[1] == 0 else w[0]

    def train(conv):
        def run(x, w):
            def body(w, _):
                g = jax.grad(lambda w: jnp.sum(jnp.sin(conv(x, w))))(w)
                return w - 0.1 * g, None

            return lax.scan(body, w, None, length=2)[0]

        return jax.jit(jax.vmap(run, in_axes=axes))

    def ref_conv(x, w):
        return lax.conv_general_dilated(
            x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    def my_conv(x, w):
        return conv2d(x, w, stride, "SAME")

    _close(train(ref_conv)(x, w), train(my_conv)(x, w), tol=1e-4)


def test_options_and_leading_axes():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 6, 5, 2))  # two leading batch axes
    init = nn.initializers.normal(0.3)
    for kw in (
        dict(use_bias=False, kernel_init=init),
        dict(padding=1),
        dict(padding=((1, 0), (0, 2))),
    ):
        ref = nn.Conv(4, (3, 3), **kw)
        mine = Conv(4, (3, 3), **kw)
        p = ref.init(jax.random.PRNGKey(1), x)
        _close(p, mine.init(jax.random.PRNGKey(1), x), tol=0)
        _close(ref.apply(p, x), mine.apply(p, x))
        _close(ref.apply(p, x[0, 0]), mine.apply(p, x[0, 0]))  # no batch axis


def _models():
    img = jax.random.uniform(jax.random.PRNGKey(3), (2, 8, 8, 1))
    relu = family_models.ACTIVATION_NAMES.index("relu")
    return [
        (models, models.ConvNet(num_outputs=10), (img[..., 0],)),
        (family_models, family_models.DynConvNet((4, 6), (2, 1), 10), (img, relu)),
        (
            family_models,
            family_models.ResNet(4, 3, True, (1, 1), (4, 8), 10),
            (img, relu),
        ),
        (family_models, family_models.ViT(1, 2, 4, 16, 4, 10), (img,)),
    ]


@pytest.mark.parametrize("index", range(4), ids=["ConvNet", "DynConvNet", "ResNet", "ViT"])
def test_models_keep_flax_parameters_and_outputs(index, monkeypatch):
    """Each model with learnopt's Conv has nn.Conv's parameter tree and computes the same."""
    module, model, args = _models()[index]
    key = jax.random.PRNGKey(0)

    def init_apply():  # a new function each time, so jit traces with the current ``Conv``
        def fn():
            params = model.init(key, *args)
            return params, model.apply(params, *args)

        return jax.jit(fn)()

    params, out = init_apply()
    monkeypatch.setattr(module, "Conv", nn.Conv)
    params_flax, out_flax = init_apply()
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, params_flax)
    _close(params_flax, params, tol=0)
    _close(out_flax, out)


def test_scan_compiles_only_canonical_convolutions():
    """The reason for the module: inside lax.scan, nn.Conv's gradient convolutions are not in
    XLA:CPU's canonical form (slow loop emitter); conv2d's all are."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 4))

    def labels(conv):
        def body(c, _):
            x, w = c
            gx, gw = jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1))(x, w)
            return (x - 0.1 * gx, w - 0.1 * gw), None

        hlo = jax.jit(lambda c: lax.scan(body, c, None, length=2)).lower((x, w)).compile()
        return re.findall(r"convolution\(.*dim_labels=([^,\s]+)", hlo.as_text())

    mine = labels(lambda x, w: conv2d(x, w, 2, "SAME"))
    assert len(mine) == 3 and set(mine) == {"b01f_01io->b01f"}
