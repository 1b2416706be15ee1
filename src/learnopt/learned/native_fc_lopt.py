"""Native CPU kernel of fc_lopt's per-tensor step: momenta, normalisers, MLP, update.

The update of ``fc_lopt`` (Metz et al. 2019, arXiv:1810.10180, as the baseline of Metz et al.
2022, arXiv:2203.11860, §4) for one tensor, seen flat: the ``K`` momenta
``m_k <- b_k m_k + (1 - b_k) g``; the per-tensor normalisers ``rsqrt(eps + mean(x^2))`` of the
``2 + K`` features (``g``, ``p``, the new momenta), folded into the first layer's weights, and
the time features folded into its bias; the ReLU MLP ``(2 + K + T) -> H -> ... -> 2`` and the
step ``-d * exp(exp_mult * mag) * step_mult``.

XLA:CPU runs that MLP as matmuls with ``(N, H)`` intermediates in memory. Here it runs over
blocks of :data:`BLOCK` entries whose hidden units stay in the L1 cache: the first layer
writes them, and each later layer reads them for :func:`group` output units at a time, so that
one load of a hidden unit feeds several multiply-adds; the last hidden layer adds its units'
contributions to ``d`` and ``mag`` as it goes. The cost and the measured speed are in
docs/derivations.md §3.2.

A call runs in two phases over chunks of :data:`native.CHUNK_ELEMENTS` entries, on the
caller's thread and the helper threads of :mod:`learnopt.learned.native` (the runtime is the
same): (1) the new momenta and each chunk's sums of the features' squares; (2) the
normalisers from all the chunks' sums, the MLP and the update. The chunks are fixed by the
tensor's size, so the result does not depend on the number of threads.
"""

from __future__ import annotations

import functools
from types import ModuleType

import numpy as np

from learnopt.learned import native

#: The kernel's inputs after ``dims``: the tensor's parameters and gradient ``(B, N)``, its
#: momenta before the step ``(B, K, N)``, their decays, the MLP (``w0`` with all its rows,
#: ``b0``, hidden ``wh`` / ``bh``, output ``wo`` / ``bo``), the time features and
#: ``(exp_mult, step_mult, eps, unused)``.
INPUTS = ("p", "g", "m", "decays", "w0", "b0", "time", "wh", "bh", "wo", "bo", "consts")
#: The kernel's outputs: the update and the momenta after the step.
OUTPUTS = ("update", "m_out")
#: Entries whose hidden units are kept at once: ``H * BLOCK`` floats, in the L1 cache.
BLOCK = 128


def group(h: int) -> int:
    """Output units of a hidden layer computed together (they share each input unit's load)."""
    return next(g for g in (8, 4, 2, 1) if h % g == 0)


def array_shapes(k: int, h: int, layers: int, num_time: int) -> dict[str, str]:
    """Each array of a call, in the state block's order: :data:`INPUTS`, :data:`OUTPUTS`, then
    each chunk's sums of the features' squares ``part`` (float64)."""
    return {"p": "(B, N)", "g": "(B, N)", "m": f"(B, {k}, N)", "decays": f"(B, {k})",
            "w0": f"(B, {2 + k + num_time}, {h})", "b0": f"(B, {h})",
            "time": f"(B, {num_time})", "wh": f"(B, {layers - 1}, {h}, {h})",
            "bh": f"(B, {layers - 1}, {h})", "wo": f"(B, {h}, 2)", "bo": "(B, 2)",
            "consts": "(B, 4)", "update": "(B, N)", "m_out": f"(B, {k}, N)",
            "part": f"(B, CPM, {2 + k})"}


def kernel_source(k: int, h: int, layers: int, num_time: int) -> str:
    """Python (numba) source of the kernel for ``k`` momenta, width ``h``, ``layers`` hidden
    layers (>= 1) and ``num_time`` time features: ``run_call(template, mode, threads, task)``
    and the XLA entry point ``xla_entry(call_frame)`` (as :func:`native.kernel_source`)."""
    if k < 1 or h < 1 or layers < 1 or num_time < 0:
        raise ValueError(f"need k, h, layers >= 1 and num_time >= 0; got {k}, {h}, {layers}, "
                         f"{num_time}")
    nf = 2 + k
    grp = group(h)
    shapes = array_shapes(k, h, layers, num_time)
    out: list[str] = []
    a = out.append
    i1, i2, i3, i4 = (" " * n for n in (4, 8, 12, 16))

    def head(phase: int) -> None:
        a("@njit(fastmath=FASTMATH, error_model='numpy', cache=True)")
        a(f"def _phase{phase}(w, c):")
        a(f"{i1}{native.VIEWS}")
        a(f"{i1}b = c // CPM; e0 = (c % CPM) * RPC; e1 = min(N, e0 + RPC)")

    def layer(li: int, last: bool) -> None:
        """Hidden layer ``li + 1`` on the block's units ``hb``: into ``hn``, or (``last``)
        straight into ``dacc`` / ``macc``."""
        a(f"{i2}for o in range(0, H, {grp}):")
        for j in range(grp):
            a(i3 + "; ".join(f"u{v}_{j} = wh[b, {li}, {v}, o + {j}]" for v in range(h)))
            a(f"{i3}c{j} = bh[b, {li}, o + {j}]")
            if last:
                a(f"{i3}od{j} = wo[b, o + {j}, 0]; om{j} = wo[b, o + {j}, 1]")
        a(f"{i3}for t in range(n):")
        a(i4 + "; ".join(f"x{v} = h{v}[t]" for v in range(h)))
        for j in range(grp):
            terms = " + ".join(f"u{v}_{j} * x{v}" for v in range(h))
            a(f"{i4}k{j} = max(c{j} + {terms}, ZERO)")
        if last:
            a(f"{i4}dacc[t] += " + " + ".join(f"od{j} * k{j}" for j in range(grp)))
            a(f"{i4}macc[t] += " + " + ".join(f"om{j} * k{j}" for j in range(grp)))
        else:
            a(i4 + "; ".join(f"hn[o + {j}, t] = k{j}" for j in range(grp)))
        if not last:
            a(f"{i2}hb, hn = hn, hb")
            a(i2 + "; ".join(f"h{v} = hb[{v}]" for v in range(h)))

    a('"""Generated by learnopt.learned.native_fc_lopt.kernel_source: fc_lopt, '
      f'K={k}, H={h}, L={layers}, T={num_time}."""')
    out.extend(native.header_lines())
    a(f"K = {k}\nH = {h}\nNF = {nf}\nT = {num_time}\nBLOCK = {BLOCK}")
    a("FASTMATH = {'reassoc', 'contract', 'arcp'}  # no nnan / ninf: NaN and inf propagate\n\n")
    out.extend(native.runtime_lines(len(native.STATE_HEAD) + len(shapes)))
    # phase 1: the chunk's new momenta and the sums of the features' squares
    head(1)
    a(f"{i1}gb = ga[b]; pb = pa[b]")
    a(i1 + "; ".join(f"ss{v} = 0.0" for v in range(nf)))
    a(f"{i1}for s in range(e0, e1, BLOCK):")
    a(f"{i2}e = min(e1, s + BLOCK)")
    a(f"{i2}gr = gb[s:e]; pr = pb[s:e]")
    a(i2 + "; ".join(f"s{v} = ZERO" for v in range(nf)))
    a(f"{i2}for t in range(e - s):")
    a(f"{i3}s0 += gr[t] * gr[t]; s1 += pr[t] * pr[t]")
    for i in range(k):
        a(f"{i2}bk = decays[b, {i}]; mr = m[b, {i}, s:e]; mw = m_out[b, {i}, s:e]")
        a(f"{i2}for t in range(e - s):")
        a(f"{i3}mw[t] = bk * mr[t] + (ONE - bk) * gr[t]")
        # summed in a loop of its own, which reads only: when ``m`` is ``m_out`` the loop
        # above may run unvectorised, and the sum must not change with it
        a(f"{i2}for t in range(e - s):")
        a(f"{i3}s{2 + i} += mw[t] * mw[t]")
    a(i2 + "; ".join(f"ss{v} += s{v}" for v in range(nf)))
    a(i1 + "; ".join(f"part[b, c % CPM, {v}] = ss{v}" for v in range(nf)) + "\n\n")
    # phase 2: the normalisers (folded into w0), the MLP on blocks of the chunk, the update
    head(2)
    a(f"{i1}eps = consts[b, 2]; exp_mult = consts[b, 0]; step_mult = consts[b, 1]")
    a(f"{i1}wf = np.empty((NF, H), np.float32); bias = np.empty(H, np.float32)")
    a(f"{i1}for v in range(NF):")
    a(f"{i2}ss = 0.0")
    a(f"{i2}for q in range(CPM):")
    a(f"{i3}ss += part[b, q, v]")
    a(f"{i2}sc = np.float32(1.0 / math.sqrt(eps + ss / N))")
    a(f"{i2}for o in range(H):")
    a(f"{i3}wf[v, o] = w0[b, v, o] * sc")
    a(f"{i1}for o in range(H):")
    a(f"{i2}acc = b0[b, o]")
    a(f"{i2}for q in range(T):")
    a(f"{i3}acc += time[b, q] * w0[b, NF + q, o]")
    a(f"{i2}bias[o] = acc")
    a(f"{i1}hb = np.empty((H, BLOCK), np.float32); hn = np.empty((H, BLOCK), np.float32)")
    a(f"{i1}dacc = np.empty(BLOCK, np.float32); macc = np.empty(BLOCK, np.float32)")
    a(f"{i1}dbuf = np.empty(BLOCK, np.float32); ibuf = np.empty(BLOCK, np.int32)")
    a(f"{i1}sbuf = ibuf.view(np.float32)")
    a(f"{i1}bd = bo[b, 0]; bmag = bo[b, 1]")
    a(f"{i1}for s in range(e0, e1, BLOCK):")
    a(f"{i2}e = min(e1, s + BLOCK); n = e - s")
    a(f"{i2}f0 = ga[b, s:e]; f1 = pa[b, s:e]")
    for i in range(k):
        a(f"{i2}f{2 + i} = m_out[b, {i}, s:e]")
    a(f"{i2}for o in range(0, H, {grp}):")
    for j in range(grp):
        a(i3 + "; ".join(f"q{v}_{j} = wf[{v}, o + {j}]" for v in range(nf))
          + f"; bb{j} = bias[o + {j}]")
    a(f"{i3}for t in range(n):")
    a(i4 + "; ".join(f"y{v} = f{v}[t]" for v in range(nf)))
    for j in range(grp):
        terms = " + ".join(f"q{v}_{j} * y{v}" for v in range(nf))
        a(f"{i4}hb[o + {j}, t] = max(bb{j} + {terms}, ZERO)")
    a(i2 + "; ".join(f"h{v} = hb[{v}]" for v in range(h)))
    a(f"{i2}for t in range(n):")
    a(f"{i3}dacc[t] = bd; macc[t] = bmag")
    for li in range(layers - 1):
        layer(li, last=li == layers - 2)
    if layers == 1:  # the first layer's units straight into the outputs
        a(i2 + "; ".join(f"od{v} = wo[b, {v}, 0]; om{v} = wo[b, {v}, 1]" for v in range(h)))
        a(f"{i2}for t in range(n):")
        a(f"{i3}dacc[t] += " + " + ".join(f"od{v} * h{v}[t]" for v in range(h)))
        a(f"{i3}macc[t] += " + " + ".join(f"om{v} * h{v}[t]" for v in range(h)))
    a(f"{i2}outr = update[b, s:e]")
    a(f"{i2}for t in range(n):")
    a(f"{i3}d = dacc[t]; x = macc[t] * exp_mult")
    out.extend(native.exp_lines(i3))
    a(f"{i2}for t in range(n):")
    a(f"{i3}outr[t] = -(dbuf[t] * sbuf[t] * step_mult)")
    a("\n")
    a("@njit(inline='always')")
    a("def _work(w, phase, c):")
    a("    if phase == 1:\n        _phase1(w, c)\n    else:\n        _phase2(w, c)\n\n")
    out.extend(native.parallel_lines(f"fc_lopt_{k}_{h}_{layers}_{num_time}"))
    a("@njit(nogil=True, cache=True)")
    a("def run_call(t, mode, threads, task):")
    out.extend(native.view_lines(i1, {}, words="t"))
    head_words = native.STATE_HEAD
    a(f"{i1}cpm = max(1, (N + CHUNK - 1) // CHUNK)")
    a(f"{i1}t[{head_words.index('cpm')}] = cpm; t[{head_words.index('rpc')}] = CHUNK")
    a(f"{i1}CPM = cpm")
    a(f"{i1}if B * N < PARALLEL_MIN:")
    a(f"{i1}    mode = 0  # too small to share")
    out.extend(native.scratch_lines(i1, shapes, len(INPUTS) + len(OUTPUTS)))
    a(f"{i1}_parallel(t, mode, threads, task, 1, B * cpm)")
    a(f"{i1}_parallel(t, mode, threads, task, 2, B * cpm)")
    a(f"{i1}_free(base)\n\n")
    out.extend(native.ffi_entry_lines(INPUTS, OUTPUTS, shapes))
    return "\n".join(native.fill_views("\n".join(out).split("\n"), shapes)) + "\n"


@functools.cache
def kernel_module(k: int, h: int, layers: int, num_time: int) -> ModuleType:
    """The compiled fc_lopt kernel module for these sizes."""
    return native.load(f"fc_lopt_k{k}_h{h}_l{layers}_t{num_time}",
                       kernel_source(k, h, layers, num_time))


def ready(k: int, h: int, layers: int, num_time: int) -> bool:
    """Whether the kernel for these sizes can be used: at least one hidden layer,
    :func:`native.available` and it compiles (on failure a warning says why, once)."""
    return (native.available() and layers >= 1
            and native.builds(kernel_module, k, h, layers, num_time))


def _dims(n: int) -> tuple[int, int, int, int]:
    return (1, 1, 1, n)  # the layout words (P, N1, M, N2): one flat run of N entries


def numpy_call(k: int, h: int, layers: int, num_time: int, arrays: dict,
               out: dict | None = None, num_threads: int | None = None) -> dict:
    """Run the kernel on NumPy float32 arrays (C-contiguous, each with a leading batch axis;
    ``p`` and ``g`` ``(B, N)``); ``out`` may hold output arrays to write into (``m`` may be its
    own ``m_out``). Returns the outputs."""
    b, n = arrays["p"].shape
    out = dict(out or {})
    out.setdefault("update", np.empty((b, n), np.float32))
    out.setdefault("m_out", np.empty((b, k, n), np.float32))
    module = kernel_module(k, h, layers, num_time)
    native.run(module, native.template(module, b, _dims(n), {**arrays, **out},
                                       INPUTS + OUTPUTS), num_threads)
    return out


def xla_call(k: int, h: int, layers: int, num_time: int, arrays: dict) -> dict:
    """The kernel as one XLA CPU custom call on the named :data:`INPUTS` (each with a leading
    batch axis; ``p`` and ``g`` ``(B, N)``); returns the named :data:`OUTPUTS`. ``m`` may have
    any shape of the same memory (the momenta's own, so that XLA updates a loop-carried state
    in place: :func:`native.batched_call`); ``m_out`` has its shape."""
    target = native.register(f"learnopt_fc_lopt_k{k}_h{h}_l{layers}_t{num_time}",
                             kernel_module(k, h, layers, num_time))
    n = int(arrays["p"].shape[1])
    # the momenta are updated in place (the kernel reads each element before it writes it)
    call = native.batched_call(target, ((n,), (k, n)), _dims(n) + (native.threads(),),
                               ((INPUTS.index("m"), OUTPUTS.index("m_out")),))
    outs = call(*(arrays[name] for name in INPUTS))
    return dict(zip(OUTPUTS, outs, strict=True))
