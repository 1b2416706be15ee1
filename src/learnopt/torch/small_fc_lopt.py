"""``small_fc_lopt`` in PyTorch: the tiny per-parameter MLP learned optimizer.

Metz et al. 2022, "Practical tradeoffs between memory, compute, and performance in learned
optimizers", arXiv:2203.11860, §2.2, App. A and §4.2 / Fig. 3b (``AdafacMLPLOpt`` of the
released learned_optimization code); the port of ``learnopt.learned.adafac_mlp.SmallFcLOpt``.

Per tensor of shape ``S`` with ``K`` momentum / AdaFactor decays (3) and one rms decay:

* momentum ``m_k <- b_k m_k + (1 - b_k) g``; rms ``v <- c v + (1 - c) g^2`` (c clipped to
  [0, 1]); AdaFactor (decays clipped to [0, 1]) on ``g^2 + 1e-30``: for rank >= 2, with
  ``(d1, d0)`` the 2nd-largest and largest axes (stable order), ``v_row`` averages over
  ``d0`` and ``v_col`` over ``d1``; rank < 2 keeps a full ``v_full``.
* 28 features (in this order): ``g, p, m (K), rms, m * rsqrt(rms + 1e-6) (K),
  rsqrt(rms + 1e-6), fac_g (K), row (K), col (K), rsqrt(row + 1e-8) (K),
  rsqrt(col + 1e-8) (K), m * row_f * col_f (K)``, where ``fac_g = g * row_f * col_f`` with
  ``row_f = safe_rsqrt(v_row / (mean_d1(v_row) + 1e-9))``, ``col_f = safe_rsqrt(v_col)``
  (rank < 2: ``v_full`` stands in for row and col, ``fac_g = g * safe_rsqrt(v_full + 1e-9)``
  and the last block is ``m * (v_full + 1e-6)^-0.5``). Each feature channel is scaled by
  ``rsqrt(1e-5 + mean over the tensor of its square)``.
* 11 time features ``tanh(t / x - 1)``, ``x`` in 1, 3, 10, ..., 1e5, ``t`` the steps taken.
* A ReLU MLP 39 -> 4 -> 4 -> 2 gives ``(d, mag)``; the parameter moves by
  ``-d * exp(0.001 mag) * 0.001``.

The row and column features are constant along one axis, so their normalisers and their
first-layer contributions are computed on the factored arrays and broadcast, which is the
same function with fewer full-size passes. Derivation: docs/derivations.md §3.1.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from learnopt.learned import native
from learnopt.torch.base import (
    TorchLearnedOptimizer,
    check_theta,
    decays_from_offsets,
    factored_dims,
    gather_rows,
    kernel_threads,
    mlp_tail_into,
    mlp_tail_t,
    scaled_step_into,
    split_rows,
    time_features,
    time_row,
    to_tensor_tree,
)

TIME_SCALES = (1, 3, 10, 30, 100, 300, 1000, 3000, 1e4, 3e4, 1e5)


def _safe_rsqrt(x: torch.Tensor) -> torch.Tensor:
    return torch.rsqrt(torch.clamp(x, min=1e-9))


class TorchSmallFcLOpt(TorchLearnedOptimizer):
    """The 197-parameter ``small_fc_lopt`` as a ``torch.optim.Optimizer``.

    Args:
      params: the parameters (or parameter groups) to optimise.
      theta: the meta-parameters, nested dicts of arrays as the JAX ``TorchSmallFcLOpt.init``
        returns them (``momentum_decays``, ``rms_decays``, ``adafactor_decays``,
        ``nn: {w0, b0, ...}``); numpy, JAX or torch arrays.
      num_steps: the training horizon (stored, as in JAX; must be >= 1).
      guard: ``None``/``False`` (bare), ``True`` or a dict of guard settings
        (:mod:`learnopt.torch.base`).
      hidden_size, hidden_layers, exp_mult, step_mult, initial_*_decays: the architecture's
        hyperparameters, as the JAX class's (the ``architecture_config`` of a weights file).
      compute: accepted for config compatibility; both JAX paths compute this function.
    """

    name = "small_fc_lopt"
    #: on CPU, tensors with at least this many entries go through the native kernel (one call
    #: each, about 0.1 ms of Python); smaller ones join the batched path, whose cost is
    #: mostly per step (benchmarks/step_cost_torch.py)
    native_min_size = 0

    def __init__(
        self,
        params: Iterable[Any],
        theta: Mapping[str, Any],
        num_steps: int,
        *,
        guard: bool | Mapping[str, Any] | None = None,
        hidden_size: int = 4,
        hidden_layers: int = 2,
        exp_mult: float = 0.001,
        step_mult: float = 0.001,
        initial_momentum_decays: Sequence[float] = (0.9, 0.99, 0.999),
        initial_rms_decays: Sequence[float] = (0.999,),
        initial_adafactor_decays: Sequence[float] = (0.9, 0.99, 0.999),
        compute: str = "elementwise",
    ):
        if compute not in ("elementwise", "concat"):
            raise ValueError(f"compute must be 'elementwise' or 'concat'; got {compute!r}")
        if len(initial_rms_decays) != 1:
            raise ValueError(f"small_fc_lopt takes exactly one rms decay; got "
                             f"{tuple(initial_rms_decays)}")
        if len(initial_momentum_decays) != len(initial_adafactor_decays):
            raise ValueError("momentum and AdaFactor decays must have the same count")
        self._hidden_size, self._hidden_layers = int(hidden_size), int(hidden_layers)
        self.km = len(initial_momentum_decays)
        self.kf = len(initial_adafactor_decays)
        self.exp_mult, self.step_mult = float(exp_mult), float(step_mult)
        self.initial_momentum_decays = tuple(float(d) for d in initial_momentum_decays)
        self.initial_rms_decays = tuple(float(d) for d in initial_rms_decays)
        self.initial_adafactor_decays = tuple(float(d) for d in initial_adafactor_decays)
        km, kf = self.km, self.kf
        self.num_tensor_features = 2 + km + 1 + km + 1 + kf + 4 * kf + km
        sizes = ((self.num_tensor_features + len(TIME_SCALES),)
                 + (hidden_size,) * hidden_layers + (2,))
        nn_shapes = {}
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            nn_shapes[f"w{i}"], nn_shapes[f"b{i}"] = (a, b), (b,)
        theta = to_tensor_tree(theta)
        check_theta(theta, {"momentum_decays": (km,), "rms_decays": (1,),
                            "adafactor_decays": (kf,), "nn": nn_shapes}, self.name)
        self.theta = theta
        super().__init__(params, num_steps, guard)
        if self._hidden_layers >= 1 and self._has_cpu_params():  # see native.prefetch
            for factored in (True, False):
                native.prefetch(native.kernel_module, *self._kernel_sizes(), factored)
        self._plans: dict[int, dict] = {}  # kernel call templates by tensor (_planned_leaf)
        # rows of w0 fed by the full-size channels, by the row factors and by the col factors
        n_head = 2 + km + 1 + km + 1 + kf  # g, p, m, rms, m*r, r, fac_g
        row0 = n_head
        self._rows_full = list(range(n_head)) + list(range(n_head + 4 * kf, n_head + 4 * kf + km))
        self._rows_row = list(range(row0, row0 + kf)) + list(range(row0 + 2 * kf, row0 + 3 * kf))
        self._rows_col = list(range(row0 + kf, row0 + 2 * kf)) + list(range(row0 + 3 * kf,
                                                                            row0 + 4 * kf))

    def _consts(self, device: torch.device) -> dict[str, Any]:
        key = ("consts", device)
        if key not in self._device_theta:
            th = self.theta
            nf = self.num_tensor_features
            w0 = th["nn"]["w0"]
            c = {
                "bm": decays_from_offsets(self.initial_momentum_decays, th["momentum_decays"]),
                "cr": torch.clamp(decays_from_offsets(self.initial_rms_decays,
                                                      th["rms_decays"]), 0.0, 1.0),
                "a": torch.clamp(decays_from_offsets(self.initial_adafactor_decays,
                                                     th["adafactor_decays"]), 0.0, 1.0),
                "w_feat": w0[:nf], "w_time": w0[nf:],
                "w_full": w0[self._rows_full], "w_row": w0[self._rows_row],
                "w_col": w0[self._rows_col],
                "timescales": torch.tensor(TIME_SCALES, dtype=torch.float32),
                "nn": th["nn"],
            }
            self._device_theta[key] = {
                k: ({kk: vv.to(device) for kk, vv in v.items()} if isinstance(v, dict)
                    else v.to(device)) for k, v in c.items()}
        return self._device_theta[key]

    def _init_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        shape, km, kf = tuple(p.shape), self.km, self.kf
        z = dict(dtype=torch.float32, device=p.device)
        dims = factored_dims(shape)
        if dims is None:
            v_row, v_col, v_full = (kf, 0), (kf, 0), (kf,) + shape
        else:
            d1, d0 = dims
            v_row = (kf,) + tuple(s for i, s in enumerate(shape) if i != d0)
            v_col = (kf,) + tuple(s for i, s in enumerate(shape) if i != d1)
            v_full = (kf, 0)
        return {"step": torch.zeros((), **z), "momentum": torch.zeros((km,) + shape, **z),
                "rms": torch.zeros((1,) + shape, **z), "v_row": torch.zeros(v_row, **z),
                "v_col": torch.zeros(v_col, **z), "v_full": torch.zeros(v_full, **z)}

    def _propose(self, params, grads, states):
        device = params[0].device
        if not self.batched or any(p.device != device for p in params):
            return self._propose_reference(params, grads, states)
        if device.type == "cpu" and self._native_ready():
            return self._propose_native(params, grads, states)
        return self._propose_batched(params, grads, states, device)

    def _kernel_sizes(self) -> tuple[int, int, int, int]:
        return (self.km, self._hidden_size, self._hidden_layers, len(TIME_SCALES))

    def _native_ready(self) -> bool:
        if self._hidden_layers < 1:
            return False
        sizes = self._kernel_sizes()
        return native.ready(*sizes, True) and native.ready(*sizes, False)

    def _propose_native(self, params, grads, states):
        """Every tensor by the native CPU kernel (``learnopt.learned.native``, the one the JAX
        side uses), one call each; tensors under ``native_min_size`` by the batched path."""
        updates, new_states = [None] * len(params), [None] * len(params)
        small = [i for i, p in enumerate(params) if p.numel() < self.native_min_size]
        if small:
            ups, sts = self._propose_batched([params[i] for i in small],
                                             [grads[i] for i in small],
                                             [states[i] for i in small], params[0].device)
            for i, u, st in zip(small, ups, sts, strict=True):
                updates[i], new_states[i] = u, st
        times: dict[int, np.ndarray] = {}  # time features by step, shared by the tensors
        for i, p in enumerate(params):
            if updates[i] is None:
                fast = self._inplace and self._planned_leaf(p, grads[i], states[i], times)
                updates[i], new_states[i] = fast or self._native_leaf(p, grads[i], states[i])
        return updates, new_states

    def _planned_leaf(self, p: torch.Tensor, g: torch.Tensor, st: Mapping[str, torch.Tensor],
                      times: dict[int, np.ndarray]):
        """One tensor by the kernel, updating its state in place through a call template kept
        from the last step (:func:`native.template`): only the gradient's and the time
        features' addresses change. For a bare step (nothing keeps the old state) on a
        float32 tensor whose kernel layout needs no transpose; None otherwise (then
        :meth:`_native_leaf` runs). Keeps an update buffer of the tensor's size."""
        if g.dtype != torch.float32 or not g.is_contiguous():
            return None
        keys = ("momentum", "rms", "v_row", "v_col", "v_full")
        addresses = (p.data_ptr(),) + tuple(st[n].data_ptr() for n in keys)
        plan = self._plans.get(id(p))
        if plan is None or plan["addresses"] != addresses:
            plan = self._plans[id(p)] = self._plan(p, st, addresses)
        if plan["words"] is None:
            return None
        time = time_row(int(st["step"]), self._consts(p.device)["timescales"], times)
        words = plan["words"]
        words[plan["g"]] = g.data_ptr()
        words[plan["time"]] = time.ctypes.data
        native.run(plan["module"], words, kernel_threads())
        return plan["update"], {**st, "step": st["step"] + 1}

    def _plan(self, p: torch.Tensor, st: Mapping[str, torch.Tensor], addresses) -> dict:
        """The kernel call of :meth:`_planned_leaf` for tensor ``p``; ``words`` is None when
        it does not apply (a layout that needs a transpose, or state not float32 and
        contiguous)."""
        k = self.km
        plan: dict[str, Any] = {"addresses": addresses, "words": None}
        tensors = [p] + [st[n] for n in ("momentum", "rms", "v_row", "v_col", "v_full")]
        if any(x.dtype != torch.float32 or not x.is_contiguous() for x in tensors):
            return plan
        dims, row_lacks_a, full, lack_a, va, vc = self._kernel_layout(p, st)
        if full != tuple(range(len(full))) or lack_a != tuple(range(len(lack_a))):
            return plan
        flat = lambda x, *lead: x.detach().view(1, *lead, -1).numpy()  # noqa: E731
        update = torch.empty(p.shape, dtype=torch.float32)
        arrays = {"p": flat(p), "g": flat(p), "m": flat(st["momentum"], k),
                  "rms": flat(st["rms"], 1), "va": flat(va, k), "vc": flat(vc, k),
                  "time": np.zeros((1, len(TIME_SCALES)), np.float32),
                  **self._native_arrays(),
                  "consts": self._kernel_consts(row_lacks_a), "update": flat(update)}
        arrays.update(m_out=arrays["m"], rms_out=arrays["rms"], va_out=arrays["va"],
                      vc_out=arrays["vc"])
        sizes = (self.km, self._hidden_size, self._hidden_layers, len(TIME_SCALES))
        module = native.kernel_module(*sizes, p.dim() >= 2)
        plan.update(words=native.template(module, 1, dims, arrays), arrays=arrays,
                    update=update, module=module, g=native.operand_word("g"),
                    time=native.operand_word("time"))
        return plan

    def _kernel_layout(self, p: torch.Tensor, st: Mapping[str, torch.Tensor]):
        """``(dims, row_lacks_a, perm_full, perm_lack_a, va, vc)`` of tensor ``p`` for the
        kernel: :func:`native.layout` for rank >= 2; rank < 2 is one flat run (scalars are
        one-entry runs, as shape [1] in the released code) with ``v_full`` as ``va``."""
        if p.dim() >= 2:
            lay = native.layout(tuple(p.shape), *factored_dims(tuple(p.shape)))
            va, vc = ((st["v_row"], st["v_col"]) if lay.row_lacks_a
                      else (st["v_col"], st["v_row"]))
            return lay.dims, lay.row_lacks_a, lay.perm_full, lay.perm_lack_a, va, vc
        return ((1, 1, 1, max(p.numel(), 1)), False, (0, 1), (0, 1),
                st["v_full"].reshape(self.km, -1), torch.zeros((self.km, 1)))

    def _kernel_consts(self, row_lacks_a: bool) -> np.ndarray:
        return np.asarray([[self.exp_mult, self.step_mult, 1e-5, float(row_lacks_a)]],
                          np.float32)

    def _native_arrays(self) -> dict[str, Any]:
        """theta as the kernel's NumPy inputs (batch axis of 1), cached."""
        key = ("native", "cpu")
        if key not in self._device_theta:
            c = self._consts(torch.device("cpu"))
            arrays = {"decays": torch.cat([c["bm"], c["cr"], c["a"]]),
                      **native.mlp_inputs(self.theta["nn"], self._hidden_layers, torch.stack,
                                          torch.zeros)}
            self._device_theta[key] = {
                k: v.detach().to(torch.float32).contiguous().numpy()[None]
                for k, v in arrays.items()}
        return self._device_theta[key]

    def _native_leaf(self, p: torch.Tensor, g: torch.Tensor, st: Mapping[str, torch.Tensor]):
        """One tensor by the kernel, laid out by :meth:`_kernel_layout` (copies where the
        layout needs a transpose)."""
        k, factored = self.km, p.dim() >= 2

        def to_kernel(x, perm):  # (lead,) + shape -> (1, lead, n), the kernel's order
            x = x.detach()
            if x.dtype != torch.float32:
                x = x.to(torch.float32)
            if any(i != j for i, j in enumerate(perm)):
                x = x.permute(perm)
            return x.reshape(1, x.shape[0], -1).contiguous()

        def back(x, like, perm):  # the inverse of to_kernel, a view
            if not any(i != j for i, j in enumerate(perm)):
                return x[0].view(like.shape)
            moved = tuple(like.shape[i] for i in perm)
            return x[0].view(moved).permute(native.inverse(perm))

        dims, row_lacks_a, full, lack_a, va, vc = self._kernel_layout(p, st)
        if not factored:
            p, g = p.reshape(-1), g.reshape(-1)
        m_old, rms_old = st["momentum"].reshape((k,) + p.shape), st["rms"].reshape(
            (1,) + p.shape)
        step = st["step"]
        time = time_features(step.reshape(1, 1), self._consts(p.device)["timescales"])
        ins = {"p": to_kernel(p[None], full)[:, 0], "g": to_kernel(g[None], full)[:, 0],
               "m": to_kernel(m_old, full), "rms": to_kernel(rms_old, full),
               "va": to_kernel(va, lack_a), "vc": to_kernel(vc, tuple(range(vc.dim()))),
               "time": time.contiguous()}
        olds = {"m": m_old, "rms": rms_old, "va": va, "vc": vc}
        outs = {"update": torch.empty_like(ins["p"])}
        for src, old in olds.items():
            # without the guard the state is updated in place (the kernel reads each
            # accumulator element before it writes it), when the views share the storage
            shares = self._inplace and ins[src].data_ptr() == old.data_ptr()
            outs[f"{src}_out"] = ins[src] if shares else torch.empty_like(ins[src])
        arrays = {**{n: x.numpy() for n, x in ins.items()}, **self._native_arrays(),
                  "consts": self._kernel_consts(row_lacks_a)}
        native.numpy_call(k, self._hidden_size, self._hidden_layers, time.shape[1], dims,
                          arrays, {n: x.numpy() for n, x in outs.items()}, factored=factored,
                          num_threads=kernel_threads())
        new = {"step": step + 1,
               "momentum": back(outs["m_out"], m_old, full).reshape(st["momentum"].shape),
               "rms": back(outs["rms_out"], rms_old, full).reshape(st["rms"].shape),
               "v_row": st["v_row"], "v_col": st["v_col"], "v_full": st["v_full"]}
        va_new = back(outs["va_out"], va, lack_a)
        if not factored:
            new["v_full"] = va_new.view(st["v_full"].shape)
        elif row_lacks_a:
            new["v_row"], new["v_col"] = va_new, outs["vc_out"][0].view(vc.shape)
        else:
            new["v_col"], new["v_row"] = va_new, outs["vc_out"][0].view(vc.shape)
        # reshape: a no-op view for rank >= 2, the original shape (scalars) for rank < 2
        return back(outs["update"][None], p[None], full)[0].reshape(st["momentum"].shape[1:]), new

    def _propose_batched(self, params, grads, states, device):
        # All tensors at once. Columns: the elements of the rank < 2 tensors first ("vector"
        # block, N1 columns), then those of the factored (rank >= 2) tensors. The full-size
        # accumulators (momentum (K, N), rms (1, N), v_full (K, N1)) and the 16 full-size
        # feature channels (C, N) are flat buffers; the factored accumulators and the
        # row / column parts of the first layer stay per tensor (they are small). The
        # channel normalisers and time features are per tensor, so the first layer is one
        # addmm per tensor; the rest of the MLP runs once over all columns.
        c = self._consts(device)
        f32, km, kf = torch.float32, self.km, self.kf
        vec = [i for i, p in enumerate(params) if p.dim() < 2]
        fac = [i for i, p in enumerate(params) if p.dim() >= 2]
        order = vec + fac
        ps = [params[i] for i in order]
        sts = [states[i] for i in order]
        shapes = [tuple(p.shape) for p in ps]
        sizes = [p.numel() for p in ps]
        total, n1 = sum(sizes), sum(sizes[: len(vec)])
        nfull = 2 + km + 1 + km + 1 + 2 * kf  # g, p, m, rms, m*r, r, fac_g, m*pre

        def buf(name, shape):
            return self._buf(name, shape, device)

        i_m, i_rms = 2, 2 + km
        i_mr, i_r, i_fg = i_rms + 1, i_rms + 1 + km, i_rms + 2 + km
        i_mp = i_fg + kf
        m_old = gather_rows(self._flat_cache, "momentum", [st["momentum"] for st in sts], km,
                            sizes)
        rms_old = gather_rows(self._flat_cache, "rms", [st["rms"] for st in sts], 1, sizes)
        x = buf("x", (nfull, total))
        g = x[0]
        torch.cat([grads[i].detach().reshape(-1).to(f32) for i in order], out=g)
        torch.cat([p.detach().reshape(-1).to(f32) for p in ps], out=x[1])
        bm, cr, a = c["bm"][:, None], c["cr"], c["a"][:, None]
        gg = torch.mul(g, g, out=buf("gg", (total,)))
        tmp = buf("tmp", (km, total))
        # without the guard (self._inplace) the state is updated in place, as torch.optim's
        m = m_old.mul_(bm) if self._inplace else torch.mul(bm, m_old)
        m.add_(torch.mul(1.0 - bm, g, out=tmp))
        rms = rms_old[0].mul_(cr) if self._inplace else torch.mul(cr, rms_old[0])
        rms.add_(torch.mul(1.0 - cr, gg, out=tmp[0]))
        g2 = gg.add_(1e-30)
        x[i_m:i_rms] = m
        x[i_rms] = rms
        r = x[i_r]
        torch.add(rms, 1e-6, out=r).rsqrt_()
        torch.mul(m, r, out=x[i_mr:i_r])
        steps = torch.stack([st["step"] for st in sts])
        time = time_features(steps[:, None], c["timescales"])
        bias = torch.addmm(c["nn"]["b0"], time, c["w_time"])  # (T, H)
        hidden = bias.shape[1]
        h = buf("h", (hidden, total))
        counts = torch.tensor([max(n, 1) for n in sizes], dtype=f32, device=device)[:, None]
        new_vrow, new_vcol, new_vfull = [], [], []

        # the rank < 2 block: v_full stands in for the row and column accumulators
        if vec:
            v_old = gather_rows(self._flat_cache, "v_full",
                                [st["v_full"] for st in sts[: len(vec)]], kf, sizes[: len(vec)])
            v = v_old.mul_(a) if self._inplace else torch.mul(a, v_old)
            v.add_(torch.mul(1.0 - a, g2[:n1], out=tmp[:, :n1]))
            torch.mul(g[:n1], _safe_rsqrt(v + 1e-9), out=x[i_fg:i_mp, :n1])
            torch.mul(m[:, :n1], torch.pow(v + 1e-6, -0.5), out=x[i_mp:, :n1])
            xv = torch.cat([v, torch.rsqrt(v + 1e-8)], 0)  # (2K, N1)
            new_vfull = split_rows(self._flat_cache, "v_full", v, shapes[: len(vec)],
                                   sizes[: len(vec)])
            new_vrow = [sts[j]["v_row"] for j in range(len(vec))]
            new_vcol = [sts[j]["v_col"] for j in range(len(vec))]
            vcols = xv.split(sizes[: len(vec)], 1)
            sv = torch.stack([torch.linalg.vector_norm(t, dim=1) for t in vcols]).square()
            sv = torch.rsqrt(1e-5 + sv / counts[: len(vec)])  # (Tv, 2K)
            w_rc = (sv[:, :, None] * c["w_row"]).add_(sv[:, :, None] * c["w_col"])

        cols = x.split(sizes, 1)
        hcols = h.split(sizes, 1)
        g2s_cols = g2.split(sizes)
        # the factored block: the row and column accumulators of all factored tensors are
        # the column blocks (row_j, col_j, ...) of one (K, R) buffer
        fac = range(len(vec), len(ps))
        if len(fac):
            pold = [t for j in fac for t in (sts[j]["v_row"], sts[j]["v_col"])]
            pshapes = [tuple(t.shape[1:]) for t in pold]
            psizes = [t[0].numel() for t in pold]
            rtot = sum(psizes)
            v_old = gather_rows(self._flat_cache, "v_fac", pold, kf, psizes)
            means = buf("v_mean", (rtot,))
            mcols = means.split(psizes)
            for q, j in enumerate(fac):
                d1, d0 = factored_dims(shapes[j])
                g2s = g2s_cols[j].view(shapes[j])
                torch.mean(g2s, d0, out=mcols[2 * q].view(pshapes[2 * q]))
                torch.mean(g2s, d1, out=mcols[2 * q + 1].view(pshapes[2 * q + 1]))
            vf = v_old.mul_(a) if self._inplace else torch.mul(a, v_old)
            vf.add_(torch.mul(1.0 - a, means, out=buf("v_tmp", (kf, rtot))))
            pnew = split_rows(self._flat_cache, "v_fac", vf, pshapes, psizes)
            # row factors rsqrt(v_row / mean_d1(v_row)) and column factors rsqrt(v_col), both
            # clamped below at 1e-9 (safe_rsqrt), in one (K, R) buffer
            fcs = buf("v_fac_f", (kf, rtot))
            fcs.copy_(vf)
            fcols = fcs.split(psizes, 1)
            for q, j in enumerate(fac):
                d1, d0 = factored_dims(shapes[j])
                d1r = d1 - 1 if d1 > d0 else d1
                vr = pnew[2 * q]
                mr = vr.mean(1 + d1r, keepdim=True).add_(1e-9)
                torch.div(vr, mr, out=fcols[2 * q].view((kf,) + pshapes[2 * q]))
            fcs.clamp_(min=1e-9).rsqrt_()
            for q, j in enumerate(fac):
                shape = shapes[j]
                d1, d0 = factored_dims(shape)
                row_f = fcols[2 * q].view((kf,) + pshapes[2 * q])
                col_f = fcols[2 * q + 1].view((kf,) + pshapes[2 * q + 1])
                pre = torch.mul(row_f.unsqueeze(1 + d0), col_f.unsqueeze(1 + d1),
                                out=buf(f"pre{j}", (kf,) + shape))
                xc = cols[j]
                torch.mul(cols[j][0].view(shape), pre, out=xc[i_fg:i_mp].view((kf,) + shape))
                torch.mul(xc[i_m:i_rms].view((km,) + shape), pre,
                          out=xc[i_mp:].view((km,) + shape))
                new_vrow.append(pnew[2 * q])
                new_vcol.append(pnew[2 * q + 1])
                new_vfull.append(sts[j]["v_full"])
        sq_all = torch.stack([torch.linalg.vector_norm(t, dim=1) for t in cols]).square()
        scale = torch.rsqrt(1e-5 + sq_all / counts)  # (T, C)
        w = (scale[:, :, None] * c["w_full"]).transpose(1, 2)  # (T, H, C)
        for j in range(len(ps)):
            torch.addmm(bias[j][:, None], w[j], cols[j], out=hcols[j])
        if vec:
            hv = h[:, :n1]
            for j, (xvj, hj) in enumerate(zip(vcols, hv.split(sizes[: len(vec)], 1),
                                              strict=True)):
                hj.addmm_(w_rc[j].T, xvj)
        if len(ps) > len(vec):
            # the row and column terms of all factored tensors: (2K, R) over their entries
            rsz = psizes
            xrs = torch.cat([vf, torch.rsqrt(vf + 1e-8)], 0).split(rsz, 1)
            sr = torch.stack([torch.linalg.vector_norm(t, dim=1) for t in xrs]).square()
            sr = torch.rsqrt(1e-5 + sr / torch.tensor(rsz, dtype=f32, device=device)[:, None])
            wrc = torch.stack([c["w_row"], c["w_col"]]).repeat(len(rsz) // 2, 1, 1)
            wrc = (sr[:, :, None] * wrc).transpose(1, 2)  # (pieces, H, 2K)
            q = 0
            for j in range(len(vec), len(ps)):
                shape = shapes[j]
                d1, d0 = factored_dims(shape)
                hj = hcols[j].view((hidden,) + shape)
                for vv, axis in ((new_vrow[j], d0), (new_vcol[j], d1)):
                    part = (wrc[q] @ xrs[q]).view((-1,) + vv.shape[1:])
                    hj.add_(part.unsqueeze(1 + axis))
                    q += 1
        out = mlp_tail_into(c["nn"], h, buf("out", (2, total)), buf, chunk=1 << 30)
        step = scaled_step_into(out, self.exp_mult, self.step_mult)
        ups = [u.view(s) for u, s in zip(step.split(sizes), shapes, strict=True)]
        moms = split_rows(self._flat_cache, "momentum", m, shapes, sizes)
        rmss = split_rows(self._flat_cache, "rms", rms.view(1, -1), shapes, sizes)
        new_steps = (steps + 1).unbind()
        updates, new_states = [None] * len(ps), [None] * len(ps)
        for j, i in enumerate(order):
            updates[i] = ups[j]
            new_states[i] = {"step": new_steps[j], "momentum": moms[j], "rms": rmss[j],
                             "v_row": new_vrow[j], "v_col": new_vcol[j],
                             "v_full": new_vfull[j]}
        return updates, new_states

    def _propose_reference(self, params, grads, states):
        updates, new_states = [], []
        for p, g, st in zip(params, grads, states, strict=True):
            u, s = self._leaf(p, g, st)
            updates.append(u)
            new_states.append(s)
        return updates, new_states

    def _leaf(self, p: torch.Tensor, g: torch.Tensor, st: Mapping[str, torch.Tensor]):
        # Decay-first layout: accumulators are (K,) + shape, features (C, n), hidden (H, n),
        # so every elementwise op runs over contiguous parameter-sized rows.
        c = self._consts(p.device)
        shape, nd = tuple(p.shape), p.dim()
        n = max(p.numel(), 1)
        g = g.detach().to(torch.float32)
        x = p.detach().to(torch.float32)
        bm, cr, a = (c[k].view((-1,) + (1,) * nd) for k in ("bm", "cr", "a"))
        gg = g * g
        m = (bm * st["momentum"]).add_((1.0 - bm) * g)
        rms = (cr * st["rms"]).add_((1.0 - cr) * gg)
        g2 = gg + 1e-30
        r = torch.rsqrt(rms + 1e-6)
        time = time_features(st["step"], c["timescales"])
        bias = (c["nn"]["b0"] + time @ c["w_time"]).unsqueeze(1)
        dims = factored_dims(shape)
        if dims is None:
            v_row, v_col = st["v_row"], st["v_col"]
            v_full = a * st["v_full"] + (1.0 - a) * g2
            fac_g = g * _safe_rsqrt(v_full + 1e-9)
            rs = torch.rsqrt(v_full + 1e-8)
            feats = [g.reshape(1, n), x.reshape(1, n), m, rms, m * r, r, fac_g, v_full, v_full,
                     rs, rs, m * torch.pow(v_full + 1e-6, -0.5)]
            xf = torch.cat([f.reshape(-1, n) for f in feats], 0)
            s = torch.rsqrt(1e-5 + torch.linalg.vector_norm(xf, dim=1).square() / n)
            h = torch.addmm(bias, (s[:, None] * c["w_feat"]).T, xf)
        else:
            d1, d0 = dims
            v_full = st["v_full"]
            a1 = c["a"].view((-1,) + (1,) * (nd - 1))
            v_row = a1 * st["v_row"] + (1.0 - a1) * g2.mean(d0).unsqueeze(0)
            v_col = a1 * st["v_col"] + (1.0 - a1) * g2.mean(d1).unsqueeze(0)
            d1r = d1 - 1 if d1 > d0 else d1
            row_f = _safe_rsqrt(v_row / (v_row.mean(1 + d1r, keepdim=True) + 1e-9))
            pre = row_f.unsqueeze(1 + d0) * _safe_rsqrt(v_col).unsqueeze(1 + d1)
            feats = [g.reshape(1, n), x.reshape(1, n), m, rms, m * r, r, g * pre, m * pre]
            xf = torch.cat([f.reshape(-1, n) for f in feats], 0)
            s = torch.rsqrt(1e-5 + torch.linalg.vector_norm(xf, dim=1).square() / n)
            h = torch.addmm(bias, (s[:, None] * c["w_full"]).T, xf).view((-1,) + shape)
            for v, w, axis in ((v_row, c["w_row"], d0), (v_col, c["w_col"], d1)):
                xr = torch.cat([v, torch.rsqrt(v + 1e-8)], 0)
                xr = xr.reshape(xr.shape[0], -1)
                sr = torch.rsqrt(1e-5 + torch.linalg.vector_norm(xr, dim=1).square()
                                 / xr.shape[1])
                part = ((sr[:, None] * w).T @ xr).view((-1,) + v.shape[1:])
                h = h + part.unsqueeze(1 + axis)
            h = h.reshape(-1, n)
        out = mlp_tail_t(c["nn"], h)
        step = out[0] * torch.exp(out[1] * self.exp_mult) * self.step_mult
        new_state = {"step": st["step"] + 1, "momentum": m, "rms": rms, "v_row": v_row,
                     "v_col": v_col, "v_full": v_full}
        return (-step).reshape(shape), new_state
