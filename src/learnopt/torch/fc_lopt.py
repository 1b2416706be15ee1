"""``fc_lopt`` in PyTorch: the per-parameter MLP learned optimizer of Metz et al. 2019.

Metz et al. 2019, "Understanding and correcting pathologies in the training of learned
optimizers", arXiv:1810.10180, as the ``fc_lopt`` baseline of Metz et al. 2022, "Practical
tradeoffs between memory, compute, and performance in learned optimizers", arXiv:2203.11860,
§4 (``MLPLOpt`` of the released learned_optimization code); the port of
``learnopt.learned.mlp.FcLOpt``.

Per tensor: six momenta ``m_k <- b_k m_k + (1 - b_k) g`` with fixed decays 0.1, 0.5, 0.9,
0.99, 0.999, 0.9999; features ``g, p, m (6)``, each channel scaled by ``rsqrt(1e-5 + mean
over the tensor of its square)``, and 11 time features ``tanh(t / x - 1)``: 19 inputs to a
ReLU MLP 19 -> 32 -> 32 -> 2 giving ``(d, mag)``; the parameter moves by
``-d * exp(0.001 mag) * 0.001``. Details: docs/derivations.md §3.2.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from learnopt.torch.base import (
    LearnedOptimizer,
    check_theta,
    mlp_tail_t,
    time_features,
    to_tensor_tree,
)
from learnopt.torch.small_fc_lopt import TIME_SCALES

FC_LOPT_DECAYS = (0.1, 0.5, 0.9, 0.99, 0.999, 0.9999)


class FcLOpt(LearnedOptimizer):
    """``fc_lopt`` (1,762 meta-parameters) as a ``torch.optim.Optimizer``.

    Args:
      params: the parameters (or parameter groups).
      theta: the MLP weights ``{w0, b0, w1, b1, w2, b2}`` as the JAX ``FcLOpt.init`` returns.
      num_steps: the training horizon (stored; must be >= 1).
      guard: ``None``/``False`` (bare), ``True`` or a dict of guard settings.
      hidden_size, hidden_layers, exp_mult, step_mult, decays: as the JAX class's.
    """

    name = "fc_lopt"

    def __init__(
        self,
        params: Iterable[Any],
        theta: Mapping[str, Any],
        num_steps: int,
        *,
        guard: bool | Mapping[str, Any] | None = None,
        hidden_size: int = 32,
        hidden_layers: int = 2,
        exp_mult: float = 0.001,
        step_mult: float = 0.001,
        decays: Sequence[float] = FC_LOPT_DECAYS,
    ):
        if not decays or not all(0.0 <= d <= 1.0 for d in decays):
            raise ValueError(f"decays must be a non-empty list in [0, 1]; got {tuple(decays)}")
        self.momentum_decays = tuple(float(d) for d in decays)
        self.exp_mult, self.step_mult = float(exp_mult), float(step_mult)
        self.num_tensor_features = 2 + len(self.momentum_decays)
        sizes = ((self.num_tensor_features + len(TIME_SCALES),)
                 + (hidden_size,) * hidden_layers + (2,))
        shapes = {}
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            shapes[f"w{i}"], shapes[f"b{i}"] = (a, b), (b,)
        theta = to_tensor_tree(theta)
        check_theta(theta, shapes, self.name)
        self.theta = theta
        super().__init__(params, num_steps, guard)

    def _consts(self, device: torch.device) -> dict[str, Any]:
        key = ("consts", device)
        if key not in self._device_theta:
            nf = self.num_tensor_features
            self._device_theta[key] = {
                "b": torch.tensor(self.momentum_decays, dtype=torch.float32, device=device),
                "w_feat": self.theta["w0"][:nf].to(device),
                "w_time": self.theta["w0"][nf:].to(device),
                "timescales": torch.tensor(TIME_SCALES, dtype=torch.float32, device=device),
                "nn": {k: v.to(device) for k, v in self.theta.items()},
            }
        return self._device_theta[key]

    def _init_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        z = dict(dtype=torch.float32, device=p.device)
        return {"step": torch.zeros((), **z),
                "momentum": torch.zeros((len(self.momentum_decays),) + tuple(p.shape), **z)}

    def _propose(self, params, grads, states):
        # decay-first layout: momenta (K,) + shape, features (C, n), hidden (H, n)
        updates, new_states = [], []
        for p, g, st in zip(params, grads, states, strict=True):
            c = self._consts(p.device)
            n = max(p.numel(), 1)
            g = g.detach().to(torch.float32)
            b = c["b"].view((-1,) + (1,) * p.dim())
            m = b * st["momentum"] + (1.0 - b) * g
            x = torch.cat([g.reshape(1, n), p.detach().to(torch.float32).reshape(1, n),
                           m.reshape(-1, n)], 0)
            s = torch.rsqrt(1e-5 + torch.linalg.vector_norm(x, dim=1).square() / n)
            time = time_features(st["step"], c["timescales"])
            bias = (c["nn"]["b0"] + time @ c["w_time"]).unsqueeze(1)
            out = mlp_tail_t(c["nn"], torch.addmm(bias, (s[:, None] * c["w_feat"]).T, x))
            step = out[0] * torch.exp(out[1] * self.exp_mult) * self.step_mult
            updates.append((-step).reshape(p.shape))
            new_states.append({"step": st["step"] + 1, "momentum": m})
        return updates, new_states
