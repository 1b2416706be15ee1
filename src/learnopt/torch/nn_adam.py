"""``nn_adam`` in PyTorch: a per-tensor LSTM that sets Adam's hyperparameters.

Metz et al. 2022, "Practical tradeoffs between memory, compute, and performance in learned
optimizers", arXiv:2203.11860, §2.2 ("Hyperparameter controllers") and App. C (``TorchNNAdam`` of
the released learned_optimization code); the port of ``learnopt.learned.nn_adam.NNAdam``.

Each step, 19 statistics of every parameter tensor (computed from the gradient clipped to
``[-grad_clip, grad_clip]`` and Adam's accumulators before this step's update; the previous
step's scaled hyperparameters) go through one LSTM (shared weights, one state per tensor,
all tensors in one batch); a linear layer scaled by ``output_scale`` maps its output to the
tensor's scaled ``(0.1 log lr, 0.1 log(1 - beta1), 0.1 log(1 - beta2), 0.1 log eps)``,
added to the initial ones (``output_mode="absolute"``) or the previous ones
(``"increment"``), clipped, and those drive Adam with exact bias correction for time-varying
betas (``step_rule="adam"``) or the released code's rule (``"released"``). Details:
docs/derivations.md §3.4.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from learnopt.torch.base import (
    TorchLearnedOptimizer,
    check_theta,
    gather_rows,
    split_rows,
    to_tensor_tree,
)

NUM_FEATURES = 19
#: Offsets ``s`` of the progress features ``tanh(10 (t / num_steps - s))`` (VeLO's, App. B.3).
FRACTION_OFFSETS = (0.03, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0, 1.1)
X_LOW = (0.1 * math.log(1e-8), -1.0, -1.0, 0.1 * math.log(1e-11))
X_HIGH = (0.1 * math.log(1e3), 0.0, 0.0, 0.1 * math.log(1e4))


def _clip_log_abs(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.clamp(torch.log(1e-8 + torch.abs(x)), -5.0, 5.0)


def _stats(x: torch.Tensor, n: int) -> list[torch.Tensor]:
    mean = x.sum() / n
    return [_clip_log_abs(mean), torch.sign(mean), _clip_log_abs((x - mean).square().sum() / n)]


class TorchNNAdam(TorchLearnedOptimizer):
    """``nn_adam`` (6,856 meta-parameters with the defaults) as a ``torch.optim.Optimizer``.

    Args:
      params: the parameters (or parameter groups).
      theta: ``{"lstm": {w, b}, "out": {w, b}, "initial_hparams", "initial_state": {h, c}}``
        as the JAX ``TorchNNAdam.init`` returns.
      num_steps: the training horizon (stored; must be >= 1).
      guard: ``None``/``False`` (bare), ``True`` or a dict of guard settings.
      lstm_size, output_scale, output_mode, step_rule, grad_clip, progress_features: as the
        JAX class's; the
        ``initial_*`` hyperparameters are accepted for config compatibility (theta's
        ``initial_hparams`` holds them).
    """

    name = "nn_adam"

    def __init__(
        self,
        params: Iterable[Any],
        theta: Mapping[str, Any],
        num_steps: int,
        *,
        guard: bool | Mapping[str, Any] | None = None,
        lstm_size: int = 32,
        initial_learning_rate: float = 1e-4,
        initial_beta1: float = 0.9,
        initial_beta2: float = 0.999,
        initial_epsilon: float = 1e-8,
        output_scale: float = 0.01,
        output_mode: str = "absolute",
        step_rule: str = "adam",
        grad_clip: float = 1000.0,
        progress_features: bool = False,
    ):
        if output_mode not in ("absolute", "increment"):
            raise ValueError(f"output_mode must be 'absolute' or 'increment'; got {output_mode!r}")
        if step_rule not in ("adam", "released"):
            raise ValueError(f"step_rule must be 'adam' or 'released'; got {step_rule!r}")
        if not grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0; got {grad_clip}")
        del initial_learning_rate, initial_beta1, initial_beta2, initial_epsilon
        h = lstm_size
        theta = to_tensor_tree(theta)
        self.progress_features = bool(progress_features)
        n_in = NUM_FEATURES + (len(FRACTION_OFFSETS) if self.progress_features else 0)
        check_theta(theta, {"lstm": {"w": (n_in + h, 4 * h), "b": (4 * h,)},
                            "out": {"w": (h, 4), "b": (4,)}, "initial_hparams": (4,),
                            "initial_state": {"h": (h,), "c": (h,)}}, self.name)
        self.theta = theta
        self.lstm_size = h
        self.output_scale = float(output_scale)
        self.output_mode, self.step_rule = output_mode, step_rule
        self.grad_clip = float(grad_clip)
        super().__init__(params, num_steps, guard)

    def _consts(self, device: torch.device) -> dict[str, Any]:
        key = ("consts", device)
        if key not in self._device_theta:
            th = self._theta_on(device)
            self._device_theta[key] = dict(
                th, low=torch.tensor(X_LOW, dtype=torch.float32, device=device),
                high=torch.tensor(X_HIGH, dtype=torch.float32, device=device),
                offsets=torch.tensor(FRACTION_OFFSETS, dtype=torch.float32, device=device))
        return self._device_theta[key]

    def _init_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        th = self._theta_on(p.device)
        z = dict(dtype=torch.float32, device=p.device)
        return {"step": torch.zeros((), **z), "mu": torch.zeros(p.shape, **z),
                "nu": torch.zeros(p.shape, **z),
                "hparams": th["initial_hparams"].clone(), "debias": torch.zeros(2, **z),
                "h": th["initial_state"]["h"].clone(), "c": th["initial_state"]["c"].clone()}

    def _propose(self, params, grads, states):
        device = params[0].device
        if any(p.device != device for p in params):
            raise RuntimeError("nn_adam: all parameters must be on one device")
        c = self._consts(device)
        batched = self.batched
        if batched:
            x, flat = self._features_batched(params, grads, states, device)
        else:
            x, gs = self._features_reference(params, grads, states, device)
        if self.progress_features:  # each tensor's steps so far over the horizon
            frac = torch.stack([st["step"] for st in states]) / float(self.num_steps)
            x = torch.cat([x, torch.tanh(10.0 * (frac[:, None] - c["offsets"]))], 1)
        h_prev = torch.stack([st["h"] for st in states])
        c_prev = torch.stack([st["c"] for st in states])
        z = torch.addmm(c["lstm"]["b"], torch.cat([x, h_prev], -1), c["lstm"]["w"])
        i, gg, f, o = z.chunk(4, dim=-1)
        cell = torch.sigmoid(f + 1.0) * c_prev + torch.sigmoid(i) * torch.tanh(gg)
        hidden = torch.sigmoid(o) * torch.tanh(cell)
        delta = self.output_scale * torch.addmm(c["out"]["b"], hidden, c["out"]["w"])
        hp_prev = torch.stack([st["hparams"] for st in states])
        base = hp_prev if self.output_mode == "increment" else c["initial_hparams"]
        xh = torch.clamp(base + delta, c["low"], c["high"])
        e = torch.exp(10.0 * torch.clamp(xh, c["low"], c["high"]))
        lr, e1, e2, eps = e.unbind(-1)
        b1, b2 = 1.0 - e1, 1.0 - e2
        d_prev = torch.stack([st["debias"] for st in states])
        debias = torch.stack([b1 * d_prev[:, 0] + e1, b2 * d_prev[:, 1] + e2], 1)

        if batched:
            return self._adam_batched(flat, states, xh, lr, e1, e2, eps, b1, b2, debias,
                                      hidden, cell)
        updates, new_states = [], []
        for k, (g, st) in enumerate(zip(gs, states, strict=True)):
            m = e1[k] * g + b1[k] * st["mu"]
            v = e2[k] * g.square() + b2[k] * st["nu"]
            if self.step_rule == "adam":
                q = v / debias[k, 1]
                root = torch.where(q > 0, torch.sqrt(torch.where(q > 0, q, 1.0)), 0.0)
                step = -lr[k] * ((m / debias[k, 0]) / (root + eps[k]))
            else:
                step = -(lr[k] * (1.0 + eps[k])) * m / (eps[k] + torch.sqrt(v + 1e-10))
            updates.append(step)
            new_states.append({"step": st["step"] + 1, "mu": m, "nu": v, "hparams": xh[k],
                               "debias": debias[k], "h": hidden[k], "c": cell[k]})
        return updates, new_states

    def _features_reference(self, params, grads, states, device):
        gs, feats = [], []
        one, minus = torch.ones((), device=device), -torch.ones((), device=device)
        for p, g, st in zip(params, grads, states, strict=True):
            n = max(p.numel(), 1)
            g = torch.clamp(g.detach().to(torch.float32), -self.grad_clip, self.grad_clip)
            x = p.detach().to(torch.float32)
            gs.append(g)
            f = (_stats(st["mu"], n) + _stats(st["nu"], n) + _stats(x, n) + _stats(g, n)
                 + [_clip_log_abs(g.abs().sum() / n), one if p.dim() == 0 else minus,
                    one if p.dim() == 1 else minus])
            feats.append(torch.cat([torch.stack(f), 0.2 * torch.clamp(st["hparams"], -5.0, 5.0)]))
        return torch.stack(feats), gs

    def _features_batched(self, params, grads, states, device):
        # All tensors' elements in flat (N,) buffers; per-tensor sums over column blocks.
        f32 = torch.float32
        shapes = [tuple(p.shape) for p in params]
        sizes = [p.numel() for p in params]
        total = sum(sizes)

        def buf(name, shape, dtype=None):
            return self._buf(name, shape, device)

        g = buf("g", (total,))
        torch.cat([gr.detach().reshape(-1).to(f32) for gr in grads], out=g)
        g.clamp_(-self.grad_clip, self.grad_clip)
        xp = buf("x", (total,))
        torch.cat([p.detach().reshape(-1).to(f32) for p in params], out=xp)
        mu = gather_rows(self._flat_cache, "mu", [st["mu"] for st in states], 1, sizes)[0]
        nu = gather_rows(self._flat_cache, "nu", [st["nu"] for st in states], 1, sizes)[0]
        key = ("segments", tuple(sizes), device)
        if key not in self._device_theta:  # which tensor each element belongs to
            self._device_theta = {k: v for k, v in self._device_theta.items()
                                  if not (isinstance(k, tuple) and k[0] == "segments")}
            self._device_theta[key] = (
                torch.repeat_interleave(torch.arange(len(sizes), device=device),
                                        torch.tensor(sizes, device=device)),
                torch.tensor([max(n, 1) for n in sizes], dtype=f32, device=device))
        seg, counts = self._device_theta[key]
        d = buf("d", (total,))

        def sums(a):
            return torch.stack([v.sum() for v in a.split(sizes)])

        def stats(a):
            mean = sums(a) / counts
            torch.sub(a, mean.index_select(0, seg), out=d).square_()
            return [_clip_log_abs(mean), torch.sign(mean), _clip_log_abs(sums(d) / counts)]

        ranks = [p.dim() for p in params]
        f = (stats(mu) + stats(nu) + stats(xp) + stats(g)
             + [_clip_log_abs(sums(torch.abs(g, out=d)) / counts),
                torch.tensor([1.0 if r == 0 else -1.0 for r in ranks], device=device),
                torch.tensor([1.0 if r == 1 else -1.0 for r in ranks], device=device)])
        hp = torch.stack([st["hparams"] for st in states])
        x = torch.cat([torch.stack(f, 1), 0.2 * torch.clamp(hp, -5.0, 5.0)], 1)
        return x, (g, mu, nu, seg, shapes, sizes)

    def _adam_batched(self, flat, states, xh, lr, e1, e2, eps, b1, b2, debias, hidden, cell):
        g, mu, nu, seg, shapes, sizes = flat
        total = g.shape[0]
        device = g.device

        def buf(name, shape):
            return self._buf(name, shape, device)

        if self.step_rule == "adam":
            per = torch.stack([e1, b1, e2, b2, debias[:, 0], debias[:, 1], eps, -lr])
        else:
            per = torch.stack([e1, b1, e2, b2, -(lr * (1.0 + eps)), eps])
        sc = torch.index_select(per, 1, seg, out=buf("per", (per.shape[0], total)))
        t = buf("t", (total,))
        m = mu.mul_(sc[1]) if self._inplace else torch.mul(sc[1], mu)
        m.add_(torch.mul(sc[0], g, out=t))
        v = nu.mul_(sc[3]) if self._inplace else torch.mul(sc[3], nu)
        v.add_(torch.mul(g, g, out=t).mul_(sc[2]))
        step = buf("step", (total,))
        if self.step_rule == "adam":
            q = torch.div(v, sc[5], out=t)
            root = torch.sqrt(q, out=buf("root", (total,)))
            mask = torch.gt(q, 0.0, out=self._mask(total, device)).logical_not_()
            root.masked_fill_(mask, 0.0).add_(sc[6])
            torch.div(m, sc[4], out=step).div_(root).mul_(sc[7])
        else:
            torch.add(v, 1e-10, out=t).sqrt_().add_(sc[5])
            torch.mul(sc[4], m, out=step).div_(t)
        updates = [u.view(s) for u, s in zip(step.split(sizes), shapes, strict=True)]
        mus = split_rows(self._flat_cache, "mu", m.view(1, -1), shapes, sizes, lead=False)
        nus = split_rows(self._flat_cache, "nu", v.view(1, -1), shapes, sizes, lead=False)
        new_steps = (torch.stack([st["step"] for st in states]) + 1).unbind()
        return updates, [{"step": new_steps[k], "mu": mus[k], "nu": nus[k],
                          "hparams": xh[k], "debias": debias[k], "h": hidden[k],
                          "c": cell[k]} for k in range(len(states))]

    def _mask(self, n, device):
        b = self._ws.get("mask")
        if b is None or b.shape != (n,) or b.device != device:
            b = self._ws["mask"] = torch.empty(n, dtype=torch.bool, device=device)
        return b
