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

import torch

from learnopt.torch.base import (
    LearnedOptimizer,
    check_theta,
    decays_from_offsets,
    factored_dims,
    mlp_tail_t,
    time_features,
    to_tensor_tree,
)

TIME_SCALES = (1, 3, 10, 30, 100, 300, 1000, 3000, 1e4, 3e4, 1e5)


def _safe_rsqrt(x: torch.Tensor) -> torch.Tensor:
    return torch.rsqrt(torch.clamp(x, min=1e-9))


class SmallFcLOpt(LearnedOptimizer):
    """The 197-parameter ``small_fc_lopt`` as a ``torch.optim.Optimizer``.

    Args:
      params: the parameters (or parameter groups) to optimise.
      theta: the meta-parameters, nested dicts of arrays as the JAX ``SmallFcLOpt.init``
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
