"""The native CPU kernel of small_fc_lopt's update against the XLA elementwise path."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_checks import kernel, loop_copies, steps

from learnopt.learned import native
from learnopt.learned.adafac_mlp import SmallFcLOpt

pytestmark = [pytest.mark.skipif(not native.available(), reason="numba is not installed"),
              pytest.mark.filterwarnings("error:learnopt. the native kernel")]


def _theta(lopt: SmallFcLOpt, seed: int, scale: float = 0.3):
    theta = lopt.init(jax.random.PRNGKey(seed))
    leaves, treedef = jax.tree.flatten(theta)
    keys = jax.random.split(jax.random.PRNGKey(seed + 100), len(leaves))
    return treedef.unflatten([x + scale * jax.random.normal(k, x.shape)
                              for x, k in zip(leaves, keys, strict=True)])


def _params(shape, seed=1):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    # a vector and a scalar go through the kernel of rank < 2 (v_full)
    return {"w": jax.random.normal(k1, shape), "b": jax.random.normal(k2, (3,)),
            "s": jax.random.normal(k3, ())}


def _three_steps(lopt: SmallFcLOpt):
    """Updates of the third step, the final params and optimizer state, jitted (the kernel is
    traced per call)."""
    return jax.jit(lambda theta, params: steps(lopt, theta, params))


def _assert_close(native_tree, xla_tree, rtol):
    for a, b in zip(jax.tree.leaves(native_tree), jax.tree.leaves(xla_tree), strict=True):
        if np.size(b) == 0:  # placeholders of the factored state
            continue
        scale = float(np.max(np.abs(b)))
        assert scale > 0
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=rtol * scale)


# (4, 3, 2): the two factored axes are 0 and 1, so the later one is moved last for the kernel
SHAPES = [(9, 5), (5, 9), (3, 4, 5), (4, 3, 2), (3, 3, 4, 5), (2, 20, 3, 5)]


def test_default_kernels_build():
    """The kernels of the default sizes build (a failure would only warn and fall back)."""
    assert native.ready(3, 4, 2, 11, True) and native.ready(3, 4, 2, 11, False)
    assert SmallFcLOpt()._native((5, 6)) and SmallFcLOpt()._native(())


@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_equals_xla_path(shape):
    lopt = SmallFcLOpt()
    theta, params = _theta(lopt, 0), _params(shape)
    with kernel(True):
        got = _three_steps(lopt)(theta, params)
    with kernel(False):
        want = _three_steps(lopt)(theta, params)
    _assert_close(got, want, 2e-5)


@pytest.mark.parametrize("hidden_size,hidden_layers,decays", [(4, 1, 3), (3, 3, 2)])
def test_kernel_other_sizes(hidden_size, hidden_layers, decays):
    ds = (0.5, 0.9, 0.99)[:decays]
    lopt = SmallFcLOpt(hidden_size=hidden_size, hidden_layers=hidden_layers,
                       initial_momentum_decays=ds, initial_adafactor_decays=ds)
    assert native.ready(decays, hidden_size, hidden_layers, 11, True)
    theta, params = _theta(lopt, 3), _params((6, 7))
    with kernel(True):
        got = _three_steps(lopt)(theta, params)
    with kernel(False):
        want = _three_steps(lopt)(theta, params)
    _assert_close(got, want, 2e-5)


def test_kernel_under_nested_vmap():
    """Tasks x perturbations, as in meta-training: each member equals its own unbatched run."""
    lopt = SmallFcLOpt()
    thetas = [[_theta(lopt, 10 * i + j) for j in range(3)] for i in range(2)]
    params = [_params((7, 4), seed=i) for i in range(2)]
    stack = lambda xs: jax.tree.map(lambda *a: jnp.stack(a), *xs)  # noqa: E731
    run = _three_steps(lopt)
    with kernel(True):
        batched = jax.jit(jax.vmap(jax.vmap(run, in_axes=(0, None)), in_axes=(0, 0)))(
            stack([stack(t) for t in thetas]), stack(params))
    with kernel(False):
        for i in range(2):
            for j in range(3):
                want = run(thetas[i][j], params[i])
                _assert_close(jax.tree.map(lambda x, i=i, j=j: x[i, j], batched), want, 2e-5)


def test_meta_gradient_is_the_xla_paths():
    """Differentiated, the kernel's leaf evaluates as the matmul path: theta-gradients agree."""
    lopt = SmallFcLOpt()
    params = _params((5, 6))

    def loss(theta):
        updates, final, _ = _three_steps(lopt)(theta, params)
        return jnp.sum(final["w"] ** 2) + jnp.sum(updates["w"])

    theta = _theta(lopt, 4)
    with kernel(True):
        got = jax.grad(loss)(theta)
    with kernel(False):
        want = jax.grad(loss)(theta)
    _assert_close(got, want, 1e-5)


def test_nonfinite_values_propagate():
    """NaN gradients give NaN updates; a magnitude past exp's range gives inf, as exp does."""
    lopt = SmallFcLOpt()
    theta = _theta(lopt, 5)
    params = _params((6, 5))
    opt = lopt.optimizer(theta, 10)
    with kernel(True):
        update = jax.jit(opt.update)
        g = {**params, "w": params["w"].at[2, 3].set(jnp.nan)}
        u, _ = update(g, opt.init(params), params)
        assert np.isnan(np.asarray(u["w"])).all()  # the per-tensor normalisers are NaN
        huge = jax.tree.map(lambda x: x, theta)
        huge["nn"]["b2"] = huge["nn"]["b2"].at[1].set(1e6)  # exp(0.001 * ~1e6) overflows
        u, _ = jax.jit(lopt.optimizer(huge, 10).update)(params, opt.init(params), params)
        assert np.isinf(np.asarray(u["w"])).all()


def test_source_and_errors(tmp_path, monkeypatch):
    src = native.kernel_source(3, 4, 2, 11)
    compile(src, "<kernel>", "exec")  # valid Python
    assert "def run_call(" in src and "def xla_entry(" in src
    assert native.num_full_features(3) == 16
    with pytest.raises(ValueError, match="layers >= 1"):
        native.kernel_source(3, 4, 0, 11)
    monkeypatch.setenv("LEARNOPT_KERNEL_DIR", str(tmp_path))
    assert native.kernel_dir() == tmp_path
    major, minor = native.ffi_api_version()
    assert major >= 0 and minor >= 0


@pytest.mark.parametrize("shape,dims,perm_full,perm_lack_a,row_lacks_a", [
    # rows shorter than SHORT_ROW entries: the longer factored axis becomes the rows
    ((9, 5), (1, 5, 1, 9), (0, 2, 1), (0, 1), False),
    ((5, 9), (1, 5, 1, 9), (0, 1, 2), (0, 1), False),
    ((4, 3, 2), (1, 3, 2, 4), (0, 2, 3, 1), (0, 2, 1), False),
    # (4, 30, 2): factored axes 0 and 1; axis 1 moves last
    ((4, 30, 2), (1, 4, 2, 30), (0, 1, 3, 2), (0, 2, 1), False),
    ((40, 30, 2), (1, 40, 2, 30), (0, 1, 3, 2), (0, 2, 1), True),
    ((3, 3, 4, 5), (9, 4, 1, 5), (0, 1, 2, 3, 4), (0, 1, 2, 3), False),
    ((3, 3, 40, 5), (9, 5, 1, 40), (0, 1, 2, 4, 3), (0, 1, 2, 3), False),
    ((2, 40, 3, 5), (6, 5, 1, 40), (0, 1, 3, 4, 2), (0, 1, 3, 2), False),
])
def test_layout(shape, dims, perm_full, perm_lack_a, row_lacks_a):
    from learnopt.learned import common

    lay = native.layout(shape, *common.factored_dims(shape))
    assert lay.dims == dims and lay.perm_full == perm_full
    assert lay.perm_lack_a == perm_lack_a and lay.row_lacks_a == row_lacks_a
    assert native.inverse((0, 2, 3, 1)) == (0, 3, 1, 2)


def test_unbuildable_kernel_falls_back_to_xla(tmp_path, monkeypatch):
    """A kernel that cannot be built (here: its cache directory cannot be made) warns once and
    the optimizer runs on the XLA path."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("LEARNOPT_KERNEL_DIR", str(blocker / "kernels"))
    lopt = SmallFcLOpt(hidden_size=2, hidden_layers=1, initial_momentum_decays=(0.5,),
                       initial_adafactor_decays=(0.5,))  # sizes no other test builds
    with pytest.warns(UserWarning, match="is unavailable"):
        assert not native.ready(1, 2, 1, 11, True)
        assert not lopt._native((4, 3))
        updates, params, _ = _three_steps(lopt)(_theta(lopt, 0), _params((4, 3)))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves((updates, params)))


def test_prefetch_builds_once_in_the_background_and_builds_waits_for_it():
    """:func:`native.prefetch` starts a build on another thread; :func:`native.builds` waits for
    it instead of building again, and reports (and warns about) a failed build once."""
    import threading

    started, release, calls = threading.Event(), threading.Event(), []

    def module_fn(*sizes):
        calls.append((sizes, threading.current_thread().name))
        started.set()
        assert release.wait(30)
        if sizes == (2,):
            raise OSError("no room for the kernel")

    native.prefetch(module_fn, 1)
    assert started.wait(30)
    native.prefetch(module_fn, 1)  # already under way: not started again
    release.set()
    assert native.builds(module_fn, 1) and native.builds(module_fn, 1)
    assert calls == [((1,), "learnopt-kernel-load")]
    native.prefetch(module_fn, 2)
    with pytest.warns(UserWarning, match="unavailable .*no room for the kernel"):
        assert not native.builds(module_fn, 2)
    assert not native.builds(module_fn, 2)  # the filter turns a second warning into an error
    assert len(calls) == 2


def test_prefetch_never_compiles(tmp_path, monkeypatch):
    """A prefetch only loads kernels compiled on this machine before: constructing an optimizer
    of new sizes (a config check) must not start a compile; its first step compiles."""
    import time

    monkeypatch.setenv("LEARNOPT_KERNEL_DIR", str(tmp_path))
    sizes = (1, 3, 1, 11, True)  # no other test builds these
    key = (native.kernel_module, sizes)
    SmallFcLOpt(hidden_size=3, hidden_layers=1, initial_momentum_decays=(0.5,),
                initial_adafactor_decays=(0.5,))  # prefetches its two kernels
    deadline = time.monotonic() + 30
    while key in native._BUILDS and time.monotonic() < deadline:
        time.sleep(0.01)
    assert key not in native._BUILDS and not list(tmp_path.iterdir())


def test_a_forked_child_forgets_builds_left_running_by_its_parent():
    """A build running on a parent's thread never finishes in a forked child (which has only
    the forking thread): the child's hook drops it, so that the child builds for itself."""
    import threading

    release = threading.Event()
    native.prefetch(lambda *sizes: release.wait(30), 3)
    pending = [key for key, future in native._BUILDS.items() if not future.done()]
    assert pending
    lock = native._LOCK
    native._after_fork_in_child()  # what os.fork runs in the child
    assert not any(key in native._BUILDS for key in pending) and native._LOCK is not lock
    release.set()


def _numpy_arrays(dims, seed=0, k=3, h=4, layers=2, num_time=11, batch=1):
    """Random kernel operands (accumulators positive where they must be) for layout ``dims``."""
    rng = np.random.default_rng(seed)
    p_, n1, m_, n2 = dims
    n, na, nc = p_ * n1 * m_ * n2, p_ * m_ * n2, p_ * n1 * m_
    f32 = lambda *shape: rng.standard_normal((batch,) + shape).astype(np.float32)  # noqa: E731
    pos = lambda *shape: np.abs(f32(*shape)) + np.float32(0.1)  # noqa: E731
    return {"p": f32(n), "g": f32(n), "m": f32(k, n), "rms": pos(1, n), "va": pos(k, na),
            "vc": pos(k, nc), "decays": np.tile(np.float32([0.5, 0.9, 0.99, 0.999, 0.1, 0.5,
                                                            0.9]), (batch, 1)),
            "w0": 0.3 * f32(4 + 8 * k + num_time, h), "b0": f32(h), "time": f32(num_time),
            "wh": 0.3 * f32(layers - 1, h, h), "bh": f32(layers - 1, h), "wo": f32(h, 2),
            "bo": f32(2), "consts": np.tile(np.float32([1e-3, 1e-3, 1e-5, 0.0]), (batch, 1))}


@contextlib.contextmanager
def _threads(count):
    old = native.set_threads(count)
    try:
        yield
    finally:
        native.set_threads(old)


@pytest.mark.parametrize("dims,batch", [((1, 300, 1, 130), 1), ((2, 40, 3, 64), 3),
                                        ((1, 64, 1, 32), 16)])
def test_chunks_give_the_same_result_on_any_number_of_threads(dims, batch):
    """Large calls are split into chunks fixed by the layout, shared by helper threads: 1, 2
    and 3 threads give the same bits, in place or not."""
    assert dims[0] * dims[1] * dims[2] * dims[3] * batch >= native.PARALLEL_MIN_ELEMENTS
    arrays = _numpy_arrays(dims, batch=batch)
    results = []
    for count in (1, 2, 3, 2):
        with _threads(count):
            results.append(native.numpy_call(3, 4, 2, 11, dims, arrays))
    for got in results[1:]:
        for name in native.OUTPUTS:
            np.testing.assert_array_equal(got[name], results[0][name])
    # in place: the accumulators as their own outputs
    inplace = {n: arrays[n].copy() for n in ("m", "rms", "va", "vc")}
    with _threads(2):
        out = native.numpy_call(3, 4, 2, 11, dims, {**arrays, **inplace},
                                {"m_out": inplace["m"], "rms_out": inplace["rms"],
                                 "va_out": inplace["va"], "vc_out": inplace["vc"]})
    for name in native.OUTPUTS:
        np.testing.assert_array_equal(out[name], results[0][name])
    assert np.isfinite(results[0]["update"]).all() and np.abs(results[0]["update"]).max() > 0


def test_threaded_kernel_equals_xla_path_under_jit():
    """A tensor of several chunks (and a vmapped batch of them) through XLA with helper
    threads: the same bits as one thread, and the XLA path's values."""
    lopt = SmallFcLOpt()
    theta = _theta(lopt, 6)
    params = {"w": jax.random.normal(jax.random.PRNGKey(2), (200, 70)),
              "k": jax.random.normal(jax.random.PRNGKey(3), (4, 30, 70))}
    runs = {}
    for count in (1, 2):
        with _threads(count), kernel(True):
            runs[count] = _three_steps(lopt)(theta, params)
    for a, b in zip(jax.tree.leaves(runs[1]), jax.tree.leaves(runs[2]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with kernel(False):
        want = _three_steps(lopt)(theta, params)
    _assert_close(runs[2], want, 2e-5)


def test_helpers_are_started_again_after_fork():
    """A forked child has none of its parent's helper threads: its first threaded call starts
    its own (the helper block records the pid that started them; a start lock copied from the
    parent is stale) and gives the same bits."""
    import os
    import warnings

    dims = (1, 300, 1, 130)
    arrays = _numpy_arrays(dims, seed=4)
    with _threads(2):
        want = native.numpy_call(3, 4, 2, 11, dims, arrays)["update"]  # parent's helpers
        block = native.helper_block()
        assert block[0] == os.getpid() and block[2] >= 1
        read, write = os.pipe()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # jax warns that fork and threads do not mix
            pid = os.fork()
        if pid == 0:  # the child: no jax here, only the kernel
            try:
                block[1] = os.getppid()  # as if the fork came while the parent started helpers
                got = native.numpy_call(3, 4, 2, 11, dims, arrays)["update"]
                own = block[0] == os.getpid() and block[2] >= 1
                os.write(write, b"1" if own and np.array_equal(got, want) else b"0")
            finally:
                os._exit(0)
        os.close(write)
        import select

        ready, _, _ = select.select([read], [], [], 60.0)
        answer = os.read(read, 1) if ready else b"timeout"
        os.close(read)
        if not ready:
            os.kill(pid, 9)
        os.waitpid(pid, 0)
    assert answer == b"1"


def test_thread_settings_are_checked(monkeypatch):
    monkeypatch.delitem(native._STATE, "threads", raising=False)
    monkeypatch.setenv("LEARNOPT_NATIVE_THREADS", "3")
    assert native.threads() == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("LEARNOPT_NATIVE_THREADS", bad)
        with pytest.raises(ValueError, match="LEARNOPT_NATIVE_THREADS must be a whole number"):
            native.threads()
    with pytest.raises(ValueError, match="threads must be >= 1"):
        native.set_threads(0)
    dims = (1, 4, 1, 5)
    arrays = _numpy_arrays(dims)
    arrays["g"] = arrays["g"].astype(np.float64)
    with pytest.raises(ValueError, match="kernel operand g must be C-contiguous float32"):
        native.numpy_call(3, 4, 2, 11, dims, arrays)


def test_training_loop_updates_the_accumulators_in_place():
    """In a jitted training loop the kernel writes the new momenta and rms over the loop's own
    arrays: the compiled loop body copies no full-size accumulator (before the kernel wrote
    them to new buffers that XLA copied into the loop state on every step), and the loop's
    result is the XLA path's."""
    lopt = SmallFcLOpt()
    opt = lopt.optimizer(_theta(lopt, 7), 100)
    params = {"w": jax.random.normal(jax.random.PRNGKey(4), (24, 40)),
              "b": jax.random.normal(jax.random.PRNGKey(5), (40,))}
    with kernel(True):
        copies, got = loop_copies(opt, params)
    assert copies == []
    with kernel(False):
        _, want = loop_copies(opt, params)
    _assert_close(got, want, 2e-5)
