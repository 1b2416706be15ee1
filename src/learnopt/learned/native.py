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
factored axes ``N1`` and ``N2`` (the caller moves the later one last when it is not); ``va`` is
its factored statistic without ``N1``, ``(P, M, N2)``, and ``vc`` the one without ``N2``,
``(P, N1, M)``. A tensor of rank < 2 is one run ``(1, 1, 1, N)`` with ``v_full`` in ``va``.
Every array has a leading batch axis ``B`` (vmapped tasks and perturbations).

The kernel is generated as Python source for each architecture size (decays ``K``, width
``H``, ``L`` hidden layers, ``T`` time features, factored or not), written to a cache
directory (``LEARNOPT_KERNEL_DIR``, default ``~/.cache/learnopt/kernels``) and compiled with
numba's on-disk cache, so a machine compiles each once (3-6 s). XLA calls it as a CPU custom
call through its typed FFI (:func:`xla_call`); the PyTorch port calls it on NumPy views
(:func:`numpy_call`). numba is a dependency; without it, or with ``LEARNOPT_NATIVE=0``,
:func:`available` is False and the callers use their XLA / torch paths (the same function).
"""

from __future__ import annotations

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

_LOCK = threading.Lock()


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
    """Whether ``module_fn(*sizes)`` (a kernel module) builds; a warning says why not."""
    try:
        module_fn(*sizes)
        return True
    except Exception as err:  # an unwritable cache directory, a numba that cannot compile
        warnings.warn(f"learnopt: the native kernel {module_fn.__module__}.{module_fn.__name__}"
                      f"{sizes} is unavailable ({err!r}); using the XLA / torch path (the "
                      "same function, slower)", stacklevel=3)
        return False


@functools.cache
def _builds(k: int, h: int, layers: int, num_time: int, factored: bool) -> bool:
    return builds(kernel_module, k, h, layers, num_time, factored)


def ready(k: int, h: int, layers: int, num_time: int, factored: bool) -> bool:
    """Whether the kernel for these sizes can be used: :func:`available` and it compiles (on
    failure a warning says why, once)."""
    return available() and _builds(k, h, layers, num_time, factored)


def set_enabled(enabled: bool) -> bool:
    """Turn the kernel on or off for computations traced from now on; returns the old value."""
    old = _STATE["enabled"]
    _STATE["enabled"] = bool(enabled)
    return old


def num_full_features(k: int) -> int:
    """Full-size features of a factored tensor: g, p, m (K), rms, m * r (K), r, fac_g (K),
    m * row_f * col_f (K)."""
    return 4 + 4 * k


class Layout(NamedTuple):
    """How a factored tensor of ``shape`` is laid out for the kernel.

    ``dims = (P, N1, M, N2)``: the tensor with its later factored axis ``c`` moved last, and
    ``a`` its earlier one. ``perm_full`` does that move on the tensor, ``perm_lack_a`` on an
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


@functools.lru_cache(maxsize=4096)
def layout(shape: Sequence[int], d1: int, d0: int) -> Layout:
    """The :class:`Layout` of a tensor of ``shape`` with factored axes ``(d1, d0)``."""
    shape = tuple(int(x) for x in shape)
    a, c = min(d0, d1), max(d0, d1)
    n = len(shape)
    dims = (math.prod(shape[:a]), shape[a], math.prod(shape[a + 1:c]) * math.prod(shape[c + 1:]),
            shape[c])
    full = tuple(i for i in range(n) if i != c) + (c,)
    lack_a = tuple(i for i in range(n - 1) if i != c - 1) + (c - 1,)
    return Layout(dims, a, c, (0,) + tuple(i + 1 for i in full),
                  (0,) + tuple(i + 1 for i in lack_a), d0 == a)


@functools.lru_cache(maxsize=4096)
def inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    """The permutation that undoes ``perm``."""
    return tuple(sorted(range(len(perm)), key=perm.__getitem__))


def kernel_source(k: int, h: int, layers: int, num_time: int, factored: bool = True) -> str:
    """Python (numba) source of the kernel for ``k`` decays, width ``h``, ``layers`` hidden
    layers (>= 1) and ``num_time`` time features: ``kernel(dims, <INPUTS>, <OUTPUTS>)`` and
    the XLA entry point ``xla_entry(call_frame)``. ``factored=False``: the kernel of tensors
    of rank < 2, whose full second moment ``v_full`` (in ``va``, ``vc`` unused) stands in for
    the row and column statistics; its 28 features are all full-size."""
    if k < 1 or h < 1 or layers < 1 or num_time < 0:
        raise ValueError(f"need k, h, layers >= 1 and num_time >= 0; got {k}, {h}, {layers}, "
                         f"{num_time}")
    first = 4 + 3 * k  # the 4K row / column features follow the first 4 + 3K
    nf = 4 + 8 * k
    names = (["g", "p"] + [f"m{i}" for i in range(k)] + ["rv"] + [f"mr{i}" for i in range(k)]
             + ["r"] + [f"fg{i}" for i in range(k)] + [f"mf{i}" for i in range(k)])
    # the w0 rows of each computed feature: a feature that stands for two inputs (v_full as
    # the row and the column statistic) gets the sum of their rows
    rows = [[r] for r in list(range(first)) + list(range(first + 4 * k, nf))]
    if not factored:
        names += [f"v{i}" for i in range(k)] + [f"rs{i}" for i in range(k)]
        rows += [[first + i, first + k + i] for i in range(k)]
        rows += [[first + 2 * k + i, first + 3 * k + i] for i in range(k)]
    f = len(names)
    assert f == num_full_features(k) + (0 if factored else 2 * k)
    out: list[str] = []
    a = out.append
    i2, i3, i4 = " " * 8, " " * 12, " " * 16
    ind, body = " " * 20, " " * 24

    def features() -> None:
        """The 16 features of element t, from the new accumulators."""
        a(f"{body}g = gr[t]")
        a(f"{body}p = pr[t]")
        a(f"{body}rv = rw[t]")
        a(f"{body}r = ONE / math.sqrt(rv + E6)")
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
                a(f"{body}mf{i} = m{i} / math.sqrt(v{i} + E6)")

    def runs(with_mlp: bool) -> None:
        a(f"{i2}for pi in range(P):")
        a(f"{i3}for i in range(N1):")
        a(f"{i4}for mm in range(M):")
        a(f"{ind}e = ((pi * N1 + i) * M + mm) * N2")
        a(f"{ind}ia = (pi * M + mm) * N2")
        a(f"{ind}ic = (pi * N1 + i) * M + mm")
        a(f"{ind}gr = gb[e:e + N2]; pr = pb[e:e + N2]; rr = rb[e:e + N2]; rw = rwb[e:e + N2]")
        for i in range(k):
            a(f"{ind}mr_{i} = mb[{i}, e:e + N2]; mw_{i} = mwb[{i}, e:e + N2]")
            if factored:
                a(f"{ind}far{i} = fa[{i}, ia:ia + N2]; fc{i} = fc[{i}, ic]")
            else:
                a(f"{ind}vo_{i} = vab[{i}, e:e + N2]; vw_{i} = vaob[{i}, e:e + N2]")
        if with_mlp:
            a(f"{ind}outr = ob[e:e + N2]")
            for o in range(h):
                if factored:
                    a(f"{ind}car{o} = ca[{o}, ia:ia + N2]; base{o} = bias{o} + cc[{o}, ic]")
                else:
                    a(f"{ind}base{o} = bias{o}")

    a('"""Generated by learnopt.learned.native.kernel_source: small_fc_lopt, '
      f'K={k}, H={h}, L={layers}, T={num_time}, factored={factored}."""')
    out.extend(header_lines())
    a(f"K = {k}\nH = {h}\nFIRST = {first}\nNF = {nf}\nT = {num_time}")
    a("FASTMATH = {'reassoc', 'contract', 'arcp'}  # no nnan / ninf: NaN and inf propagate\n\n")
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
    a("@njit(fastmath=FASTMATH, error_model='numpy', cache=True)")
    # p and g name the element's values in the loops: the arrays are pa and ga here
    args = [{"p": "pa", "g": "ga"}.get(n, n) for n in INPUTS + OUTPUTS]
    a("def kernel(dims, " + ", ".join(args) + "):")
    a("    B, P, N1, M, N2 = dims[0], dims[1], dims[2], dims[3], dims[4]")
    a("    N = P * N1 * M * N2; NA = P * M * N2; NC = P * N1 * M")
    if factored:
        a("    fa = np.empty((K, NA), np.float32); fc = np.empty((K, NC), np.float32)")
        a("    ca = np.empty((H, NA), np.float32); cc = np.empty((H, NC), np.float32)")
        a("    gsum_a = np.empty(NA, np.float64); gsum_c = np.empty(NC, np.float64)")
    a("    dbuf = np.empty(N2, np.float32); ibuf = np.empty(N2, np.int32)")
    a("    sbuf = ibuf.view(np.float32)")
    a("    for b in range(B):")
    a("        exp_mult = consts[b, 0]; step_mult = consts[b, 1]; eps = consts[b, 2]")
    if factored:
        a("        _factored(P, N1, M, N2, ga[b], va[b], vc[b], va_out[b], vc_out[b], "
          "decays[b], w0[b], consts[b, 3] > 0.5, eps, fa, fc, ca, cc, gsum_a, gsum_c)")
    else:
        a("        vab = va[b]; vaob = va_out[b]")
        a(i2 + "; ".join(f"ak{i} = decays[b, {k + 1 + i}]" for i in range(k)))
    a("        pb = pa[b]; gb = ga[b]; mb = m[b]; rb = rms[b, 0]")
    a("        mwb = m_out[b]; rwb = rms_out[b, 0]; ob = update[b]")
    a(i2 + "; ".join(f"bm{i} = decays[b, {i}]" for i in range(k)))
    a(f"{i2}crms = decays[b, {k}]")
    a(i2 + "; ".join(f"ss{v} = 0.0" for v in range(f)))
    runs(with_mlp=False)  # pass 1: new accumulators, mean squares of the features
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
    features()
    for v, nm in enumerate(names):
        a(f"{body}s{v} += {nm} * {nm}")
    for v in range(f):
        a(f"{ind}ss{v} += s{v}")
    for v in range(f):
        a(f"{i2}sc = np.float32(1.0 / math.sqrt(eps + ss{v} / N))")
        a(i2 + "; ".join(f"w{v}_{o} = (" + " + ".join(f"w0[b, {r}, {o}]" for r in rows[v])
                         + ") * sc" for o in range(h)))
    for o in range(h):
        a(f"{i2}bias{o} = b0[b, {o}]")
        a(f"{i2}for j in range(T):")
        a(f"{i2}    bias{o} += time[b, j] * w0[b, NF + j, {o}]")
    for li in range(layers - 1):
        for v in range(h):
            a(i2 + "; ".join(f"u{li}_{v}_{o} = wh[b, {li}, {v}, {o}]" for o in range(h)))
        a(i2 + "; ".join(f"c{li}_{o} = bh[b, {li}, {o}]" for o in range(h)))
    a(i2 + "; ".join(f"od{v} = wo[b, {v}, 0]; om{v} = wo[b, {v}, 1]" for v in range(h)))
    a(f"{i2}bd = bo[b, 0]; bmag = bo[b, 1]")
    runs(with_mlp=True)  # pass 2: the features again, the MLP, the step
    a(f"{ind}for t in range(N2):")
    features()
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
    out.extend(ffi_entry_lines(INPUTS, OUTPUTS, array_shapes(k, h, layers, num_time)))
    return "\n".join(out) + "\n"


def header_lines() -> list[str]:
    """Imports and float32 constants of a generated kernel module."""
    out: list[str] = []
    a = out.append
    a("import math\n\nimport numpy as np\nfrom numba import carray, cfunc, njit, types")
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
    a(f"{body}e2 = math.floor(xc * LOG2E + HALF)")
    a(f"{body}rr_ = xc - e2 * LN2_HI - e2 * LN2_LO")
    a(f"{body}pe = ONE + rr_ * (ONE + rr_ * (C2 + rr_ * (C3 + rr_ * (C4 + rr_ * (C5 + rr_ * "
      "(C6 + rr_ * C7))))))")
    a(f"{body}pe = pe + (x - x)")
    a(f"{body}pe = INF if x > XMAX else pe")
    a(f"{body}pe = ZERO if x < XMIN else pe")
    a(f"{body}ibuf[t] = (min(np.int32(e2), EXP_CAP) + EXP_CAP) << np.int32(23)")
    a(f"{body}dbuf[t] = d * pe")
    return out


def ffi_entry_lines(inputs: Sequence[str], outputs: Sequence[str],
                    shapes: dict[str, str]) -> list[str]:
    """``xla_entry``, the XLA FFI handler calling ``kernel(dims, *inputs, *outputs)``, with
    each array's shape an expression in ``B, N, NA, NC`` (from the ``dims`` operand)."""
    out: list[str] = []
    a = out.append
    # XLA's typed FFI (xla/ffi/api/c_api.h): XLA_FFI_Error* handler(XLA_FFI_CallFrame*), read
    # as 8-byte words. Call frame: 1 extension_start, 4 stage, 9 argument buffers (void**),
    # 14 result buffers; buffer: 3 data. A frame whose extension is the metadata query
    # (type 1) gets the API version of the headers this kernel was generated against.
    major, minor = ffi_api_version()
    a("@intrinsic")
    a("def _as_pointer(typingctx, address):")
    a("    def codegen(context, builder, signature, args):")
    a("        return builder.inttoptr(args[0], cgutils.voidptr_t)")
    a("    return types.voidptr(address), codegen\n\n")
    a("@intrinsic")
    a("def _null(typingctx):")
    a("    def codegen(context, builder, signature, args):")
    a("        return cgutils.voidptr_t(None)")
    a("    return types.voidptr(), codegen\n\n")
    a("@njit(inline='always')")
    a("def _words(address, n):")
    a("    return carray(_as_pointer(address), (n,), np.int64)\n\n")
    a("@njit(inline='always')")
    a("def _f32(buffers, j, shape):")
    a("    return carray(_as_pointer(_words(buffers[j], 4)[3]), shape, np.float32)\n\n")
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
    a("    dims = carray(_as_pointer(_words(ins[0], 4)[3]), (5,), np.int32)")
    a("    B, P, N1, M, N2 = dims[0], dims[1], dims[2], dims[3], dims[4]")
    a("    N = P * N1 * M * N2; NA = P * M * N2; NC = P * N1 * M")
    for j, name in enumerate(inputs):
        a(f"    {name} = _f32(ins, {j + 1}, {shapes[name]})")
    for j, name in enumerate(outputs):
        a(f"    {name} = _f32(outs, {j}, {shapes[name]})")
    a("    kernel(dims, " + ", ".join(tuple(inputs) + tuple(outputs)) + ")")
    a("    return _null()")
    return out


def array_shapes(k: int, h: int, layers: int, num_time: int) -> dict[str, str]:
    """Each kernel array's shape, as an expression in ``B, N, NA, NC``."""
    nin = 4 + 8 * k + num_time
    shapes = {"p": "(B, N)", "g": "(B, N)", "m": f"(B, {k}, N)", "rms": "(B, 1, N)",
              "va": f"(B, {k}, NA)", "vc": f"(B, {k}, NC)", "decays": f"(B, {2 * k + 1})",
              "w0": f"(B, {nin}, {h})", "b0": f"(B, {h})", "time": f"(B, {num_time})",
              "wh": f"(B, {layers - 1}, {h}, {h})", "bh": f"(B, {layers - 1}, {h})",
              "wo": f"(B, {h}, 2)", "bo": "(B, 2)", "consts": "(B, 4)"}
    shapes.update({"update": "(B, N)", "m_out": shapes["m"], "rms_out": shapes["rms"],
                   "va_out": shapes["va"], "vc_out": shapes["vc"]})
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
        spec = importlib.util.spec_from_file_location(f"learnopt_kernel_{name}", path)
        module = importlib.util.module_from_spec(spec)
        # numba's on-disk cache finds the module again by name while it is being executed
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module


@functools.cache
def kernel_module(k: int, h: int, layers: int, num_time: int, factored: bool = True
                  ) -> ModuleType:
    """The compiled small_fc_lopt kernel module for these sizes."""
    kind = "f" if factored else "v"
    return load(f"small_fc_lopt_{kind}_k{k}_h{h}_l{layers}_t{num_time}",
                kernel_source(k, h, layers, num_time, factored))


def _out_shapes(k: int, b: int, dims) -> dict[str, tuple[int, ...]]:
    """The outputs' shapes (:func:`array_shapes`) for batch ``b`` and layout ``dims``."""
    p, n1, m, n2 = dims
    n, na, nc = p * n1 * m * n2, p * m * n2, p * n1 * m
    return {"update": (b, n), "m_out": (b, k, n), "rms_out": (b, 1, n), "va_out": (b, k, na),
            "vc_out": (b, k, nc)}


def numpy_call(k: int, h: int, layers: int, num_time: int, dims, arrays: dict,
               out: dict | None = None, factored: bool = True) -> dict:
    """Run the kernel on NumPy float32 arrays (C-contiguous, each with a leading batch axis);
    ``out`` may hold output arrays to write into (an input may be its own output: the
    accumulators are read before they are written, element by element). Returns the outputs."""
    b = arrays["p"].shape[0]
    out = dict(out or {})
    if len(out) < len(OUTPUTS):
        for name, shape in _out_shapes(k, b, dims).items():
            if name not in out:
                out[name] = np.empty(shape, np.float32)
    kernel = kernel_module(k, h, layers, num_time, factored).kernel
    kernel(np.asarray((b,) + tuple(dims), np.int32), *(arrays[n] for n in INPUTS),
           *(out[n] for n in OUTPUTS))
    return out


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
                 dims: tuple[int, ...]):
    """``f(*inputs) -> outputs``: the custom call ``target`` on arrays with one leading batch
    axis (``dims`` after the batch size is its ``dims`` operand; ``out_shapes`` the output
    shapes without the batch axis; all hashable, so that one function serves every trace),
    closed under ``vmap``: a vmapped call folds the new axis into the batch axis and calls
    itself."""
    import jax
    import jax.numpy as jnp

    @jax.custom_batching.custom_vmap
    def call(*inputs):
        b = inputs[0].shape[0]
        outs = [jax.ShapeDtypeStruct((b,) + s, jnp.float32) for s in out_shapes]
        return tuple(jax.ffi.ffi_call(target, outs)(jnp.asarray((b,) + dims, jnp.int32),
                                                    *inputs))

    @call.def_vmap
    def _rule(axis_size, in_batched, *inputs):
        flat = []
        for x, batched in zip(inputs, in_batched, strict=True):
            if not batched:
                x = jnp.broadcast_to(x, (axis_size,) + x.shape)
            flat.append(jnp.reshape(x, (axis_size * x.shape[1],) + x.shape[2:]))
        outs = call(*flat)
        return (tuple(jnp.reshape(o, (axis_size, -1) + o.shape[1:]) for o in outs),
                (True,) * len(outs))

    return call


def xla_call(k: int, h: int, layers: int, num_time: int, dims, arrays: dict,
             factored: bool = True) -> dict:
    """The kernel as one XLA CPU custom call on the named :data:`INPUTS` (each with a leading
    batch axis); returns the named :data:`OUTPUTS`."""
    kind = "f" if factored else "v"
    target = register(f"learnopt_small_fc_lopt_{kind}_k{k}_h{h}_l{layers}_t{num_time}",
                      kernel_module(k, h, layers, num_time, factored))
    dims = tuple(int(d) for d in dims)
    shapes = _out_shapes(k, 1, dims)
    call = batched_call(target, tuple(shapes[n][1:] for n in OUTPUTS), dims)
    outs = call(*(arrays[name] for name in INPUTS))
    return dict(zip(OUTPUTS, outs, strict=True))
