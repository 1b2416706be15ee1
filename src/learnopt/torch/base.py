"""The common ``torch.optim.Optimizer`` base of the ported learned optimizers, and the guard.

A learned optimizer here is a fixed function of its meta-parameters ``theta`` (loaded from a
weights file or handed over from the JAX side) applied to every parameter tensor, as in the
JAX package (Metz et al. 2022, "Practical tradeoffs between memory, compute, and performance
in learned optimizers", arXiv:2203.11860, §2). Subclasses implement two pure functions:
``_init_state(p)`` (the per-parameter state) and ``_propose(params, grads, states)`` (the
float32 updates to add to the parameters and the new states). Under the guard the update is
functional (the old state tensors are left as they were), which lets the guard keep the state
of its last good point by reference instead of copying it; a bare step sets ``_inplace`` and
may update the state tensors in place, as ``torch.optim`` optimizers do. The updates may be
views of scratch buffers that the next step overwrites. ``batched`` selects a subclass's path
that runs all tensors of a step together (docs/torch.md, "Cost") or its per-tensor reference.

The divergence guard is the JAX ``learnopt.learned.guard.guarded`` (docs/stability.md), same
rule, same order of operations: sanitise non-finite gradient elements to 0; test the loss
at the current parameters against the first finite loss ``L0``
(``L > L0 + blowup_factor * max(|L0|, min_loss_scale)`` or non-finite is a blow-up); on a
passing loss, snapshot the parameters and the optimizer state; scale the proposal by the
step scale; reject it if ``p + update`` or the new state gains a non-finite value; on a
blow-up or rejection roll parameters and state back to the snapshot and multiply the scale
by ``shrink``. Metz et al. 2022, "VeLO: Training Versatile Learned Optimizers by Scaling Up",
arXiv:2211.09760, §4.4, motivates it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch

_INT32_MAX = 2**31 - 1
_GUARD_DEFAULTS = {"blowup_factor": 1.0, "shrink": 0.5, "min_loss_scale": 1e-6, "patience": 5}
_GUARD_KEY = "guard"  # the optimizer-level entry of self.state (saved by state_dict)
_SNAP_PARAM, _SNAP_STATE = "guard_param", "guard_state"


def check_num_steps(num_steps: Any) -> int:
    """``num_steps`` as a positive int, or a ValueError that says what is wrong."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int | np.integer):
        raise ValueError(f"num_steps must be a positive integer (the training horizon); got "
                         f"{num_steps!r}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1 (the training horizon); got {num_steps}")
    return int(num_steps)


def guard_settings(guard: bool | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``None`` / ``False``: no guard; ``True``: default settings; a mapping: those settings
    (keys of :func:`learnopt.learned.guard.guarded`: blowup_factor, shrink, min_loss_scale,
    patience)."""
    if guard is None or guard is False:
        return None
    settings = dict(_GUARD_DEFAULTS)
    if guard is not True:
        if not isinstance(guard, Mapping):
            raise ValueError(f"guard must be None, a bool or a dict of settings; got {guard!r}")
        unknown = sorted(set(guard) - set(_GUARD_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown guard settings {unknown}; accepted: "
                             f"{', '.join(_GUARD_DEFAULTS)}")
        settings.update({k: v if k == "patience" else float(v) for k, v in guard.items()})
    if not settings["blowup_factor"] > 0:
        raise ValueError(f"blowup_factor must be > 0; got {settings['blowup_factor']}")
    if not 0.0 < settings["shrink"] < 1.0:
        raise ValueError(f"shrink must lie in (0, 1); got {settings['shrink']}")
    if not settings["min_loss_scale"] > 0:
        raise ValueError(f"min_loss_scale must be > 0; got {settings['min_loss_scale']}")
    patience = settings["patience"]
    if isinstance(patience, bool) or not isinstance(patience, int | np.integer) or patience < 1:
        raise ValueError(f"patience must be an integer >= 1; got {patience!r}")
    settings["patience"] = int(patience)
    return settings


def to_tensor_tree(tree: Any) -> Any:
    """Nested dicts of arrays (numpy, JAX, torch, lists) -> the same dicts of float32 CPU
    tensors (copies)."""
    if isinstance(tree, Mapping):
        return {k: to_tensor_tree(v) for k, v in tree.items()}
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", torch.float32).clone()
    return torch.tensor(np.asarray(tree, dtype=np.float32))


def check_theta(theta: Any, shapes: Mapping[str, Any], who: str, where: str = "theta") -> None:
    """Raise a ValueError naming the entry when ``theta`` lacks a key or has a wrong shape."""
    if not isinstance(theta, Mapping):
        raise ValueError(f"{who}: {where} must be a dict; got {type(theta).__name__}")
    missing = sorted(set(shapes) - set(theta))
    extra = sorted(set(theta) - set(shapes))
    if missing or extra:
        raise ValueError(f"{who}: {where} has keys {sorted(theta)}; expected {sorted(shapes)} "
                         f"(missing {missing}, unexpected {extra})")
    for k, want in shapes.items():
        if isinstance(want, Mapping):
            check_theta(theta[k], want, who, f"{where}[{k!r}]")
        elif tuple(theta[k].shape) != tuple(want):
            raise ValueError(f"{who}: {where}[{k!r}] has shape {tuple(theta[k].shape)}; "
                             f"expected {tuple(want)}")


def _nonfinite(x: torch.Tensor) -> torch.Tensor:
    return (~torch.isfinite(x)).sum()


def _is_float(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def _all_finite(tensors: list[torch.Tensor]) -> list[bool]:
    """Whether each tensor holds only finite values, with one host sync: a finite sum means
    no inf or NaN element (a non-finite one, possibly an overflow of finite values, is
    checked element by element)."""
    if not tensors:
        return []
    sums = torch.stack([t.sum(dtype=torch.float32).to("cpu") for t in tensors])
    ok = torch.isfinite(sums).tolist()
    return [o or bool(torch.isfinite(t).all()) for t, o in zip(tensors, ok, strict=True)]


def _all_finite_views(tensors: list[torch.Tensor]) -> list[bool]:
    """:func:`_all_finite`, testing a buffer once when the tensors tile it exactly (the state
    views of the batched path)."""
    groups: dict[int, list[int]] = {}
    for i, t in enumerate(tensors):
        base = t._base if t._base is not None else t
        groups.setdefault(id(base), []).append(i)
    out = [True] * len(tensors)
    whole, single = [], []
    for idx in groups.values():
        t0 = tensors[idx[0]]
        base = t0._base if t0._base is not None else t0
        if len(idx) > 1 and sum(tensors[i].numel() for i in idx) == base.numel():
            whole.append((base, idx))
        else:
            single.extend(idx)
    flags = _all_finite([b for b, _ in whole] + [tensors[i] for i in single])
    for (_, idx), ok in zip(whole, flags[: len(whole)], strict=True):
        if not ok:  # then tensor by tensor
            for i, f in zip(idx, _all_finite([tensors[i] for i in idx]), strict=True):
                out[i] = f
    for i, ok in zip(single, flags[len(whole):], strict=True):
        out[i] = ok
    return out


class TorchLearnedOptimizer(torch.optim.Optimizer):
    """Base class: a learned optimizer with fixed ``theta``, optionally behind the guard.

    ``step(closure=None, *, loss=None)``: a closure (``torch.optim`` convention: it zeroes the
    gradients, computes the loss, calls ``backward()`` and returns the loss) is evaluated
    first, under ``torch.enable_grad()``. When the optimizer reads the loss (the guard does;
    ``needs_loss``), a closure or ``loss=`` is required: ``loss=`` is the loss at the current
    parameters whose gradients are already in ``.grad``, for loops that computed them
    already. Returns the loss (``None`` if neither was given).
    """

    name = "learned_optimizer"
    #: whether the bare optimizer reads the loss (none of the ported architectures does)
    reads_loss = False
    #: ``True``: ``_propose`` runs all parameter tensors of a step together (flat buffers,
    #: one MLP pass); ``False``: the per-tensor reference path (same function; for tests and
    #: debugging). Set on an instance to switch.
    batched = True

    def __init__(self, params: Iterable[Any], num_steps: int,
                 guard: bool | Mapping[str, Any] | None = None):
        self.num_steps = check_num_steps(num_steps)
        self.guard = guard_settings(guard)
        super().__init__(params, {})
        self._device_theta: dict[Any, Any] = {}
        self._flat_cache: dict[str, tuple[list[torch.Tensor], torch.Tensor]] = {}
        self._ws: dict[str, torch.Tensor] = {}  # reused scratch buffers of the batched path
        self._inplace = False  # whether _propose may overwrite the old state tensors

    # -- to implement ---------------------------------------------------------------------
    def _init_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _propose(self, params: list[torch.Tensor], grads: list[torch.Tensor],
                 states: list[dict[str, torch.Tensor]]
                 ) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
        raise NotImplementedError

    # -- helpers ----------------------------------------------------------------------------
    def _has_cpu_params(self) -> bool:
        """Whether any parameter lives on the CPU (where the native kernels run)."""
        return any(p.device.type == "cpu" for group in self.param_groups for p in group["params"])

    def _buf(self, name: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """A float32 scratch buffer, reused across steps (freshly allocated large tensors
        cost a page fault per page on first touch, more than the arithmetic on them)."""
        b = self._ws.get(name)
        if b is None or b.shape != shape or b.device != device:
            b = self._ws[name] = torch.empty(shape, dtype=torch.float32, device=device)
        return b

    def _theta_on(self, device: torch.device) -> Any:
        """``self.theta`` (float32 CPU tensors) moved to ``device``, cached."""
        if device not in self._device_theta:
            def move(t):
                return {k: move(v) for k, v in t.items()} if isinstance(t, dict) else t.to(device)
            self._device_theta[device] = move(self.theta)
        return self._device_theta[device]

    @property
    def needs_loss(self) -> bool:
        """Whether ``step`` needs the loss (a closure or ``loss=``)."""
        return self.reads_loss or self.guard is not None

    def _gather(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        params, grads = [], []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or p.numel() == 0:  # nothing to update
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{self.name} does not support sparse gradients")
                if p.is_complex():
                    raise RuntimeError(f"{self.name} does not support complex parameters")
                state = self.state[p]
                if "step" not in state:
                    state.update(self._init_state(p))
                params.append(p)
                grads.append(p.grad)
        return params, grads

    @staticmethod
    def _inner(state: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in state.items() if not k.startswith("guard_")}

    def _set_inner(self, p: torch.Tensor, inner: Mapping[str, Any]) -> None:
        state = self.state[p]
        for k in [k for k in state if not k.startswith("guard_")]:
            del state[k]
        state.update(inner)

    # -- the step ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, loss: Any = None) -> Any:
        """One optimizer step (class docstring); returns the loss."""
        if closure is not None:
            if loss is not None:
                raise ValueError(f"{self.name}.step: give a closure or loss=, not both")
            with torch.enable_grad():
                loss = closure()
        if loss is None and self.needs_loss:
            what = "the divergence guard" if self.guard is not None else self.name
            raise ValueError(
                f"{self.name}.step needs the loss at the current parameters ({what} reads it): "
                "call step(closure) with a closure that zeroes the gradients, computes the "
                "loss, calls loss.backward() and returns the loss, or step(loss=loss) after "
                "loss.backward(). Use guard=False for the bare learned optimizer, which does "
                "not read the loss.")
        params, grads = self._gather()
        if self.guard is None:
            if params:
                states = [self._inner(self.state[p]) for p in params]
                self._inplace = True  # nothing keeps the old state: update it in place
                try:
                    updates, new_states = self._propose(params, grads, states)
                finally:
                    self._inplace = False
                torch._foreach_add_(params, [u.to(p.dtype) for u, p in
                                             zip(updates, params, strict=True)])
                for p, s in zip(params, new_states, strict=True):
                    self._set_inner(p, s)
        else:
            self._guarded_step(params, grads, loss)
        return loss

    # -- the guard --------------------------------------------------------------------------
    @property
    def guard_state(self) -> dict[str, Any] | None:
        """The guard's counters: ``initial_loss``, ``has_initial_loss``, ``scale``,
        ``num_rollbacks``, ``num_sanitized``, ``num_high`` (``None`` without a guard)."""
        if self.guard is None:
            return None
        if _GUARD_KEY not in self.state:
            self.state[_GUARD_KEY] = {"initial_loss": 0.0, "has_initial_loss": False,
                                      "scale": 1.0, "num_rollbacks": 0, "num_sanitized": 0}
        self.state[_GUARD_KEY].setdefault("num_high", 0)  # absent from older state_dicts
        return self.state[_GUARD_KEY]

    def _guarded_step(self, params: list[torch.Tensor], grads: list[torch.Tensor],
                      loss: Any) -> None:
        cfg, gs = self.guard, self.guard_state
        f32 = np.float32
        loss32 = f32(loss.detach().float().item() if isinstance(loss, torch.Tensor)
                     else float(loss))
        finite = bool(np.isfinite(loss32))
        first = (not gs["has_initial_loss"]) and finite
        l0 = loss32 if first else f32(gs["initial_loss"])
        has_l0 = bool(gs["has_initial_loss"] or first)
        threshold = f32(l0 + f32(cfg["blowup_factor"])
                        * max(abs(l0), f32(cfg["min_loss_scale"])))
        loss_ok = has_l0 and finite and bool(loss32 <= threshold)
        # consecutive high (finite, above the margin) losses, this one included
        num_high = gs["num_high"] + 1 if has_l0 and finite and not loss_ok else 0
        loss_tolerated = has_l0 and finite and num_high < cfg["patience"]

        for p in params:  # a parameter seen for the first time: its snapshot is where it is
            state = self.state[p]
            if _SNAP_PARAM not in state:
                state[_SNAP_PARAM] = p.detach().clone()
                state[_SNAP_STATE] = self._inner(state)
        snapped = [p for group in self.param_groups for p in group["params"]
                   if _SNAP_PARAM in self.state[p]]
        if loss_ok:  # these parameters passed: they and their state become the snapshot
            for p in snapped:
                state = self.state[p]
                snap = state[_SNAP_PARAM]
                if (isinstance(snap, torch.Tensor) and snap.shape == p.shape
                        and snap.dtype == p.dtype and snap.device == p.device):
                    snap.copy_(p.detach())  # reuse the snapshot's memory
                else:
                    state[_SNAP_PARAM] = p.detach().clone()
                state[_SNAP_STATE] = self._inner(state)  # references: updates are functional

        clean = _all_finite(grads)
        num_bad = 0
        if not all(clean):
            counts = [0 if c else int(_nonfinite(g)) for g, c in zip(grads, clean, strict=True)]
            num_bad = sum(counts)
            grads = [torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0) if c else g
                     for g, c in zip(grads, counts, strict=True)]

        old = [self._inner(self.state[p]) for p in params]
        usable = True
        if params:
            updates, new_states = self._propose(params, grads, old)
            if gs["scale"] != 1.0:  # (x * 1.0 is x)
                scale = torch.tensor(gs["scale"], dtype=torch.float32)
                updates = [u * scale.to(u.device) for u in updates]
            updates = [u.to(p.dtype) for u, p in zip(updates, params, strict=True)]
            # An all-finite test per tensor; only a new state tensor that holds a non-finite
            # value is compared with the old one (an optimizer may keep a deliberate inf:
            # only values that become non-finite count).
            usable = all(_all_finite([self._sum_buf(p, u) for p, u in
                                      zip(params, updates, strict=True)]))
            pairs = [(o.get(k), b) for o, n in zip(old, new_states, strict=True)
                     for k, b in n.items() if _is_float(b)]
            for (a, b), ok_b in zip(pairs, _all_finite_views([b for _, b in pairs]),
                                    strict=True):
                if usable and not ok_b:
                    if _is_float(a) and a.shape == b.shape:
                        usable = not bool((~torch.isfinite(b) & torch.isfinite(a)).any())
                    else:
                        usable = False
        ok = loss_tolerated and usable

        if ok:
            for p, u, s in zip(params, updates, new_states, strict=True):
                p.add_(u)
                self._set_inner(p, s)
        else:
            for p in snapped:
                state = self.state[p]
                p.add_(state[_SNAP_PARAM] - p)  # the JAX update snapshot - params, applied
                self._set_inner(p, state[_SNAP_STATE])

        gs["initial_loss"] = float(l0)
        gs["has_initial_loss"] = has_l0
        gs["num_high"] = num_high if ok else 0
        if not ok:
            gs["scale"] = float(f32(gs["scale"]) * f32(cfg["shrink"]))
            gs["num_rollbacks"] += 1
        num_bad = min(num_bad, _INT32_MAX - 255)
        total = gs["num_sanitized"]
        gs["num_sanitized"] = _INT32_MAX if num_bad > _INT32_MAX - total else total + num_bad

    def _sum_buf(self, p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``p + u`` in a reused scratch buffer (float32 parameters), else a new tensor."""
        if p.dtype != torch.float32:
            return p + u
        b = self._ws.get("guard_sum")
        if b is None or b.numel() < p.numel() or b.device != p.device:
            b = self._ws["guard_sum"] = torch.empty(max(p.numel(), 1), dtype=torch.float32,
                                                    device=p.device)
        return torch.add(p, u, out=b[: p.numel()].view(p.shape))

    # -- bookkeeping ------------------------------------------------------------------------
    def state_bytes(self) -> int:
        """Bytes of all tensors in the optimizer state (guard snapshots included)."""
        seen: set[int] = set()
        total = 0

        def walk(x: Any) -> None:
            nonlocal total
            if isinstance(x, torch.Tensor):
                if id(x) not in seen:
                    seen.add(id(x))
                    total += x.numel() * x.element_size()
            elif isinstance(x, Mapping):
                for v in x.values():
                    walk(v)

        for v in self.state.values():
            walk(v)
        return total


def time_features(step: torch.Tensor, timescales: torch.Tensor) -> torch.Tensor:
    """``tanh(t / x - 1)`` for each timescale ``x`` (Metz et al. 2022, arXiv:2203.11860,
    App. A; the released code's form)."""
    return torch.tanh(step.to(torch.float32) / timescales - 1.0)


def time_row(step: int, timescales: torch.Tensor, cache: dict[int, np.ndarray]) -> np.ndarray:
    """The time features of ``step`` as a ``(1, T)`` float32 NumPy row (a native kernel's
    input), computed once per step value in ``cache`` (shared by the tensors of a step)."""
    if step not in cache:
        cache[step] = time_features(torch.tensor([[float(step)]]), timescales).numpy()
    return cache[step]


def kernel_threads() -> int:
    """Threads of a native kernel call from PyTorch: torch's intra-op budget
    (``torch.set_num_threads``), within :func:`learnopt.learned.native.threads`."""
    from learnopt.learned import native

    return max(1, min(native.threads(), torch.get_num_threads()))


def mlp_layers(nn: Mapping[str, torch.Tensor]) -> int:
    return sum(1 for k in nn if k.startswith("w"))


def mlp_tail(nn: Mapping[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """Layers 1.. of a ReLU MLP given the first layer's pre-activation ``h``."""
    for i in range(1, mlp_layers(nn)):
        h = torch.addmm(nn[f"b{i}"], torch.relu(h), nn[f"w{i}"])
    return h


def mlp_tail_t(nn: Mapping[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """:func:`mlp_tail` on transposed activations ``h: (hidden, n)``; returns ``(out, n)``."""
    for i in range(1, mlp_layers(nn)):
        h = torch.addmm(nn[f"b{i}"].unsqueeze(1), nn[f"w{i}"].T, h.relu_())  # h is ours
    return h


def mlp_tail_into(nn: Mapping[str, torch.Tensor], h: torch.Tensor, out: torch.Tensor,
                  buf: Callable[[str, tuple[int, ...]], torch.Tensor],
                  chunk: int = 4096) -> torch.Tensor:
    """:func:`mlp_tail_t` written into ``out`` (``(out, n)``), over column chunks of ``h``
    (a chunk's activations stay in cache; the same values per column) with the scratch
    buffers ``buf(name, shape)``. Modifies ``h``."""
    layers = mlp_layers(nn)
    n = h.shape[1]
    if layers == 1:
        return out.copy_(h)
    for lo in range(0, n, chunk):
        a = h[:, lo:lo + chunk]
        width = a.shape[1]
        for i in range(1, layers):
            w = nn[f"w{i}"]
            dst = (out[:, lo:lo + width] if i == layers - 1
                   else buf(f"tail{i}", (w.shape[1], min(chunk, n)))[:, :width])
            torch.addmm(nn[f"b{i}"].unsqueeze(1), w.T, a.relu_(), out=dst)
            a = dst
    return out


def scaled_step_into(out: torch.Tensor, exp_mult: float, step_mult: float) -> torch.Tensor:
    """``-(out[0] * exp(exp_mult * out[1]) * step_mult)`` in place in ``out[1]``."""
    e = out[1]
    e.mul_(exp_mult).exp_().mul_(out[0]).mul_(step_mult).neg_()
    return e


def factored_dims(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """``(d1, d0)``: the 2nd-largest and largest dims of a rank >= 2 shape (stable sort: among
    equal sizes the later axis counts as larger), else ``None``; as the JAX side."""
    if len(shape) < 2:
        return None
    order = sorted(range(len(shape)), key=lambda i: shape[i])
    return order[-2], order[-1]


def decays_from_offsets(initial: Iterable[float], offset: torch.Tensor) -> torch.Tensor:
    """``1 - exp(10 * (log(1 - initial) / 10 + offset))`` in float32: meta-learned decays are
    offsets in ``log(1 - beta) / 10`` coordinates."""
    init = torch.tensor(list(initial), dtype=torch.float32)
    return 1.0 - torch.exp(10.0 * (torch.log(1.0 - init) / 10.0 + offset))


def num_elements(shape: Iterable[int]) -> int:
    return math.prod(shape)


# -- flat buffers for the batched path ------------------------------------------------------
# The batched path keeps a per-element accumulator of all tensors of a step in one
# ``(rows, total_elements)`` buffer; each parameter's state entry is a view of its columns
# (so ``state_dict`` and the per-tensor layout stay as they were). A step reads the buffer
# back without a copy when every state entry is still the view it handed out (identity
# check); otherwise (first step, a loaded state_dict, a guard rollback) it concatenates.


def gather_rows(cache: dict, key: str, tensors: list[torch.Tensor], rows: int,
                sizes: list[int]) -> torch.Tensor:
    """The ``(rows, sum(sizes))`` buffer whose column blocks are ``tensors`` (each
    ``(rows,) + shape``): the cached one if ``tensors`` are its views, else a concatenation."""
    hit = cache.get(key)
    if hit is not None and len(hit[0]) == len(tensors) and all(
            a is b for a, b in zip(hit[0], tensors, strict=True)):
        return hit[1]
    return torch.cat([t.reshape(rows, n) for t, n in zip(tensors, sizes, strict=True)], 1)


def split_rows(cache: dict, key: str, flat: torch.Tensor, shapes: list[tuple[int, ...]],
               sizes: list[int], lead: bool = True) -> list[torch.Tensor]:
    """Views ``(rows,) + shape`` of ``flat``'s column blocks (``shape`` if not ``lead``, for
    one row), remembered for :func:`gather_rows`."""
    rows = flat.shape[0]
    pre = (rows,) if lead else ()
    views = [v.view(pre + s) for v, s in zip(flat.split(sizes, 1), shapes, strict=True)]
    cache[key] = (views, flat)
    return views
