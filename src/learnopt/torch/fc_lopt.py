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
``-d * exp(0.001 mag) * 0.001``. On CPU, with numba installed, each tensor's step is one call
of the native kernel that the JAX side uses (:mod:`learnopt.learned.native_fc_lopt`).
Details: docs/derivations.md §3.2.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from learnopt.learned import native, native_fc_lopt
from learnopt.torch.base import (
    TorchLearnedOptimizer,
    check_theta,
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
from learnopt.torch.small_fc_lopt import TIME_SCALES

FC_LOPT_DECAYS = (0.1, 0.5, 0.9, 0.99, 0.999, 0.9999)


class TorchFcLOpt(TorchLearnedOptimizer):
    """``fc_lopt`` (1,762 meta-parameters) as a ``torch.optim.Optimizer``.

    Args:
      params: the parameters (or parameter groups).
      theta: the MLP weights ``{w0, b0, w1, b1, w2, b2}`` as the JAX ``TorchFcLOpt.init`` returns.
      num_steps: the training horizon (stored; must be >= 1).
      guard: ``None``/``False`` (bare), ``True`` or a dict of guard settings.
      hidden_size, hidden_layers, exp_mult, step_mult, decays: as the JAX class's.
    """

    name = "fc_lopt"
    #: columns per MLP pass of the batched path (the activations of a chunk stay in cache)
    CHUNK = 4096

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
        self._hidden_size, self._hidden_layers = int(hidden_size), int(hidden_layers)
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
        if self._hidden_layers >= 1 and self._has_cpu_params():  # see native.prefetch
            native.prefetch(native_fc_lopt.kernel_module, *self._kernel_sizes())

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
        device = params[0].device
        if not self.batched or any(p.device != device for p in params):
            return self._propose_reference(params, grads, states)
        if device.type == "cpu" and self._native_ready():
            return self._propose_native(params, grads, states)
        # All tensors at once: momenta (K, N) and features (C, N) over the N elements of all
        # tensors, each tensor a block of columns (the tensors under CHUNK elements first).
        # The channel normalisers and the time features are per tensor, so the first layer
        # is one addmm per tensor (with that tensor's scaled weights and bias): for the
        # small tensors into one buffer, then the rest of the MLP over all their columns;
        # for a large tensor chunk by chunk with the rest of the MLP, so that a chunk's
        # activations stay in cache.
        c = self._consts(device)
        f32, chunk = torch.float32, self.CHUNK
        k = len(self.momentum_decays)
        n_all = [p.numel() for p in params]
        small = [i for i, n in enumerate(n_all) if n < chunk]
        order = small + [i for i, n in enumerate(n_all) if n >= chunk]
        params = [params[i] for i in order]
        states = [states[i] for i in order]
        shapes = [tuple(p.shape) for p in params]
        sizes = [n_all[i] for i in order]
        total, n_small = sum(sizes), sum(sizes[: len(small)])

        def buf(name, shape):
            return self._buf(name, shape, device)

        x = buf("x", (2 + k, total))
        torch.cat([grads[i].detach().reshape(-1).to(f32) for i in order], out=x[0])
        torch.cat([p.detach().reshape(-1).to(f32) for p in params], out=x[1])
        m_old = gather_rows(self._flat_cache, "momentum", [st["momentum"] for st in states],
                            k, sizes)
        b = c["b"][:, None]
        m = m_old.mul_(b) if self._inplace else torch.mul(b, m_old)
        m.add_(torch.mul(1.0 - b, x[0], out=x[2:]))
        x[2:] = m
        steps = torch.stack([st["step"] for st in states])
        time = time_features(steps[:, None], c["timescales"])  # (T, 11)
        bias = torch.addmm(c["nn"]["b0"], time, c["w_time"])  # (T, H)
        hidden = bias.shape[1]
        cols = x.split(sizes, 1)
        sq = torch.stack([torch.linalg.vector_norm(v, dim=1) for v in cols]).square()
        scale = torch.rsqrt(1e-5 + sq / torch.tensor([max(n, 1) for n in sizes], dtype=f32,
                                                     device=device)[:, None])  # (T, C)
        w = (scale[:, :, None] * c["w_feat"]).transpose(1, 2)  # (T, H, C)
        out = buf("out", (2, total))
        ocols = out.split(sizes, 1)
        if n_small:
            h = buf("h", (hidden, n_small))
            for i, hc in enumerate(h.split(sizes[: len(small)], 1)):
                torch.addmm(bias[i][:, None], w[i], cols[i], out=hc)
            mlp_tail_into(c["nn"], h, out[:, :n_small], buf, chunk)
        h0 = buf("h0", (hidden, chunk))
        for i in range(len(small), len(params)):
            for lo in range(0, sizes[i], chunk):
                width = min(chunk, sizes[i] - lo)
                a = h0[:, :width]
                torch.addmm(bias[i][:, None], w[i], cols[i][:, lo:lo + width], out=a)
                mlp_tail_into(c["nn"], a, ocols[i][:, lo:lo + width], buf, chunk)
        step = scaled_step_into(out, self.exp_mult, self.step_mult)
        ups = [u.view(s) for u, s in zip(step.split(sizes), shapes, strict=True)]
        moms = split_rows(self._flat_cache, "momentum", m, shapes, sizes)
        new_steps = (steps + 1).unbind()
        updates, new_states = [None] * len(params), [None] * len(params)
        for j, i in enumerate(order):
            updates[i] = ups[j]
            new_states[i] = {"step": new_steps[j], "momentum": moms[j]}
        return updates, new_states

    def _kernel_sizes(self) -> tuple[int, int, int, int]:
        return (len(self.momentum_decays), self._hidden_size, self._hidden_layers,
                len(TIME_SCALES))

    def _native_ready(self) -> bool:
        return native_fc_lopt.ready(*self._kernel_sizes())

    def _native_arrays(self) -> dict[str, np.ndarray]:
        """theta, the decays and the step constants as the kernel's inputs (batch of 1)."""
        key = ("native", "cpu")
        if key not in self._device_theta:
            mlp = native.mlp_inputs(self.theta, self._hidden_layers, torch.stack, torch.zeros)
            arrays = {k: v.detach().to(torch.float32).contiguous().numpy()[None]
                      for k, v in mlp.items()}
            arrays["decays"] = np.asarray([self.momentum_decays], np.float32)
            arrays["consts"] = np.asarray([[self.exp_mult, self.step_mult, 1e-5, 0.0]],
                                          np.float32)
            self._device_theta[key] = arrays
        return self._device_theta[key]

    def _propose_native(self, params, grads, states):
        """Every tensor by the native CPU kernel, one call each (momenta in place on a bare
        step), within torch's intra-op thread budget."""
        k, sizes = len(self.momentum_decays), self._kernel_sizes()
        threads = kernel_threads()
        timescales = self._consts(torch.device("cpu"))["timescales"]
        times: dict[int, np.ndarray] = {}
        updates, new_states = [], []
        for p, g, st in zip(params, grads, states, strict=True):
            n = p.numel()  # > 0: the base class skips empty tensors

            def flat(x, *lead, n=n):  # float32, contiguous, (1, *lead, n) over x's memory
                return x.detach().to(torch.float32).contiguous().view(1, *lead, n).numpy()

            mom = st["momentum"]  # written in place only where the kernel sees its memory
            in_place = self._inplace and mom.dtype == torch.float32 and mom.is_contiguous()
            m = mom if in_place else torch.empty(mom.shape, dtype=torch.float32)
            update = torch.empty(p.shape, dtype=torch.float32)
            native_fc_lopt.numpy_call(
                *sizes, {**self._native_arrays(), "p": flat(p), "g": flat(g),
                         "m": flat(mom, k), "time": time_row(int(st["step"]), timescales, times)},
                out={"update": flat(update), "m_out": flat(m, k)}, num_threads=threads)
            updates.append(update)
            new_states.append({"step": st["step"] + 1, "momentum": m})
        return updates, new_states

    def _propose_reference(self, params, grads, states):
        # decay-first layout: momenta (K,) + shape, features (C, n), hidden (H, n)
        updates, new_states = [], []
        for p, g, st in zip(params, grads, states, strict=True):
            c = self._consts(p.device)
            n = max(p.numel(), 1)
            g = g.detach().to(torch.float32)
            b = c["b"].view((-1,) + (1,) * p.dim())
            m = b * st["momentum"].to(torch.float32) + (1.0 - b) * g  # float32 state
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
