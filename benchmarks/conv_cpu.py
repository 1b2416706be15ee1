"""Why the canonical ConvNet trains slowly on XLA:CPU, and which convolution is fast.

``Conv_FashionMnist16_32x64x64`` (``models.ConvNet``: three 3x3 SAME convolutions with 32
(stride 2), 64 and 64 channels, batch 128, 16x16x1 images) measured 1.87 s per Adam step in
``canonical_step_time.py``, where ~3 GFLOP per forward+backward step should take tens of ms.
This script times, per layer of that network and for the whole network:

* ``fwd``: the convolution alone; ``grad_w``: ``value_and_grad`` with respect to the kernel
  (forward + filter-gradient convolution); ``grad_x``: ``value_and_grad`` with respect to the
  input (forward + data-gradient convolution), of ``sum((conv(x, w) - t) ** 2) / 2``;
* each in two contexts: ``jit`` (one jitted call) and ``scan`` (the same computation as the
  body of a jitted ``lax.scan``, everything carried, the differentiated argument updated each
  iteration so that nothing is loop-invariant or constant-folded; per-iteration time).
  Training and meta-training run their steps inside ``lax.scan``, so ``scan`` matters;
* the whole network's SGD step (``value_and_grad`` wrt all parameters + update) in both
  contexts, and inside ``lax.scan`` under ``vmap`` over ``--vmap-tasks`` parameter sets and
  batches (how meta-training vectorises tasks);
* for several implementations of the same convolution (NHWC input, HWIO kernel):

  - ``lax_nhwc``: ``lax.conv_general_dilated`` with NHWC/HWIO/NHWC dimension numbers, which is
    what flax ``nn.Conv`` calls (the reference);
  - ``lax_nchw``: the same with NCHW/OIHW/NCHW (transposes in and out included);
  - ``patches``: ``lax.conv_general_dilated_patches`` (im2col by an identity-kernel
    convolution), then one matmul;
  - ``im2col``: explicit zero pad, ``kh * kw`` strided slices concatenated on the channel axis,
    then one matmul against the kernel reshaped to ``(kh * kw * cin, cout)``;
  - ``shift_matmul``: the sum over kernel offsets of (strided slice) @ ``kernel[i, j]``;
  - ``canonical_vjp``: ``lax_nhwc`` with a ``custom_vjp`` whose two gradients are
    convolutions in the canonical NHWC/HWIO/NHWC form (operands transposed explicitly);
  - ``lax_fwd_im2col_bwd``: ``lax_nhwc`` forward, gradients of the ``im2col`` formulation;
  - ``learnopt_conv2d``: ``learnopt.tasks.models.conv.conv2d``, the implementation adopted:
    ``canonical_vjp`` closed under differentiation plus ``custom_vmap`` rules (its docstring);

* the reference and the adopted variant again, their network steps timed in alternation
  (4 rounds, medians), the figure to quote for their ratio;
* and, for the reference and the adopted variant, under XLA:CPU flags that exist in the
  installed jaxlib (checked against ``XLA_FLAGS=--help``), each in a child process (flags are
  read at start-up).

All timings: compile and one warm-up call excluded, ``block_until_ready``, median of
``--repeats`` calls. The machine is shared, so only ratios within one run mean much; they are
taken against the reference measured in the same run (flag runs: within the child process,
and against the parent's reference as a rough cross-process figure). Numbers are compared
against the reference (max abs difference of outputs, max difference of gradients relative to
their max). Writes ``benchmarks/results/conv_cpu.json``.

Usage: ``python benchmarks/conv_cpu.py [--repeats 3] [--scan-steps 2] [--no-flags]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax import lax

from learnopt.tasks.models.conv import conv2d

BATCH = 128
# (H, W, cin, cout, stride) of the three layers of models.ConvNet on 16x16x1 images.
LAYERS = ((16, 16, 1, 32, 2), (8, 8, 32, 64, 1), (8, 8, 64, 64, 1))
NUM_CLASSES = 10
# Flags of the installed jaxlib that touch convolutions or their libraries (see module doc).
FLAG_SETS = (
    "--xla_cpu_use_onednn=true",
    "--xla_cpu_use_xnnpack=false",
    "--xla_cpu_experimental_onednn_custom_call=true",
    "--xla_cpu_use_thunk_runtime=false",
)


# --- convolution variants: x (N, H, W, cin), w (kh, kw, cin, cout) -> (N, Ho, Wo, cout) -----


DN = ("NHWC", "HWIO", "NHWC")


def _same_pads(size: int, k: int, s: int) -> tuple[int, int]:
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def _pads(x, w, strides, padding):
    if padding == "VALID":
        return ((0, 0), (0, 0))
    return tuple(_same_pads(x.shape[1 + i], w.shape[i], strides[i]) for i in range(2))


def conv_lax_nhwc(x, w, strides, padding):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN)


def conv_lax_nchw(x, w, strides, padding):
    y = lax.conv_general_dilated(
        x.transpose(0, 3, 1, 2),
        w.transpose(3, 2, 0, 1),
        strides,
        padding,
        dimension_numbers=("NCHW", "OIHW", "NCHW"),
    )
    return y.transpose(0, 2, 3, 1)


def conv_patches(x, w, strides, padding):
    kh, kw, cin, cout = w.shape
    p = lax.conv_general_dilated_patches(
        x, (kh, kw), strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )  # features ordered (cin, kh, kw)
    return p @ w.transpose(2, 0, 1, 3).reshape(cin * kh * kw, cout)


def _slices(x, w, strides, padding):
    kh, kw = w.shape[:2]
    (t, b), (left, r) = _pads(x, w, strides, padding)
    xp = jnp.pad(x, ((0, 0), (t, b), (left, r), (0, 0)))
    ho = (xp.shape[1] - kh) // strides[0] + 1
    wo = (xp.shape[2] - kw) // strides[1] + 1
    out = []
    for i in range(kh):
        for j in range(kw):
            out.append(
                lax.slice(
                    xp,
                    (0, i, j, 0),
                    (xp.shape[0], i + (ho - 1) * strides[0] + 1, j + (wo - 1) * strides[1] + 1,
                     xp.shape[3]),
                    (1, strides[0], strides[1], 1),
                )
            )
    return out


def conv_im2col(x, w, strides, padding):
    kh, kw, cin, cout = w.shape
    cols = jnp.concatenate(_slices(x, w, strides, padding), axis=-1)  # (kh, kw, cin) order
    return cols @ w.reshape(kh * kw * cin, cout)


def conv_shift_matmul(x, w, strides, padding):
    kw = w.shape[1]
    parts = _slices(x, w, strides, padding)
    return sum(p @ w[n // kw, n % kw] for n, p in enumerate(parts))


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _canonical(x, w, strides, pads):
    return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=DN)


def _canonical_fwd(x, w, strides, pads):
    return _canonical(x, w, strides, pads), (x, w)


def _canonical_bwd(strides, pads, res, dy):
    """Both gradients as convolutions in XLA:CPU's canonical form (NHWC input, HWIO kernel,
    NHWC output), by explicit transposes instead of permuted dimension numbers."""
    x, w = res
    dims = [(w.shape[i], x.shape[1 + i], dy.shape[1 + i], strides[i], pads[i][0]) for i in (0, 1)]
    # d/dx: the stride-dilated output gradient convolved with the flipped, in/out-swapped kernel.
    pad_x = [(k - 1 - lo, n + lo - (m - 1) * s - 1) for k, n, m, s, lo in dims]
    w_t = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
    dx = lax.conv_general_dilated(dy, w_t, (1, 1), pad_x, lhs_dilation=strides,
                                  dimension_numbers=DN)
    # d/dw: input channels as the batch, examples as the contracted features, the output
    # gradient (dilated by the stride) as the kernel.
    pad_w = [(lo, k - 1 + (m - 1) * s - n - lo + 1) for k, n, m, s, lo in dims]
    dw = lax.conv_general_dilated(x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), (1, 1),
                                  pad_w, rhs_dilation=strides, dimension_numbers=DN)
    return dx, dw.transpose(1, 2, 0, 3)


_canonical.defvjp(_canonical_fwd, _canonical_bwd)


def conv_canonical_vjp(x, w, strides, padding):
    return _canonical(x, w, tuple(strides), _pads(x, w, strides, padding))


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _hybrid(x, w, strides, padding):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN)


def _hybrid_fwd(x, w, strides, padding):
    return _hybrid(x, w, strides, padding), (x, w)


def _hybrid_bwd(strides, padding, res, dy):
    return jax.vjp(lambda a, b: conv_im2col(a, b, strides, padding), *res)[1](dy)


_hybrid.defvjp(_hybrid_fwd, _hybrid_bwd)


def conv_lax_fwd_im2col_bwd(x, w, strides, padding):
    return _hybrid(x, w, tuple(strides), padding)


VARIANTS = {
    "lax_nhwc": conv_lax_nhwc,
    "lax_nchw": conv_lax_nchw,
    "patches": conv_patches,
    "im2col": conv_im2col,
    "shift_matmul": conv_shift_matmul,
    "canonical_vjp": conv_canonical_vjp,
    "lax_fwd_im2col_bwd": conv_lax_fwd_im2col_bwd,
    "learnopt_conv2d": conv2d,
}
REFERENCE = "lax_nhwc"
CHOSEN = "learnopt_conv2d"


# --- timing --------------------------------------------------------------------------------


def median_ms(fn, args, repeats: int, per: int = 1) -> float:
    jax.block_until_ready(fn(*args))  # compile
    jax.block_until_ready(fn(*args))  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) / per)
    return 1e3 * statistics.median(times)


def layer_inputs(h, w_, cin, cout, s, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(k1, (BATCH, h, w_, cin))
    w = jax.random.normal(k2, (3, 3, cin, cout)) / np.sqrt(9 * cin)
    ho, wo = -(-h // s), -(-w_ // s)
    ct = jax.random.normal(k3, (BATCH, ho, wo, cout))  # target: loss = sum((y - ct) ** 2) / 2
    return x, w, ct


def layer_fns(conv, s):
    strides = (s, s)

    def fwd(x, w):
        return conv(x, w, strides, "SAME")

    def loss(x, w, ct):  # not linear in x or w, so the gradients need the forward pass
        return 0.5 * jnp.sum((fwd(x, w) - ct) ** 2)

    def grad_w(x, w, ct):
        return jax.value_and_grad(loss, argnums=1)(x, w, ct)

    def grad_x(x, w, ct):
        return jax.value_and_grad(loss, argnums=0)(x, w, ct)

    return fwd, grad_w, grad_x


def time_layer(conv, layer, repeats, scan_steps):
    h, w_, cin, cout, s = layer
    x, w, ct = layer_inputs(h, w_, cin, cout, s)
    fwd, grad_w, grad_x = layer_fns(conv, s)
    out = {
        "jit": {
            "fwd": median_ms(jax.jit(fwd), (x, w), repeats),
            "grad_w": median_ms(jax.jit(grad_w), (x, w, ct), repeats),
            "grad_x": median_ms(jax.jit(grad_x), (x, w, ct), repeats),
        }
    }

    def scan(body, carry):
        run = jax.jit(lambda c: lax.scan(body, c, None, length=scan_steps))
        return median_ms(run, (carry,), repeats, per=scan_steps)

    # Everything is carried (no closed-over constants that XLA could fold) and the carried
    # kernel or input changes every iteration (nothing loop-invariant to hoist).
    def body_fwd(c, _):
        xx, ww, tt = c
        y = fwd(xx, ww)
        return (xx, ww * (1.0 + 1e-9 * jnp.mean(y)), tt), None

    def body_gw(c, _):
        xx, ww, tt = c
        _, g = grad_w(xx, ww, tt)
        return (xx, ww - 1e-6 * g, tt), None

    def body_gx(c, _):
        xx, ww, tt = c
        _, g = grad_x(xx, ww, tt)
        return (xx - 1e-6 * g, ww, tt), None

    out["scan"] = {
        "fwd": scan(body_fwd, (x, w, ct)),
        "grad_w": scan(body_gw, (x, w, ct)),
        "grad_x": scan(body_gx, (x, w, ct)),
    }
    return out


def layer_errors(conv, layer):
    h, w_, cin, cout, s = layer
    x, w, ct = layer_inputs(h, w_, cin, cout, s, seed=1)
    ref = layer_fns(VARIANTS[REFERENCE], s)
    new = layer_fns(conv, s)
    err = {"fwd": float(jnp.max(jnp.abs(jax.jit(ref[0])(x, w) - jax.jit(new[0])(x, w))))}
    for i, name in ((1, "grad_w"), (2, "grad_x")):
        a = jax.jit(ref[i])(x, w, ct)[1]
        b = jax.jit(new[i])(x, w, ct)[1]
        err[name] = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))
    return err


# --- whole network: models.ConvNet's computation with a chosen convolution -------------------


def net_params(seed=0):
    from learnopt.tasks.models import standard as models

    model = models.ConvNet(num_outputs=NUM_CLASSES)
    return model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 16, 16)))["params"]


def net_loss(conv, params, x, labels):
    h = x[..., None]
    for i, (_, _, _, _, s) in enumerate(LAYERS):
        p = params[f"Conv_{i}"]
        h = jax.nn.relu(conv(h, p["kernel"], (s, s), "SAME") + p["bias"])
    logits = jnp.mean(h, axis=(1, 2)) @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"]
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))


def net_batch(seed=0, tasks=None):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    lead = () if tasks is None else (tasks,)
    x = jax.random.uniform(k1, (*lead, BATCH, 16, 16))
    labels = jax.random.randint(k2, (*lead, BATCH), 0, NUM_CLASSES)
    return x, labels


def time_net(conv, repeats, scan_steps, tasks=None):
    """ms per SGD step of the ConvNet (value_and_grad wrt params + update): one jitted step,
    and per step inside ``lax.scan``. With ``tasks``: ``vmap`` over that many parameter sets
    and batches (how meta-training vectorises tasks), scan context only."""
    params = net_params()
    x, labels = net_batch(tasks=tasks)

    def step(p, xx, ll):
        loss, g = jax.value_and_grad(lambda q: net_loss(conv, q, xx, ll))(p)
        return jax.tree.map(lambda a, b: a - 0.01 * b, p, g), loss

    if tasks is not None:
        params = jax.tree.map(lambda a: jnp.stack([a] * tasks), params)
        step = jax.vmap(step)
    out = {}
    if tasks is None:
        out["jit"] = median_ms(jax.jit(step), (params, x, labels), repeats)

    def body(c, _):
        p, xx, ll = c
        p, loss = step(p, xx, ll)
        return (p, xx, ll), loss

    run = jax.jit(lambda c: lax.scan(body, c, None, length=scan_steps))
    out["scan"] = median_ms(run, ((params, x, labels),), repeats, per=scan_steps)
    return out


def interleaved_ab(variants, repeats, rounds, scan_steps):
    """The network step (jit and scan) of ``variants`` timed in alternation for ``rounds``
    rounds, so that load drift on the shared machine hits all alike; medians over rounds."""
    params = net_params()
    x, labels = net_batch()
    fns = {}
    for v in variants:
        conv = VARIANTS[v]

        def step(p, xx, ll, conv=conv):
            loss, g = jax.value_and_grad(lambda q: net_loss(conv, q, xx, ll))(p)
            return jax.tree.map(lambda a, b: a - 0.01 * b, p, g), loss

        def body(c, _, step=step):
            p, xx, ll = c
            p, loss = step(p, xx, ll)
            return (p, xx, ll), loss

        fns[v] = {
            "jit": (jax.jit(step), (params, x, labels), 1),
            "scan": (jax.jit(lambda c, body=body: lax.scan(body, c, None, length=scan_steps)),
                     ((params, x, labels),), scan_steps),
        }
    times = {v: {"jit": [], "scan": []} for v in variants}
    for _ in range(rounds):
        for v in variants:
            for ctx, (fn, args, per) in fns[v].items():
                times[v][ctx].append(median_ms(fn, args, repeats, per=per))
    return {v: {ctx: statistics.median(ts) for ctx, ts in d.items()} | {"all_ms": d}
            for v, d in times.items()}


def net_errors(conv):
    params = net_params(1)
    x, labels = net_batch(1)
    fn = jax.value_and_grad(net_loss, argnums=1)
    l0, g0 = jax.jit(lambda p: fn(VARIANTS[REFERENCE], p, x, labels))(params)
    l1, g1 = jax.jit(lambda p: fn(conv, p, x, labels))(params)
    rel = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a))), g0, g1)
    return {"loss": float(abs(l0 - l1)), "grad_rel_max": max(jax.tree.leaves(rel))}


# --- driver --------------------------------------------------------------------------------


def machine():
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "devices": [str(d) for d in jax.devices()],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "load_average": os.getloadavg(),
    }


def child(args):
    """Network step in scan for the reference and the chosen variant under the current
    XLA_FLAGS."""
    res = {v: time_net(VARIANTS[v], args.repeats, args.scan_steps)["scan"] for v in
           (REFERENCE, CHOSEN)}
    print("CHILD_JSON " + json.dumps(res), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--scan-steps", type=int, default=2)
    p.add_argument("--vmap-tasks", type=int, default=2)
    p.add_argument("--no-flags", action="store_true", help="skip the XLA flag child runs")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    print(f"jax {jax.__version__} jaxlib {jaxlib.__version__} devices {jax.devices()}", flush=True)
    ref = REFERENCE
    layers, errors = {}, {}
    for li, layer in enumerate(LAYERS):
        name = "layer{}_{}x{}x{}->{}_s{}".format(li, *layer)
        layers[name] = {}
        for v, conv in VARIANTS.items():
            layers[name][v] = time_layer(conv, layer, args.repeats, args.scan_steps)
            errors.setdefault(v, {})[name] = layer_errors(conv, layer)
            print(f"{name:28s} {v:13s} " + "  ".join(
                f"{ctx}:{op}={ms:8.2f}ms" for ctx, d in layers[name][v].items()
                for op, ms in d.items()), flush=True)
    net, net_err = {}, {}
    for v, conv in VARIANTS.items():
        net[v] = time_net(conv, args.repeats, args.scan_steps)
        net_err[v] = net_errors(conv)
        print(f"network step {v:13s} jit {net[v]['jit']:8.2f} ms  scan {net[v]['scan']:8.2f} ms"
              f"  errors {net_err[v]}", flush=True)
    vm = {}
    if args.vmap_tasks:
        for v in (ref, "im2col", "canonical_vjp", "lax_fwd_im2col_bwd", CHOSEN):
            vm[v] = time_net(VARIANTS[v], args.repeats, args.scan_steps, tasks=args.vmap_tasks)
            print(f"vmap x{args.vmap_tasks} network step {v}: scan {vm[v]['scan']:8.2f} ms",
                  flush=True)

    ab = interleaved_ab((ref, CHOSEN), max(args.repeats, 5), 4, args.scan_steps)
    print(f"interleaved A/B: {ab}", flush=True)

    def ratios(d, base):
        return {k: (ratios(val, base[k]) if isinstance(val, dict) else base[k] / val)
                for k, val in d.items()}

    result = {
        "machine": machine(),
        "description": __doc__,
        "settings": {"batch": BATCH, "repeats": args.repeats, "scan_steps": args.scan_steps,
                     "layers_HWcin_cout_stride": LAYERS, "reference": ref},
        "speedup_over_reference": {
            "note": "reference ms / variant ms (>1: faster than lax_nhwc = flax nn.Conv)",
            "network_step": {v: ratios(d, net[ref]) for v, d in net.items()},
            "layers": {ln: {v: ratios(d, lv[ref]) for v, d in lv.items()}
                       for ln, lv in layers.items()},
            "vmap_network_step": {v: vm[ref]["scan"] / d["scan"] for v, d in vm.items()},
            "interleaved_ab_network_step": {
                ctx: ab[ref][ctx] / ab[CHOSEN][ctx] for ctx in ("jit", "scan")
            },
        },
        "scan_over_jit_slowdown": {
            v: {"network_step": net[v]["scan"] / net[v]["jit"]} | {
                ln: {op: lv[v]["scan"][op] / lv[v]["jit"][op] for op in lv[v]["jit"]}
                for ln, lv in layers.items()}
            for v in VARIANTS
        },
        "ms": {"network_step": net, "layers": layers, "vmap_network_step": vm,
               "interleaved_ab_network_step": ab},
        "max_error_vs_reference": {"layers_abs_fwd_rel_grads": errors, "network": net_err},
    }
    if not args.no_flags:
        flag_runs = {}
        for flags in FLAG_SETS:
            env = dict(os.environ, XLA_FLAGS=flags)
            cmd = [sys.executable, __file__, "--child", "--repeats", str(args.repeats),
                   "--scan-steps", str(args.scan_steps)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("CHILD_JSON ")]
            if proc.returncode or not line:
                flag_runs[flags] = {"error": (proc.stderr or proc.stdout)[-800:]}
            else:
                r = json.loads(line[0][len("CHILD_JSON "):])
                flag_runs[flags] = {
                    "network_step_scan_ms": r,
                    "reference_speedup_over_default_flags": net[ref]["scan"] / r[ref],
                    "chosen_speedup_over_reference_same_flags": r[ref] / r[CHOSEN],
                }
            print(f"flags {flags}: {flag_runs[flags]}", flush=True)
        result["xla_flag_runs"] = flag_runs
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "conv_cpu.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
