"""Native CPU kernel of small_fc_lopt's per-tensor step: accumulators, features, MLP, update.

The update of Metz et al. 2022 ("Practical tradeoffs between memory, compute, and performance
in learned optimizers", arXiv:2203.11860, §2.2 and App. A) for one tensor takes its
accumulators before the step and gives them back after it, with the update, in a few loops
over the tensor's entries: (rank >= 2) the AdaFactor row / column statistics, their factors
and the first-layer contributions of the 12 row / column features, which are constant along
one axis and computed on the small arrays; the new momenta and rms and the mean squares of the
16 full-size features (their per-tensor normalisers); the features again, the
``39 -> H -> ... -> 2`` MLP and the step ``-d * exp(exp_mult * mag) * step_mult``. XLA:CPU
splits that into dozens of loops with full-size intermediates; here every feature and hidden
unit stays in registers. Tensors of rank < 2 have a kernel of their own, in which ``v_full``
stands in for the row and column statistics. ``exp`` is evaluated in the loop by range
reduction and a degree-7 polynomial (relative error about 1e-7) so that the loop vectorises;
it gives inf above 88.72, 0 below -87.33 and NaN for NaN, as ``exp`` does. The derivation and
timings are in docs/derivations.md §3.1.

Layout (:func:`layout`): a tensor of rank >= 2 is seen as ``(P, N1, M, N2)`` with its two
factored axes ``N1`` and ``N2`` (the caller moves ``N2``, the rows, last; the longer axis when
the later one is short); ``va`` is its factored statistic without ``N1``, ``(P, M, N2)``, and
``vc`` the one without ``N2``, ``(P, N1, M)``. A tensor of rank < 2 is one run
``(1, 1, 1, N)`` with ``v_full`` in ``va``. Every array has a leading batch axis ``B``
(vmapped tasks and perturbations).

Threads (:func:`parallel_lines`): a call runs in phases, each a loop over chunks of rows
claimed by the calling thread and by the process's own helper threads; the chunks, and so the
result, do not depend on the number of threads (:func:`threads`, ``LEARNOPT_NATIVE_THREADS``).

The kernel is generated as Python source for each architecture size (decays ``K``, width
``H``, ``L`` hidden layers, ``T`` time features, factored or not), written to a cache
directory (``LEARNOPT_KERNEL_DIR``, default ``~/.cache/learnopt/kernels``) and compiled with
numba's on-disk cache, so a machine compiles each once (6-12 s). XLA calls it as a CPU custom
call through its typed FFI (:func:`xla_call`); the PyTorch port calls it on NumPy views
(:func:`numpy_call`, or a kept :func:`template` and :func:`run`). numba is a dependency;
without it, or with ``LEARNOPT_NATIVE=0``, :func:`available` is False and the callers use
their XLA / torch paths (the same function).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import hashlib
import importlib.util
import math
import os
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import numpy as np

#: The kernel's inputs after ``dims`` (the custom call's operands), in order: the tensor's
#: parameters and gradient ``(B, N)``, its accumulators before the step (momentum, rms, and the
#: factored statistics lacking axis ``a`` / ``c``), the decays (momentum (K), rms (1, clipped),
#: AdaFactor (K, clipped)), the MLP (``w0`` with all rows, ``b0``, hidden ``wh``/``bh``, output
#: ``wo``/``bo``), the time features and ``(exp_mult, step_mult, eps, row_lacks_a)``.
INPUTS = ("p", "g", "m", "rms", "va", "vc", "decays", "w0", "b0", "time", "wh", "bh", "wo",
          "bo", "consts")
#: The kernel's outputs: the update and the accumulators after the step.
OUTPUTS = ("update", "m_out", "rms_out", "va_out", "vc_out")

_LOCK = threading.Lock()  # held while a kernel module is written and imported
_BUILDS_LOCK = threading.Lock()  # guards _BUILDS and _WARNED


_STATE = {"enabled": os.environ.get("LEARNOPT_NATIVE", "1") != "0"}


def available() -> bool:
    """Whether the kernel is used: numba is importable and it is enabled (``LEARNOPT_NATIVE=0``
    in the environment or :func:`set_enabled` turns it off; the callers then use their XLA /
    torch paths, which compute the same function)."""
    return _STATE["enabled"] and _numba_installed()


@functools.cache
def _numba_installed() -> bool:  # looked up once: the PyTorch step asks on every call
    return importlib.util.find_spec("numba") is not None


def mlp_inputs(nn: dict, hidden_layers: int, stack: Callable, zeros: Callable) -> dict:
    """The MLP ``nn`` (``w0, b0, ..., w{L}, b{L}``) as the kernel's ``w0, b0, wh, bh, wo,
    bo`` (without the batch axis), with the array library's ``stack`` and ``zeros``."""
    h = nn["w0"].shape[1]
    inner = range(1, hidden_layers)
    return {"w0": nn["w0"], "b0": nn["b0"],
            "wh": stack([nn[f"w{i}"] for i in inner]) if inner else zeros((0, h, h)),
            "bh": stack([nn[f"b{i}"] for i in inner]) if inner else zeros((0, h)),
            "wo": nn[f"w{hidden_layers}"], "bo": nn[f"b{hidden_layers}"]}


def builds(module_fn: Callable[..., ModuleType], *sizes) -> bool:
    """Whether ``module_fn(*sizes)`` (a kernel module) builds, once per process; a warning says
    why not. Waits for a build that :func:`prefetch` started."""
    while True:
        future, start = _build_future(module_fn, sizes)
        if start:
            _build(future, module_fn, sizes)
        error = future.result()
        if not isinstance(error, _NotCompiled):  # else a prefetch left it: build it here
            break
    if error is not None and _warn_once(module_fn, sizes):
        warnings.warn(f"learnopt: the native kernel {module_fn.__module__}.{module_fn.__name__}"
                      f"{sizes} is unavailable ({error!r}); using the XLA / torch path (the "
                      "same function, slower)", stacklevel=3)
    return error is None


def prefetch(module_fn: Callable[..., ModuleType], *sizes) -> None:
    """Start loading ``module_fn(*sizes)`` on a background thread, if the kernel is
    :func:`available`, not started yet and compiled on this machine before; :func:`builds`
    waits for it.

    Loading a kernel that numba has compiled before costs about a second of numba's start-up,
    once per process. The optimizers that use a kernel prefetch it when they are constructed,
    so that this overlaps with the work before their first traced step (building the task,
    compiling its initialisation) instead of adding to it. A kernel never compiled here is left
    to its first use: an optimizer that is only constructed (a config check) must not cost a
    6-12 s compile."""
    if not available():
        return
    future, start = _build_future(module_fn, sizes)
    if start:
        threading.Thread(target=_build, args=(future, module_fn, sizes, True), daemon=True,
                         name="learnopt-kernel-load").start()


_BUILDS: dict[tuple, concurrent.futures.Future] = {}
_WARNED: set[tuple] = set()
_LOCAL = threading.local()  # cached_only: load() refuses to compile (a prefetch)


class _NotCompiled(Exception):
    """A prefetch found a kernel that was never compiled on this machine."""


def _build_future(module_fn: Callable, sizes: tuple) -> tuple[concurrent.futures.Future, bool]:
    """The future of ``module_fn(*sizes)``'s build, and whether the caller must start it."""
    with _BUILDS_LOCK:
        future = _BUILDS.get((module_fn, sizes))
        if future is not None:
            return future, False
        future = _BUILDS[(module_fn, sizes)] = concurrent.futures.Future()
        return future, True


def _build(future: concurrent.futures.Future, module_fn: Callable, sizes: tuple,
           cached_only: bool = False) -> None:
    """Build the kernel module; the future's result is ``None``, or the error that stopped it
    (:class:`_NotCompiled`, with the future forgotten, if ``cached_only`` and it needs a
    compile)."""
    _LOCAL.cached_only = cached_only
    try:
        module_fn(*sizes)
        future.set_result(None)
    except _NotCompiled as err:
        with _BUILDS_LOCK:
            _BUILDS.pop((module_fn, sizes), None)
        future.set_result(err)
    except Exception as err:  # an unwritable cache directory, a numba that cannot compile
        future.set_result(err)
    finally:
        _LOCAL.cached_only = False


def _warn_once(module_fn: Callable, sizes: tuple) -> bool:
    with _BUILDS_LOCK:
        first = (module_fn, sizes) not in _WARNED
        _WARNED.add((module_fn, sizes))
        return first


def _after_fork_in_child() -> None:
    """A forked child has only the thread that forked: builds still running in the parent's
    threads never finish here, and a lock they held stays held. Start over from a clean
    state (the modules that finished loading stay loaded)."""
    global _LOCK, _BUILDS_LOCK
    _LOCK, _BUILDS_LOCK = threading.Lock(), threading.Lock()
    for key, future in list(_BUILDS.items()):
        if not future.done():
            del _BUILDS[key]


os.register_at_fork(after_in_child=_after_fork_in_child)


def ready(k: int, h: int, layers: int, num_time: int, factored: bool,
          features: str = "small_fc_lopt") -> bool:
    """Whether the kernel for these sizes (and :data:`FEATURE_SETS` entry) can be used:
    :func:`available` and it compiles (on failure a warning says why, once)."""
    return available() and builds(kernel_module, k, h, layers, num_time, factored, features)


def set_enabled(enabled: bool) -> bool:
    """Turn the kernel on or off for computations traced from now on; returns the old value."""
    old = _STATE["enabled"]
    _STATE["enabled"] = bool(enabled)
    return old


#: The per-parameter feature sets the kernel computes: small_fc_lopt's 28 (Metz et al. 2022,
#: arXiv:2203.11860, App. A) and VeLO's 30, which add the clipped gradient ``clip(g, +-0.1)``
#: and ``g * rsqrt(rms + 1e-6)`` and take ``rsqrt(max(v, 1e-9))`` where small_fc_lopt takes
#: ``(v + 1e-6)^-0.5`` (Metz et al. 2022, arXiv:2211.09760, App. B.4).
FEATURE_SETS = ("small_fc_lopt", "velo")


def _check_features(features: str) -> bool:
    """Whether ``features`` is VeLO's set; raises on an unknown one."""
    if features not in FEATURE_SETS:
        raise ValueError(f"features must be one of {FEATURE_SETS}; got {features!r}")
    return features == "velo"


def num_full_features(k: int, features: str = "small_fc_lopt") -> int:
    """Full-size features of a factored tensor: g, p, m (K), rms, m * r (K), r, fac_g (K),
    m * row_f * col_f (K); VeLO's add clip(g) and g * r."""
    return 4 + 4 * k + (2 if _check_features(features) else 0)


def feature_names(k: int, factored: bool, features: str = "small_fc_lopt") -> tuple[
        list[str], list[list[int]], int, int]:
    """The full-size features the kernel computes per entry, in the kernel's names; for each,
    the ``w0`` rows it feeds (a feature that stands for two inputs, ``v_full`` as the row and
    the column statistic of a tensor of rank < 2, feeds the sum of their rows); the first of
    the 4K row / column inputs; the number of per-parameter inputs."""
    velo = _check_features(features)
    lead = ["g", "gclip", "p"] if velo else ["g", "p"]
    names = (lead + [f"m{i}" for i in range(k)] + ["rv"] + [f"mr{i}" for i in range(k)]
             + ["r"] + [f"fg{i}" for i in range(k)] + (["gxr"] if velo else [])
             + [f"mf{i}" for i in range(k)])
    nf = len(names) + 4 * k
    first = nf - 5 * k  # the 4K row / column inputs come before the last K
    rows = [[r] for r in list(range(first)) + list(range(first + 4 * k, nf))]
    if not factored:
        names += [f"v{i}" for i in range(k)] + [f"rs{i}" for i in range(k)]
        rows += [[first + i, first + k + i] for i in range(k)]
        rows += [[first + 2 * k + i, first + 3 * k + i] for i in range(k)]
    return names, rows, first, nf


class Layout(NamedTuple):
    """How a factored tensor of ``shape`` is laid out for the kernel.

    ``dims = (P, N1, M, N2)``: the tensor with its factored axis ``c`` moved last (its entries
    are the kernel's contiguous rows) and ``a`` its other factored axis (``N1``). ``c`` is the
    later factored axis, unless that one is shorter than :data:`SHORT_ROW` and the earlier one
    is longer: rows of a few entries do not vectorise, so a ``(784, 10)`` kernel is seen as
    ``(1, 10, 1, 784)``. ``perm_full`` does that move on the tensor, ``perm_lack_a`` on an
    array of the tensor's shape without axis ``a`` (one without ``c`` needs none);
    ``row_lacks_a``: whether ``v_row`` (the mean over the largest axis ``d0``) lacks ``a``.
    Every permutation is of the axes after a leading one (decays or hidden units).
    """

    dims: tuple[int, int, int, int]
    a: int
    c: int
    perm_full: tuple[int, ...]
    perm_lack_a: tuple[int, ...]
    row_lacks_a: bool


#: Rows shorter than this (one AVX-512 vector of float32) are avoided by :func:`layout`.
SHORT_ROW = 16


@functools.lru_cache(maxsize=4096)
def layout(shape: Sequence[int], d1: int, d0: int) -> Layout:
    """The :class:`Layout` of a tensor of ``shape`` with factored axes ``(d1, d0)``."""
    shape = tuple(int(x) for x in shape)
    lo, hi = min(d0, d1), max(d0, d1)
    a, c = (hi, lo) if shape[hi] < SHORT_ROW and shape[lo] > shape[hi] else (lo, hi)
    full = tuple(i for i in range(len(shape)) if i != c) + (c,)
    at = full.index(a)
    dims = (math.prod(shape[i] for i in full[:at]), shape[a],
            math.prod(shape[i] for i in full[at + 1:-1]), shape[c])
    without_a = [i for i in range(len(shape)) if i != a]
    lack_a = tuple(j for j, i in enumerate(without_a) if i != c) + (without_a.index(c),)
    return Layout(dims, a, c, (0,) + tuple(i + 1 for i in full),
                  (0,) + tuple(j + 1 for j in lack_a), d0 == a)


@functools.lru_cache(maxsize=4096)
def inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    """The permutation that undoes ``perm``."""
    return tuple(sorted(range(len(perm)), key=perm.__getitem__))


def kernel_source(k: int, h: int, layers: int, num_time: int, factored: bool = True,
                  features: str = "small_fc_lopt") -> str:
    """Python (numba) source of the kernel for ``k`` decays, width ``h``, ``layers`` hidden
    layers (>= 1), ``num_time`` time features and a :data:`FEATURE_SETS` entry:
    ``run_call(template, mode, threads, task)`` (:func:`parallel_lines`) and the XLA entry
    point ``xla_entry(call_frame)``. ``factored=False``: the kernel of tensors of rank < 2,
    whose full second moment ``v_full`` (in ``va``, ``vc`` unused) stands in for the row and
    column statistics; all its features are full-size.

    A call runs in phases, each a parallel loop over chunks (:func:`parallel_lines`): (0, rank
    >= 2) each batch member's factored statistics; (1) chunks of rows, their new accumulators
    and partial sums of the features' squares; (2) the same chunks, the per-tensor normalisers
    from those sums, the features, the MLP and the update. Chunks are fixed by the layout, not
    by the number of threads, so the result does not depend on it."""
    if k < 1 or h < 1 or layers < 1 or num_time < 0:
        raise ValueError(f"need k, h, layers >= 1 and num_time >= 0; got {k}, {h}, {layers}, "
                         f"{num_time}")
    velo = _check_features(features)
    names, rows, first, nf = feature_names(k, factored, features)
    f = len(names)
    shapes = array_shapes(k, h, layers, num_time, factored, features)
    out: list[str] = []
    a = out.append
    i1 = " " * 4
    ind, body = " " * 8, " " * 12

    def feature_lines() -> None:
        """The full-size features of element t, from the new accumulators."""
        a(f"{body}g = gr[t]")
        a(f"{body}p = pr[t]")
        a(f"{body}rv = rw[t]")
        a(f"{body}r = ONE / math.sqrt(rv + E6)")
        if velo:
            a(f"{body}gclip = min(max(g, -CLIP), CLIP)")
            a(f"{body}gxr = g * r")
        for i in range(k):
            a(f"{body}m{i} = mw_{i}[t]")
            a(f"{body}mr{i} = m{i} * r")
            if factored:
                a(f"{body}pc{i} = far{i}[t] * fc{i}")
                a(f"{body}fg{i} = g * pc{i}")
                a(f"{body}mf{i} = m{i} * pc{i}")
            else:
                a(f"{body}v{i} = vw_{i}[t]")
                a(f"{body}fg{i} = g / math.sqrt(max(v{i} + E9, E9))")
                a(f"{body}rs{i} = ONE / math.sqrt(v{i} + E8)")
                root = f"max(v{i}, E9)" if velo else f"v{i} + E6"
                a(f"{body}mf{i} = m{i} / math.sqrt({root})")

    def chunk(phase: int) -> None:
        """A phase function's head: the arrays, the chunk's member ``b`` and rows, the
        member's scalars."""
        a("@njit(fastmath=FASTMATH, error_model='numpy', cache=True)")
        a(f"def _phase{phase}(w, c):")
        a(f"{i1}{VIEWS}")
        a(f"{i1}b = c // CPM; j = c % CPM; r0 = j * RPC; r1 = min(R, r0 + RPC)")
        a(f"{i1}eps = consts[b, 2]")
        if not factored:
            a(f"{i1}vab = va[b]; vaob = va_out[b]")
            a(i1 + "; ".join(f"ak{i} = decays[b, {k + 1 + i}]" for i in range(k)))
        else:
            a(f"{i1}fab = fa[b]; fcb = fc[b]")
        a(f"{i1}pb = pa[b]; gb = ga[b]; mb = m[b]; rb = rms[b, 0]")
        a(f"{i1}mwb = m_out[b]; rwb = rms_out[b, 0]")
        if phase == 2:
            a(f"{i1}ob = update[b]")
            if factored:
                a(f"{i1}cab = ca[b]; ccb = cc[b]")

    def rows_loop(with_mlp: bool) -> None:
        """The loop over the chunk's rows of N2 elements, and each row's slices."""
        a(f"{i1}for row in range(r0, r1):")
        a(f"{ind}pi = row // (N1 * M); i = (row // M) % N1; mm = row % M")
        a(f"{ind}e = row * N2")
        a(f"{ind}ia = (pi * M + mm) * N2")
        a(f"{ind}ic = row")
        a(f"{ind}gr = gb[e:e + N2]; pr = pb[e:e + N2]; rr = rb[e:e + N2]; rw = rwb[e:e + N2]")
        for i in range(k):
            a(f"{ind}mr_{i} = mb[{i}, e:e + N2]; mw_{i} = mwb[{i}, e:e + N2]")
            if factored:
                a(f"{ind}far{i} = fab[{i}, ia:ia + N2]; fc{i} = fcb[{i}, ic]")
            else:
                a(f"{ind}vo_{i} = vab[{i}, e:e + N2]; vw_{i} = vaob[{i}, e:e + N2]")
        if with_mlp:
            a(f"{ind}outr = ob[e:e + N2]")
            for o in range(h):
                if factored:
                    a(f"{ind}car{o} = cab[{o}, ia:ia + N2]; base{o} = bias{o} + ccb[{o}, ic]")
                else:
                    a(f"{ind}base{o} = bias{o}")

    a(f'"""Generated by learnopt.learned.native.kernel_source: {features}, '
      f'K={k}, H={h}, L={layers}, T={num_time}, factored={factored}."""')
    out.extend(header_lines())
    a(f"K = {k}\nH = {h}\nFIRST = {first}\nNF = {nf}\nT = {num_time}\nF = {f}")
    if velo:
        a("CLIP = np.float32(0.1)  # VeLO's clipped-gradient feature")
    a("FASTMATH = {'reassoc', 'contract', 'arcp'}  # no nnan / ninf: NaN and inf propagate\n\n")
    out.extend(runtime_lines(len(STATE_HEAD) + len(shapes)))
    # Small arrays: the factored accumulators, their factors, the 4K row / column features'
    # first-layer contributions. Generic loops; the cost is in the two passes below.
    a("@njit(fastmath=FASTMATH, error_model='numpy', cache=True)")
    a("def _factored(P, N1, M, N2, gb, va, vc, vao, vco, dec, w0, row_lacks_a, eps, fa, fc, "
      "ca, cc, sa, sc):")
    a("    NA = P * M * N2; NC = P * N1 * M")
    a("    sa[:] = 0.0; sc[:] = 0.0  # buffers of the caller: no allocation per batch member")
    a("    for pi in range(P):")
    a("        for i in range(N1):")
    a("            for mm in range(M):")
    a("                e = ((pi * N1 + i) * M + mm) * N2; ia = (pi * M + mm) * N2")
    a("                gr = gb[e:e + N2]; sar = sa[ia:ia + N2]; s = 0.0")
    a("                for t in range(N2):")
    a("                    g2 = gr[t] * gr[t] + E30")
    a("                    sar[t] += g2")
    a("                    s += g2")
    a("                sc[(pi * N1 + i) * M + mm] += s")
    a("    for kk in range(K):")
    a("        ak = dec[K + 1 + kk]")
    a("        for j in range(NA):")
    a("            vao[kk, j] = ak * va[kk, j] + (ONE - ak) * np.float32(sa[j] / N1)")
    a("        for j in range(NC):")
    a("            vco[kk, j] = ak * vc[kk, j] + (ONE - ak) * np.float32(sc[j] / N2)")
    # row factor rsqrt(max(v_row / (mean over d1 + 1e-9), 1e-9)), column rsqrt(max(v_col, 1e-9))
    a("    for kk in range(K):")
    a("        if row_lacks_a:  # v_row = vao, (P, M, N2), d1 = the N2 axis")
    a("            for j in range(NC):")
    a("                fc[kk, j] = ONE / math.sqrt(max(vco[kk, j], E9))")
    a("            for q in range(P * M):")
    a("                vr = vao[kk, q * N2:(q + 1) * N2]; fr = fa[kk, q * N2:(q + 1) * N2]")
    a("                mean = np.float32(0.0)")
    a("                for t in range(N2):")
    a("                    mean += vr[t]")
    a("                mean = mean / N2 + E9")
    a("                for t in range(N2):")
    a("                    fr[t] = ONE / math.sqrt(max(vr[t] / mean, E9))")
    a("        else:  # v_row = vco, (P, N1, M), d1 = the N1 axis")
    a("            for j in range(NA):")
    a("                fa[kk, j] = ONE / math.sqrt(max(vao[kk, j], E9))")
    a("            for pi in range(P):")
    a("                for mm in range(M):")
    a("                    mean = np.float32(0.0)")
    a("                    for i in range(N1):")
    a("                        mean += vco[kk, (pi * N1 + i) * M + mm]")
    a("                    mean = mean / N1 + E9")
    a("                    for i in range(N1):")
    a("                        j = (pi * N1 + i) * M + mm")
    a("                        fc[kk, j] = ONE / math.sqrt(max(vco[kk, j] / mean, E9))")
    # features FIRST + q * K + kk: q = 0 v_row, 1 v_col, 2 rsqrt(v_row + 1e-8), 3 rsqrt(v_col...)
    a("    ca[:, :] = ZERO; cc[:, :] = ZERO")
    a("    for q in range(4):")
    a("        on_a = (q % 2 == 0) == row_lacks_a")
    a("        src = vao if on_a else vco")
    a("        dst = ca if on_a else cc")
    a("        n = NA if on_a else NC")
    a("        for kk in range(K):")
    a("            ss = 0.0")
    a("            for j in range(n):")
    a("                x = src[kk, j] if q < 2 else ONE / math.sqrt(src[kk, j] + E8)")
    a("                ss += x * x")
    a("            scale = np.float32(1.0 / math.sqrt(eps + ss / n))")
    a("            for o in range(H):")
    a("                w = w0[FIRST + q * K + kk, o] * scale")
    a("                for j in range(n):")
    a("                    x = src[kk, j] if q < 2 else ONE / math.sqrt(src[kk, j] + E8)")
    a("                    dst[o, j] += w * x\n\n")
    # phase 0: one member's factored statistics, factors and row / column contributions
    a("@njit(fastmath=FASTMATH, error_model='numpy', cache=True)")
    a("def _phase0(w, c):")
    a(f"{i1}{VIEWS}")
    if factored:
        a(f"{i1}_factored(P, N1, M, N2, ga[c], va[c], vc[c], va_out[c], vc_out[c], decays[c], "
          "w0[c], consts[c, 3] > 0.5, consts[c, 2], fa[c], fc[c], ca[c], cc[c], gsa[c], gsc[c])")
    else:
        a(f"{i1}pass  # rank < 2: no factored statistics")
    a("\n")
    # phase 1: the chunk's new accumulators, and the partial sums of the features' squares
    chunk(1)
    a(i1 + "; ".join(f"bm{i} = decays[b, {i}]" for i in range(k)))
    a(f"{i1}crms = decays[b, {k}]")
    a(i1 + "; ".join(f"ss{v} = 0.0" for v in range(f)))
    rows_loop(with_mlp=False)
    a(f"{ind}" + "; ".join(f"s{v} = ZERO" for v in range(f)))
    # the new accumulators first, in loops of their own (one store each: they vectorise)
    a(f"{ind}for t in range(N2):")
    a(f"{body}rw[t] = crms * rr[t] + (ONE - crms) * (gr[t] * gr[t])")
    for i in range(k):
        a(f"{ind}for t in range(N2):")
        a(f"{body}mw_{i}[t] = bm{i} * mr_{i}[t] + (ONE - bm{i}) * gr[t]")
        if not factored:
            a(f"{ind}for t in range(N2):")
            a(f"{body}vw_{i}[t] = ak{i} * vo_{i}[t] + (ONE - ak{i}) * (gr[t] * gr[t] + E30)")
    a(f"{ind}for t in range(N2):")
    feature_lines()
    for v, nm in enumerate(names):
        a(f"{body}s{v} += {nm} * {nm}")
    for v in range(f):
        a(f"{ind}ss{v} += s{v}")
    for v in range(f):
        a(f"{i1}part[b, j, {v}] = ss{v}")
    a("\n")
    # phase 2: the normalisers from every chunk's sums, the features, the MLP, the update
    chunk(2)
    a(f"{i1}exp_mult = consts[b, 0]; step_mult = consts[b, 1]")
    for v in range(f):
        a(f"{i1}ss = 0.0")
        a(f"{i1}for q in range(CPM):")
        a(f"{i1}    ss += part[b, q, {v}]")
        a(f"{i1}sc = np.float32(1.0 / math.sqrt(eps + ss / N))")
        a(i1 + "; ".join(f"w{v}_{o} = (" + " + ".join(f"w0[b, {r}, {o}]" for r in rows[v])
                         + ") * sc" for o in range(h)))
    for o in range(h):
        a(f"{i1}bias{o} = b0[b, {o}]")
        a(f"{i1}for q in range(T):")
        a(f"{i1}    bias{o} += time[b, q] * w0[b, NF + q, {o}]")
    for li in range(layers - 1):
        for v in range(h):
            a(i1 + "; ".join(f"u{li}_{v}_{o} = wh[b, {li}, {v}, {o}]" for o in range(h)))
        a(i1 + "; ".join(f"c{li}_{o} = bh[b, {li}, {o}]" for o in range(h)))
    a(i1 + "; ".join(f"od{v} = wo[b, {v}, 0]; om{v} = wo[b, {v}, 1]" for v in range(h)))
    a(f"{i1}bd = bo[b, 0]; bmag = bo[b, 1]")
    a(f"{i1}dbuf = np.empty(N2, np.float32); ibuf = np.empty(N2, np.int32)")
    a(f"{i1}sbuf = ibuf.view(np.float32)")
    rows_loop(with_mlp=True)
    a(f"{ind}for t in range(N2):")
    feature_lines()
    for o in range(h):
        terms = " + ".join(f"w{v}_{o} * {nm}" for v, nm in enumerate(names))
        low = f"car{o}[t] + " if factored else ""
        a(f"{body}h{o} = max(base{o} + {low}{terms}, ZERO)")
    for li in range(layers - 1):
        for o in range(h):
            terms = " + ".join(f"u{li}_{v}_{o} * h{v}" for v in range(h))
            a(f"{body}k{o} = max(c{li}_{o} + {terms}, ZERO)")
        a(body + "; ".join(f"h{o} = k{o}" for o in range(h)))
    a(f"{body}d = bd + " + " + ".join(f"od{v} * h{v}" for v in range(h)))
    a(f"{body}x = (bmag + " + " + ".join(f"om{v} * h{v}" for v in range(h)) + ") * exp_mult")
    out.extend(exp_lines(body))
    a(f"{ind}for t in range(N2):")
    a(f"{body}outr[t] = -(dbuf[t] * sbuf[t] * step_mult)")
    a("\n")
    # the phases of a call
    a("@njit(inline='always')")
    a("def _work(w, phase, c):")
    a("    if phase == 0:\n        _phase0(w, c)\n    elif phase == 1:\n        _phase1(w, c)")
    a("    else:\n        _phase2(w, c)\n\n")
    out.extend(parallel_lines(f"{features}_{'f' if factored else 'v'}{k}_{h}_{layers}_"
                              f"{num_time}"))
    a("@njit(nogil=True, cache=True)")
    a("def run_call(t, mode, threads, task):")
    out.extend(view_lines(i1, {}, words="t"))  # the layout words only
    a(f"{i1}rpc = max(1, CHUNK // N2); cpm = (R + rpc - 1) // rpc")
    a(f"{i1}t[{STATE_HEAD.index('cpm')}] = cpm; t[{STATE_HEAD.index('rpc')}] = rpc")
    a(f"{i1}CPM = cpm")
    a(f"{i1}if B * N < PARALLEL_MIN:")
    a(f"{i1}    mode = 0  # too small to share")
    out.extend(scratch_lines(i1, shapes))
    if factored:
        a(f"{i1}_parallel(t, mode, threads, task, 0, B)")
    a(f"{i1}_parallel(t, mode, threads, task, 1, B * cpm)")
    a(f"{i1}_parallel(t, mode, threads, task, 2, B * cpm)")
    a(f"{i1}_free(base)\n\n")
    out.extend(ffi_entry_lines(INPUTS, OUTPUTS, shapes))
    return "\n".join(fill_views("\n".join(out).split("\n"), shapes)) + "\n"


def header_lines() -> list[str]:
    """Imports and float32 constants of a generated kernel module."""
    out: list[str] = []
    a = out.append
    a("import math\n\nimport numpy as np\nfrom llvmlite import binding, ir")
    a("from numba import carray, cfunc, njit, types")
    a("from numba.core import cgutils\nfrom numba.extending import intrinsic\n")
    a("ONE = np.float32(1.0)\nZERO = np.float32(0.0)\nE6 = np.float32(1e-6)")
    a("E8 = np.float32(1e-8)\nE9 = np.float32(1e-9)\nE30 = np.float32(1e-30)")
    a("INF = np.float32(np.inf)\nHALF = np.float32(0.5)\nLOG2E = np.float32(1.4426950408889634)")
    a("LN2_HI = np.float32(0.693359375)\nLN2_LO = np.float32(-2.12194440e-4)")
    a("XMAX = np.float32(88.72)\nXMIN = np.float32(-87.33)\nEXP_CAP = np.int32(127)")
    for i in range(2, 8):
        a(f"C{i} = np.float32(1.0 / {math.factorial(i)}.0)")
    return out


def exp_lines(body: str) -> list[str]:
    """In a loop over ``t`` indented by ``body``: ``dbuf[t] = d * exp(r)`` and the bits of
    ``2^e2`` in ``ibuf[t]`` (read back as floats through ``sbuf``), where ``exp(x) = 2^e2 exp(r)``
    and ``|r| <= ln2 / 2``; ``exp(r)`` by its Taylor polynomial. NaN passes through
    (``x - x``), inf and 0 are selected outside the range. Needs ``x`` and ``d``."""
    out: list[str] = []
    a = out.append
    a(f"{body}xc = min(max(x, XMIN), XMAX)")
    a(f"{body}e2 = np.floor(xc * LOG2E + HALF)  # float32: the reduction stays in float32")
    a(f"{body}rr_ = xc - e2 * LN2_HI - e2 * LN2_LO")
    a(f"{body}pe = ONE + rr_ * (ONE + rr_ * (C2 + rr_ * (C3 + rr_ * (C4 + rr_ * (C5 + rr_ * "
      "(C6 + rr_ * C7))))))")
    a(f"{body}pe = pe + (x - x)")
    a(f"{body}pe = INF if x > XMAX else pe")
    a(f"{body}pe = ZERO if x < XMIN else pe")
    a(f"{body}ibuf[t] = (min(np.int32(e2), EXP_CAP) + EXP_CAP) << np.int32(23)")
    a(f"{body}dbuf[t] = d * pe")
    return out


#: The first words of a call's state block (int64), before the data addresses of its arrays
#: (:func:`array_shapes` order): the block's reference count, the next chunk to claim, the
#: chunks done, the phase's chunks and its number, chunks per batch member and rows per chunk,
#: and the layout ``(B, P, N1, M, N2)``.
STATE_HEAD = ("refs", "next", "done", "chunks", "phase", "cpm", "rpc", "B", "P", "N1", "M",
              "N2")
#: Elements per chunk (whole rows of ``N2``), and the fewest elements in a call for which
#: helper threads are asked for.
CHUNK_ELEMENTS = 4096
PARALLEL_MIN_ELEMENTS = 8192
#: The arrays of a call that the kernel allocates (float64 ones: partial sums).
_FLOAT64 = ("gsa", "gsc", "part")


def runtime_lines(num_words: int) -> list[str]:
    """The runtime of a generated kernel module: raw pointers, ``malloc`` / ``free``, atomics,
    calls through C function pointers, ``sched_yield``, and the state block's size."""
    out: list[str] = []
    a = out.append
    a(f"NW = {num_words}  # words of a state block, then 8 for the arguments of API calls")
    a(f"CHUNK = {CHUNK_ELEMENTS}\nPARALLEL_MIN = {PARALLEL_MIN_ELEMENTS}")
    a("I64 = ir.IntType(64)\nVOID = ir.VoidType()\nPTR = cgutils.voidptr_t\n\n")

    def intrinsic(name: str, params: str, sig: str, body: list[str]) -> None:
        a("@intrinsic")
        a(f"def {name}(typingctx{', ' if params else ''}{params}):")
        a("    def codegen(context, builder, signature, args):")
        out.extend("        " + line for line in body)
        a(f"    return {sig}, codegen\n\n")

    def extern(fn: str, ret: str, params: str) -> str:
        return (f"cgutils.get_or_insert_function(builder.module, ir.FunctionType({ret}, "
                f"[{params}]), '{fn}')")

    intrinsic("_as_pointer", "address", "types.voidptr(address)",
              ["return builder.inttoptr(args[0], PTR)"])
    intrinsic("_null", "", "types.voidptr()", ["return PTR(None)"])
    intrinsic("_address", "pointer", "types.int64(pointer)",
              ["return builder.ptrtoint(args[0], I64)"])
    intrinsic("_malloc", "size", "types.int64(types.int64)",
              [f"fn = {extern('malloc', 'PTR', 'I64')}",
               "return builder.ptrtoint(builder.call(fn, [args[0]]), I64)"])
    intrinsic("_free", "address", "types.void(types.int64)",
              [f"fn = {extern('free', 'VOID', 'PTR')}",
               "builder.call(fn, [builder.inttoptr(args[0], PTR)])",
               "return context.get_dummy_value()"])
    intrinsic("_yield", "", "types.void()",
              [f"builder.call({extern('sched_yield', 'ir.IntType(32)', '')}, [])",
               "return context.get_dummy_value()"])
    # sequentially consistent: a chunk's writes are seen by whoever sees its completion
    intrinsic("_atomic_add", "address, value", "types.int64(types.int64, types.int64)",
              ["ptr = builder.inttoptr(args[0], I64.as_pointer())",
               "return builder.atomic_rmw('add', ptr, args[1], 'seq_cst')"])
    intrinsic("_atomic_load", "address", "types.int64(types.int64)",
              ["return builder.load_atomic(builder.inttoptr(args[0], I64.as_pointer()), "
               "'seq_cst', 8)"])
    intrinsic("_atomic_cas", "address, expected, value",
              "types.int64(types.int64, types.int64, types.int64)",
              ["ptr = builder.inttoptr(args[0], I64.as_pointer())",
               "res = builder.cmpxchg(ptr, args[1], args[2], 'seq_cst', 'seq_cst')",
               "return builder.extract_value(res, 0)"])
    intrinsic("_getpid", "", "types.int64()",
              [f"fn = {extern('getpid', 'ir.IntType(32)', '')}",
               "return builder.sext(builder.call(fn, []), I64)"])
    # int pthread_<name>(void*, void*): the mutex and condition variable functions used (the
    # one-argument ones ignore the second, as every C calling convention allows)
    for fn in ("mutex_init", "mutex_lock", "mutex_unlock", "cond_init", "cond_wait",
               "cond_signal"):
        intrinsic(f"_{fn}", "first, second", "types.int64(types.int64, types.int64)",
                  [f"fn = {extern('pthread_' + fn, 'ir.IntType(32)', 'PTR, PTR')}",
                   "res = builder.call(fn, [builder.inttoptr(x, PTR) for x in args])",
                   "return builder.sext(res, I64)"])
    intrinsic("_pthread_create", "thread, start", "types.int64(types.int64, types.int64)",
              ["fnty = ir.FunctionType(ir.IntType(32), [PTR, PTR, PTR, PTR])",
               "fn = cgutils.get_or_insert_function(builder.module, fnty, 'pthread_create')",
               "res = builder.call(fn, [builder.inttoptr(args[0], PTR), PTR(None), "
               "builder.inttoptr(args[1], PTR), PTR(None)])",
               "return builder.sext(res, I64)"])
    # the process's helper-thread block, bound by learnopt.learned.native.helper_block
    intrinsic("_helpers", "", "types.int64()",
              ["mod = builder.module",
               "var = mod.globals.get('learnopt_helpers') or "
               "cgutils.add_global_variable(mod, I64, 'learnopt_helpers')",
               "return builder.ptrtoint(var, I64)"])
    intrinsic("_call_task", "task, data", "types.void(types.int64, types.int64)",
              ["fnty = ir.FunctionType(VOID, [PTR])",
               "f = builder.inttoptr(args[0], fnty.as_pointer())",
               "builder.call(f, [builder.inttoptr(args[1], PTR)])",
               "return context.get_dummy_value()"])
    a("@njit(inline='always')")
    a("def _words(address, n):")
    a("    return carray(_as_pointer(address), (n,), np.int64)\n\n")
    return out


#: Words of the process's helper-thread block (:func:`helper_block`): the pid that started
#: the helpers, a start lock (its holder's pid), the helpers started, the queue's head and
#: tail, a ``pthread_t`` out-word; then a pthread mutex and condition variable (16 words each,
#: more than any platform's), and a queue of ``(task, data)`` pairs.
HELPER_HEAD = ("pid", "lock", "count", "head", "tail", "thread")
HELPER_QUEUE = 64
_H_MUTEX, _H_COND, _H_QUEUE = 8, 24, 40
HELPER_WORDS = _H_QUEUE + 2 * HELPER_QUEUE
#: Polls of an idle helper (each a ``sched_yield``) before it sleeps on the condition variable.
HELPER_SPINS = 2000


def parallel_lines(symbol: str) -> list[str]:
    """Parallel loops over chunks, on the caller's thread and helper threads (needs ``_work(w,
    phase, c)``, one chunk of a phase on the state block's words ``w``, inlinable).

    ``task(block)``, a C function, claims chunks of the block's phase (an atomic counter) and
    runs them until none is left, then drops its reference to the block. ``_parallel(t, mode,
    threads, task, phase, n)`` runs chunks ``0..n-1`` of ``phase``: it copies the template
    ``t`` into a fresh state block, queues ``task(block)`` for up to ``threads - 1`` helpers
    (``mode`` 1; ``mode`` 0 runs every chunk on the caller's thread), runs it itself, and waits
    until every claimed chunk is done. The caller never waits on a helper that has not
    started: one that starts late, or never, finds nothing to do, and the block is freed by
    whoever holds its last reference.

    The helpers are the process's own threads (``pthread``), shared by every kernel module
    through :func:`helper_block`, started on first use and again after a ``fork`` (the pid
    changes). XLA cannot lend its threads: ``import learnopt`` gives its intra-op pool one
    thread (docs/hangs.md), on which it runs the custom call. An idle helper polls the queue
    for a while, then sleeps on a condition variable.

    ``task`` and ``worker`` are compiled once, by themselves (the chunks' code is large, and
    numba optimises again every function it is linked into): their addresses are bound to the
    symbols ``learnopt_{task,worker}_<symbol>`` that the callers refer to."""
    out: list[str] = []
    a = out.append
    a("REFS, NEXT, DONE, CHUNKS, PHASE = " + ", ".join(
        str(STATE_HEAD.index(n)) for n in ("refs", "next", "done", "chunks", "phase")))
    a("H_PID, H_LOCK, H_COUNT, H_HEAD, H_TAIL, H_THREAD = " + ", ".join(
        str(HELPER_HEAD.index(n)) for n in HELPER_HEAD))
    a(f"HQ = {HELPER_QUEUE}\nH_MUTEX = {_H_MUTEX}\nH_COND = {_H_COND}\nH_QUEUE = {_H_QUEUE}")
    a(f"HELPER_SPINS = {HELPER_SPINS}\n\n")
    a("@njit(inline='always')")
    a("def _release(block):")
    a("    if _atomic_add(block + 8 * REFS, -1) == 1:")
    a("        _free(block)\n\n")
    a("@cfunc(types.void(types.voidptr), fastmath=FASTMATH, error_model='numpy', cache=True)")
    a("def task(data):")
    a("    block = _address(data)")
    a("    w = _words(block, NW)")
    a("    n = w[CHUNKS]; phase = w[PHASE]")
    a("    while True:")
    a("        c = _atomic_add(block + 8 * NEXT, 1)")
    a("        if c >= n:")
    a("            break")
    a("        _work(w, phase, c)")
    a("        _atomic_add(block + 8 * DONE, 1)")
    a("    _release(block)\n\n")
    a(f"binding.add_symbol('learnopt_task_{symbol}', task.address)\n\n")
    a("@cfunc(types.voidptr(types.voidptr), cache=True)")
    a("def worker(arg):")
    a("    h = _helpers()")
    a("    hw = _words(h, H_QUEUE + 2 * HQ)")
    a("    head = h + 8 * H_HEAD; tail = h + 8 * H_TAIL")
    a("    while True:")
    a("        spins = 0")
    a("        while _atomic_load(tail) == _atomic_load(head) and spins < HELPER_SPINS:")
    a("            _yield()")
    a("            spins += 1")
    a("        _mutex_lock(h + 8 * H_MUTEX, 0)")
    a("        while _atomic_load(tail) == _atomic_load(head):")
    a("            _cond_wait(h + 8 * H_COND, h + 8 * H_MUTEX)")
    a("        slot = H_QUEUE + 2 * (hw[H_HEAD] % HQ)")
    a("        job = hw[slot]; data = hw[slot + 1]")
    a("        _atomic_add(head, 1)")
    a("        _mutex_unlock(h + 8 * H_MUTEX, 0)")
    a("        _call_task(job, data)")
    a("    return _null()\n\n")
    a(f"binding.add_symbol('learnopt_worker_{symbol}', worker.address)\n\n")
    for name in ("task", "worker"):
        a("@intrinsic")
        a(f"def _{name}_address(typingctx):")
        a("    def codegen(context, builder, signature, args):")
        a("        fnty = ir.FunctionType(VOID, [PTR])")
        a("        fn = cgutils.get_or_insert_function(builder.module, fnty, "
          f"'learnopt_{name}_{symbol}')")
        a("        return builder.ptrtoint(fn, I64)")
        a("    return types.int64(), codegen\n\n")
    a("@njit(cache=True)")
    a("def _start_helpers(h, count):")
    a("    # at least count helpers in this process (started again after a fork)")
    a("    pid = _getpid()")
    a("    hw = _words(h, H_QUEUE)")
    a("    started = _atomic_load(h + 8 * H_COUNT)")
    a("    if _atomic_load(h + 8 * H_PID) == pid and started >= count:")
    a("        return")
    a("    # the start lock holds its owner's pid: one copied from the parent by a fork is stale")
    a("    lock = h + 8 * H_LOCK")
    a("    while True:")
    a("        owner = _atomic_cas(lock, 0, pid)")
    a("        if owner == 0 or (owner != pid and _atomic_cas(lock, owner, pid) == owner):")
    a("            break")
    a("        _yield()")
    a("    if hw[H_PID] != pid:")
    a("        _mutex_init(h + 8 * H_MUTEX, 0)")
    a("        _cond_init(h + 8 * H_COND, 0)")
    a("        hw[H_COUNT] = 0; hw[H_HEAD] = 0; hw[H_TAIL] = 0")
    a("        _atomic_add(h + 8 * H_PID, pid - hw[H_PID])")
    a("    while hw[H_COUNT] < count:")
    a("        if _pthread_create(h + 8 * H_THREAD, _worker_address()) != 0:")
    a("            break")
    a("        _atomic_add(h + 8 * H_COUNT, 1)")
    a("    _atomic_add(lock, -pid)\n\n")
    a("@njit(cache=True)")
    a("def _submit(job, data):")
    a("    h = _helpers()")
    a("    hw = _words(h, H_QUEUE + 2 * HQ)")
    a("    _mutex_lock(h + 8 * H_MUTEX, 0)")
    a("    queued = hw[H_TAIL] - hw[H_HEAD] < HQ")
    a("    if queued:")
    a("        slot = H_QUEUE + 2 * (hw[H_TAIL] % HQ)")
    a("        hw[slot] = job; hw[slot + 1] = data")
    a("        _atomic_add(h + 8 * H_TAIL, 1)")
    a("        _cond_signal(h + 8 * H_COND, 0)")
    a("    _mutex_unlock(h + 8 * H_MUTEX, 0)")
    a("    return queued\n\n")
    a("@njit(cache=True)")
    a("def _parallel(t, mode, threads, task, phase, n):")
    a("    block = _malloc(8 * NW)")
    a("    w = _words(block, NW)")
    a("    for q in range(NW):")
    a("        w[q] = t[q]")
    a("    helpers = max(min(threads - 1, n - 1), 0) if mode != 0 else 0")
    a("    # references: each helper's, and the caller's two (its task, its wait)")
    a("    w[REFS] = 2 + helpers; w[NEXT] = 0; w[DONE] = 0; w[CHUNKS] = n; w[PHASE] = phase")
    a("    if helpers > 0:")
    a("        _start_helpers(_helpers(), helpers)")
    a("    for q in range(helpers):")
    a("        if not _submit(task, block):")
    a("            _atomic_add(block + 8 * REFS, q - helpers)  # the helpers that were not queued")
    a("            break")
    a("    _call_task(task, block)")
    a("    while _atomic_load(block + 8 * DONE) < n:")
    a("        _yield()")
    a("    _release(block)\n\n")
    return out


#: A line of generated source that :func:`fill_views` replaces with a function's arrays.
VIEWS = "# <views>"


def fill_views(lines: list[str], shapes: dict[str, str]) -> list[str]:
    """``lines`` with each :data:`VIEWS` line replaced by :func:`view_lines` of the arrays that
    its function (up to the next decorator) uses: numba types every view it is given."""
    import re

    out: list[str] = []
    for i, line in enumerate(lines):
        if line.strip() != VIEWS:
            out.append(line)
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("@")),
                   len(lines))
        body = "\n".join(lines[i + 1:end])
        used = {name: shape for name, shape in shapes.items()
                if re.search(rf"\b{_VAR.get(name, name)}\b", body)}
        out.extend(view_lines(line[:len(line) - len(line.lstrip())], used, list(shapes)))
    return out


_VAR = {"p": "pa", "g": "ga"}  # in the loops, p and g name an element's values


def view_lines(indent: str, shapes: dict[str, str], order: Sequence[str] = (),
               words: str = "w") -> list[str]:
    """The layout from a state block's ``words`` (``B, P, N1, M, N2``, and ``N``, ``NA``,
    ``NC``, the rows ``R``); from a block (``words="w"``) its chunking (``CPM``, ``RPC``) and
    the arrays of ``shapes`` (``p`` and ``g`` as ``pa`` and ``ga``), each at its word in
    ``order``."""
    head = {name: i for i, name in enumerate(STATE_HEAD)}
    out = [indent + "; ".join(f"{d} = {words}[{head[d]}]" for d in ("B", "P", "N1", "M", "N2")),
           f"{indent}N = P * N1 * M * N2; NA = P * M * N2; NC = P * N1 * M; R = P * N1 * M"]
    if words == "w":
        out.append(f"{indent}CPM = {words}[{head['cpm']}]; RPC = {words}[{head['rpc']}]")
    order = list(order)
    for name, shape in shapes.items():
        dtype = "np.float64" if name in _FLOAT64 else "np.float32"
        out.append(f"{indent}{_VAR.get(name, name)} = carray(_as_pointer({words}["
                   f"{len(STATE_HEAD) + order.index(name)}]), {shape}, {dtype})")
    return out


def scratch_lines(indent: str, shapes: dict[str, str],
                  operands: int = len(INPUTS) + len(OUTPUTS)) -> list[str]:
    """In ``run_call``: one ``malloc`` (``base``) for the arrays of ``shapes`` after the call's
    first ``operands``, their addresses in the template ``t`` (64-byte aligned)."""
    out = [f"{indent}size = 0"]
    names = list(shapes)
    own = names[operands:]
    for name in own:
        item = 8 if name in _FLOAT64 else 4
        out.append(f"{indent}t[{len(STATE_HEAD) + names.index(name)}] = size")
        count = " * ".join(x.strip() for x in shapes[name].strip("()").split(","))
        out.append(f"{indent}size += ({count} * {item} + 63) // 64 * 64")
    out.append(f"{indent}base = _malloc(size + 64)")
    out.append(f"{indent}base64 = (base + 63) // 64 * 64")
    for name in own:
        out.append(f"{indent}t[{len(STATE_HEAD) + names.index(name)}] += base64")
    return out


def ffi_entry_lines(inputs: Sequence[str], outputs: Sequence[str],
                    shapes: dict[str, str]) -> list[str]:
    """``xla_entry``, the XLA FFI handler: the template of a call from its operands (the first
    is ``dims``: ``B, P, N1, M, N2`` and the most threads to use), then ``run_call`` with
    XLA's intra-op thread pool."""
    out: list[str] = []
    a = out.append
    # XLA's typed FFI (xla/ffi/api/c_api.h): XLA_FFI_Error* handler(XLA_FFI_CallFrame*), read
    # as 8-byte words. Call frame: 1 extension_start, 2 api, 3 execution context, 4 stage,
    # 9 argument buffers (void**), 14 result buffers; buffer: 3 data. A frame whose extension
    # is the metadata query (type 1) gets the API version of the headers this kernel was
    # generated against.
    major, minor = ffi_api_version()
    a("@cfunc(types.voidptr(types.voidptr), cache=True)")
    a("def xla_entry(frame_ptr):")
    a("    frame = carray(frame_ptr, (15,), np.int64)")
    a("    if frame[1] != 0:")
    a("        extension = _words(frame[1], 4)")
    a("        if (extension[1] & 0xFFFFFFFF) == 1:")
    a("            metadata = _words(extension[3], 6)")
    a("            metadata[1] = 24")
    a("            metadata[2] = 0")
    a(f"            metadata[3] = {major} | ({minor} << 32)")
    a("            metadata[4] = 0")
    a("            metadata[5] = 0")
    a("            return _null()")
    a("    if (frame[4] & 0xFFFFFFFF) != 3:")
    a("        return _null()")
    a(f"    ins = _words(frame[9], {len(inputs) + 1})")
    a(f"    outs = _words(frame[14], {len(outputs)})")
    a("    dims = carray(_as_pointer(_words(ins[0], 4)[3]), (6,), np.int32)")
    a("    t = np.zeros(NW, np.int64)")
    a("    for q in range(5):")
    a(f"        t[{STATE_HEAD.index('B')} + q] = dims[q]")
    for j in range(len(inputs)):
        a(f"    t[{len(STATE_HEAD) + j}] = _words(ins[{j + 1}], 4)[3]")
    for j in range(len(outputs)):
        a(f"    t[{len(STATE_HEAD) + len(inputs) + j}] = _words(outs[{j}], 4)[3]")
    a("    run_call(t, 1, dims[5], _task_address())")
    a("    return _null()")
    return out


def array_shapes(k: int, h: int, layers: int, num_time: int,
                 factored: bool = True, features: str = "small_fc_lopt") -> dict[str, str]:
    """Each array of a kernel call, in the state block's order: its :data:`INPUTS` and
    :data:`OUTPUTS`, then the kernel's own (the factors ``fa``, ``fc`` and first-layer
    contributions ``ca``, ``cc`` of the row / column statistics, their sums of squared
    gradients ``gsa``, ``gsc``, and each chunk's sums of the features' squares ``part``),
    with shapes as expressions in ``B, N, NA, NC`` and the chunks per member ``CPM``."""
    nin = feature_names(k, factored, features)[3] + num_time
    shapes = {"p": "(B, N)", "g": "(B, N)", "m": f"(B, {k}, N)", "rms": "(B, 1, N)",
              "va": f"(B, {k}, NA)", "vc": f"(B, {k}, NC)", "decays": f"(B, {2 * k + 1})",
              "w0": f"(B, {nin}, {h})", "b0": f"(B, {h})", "time": f"(B, {num_time})",
              "wh": f"(B, {layers - 1}, {h}, {h})", "bh": f"(B, {layers - 1}, {h})",
              "wo": f"(B, {h}, 2)", "bo": "(B, 2)", "consts": "(B, 4)"}
    shapes.update({"update": "(B, N)", "m_out": shapes["m"], "rms_out": shapes["rms"],
                   "va_out": shapes["va"], "vc_out": shapes["vc"]})
    if factored:
        shapes.update({"fa": f"(B, {k}, NA)", "fc": f"(B, {k}, NC)", "ca": f"(B, {h}, NA)",
                       "cc": f"(B, {h}, NC)", "gsa": "(B, NA)", "gsc": "(B, NC)"})
    full = num_full_features(k, features) + (0 if factored else 2 * k)
    shapes["part"] = f"(B, CPM, {full})"
    return shapes


@functools.cache
def ffi_api_version() -> tuple[int, int]:
    """``(major, minor)`` of XLA's FFI in the installed jaxlib (its ``c_api.h``, found without
    importing jax); ``(0, 0)`` without jaxlib (the PyTorch port alone: no XLA entry is used)."""
    import re

    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        return 0, 0
    header = (Path(next(iter(spec.submodule_search_locations))) / "include" / "xla" / "ffi"
              / "api" / "c_api.h")
    text = header.read_text()
    found = [re.search(rf"#define XLA_FFI_API_{part} (\d+)", text) for part in ("MAJOR", "MINOR")]
    if not all(found):
        raise RuntimeError(f"no XLA FFI API version in {header}")
    return int(found[0].group(1)), int(found[1].group(1))


def kernel_dir() -> Path:
    """Where generated kernels and numba's compiled copies live."""
    env = os.environ.get("LEARNOPT_KERNEL_DIR")
    return Path(env) if env else Path.home() / ".cache" / "learnopt" / "kernels"


def load(name: str, src: str) -> ModuleType:
    """The module of generated kernel source ``src``, written under :func:`kernel_dir` as
    ``<name>_<hash of src>.py`` and imported once per process (numba compiles it once per
    machine, into its on-disk cache beside the file)."""
    digest = hashlib.sha256(src.encode()).hexdigest()[:12]
    if (getattr(_LOCAL, "cached_only", False)
            and not (kernel_dir() / f"{name}_{digest}.py").exists()):
        raise _NotCompiled(name)
    return _load(f"{name}_{digest}", src)


@functools.cache
def _load(name: str, src: str) -> ModuleType:
    directory = kernel_dir()
    path = directory / f"{name}.py"
    with _LOCK:
        if not path.exists():
            directory.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(src)
            os.replace(tmp, path)  # atomic: concurrent processes never read a partial file
        helper_block()  # bound before the module's code is linked
        if f"learnopt_kernel_{name}" in sys.modules:  # loaded by another thread meanwhile
            return sys.modules[f"learnopt_kernel_{name}"]
        spec = importlib.util.spec_from_file_location(f"learnopt_kernel_{name}", path)
        module = importlib.util.module_from_spec(spec)
        # numba's on-disk cache finds the module again by name while it is being executed
        sys.modules[spec.name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[spec.name]  # a later call tries again, never with half a module
            raise
    return module


@functools.cache
def kernel_module(k: int, h: int, layers: int, num_time: int, factored: bool = True,
                  features: str = "small_fc_lopt") -> ModuleType:
    """The compiled kernel module for these sizes and :data:`FEATURE_SETS` entry."""
    return load(_kernel_name(k, h, layers, num_time, factored, features),
                kernel_source(k, h, layers, num_time, factored, features))


def _kernel_name(k: int, h: int, layers: int, num_time: int, factored: bool,
                 features: str) -> str:
    return f"{features}_{'f' if factored else 'v'}_k{k}_h{h}_l{layers}_t{num_time}"


def _out_shapes(k: int, b: int, dims) -> dict[str, tuple[int, ...]]:
    """The outputs' shapes (:func:`array_shapes`) for batch ``b`` and layout ``dims``."""
    p, n1, m, n2 = dims
    n, na, nc = p * n1 * m * n2, p * m * n2, p * n1 * m
    return {"update": (b, n), "m_out": (b, k, n), "rms_out": (b, 1, n), "va_out": (b, k, na),
            "vc_out": (b, k, nc)}


def numpy_call(k: int, h: int, layers: int, num_time: int, dims, arrays: dict,
               out: dict | None = None, factored: bool = True,
               num_threads: int | None = None, features: str = "small_fc_lopt") -> dict:
    """Run the kernel on NumPy float32 arrays (C-contiguous, each with a leading batch axis);
    ``out`` may hold output arrays to write into (an input may be its own output: the
    accumulators are read before they are written, element by element). Large calls share
    their chunks with helper threads (``num_threads`` in all, by default :func:`threads`).
    Returns the outputs."""
    b = arrays["p"].shape[0]
    out = dict(out or {})
    if len(out) < len(OUTPUTS):
        for name, shape in _out_shapes(k, b, dims).items():
            if name not in out:
                out[name] = np.empty(shape, np.float32)
    module = kernel_module(k, h, layers, num_time, factored, features)
    run(module, template(module, b, dims, {**arrays, **out}), num_threads)
    return out


def template(module: ModuleType, batch: int, dims, arrays: dict,
             operands: Sequence[str] = INPUTS + OUTPUTS) -> np.ndarray:
    """A call of kernel ``module``'s template: the layout and the data address of every
    operand (by default the named :data:`INPUTS` and :data:`OUTPUTS`, C-contiguous float32;
    the caller keeps them alive), then room for the kernel's own arrays. A caller that calls
    again on the same arrays may keep it, and change an operand's address at
    :func:`operand_word`."""
    words = np.zeros(module.NW, np.int64)
    words[STATE_HEAD.index("B"):len(STATE_HEAD)] = (batch,) + tuple(dims)
    for word, name in enumerate(operands, len(STATE_HEAD)):
        x = arrays[name]
        if x.dtype != np.float32 or not x.flags.c_contiguous:
            raise ValueError(f"kernel operand {name} must be C-contiguous float32, got "
                             f"{x.dtype} with strides {x.strides}")
        words[word] = x.ctypes.data
    return words


def operand_word(name: str) -> int:
    """The word of a template (:func:`template`) that holds operand ``name``'s address."""
    return len(STATE_HEAD) + (INPUTS + OUTPUTS).index(name)


def run(module: ModuleType, words: np.ndarray, num_threads: int | None = None) -> None:
    """Run a kernel module (:func:`kernel_module`) on a call's :func:`template`, on at most
    ``num_threads`` threads (by default :func:`threads`)."""
    module.run_call(words, 1, num_threads or threads(), module.task.address)


def threads() -> int:
    """The most threads a kernel call uses (``LEARNOPT_NATIVE_THREADS``, or :func:`set_threads`;
    by default the CPUs this process may run on): the caller's and ``threads() - 1`` helpers
    (:func:`parallel_lines`)."""
    if "threads" in _STATE:
        return _STATE["threads"]
    env = os.environ.get("LEARNOPT_NATIVE_THREADS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"LEARNOPT_NATIVE_THREADS must be a whole number >= 1, got {env!r}")
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def set_threads(count: int | None) -> int | None:
    """Set the most threads a kernel call uses, for computations traced (XLA) or run (PyTorch)
    from now on; ``None`` restores the default. Results do not depend on it (the chunks are
    fixed by the layout). Returns the old setting."""
    if count is not None and count < 1:
        raise ValueError(f"threads must be >= 1, got {count}")
    old = _STATE.get("threads")
    if count is None:
        _STATE.pop("threads", None)
    else:
        _STATE["threads"] = int(count)
    return old


@functools.cache
def helper_block() -> np.ndarray:
    """The process's helper-thread block (:data:`HELPER_WORDS` int64 words, 64-byte aligned),
    bound to the symbol ``learnopt_helpers`` that every kernel module refers to: one set of
    helper threads serves them all. Kept alive for the life of the process."""
    from llvmlite import binding

    raw = np.zeros(HELPER_WORDS + 8, np.int64)
    start = (-raw.ctypes.data % 64) // 8
    block = raw[start:start + HELPER_WORDS]
    binding.add_symbol("learnopt_helpers", block.ctypes.data)
    return block


@functools.cache
def register(name: str, module: ModuleType) -> str:
    """Register ``module.xla_entry`` as the XLA CPU custom call ``name`` (typed FFI)."""
    import jax

    new_capsule = ctypes.pythonapi.PyCapsule_New
    new_capsule.restype = ctypes.py_object
    new_capsule.argtypes = (ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p)
    capsule = new_capsule(module.xla_entry.address, b"xla._CUSTOM_CALL_TARGET", None)
    jax.ffi.register_ffi_target(name, capsule, platform="cpu")
    return name


@functools.cache
def batched_call(target: str, out_shapes: tuple[tuple[int, ...], ...],
                 dims: tuple[int, ...], aliases: tuple[tuple[int, int], ...] = ()):
    """``f(*inputs) -> outputs``: the custom call ``target`` on arrays with one leading batch
    axis (``dims`` after the batch size is its ``dims`` operand; ``out_shapes`` the output
    shapes without the batch axis; all hashable, so that one function serves every trace),
    closed under ``vmap``: a vmapped call folds the new axis into the batch axis and calls
    itself.

    ``aliases`` pairs ``(input, output)``: that output is written over that input's buffer
    (the kernel reads each accumulator element before it writes it) and has the input's
    shape. The batch size is the first input's leading axis; an aliased input may have any
    shape of the same row-major memory, ``(batch, ...)`` or the tensor's own shape for a
    batch of one, and is passed without a reshape. That matters in a loop: XLA updates a
    loop-carried accumulator in place only when the call's operand is the carried array
    itself; through a reshape it copied the accumulators before and after every call."""
    import jax
    import jax.numpy as jnp

    out_of = dict(aliases)

    @jax.custom_batching.custom_vmap
    def call(*inputs):
        b = inputs[0].shape[0]
        outs = [jax.ShapeDtypeStruct((b,) + s, jnp.float32) for s in out_shapes]
        for i, o in aliases:
            outs[o] = jax.ShapeDtypeStruct(inputs[i].shape, jnp.float32)
        return tuple(jax.ffi.ffi_call(target, outs, input_output_aliases={
            i + 1: o for i, o in aliases})(jnp.asarray((b,) + dims, jnp.int32), *inputs))

    @call.def_vmap
    def _rule(axis_size, in_batched, *inputs):
        flat = []
        for i, (x, batched) in enumerate(zip(inputs, in_batched, strict=True)):
            if not batched:
                x = jnp.broadcast_to(x, (axis_size,) + x.shape)
            if i not in out_of:  # an aliased input's memory is already batch-major
                x = jnp.reshape(x, (axis_size * x.shape[1],) + x.shape[2:])
            flat.append(x)
        outs = call(*flat)
        aliased = set(out_of.values())
        return (tuple(o if j in aliased else jnp.reshape(o, (axis_size, -1) + o.shape[1:])
                      for j, o in enumerate(outs)), (True,) * len(outs))

    return call


def xla_call(k: int, h: int, layers: int, num_time: int, dims, arrays: dict,
             factored: bool = True, features: str = "small_fc_lopt",
             in_place: Sequence[str] = ()) -> dict:
    """The kernel as one XLA CPU custom call on the named :data:`INPUTS` (each with a leading
    batch axis); returns the named :data:`OUTPUTS`. Each accumulator named in ``in_place``
    (of ``m``, ``rms``, ``va``, ``vc``) is updated in its input's buffer and returned in that
    input's shape, which may be any shape of the same memory (:func:`batched_call`)."""
    target = register("learnopt_" + _kernel_name(k, h, layers, num_time, factored, features),
                      kernel_module(k, h, layers, num_time, factored, features))
    dims = tuple(int(d) for d in dims)
    shapes = _out_shapes(k, 1, dims)
    aliases = tuple((INPUTS.index(n), OUTPUTS.index(n + "_out")) for n in in_place)
    call = batched_call(target, tuple(shapes[n][1:] for n in OUTPUTS), dims + (threads(),),
                        aliases)
    outs = call(*(arrays[name] for name in INPUTS))
    return dict(zip(OUTPUTS, outs, strict=True))
