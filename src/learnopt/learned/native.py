"""Native CPU kernel of small_fc_lopt's per-tensor update: features, normalisation, MLP, step.

The update of Metz et al. 2022 ("Practical tradeoffs between memory, compute, and performance
in learned optimizers", arXiv:2203.11860, §2.2 and App. A) for one tensor of rank >= 2 is two
passes over its entries: one for the mean square of each of the 16 full-size features (their
per-tensor normalisers), one for the features again, the 39 -> H -> ... -> 2 MLP and the step
``-d * exp(exp_mult * mag) * step_mult``. XLA:CPU splits that into dozens of loops with
full-size intermediates; here each pass is one loop with every feature and hidden unit in
registers, compiled by numba for the architecture's sizes (decays ``K``, width ``H``, ``L``
hidden layers). On the 784x128 tensor of the step benchmark it takes about a third of the
time of the XLA version (benchmarks/small_fc_lopt_step.py).

The 12 AdaFactor row / column features are constant along one axis of the tensor: their
normalisers and their first-layer contributions (``ca``, ``cc``: one row per hidden unit) are
computed by the caller on the small factored arrays. ``exp`` is evaluated in-loop by range
reduction and a degree-7 polynomial (relative error about 1e-7), so the loop vectorises; it
returns inf above 88.72, 0 below -87.33 and NaN for NaN, as ``exp`` does.

Layout: the tensor is seen as ``(P, N1, M, N2)`` with the two factored axes ``N1`` and ``N2``
(the caller moves the later factored axis last when it is not). ``fa`` / ``ca`` are indexed
by the entries of the tensor without ``N1``, ``(P, M, N2)``; ``fc`` / ``cc`` by those without
``N2``, ``(P, N1, M)``. Every array has a leading batch axis ``B`` (vmapped tasks and
perturbations).

The kernel is generated as Python source for each ``(K, H, L)``, written to a cache directory
(``LEARNOPT_KERNEL_DIR``, default ``~/.cache/learnopt/kernels``) and compiled there with
numba's on-disk cache, so a machine compiles each kernel once (about 3 s). It is registered
with XLA as a CPU custom call and called from NumPy arrays by the PyTorch port. numba is a
dependency; without it (``available()`` is False) the callers use their XLA / torch paths.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.util
import os
import sys
import threading
from pathlib import Path
from types import ModuleType

import numpy as np

#: Names of the kernel's array arguments after ``dims``, in order (the custom call's operands).
ARGS = ("p", "g", "m", "rms", "fa", "fc", "ca", "cc", "wf", "b0", "wh", "bh", "wo", "bo",
        "consts")

_LOCK = threading.Lock()


_STATE = {"enabled": os.environ.get("LEARNOPT_NATIVE", "1") != "0"}


def available() -> bool:
    """Whether the kernel is used: numba is importable and it is enabled (``LEARNOPT_NATIVE=0``
    in the environment or :func:`set_enabled` turns it off; the callers then use their XLA /
    torch paths, which compute the same function)."""
    return _STATE["enabled"] and importlib.util.find_spec("numba") is not None


def set_enabled(enabled: bool) -> bool:
    """Turn the kernel on or off for computations traced from now on; returns the old value."""
    old = _STATE["enabled"]
    _STATE["enabled"] = bool(enabled)
    return old


def num_full_features(k: int) -> int:
    """Full-size features of a factored tensor: g, p, m (K), rms, m * r (K), r, fac_g (K),
    m * row_f * col_f (K)."""
    return 4 + 4 * k


def kernel_source(k: int, h: int, layers: int) -> str:
    """Python (numba) source of the kernel for ``k`` decays, width ``h``, ``layers`` hidden
    layers (>= 1): one function ``kernel(dims, p, g, m, rms, fa, fc, ca, cc, wf, b0, wh, bh,
    wo, bo, consts, out)`` and the XLA entry point ``xla_entry(out, ins)``."""
    if k < 1 or h < 1 or layers < 1:
        raise ValueError(f"need k, h, layers >= 1; got {k}, {h}, {layers}")
    f = num_full_features(k)
    names = (["g", "p"] + [f"m{i}" for i in range(k)] + ["rv"] + [f"mr{i}" for i in range(k)]
             + ["r"] + [f"fg{i}" for i in range(k)] + [f"mf{i}" for i in range(k)])
    assert len(names) == f
    out: list[str] = []
    a = out.append
    i4, i5, i6 = " " * 8, " " * 12, " " * 16

    def features(ind: str) -> None:
        a(f"{ind}g = gr[t]")
        a(f"{ind}p = pr[t]")
        a(f"{ind}rv = rr[t]")
        a(f"{ind}r = ONE / math.sqrt(rv + E6)")
        for i in range(k):
            a(f"{ind}m{i} = mr_{i}[t]")
            a(f"{ind}pc{i} = far{i}[t] * fc{i}")
            a(f"{ind}mr{i} = m{i} * r")
            a(f"{ind}fg{i} = g * pc{i}")
            a(f"{ind}mf{i} = m{i} * pc{i}")

    def run_header(with_contrib: bool) -> None:
        a(f"{i4}for pi in range(P):")
        a(f"{i5}for i in range(N1):")
        a(f"{i6}for mm in range(M):")
        ind = i6 + "    "
        a(f"{ind}e = ((pi * N1 + i) * M + mm) * N2")
        a(f"{ind}ia = (pi * M + mm) * N2")
        a(f"{ind}ic = (pi * N1 + i) * M + mm")
        a(f"{ind}gr = gb[e:e + N2]; pr = pb[e:e + N2]; rr = rb[e:e + N2]")
        for i in range(k):
            a(f"{ind}mr_{i} = mb{i}[e:e + N2]; far{i} = fab{i}[ia:ia + N2]; fc{i} = fcb[{i}, ic]")
        if with_contrib:
            a(f"{ind}outr = ob[e:e + N2]")
            for o in range(h):
                a(f"{ind}car{o} = cab{o}[ia:ia + N2]; base{o} = b0_{o} + ccb[{o}, ic]")

    a('"""Generated by learnopt.learned.native.kernel_source: small_fc_lopt, '
      f'K={k}, H={h}, L={layers}."""')
    a("import math\n\nimport numpy as np\nfrom numba import carray, cfunc, njit, types")
    a("from numba.core import cgutils\nfrom numba.extending import intrinsic\n")
    a("ONE = np.float32(1.0)\nZERO = np.float32(0.0)\nE6 = np.float32(1e-6)")
    a("INF = np.float32(np.inf)\nHALF = np.float32(0.5)\nLOG2E = np.float32(1.4426950408889634)")
    a("LN2_HI = np.float32(0.693359375)\nLN2_LO = np.float32(-2.12194440e-4)")
    a("XMAX = np.float32(88.72)\nXMIN = np.float32(-87.33)\nEXP_CAP = np.int32(127)")
    for i in range(2, 8):
        a(f"C{i} = np.float32(1.0 / {float(np.prod(np.arange(1, i + 1)))})")
    a("FASTMATH = {'reassoc', 'contract', 'arcp'}  # no nnan / ninf: NaN and inf propagate\n\n")
    a("@njit(fastmath=FASTMATH, error_model='numpy', cache=True)")
    a("def kernel(dims, p_, g_, m_, rms_, fa_, fc_, ca_, cc_, wf_, b0_, wh_, bh_, wo_, bo_, "
      "consts, out_):")
    a("    B, P, N1, M, N2 = dims[0], dims[1], dims[2], dims[3], dims[4]")
    a("    N = P * N1 * M * N2")
    a("    dbuf = np.empty(N2, np.float32)")
    a("    ibuf = np.empty(N2, np.int32)")
    a("    sbuf = ibuf.view(np.float32)")
    a("    for b in range(B):")
    a("        exp_mult = consts[b, 0]; step_mult = consts[b, 1]; eps = consts[b, 2]")
    a("        pb = p_[b]; gb = g_[b]; rb = rms_[b, 0]; ob = out_[b]; fcb = fc_[b]; ccb = cc_[b]")
    for i in range(k):
        a(f"        mb{i} = m_[b, {i}]; fab{i} = fa_[b, {i}]")
    a("        " + "; ".join(f"ss{v} = 0.0" for v in range(f)))
    run_header(with_contrib=False)
    ind = i6 + "    "
    a(f"{ind}" + "; ".join(f"s{v} = ZERO" for v in range(f)))
    a(f"{ind}for t in range(N2):")
    features(ind + "    ")
    for v, nm in enumerate(names):
        a(f"{ind}    s{v} += {nm} * {nm}")
    for v in range(f):
        a(f"{ind}ss{v} += s{v}")
    for v in range(f):
        a(f"        sc = np.float32(1.0 / math.sqrt(eps + ss{v} / N))")
        a("        " + "; ".join(f"w{v}_{o} = wf_[b, {v}, {o}] * sc" for o in range(h)))
    for o in range(h):
        a(f"        b0_{o} = b0_[b, {o}]; cab{o} = ca_[b, {o}]")
    for li in range(layers - 1):
        for v in range(h):
            a("        " + "; ".join(f"u{li}_{v}_{o} = wh_[b, {li}, {v}, {o}]" for o in range(h)))
        a("        " + "; ".join(f"c{li}_{o} = bh_[b, {li}, {o}]" for o in range(h)))
    a("        " + "; ".join(f"od{v} = wo_[b, {v}, 0]; om{v} = wo_[b, {v}, 1]" for v in range(h)))
    a("        bd = bo_[b, 0]; bm = bo_[b, 1]")
    run_header(with_contrib=True)
    a(f"{ind}for t in range(N2):")
    body = ind + "    "
    features(body)
    for o in range(h):
        terms = " + ".join(f"w{v}_{o} * {nm}" for v, nm in enumerate(names))
        a(f"{body}h{o} = max(base{o} + car{o}[t] + {terms}, ZERO)")
    for li in range(layers - 1):
        for o in range(h):
            terms = " + ".join(f"u{li}_{v}_{o} * h{v}" for v in range(h))
            a(f"{body}k{o} = max(c{li}_{o} + {terms}, ZERO)")
        a(f"{body}" + "; ".join(f"h{o} = k{o}" for o in range(h)))
    a(f"{body}d = bd + " + " + ".join(f"od{v} * h{v}" for v in range(h)))
    a(f"{body}x = (bm + " + " + ".join(f"om{v} * h{v}" for v in range(h)) + ") * exp_mult")
    # exp(x) = 2^n * exp(r), |r| <= ln2 / 2: 2^n is built from its bits in ibuf (viewed as
    # sbuf), exp(r) by its Taylor polynomial; NaN passes through (x - x), inf is selected.
    a(f"{body}xc = min(max(x, XMIN), XMAX)")
    a(f"{body}n = math.floor(xc * LOG2E + HALF)")
    a(f"{body}rr_ = xc - n * LN2_HI - n * LN2_LO")
    a(f"{body}pe = ONE + rr_ * (ONE + rr_ * (C2 + rr_ * (C3 + rr_ * (C4 + rr_ * (C5 + rr_ * "
      "(C6 + rr_ * C7))))))")
    a(f"{body}pe = pe + (x - x)")
    a(f"{body}pe = INF if x > XMAX else pe")
    a(f"{body}pe = ZERO if x < XMIN else pe")
    a(f"{body}ibuf[t] = (min(np.int32(n), EXP_CAP) + EXP_CAP) << np.int32(23)")
    a(f"{body}dbuf[t] = d * pe")
    a(f"{ind}for t in range(N2):")
    a(f"{body}outr[t] = -(dbuf[t] * sbuf[t] * step_mult)")
    a("\n")
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
    a(f"    ins = _words(frame[9], {len(ARGS) + 1})")
    a("    dims = carray(_as_pointer(_words(ins[0], 4)[3]), (5,), np.int32)")
    a("    B, P, N1, M, N2 = dims[0], dims[1], dims[2], dims[3], dims[4]")
    a("    N = P * N1 * M * N2; NA = P * M * N2; NC = P * N1 * M")
    shapes = {"p": "(B, N)", "g": "(B, N)", "m": f"(B, {k}, N)", "rms": "(B, 1, N)",
              "fa": f"(B, {k}, NA)", "fc": f"(B, {k}, NC)", "ca": f"(B, {h}, NA)",
              "cc": f"(B, {h}, NC)", "wf": f"(B, {f}, {h})", "b0": f"(B, {h})",
              "wh": f"(B, {layers - 1}, {h}, {h})", "bh": f"(B, {layers - 1}, {h})",
              "wo": f"(B, {h}, 2)", "bo": "(B, 2)", "consts": "(B, 3)"}
    for j, name in enumerate(ARGS):
        a(f"    {name} = _f32(ins, {j + 1}, {shapes[name]})")
    a("    out = _f32(_words(frame[14], 1), 0, (B, N))")
    a("    kernel(dims, " + ", ".join(ARGS) + ", out)")
    a("    return _null()")
    return "\n".join(out) + "\n"


@functools.cache
def ffi_api_version() -> tuple[int, int]:
    """``(major, minor)`` of XLA's FFI in the installed jaxlib (its ``c_api.h``)."""
    import re

    import jax

    header = Path(jax.ffi.include_dir()) / "xla" / "ffi" / "api" / "c_api.h"
    text = header.read_text()
    found = [re.search(rf"#define XLA_FFI_API_{part} (\d+)", text) for part in ("MAJOR", "MINOR")]
    if not all(found):
        raise RuntimeError(f"no XLA FFI API version in {header}")
    return int(found[0].group(1)), int(found[1].group(1))


def kernel_dir() -> Path:
    """Where generated kernels and numba's compiled copies live."""
    env = os.environ.get("LEARNOPT_KERNEL_DIR")
    return Path(env) if env else Path.home() / ".cache" / "learnopt" / "kernels"


@functools.cache
def kernel_module(k: int, h: int, layers: int) -> ModuleType:
    """The compiled kernel module for ``(k, h, layers)`` (generated and imported once)."""
    src = kernel_source(k, h, layers)
    digest = hashlib.sha256(src.encode()).hexdigest()[:12]
    name = f"small_fc_lopt_k{k}_h{h}_l{layers}_{digest}"
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
def xla_target(k: int, h: int, layers: int) -> str:
    """Register the kernel for ``(k, h, layers)`` as an XLA CPU custom call; its name."""
    import jax

    entry = kernel_module(k, h, layers).xla_entry
    name = f"learnopt_small_fc_lopt_k{k}_h{h}_l{layers}"
    new_capsule = ctypes.pythonapi.PyCapsule_New
    new_capsule.restype = ctypes.py_object
    new_capsule.argtypes = (ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p)
    capsule = new_capsule(entry.address, b"xla._CUSTOM_CALL_TARGET", None)
    jax.ffi.register_ffi_target(name, capsule, platform="cpu")
    return name


@functools.cache
def _batched_call(k: int, h: int, layers: int, dims: tuple[int, int, int, int]):
    """``f(*arrays) -> update``: the custom call on arrays with one leading batch axis, closed
    under ``vmap`` (a vmapped call folds the new axis into the batch axis and calls itself)."""
    import jax
    import jax.numpy as jnp

    target = xla_target(k, h, layers)
    n = int(np.prod(dims))

    @jax.custom_batching.custom_vmap
    def call(*arrays):
        b = arrays[0].shape[0]
        shape_arg = jnp.asarray((b,) + dims, jnp.int32)
        out = jax.ShapeDtypeStruct((b, n), jnp.float32)
        return jax.ffi.ffi_call(target, out)(shape_arg, *arrays)

    @call.def_vmap
    def _rule(axis_size, in_batched, *arrays):
        flat = []
        for x, batched in zip(arrays, in_batched, strict=True):
            if not batched:
                x = jnp.broadcast_to(x, (axis_size,) + x.shape)
            flat.append(jnp.reshape(x, (axis_size * x.shape[1],) + x.shape[2:]))
        out = call(*flat)
        return jnp.reshape(out, (axis_size, -1, n)), True

    return call


def xla_update(k: int, h: int, layers: int, dims: tuple[int, int, int, int], **arrays):
    """The kernel's update, shape ``(B, prod(dims))``, from the named arrays of :data:`ARGS`
    (each with a leading batch axis ``B``), as one XLA CPU custom call."""
    return _batched_call(k, h, layers, tuple(int(d) for d in dims))(
        *(arrays[name] for name in ARGS))
