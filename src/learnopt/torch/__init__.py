"""learnopt's learned optimizers as ``torch.optim.Optimizer`` classes (docs/torch.md).

::

    import learnopt.torch

    opt = learnopt.torch.pretrained("small_fc_lopt_general", model.parameters(), num_steps=1000)

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    for _ in range(1000):
        opt.step(closure)       # the guarded shipped optimizers read the loss: closure needed

Ported: ``small_fc_lopt`` and ``fc_lopt`` (Metz et al. 2022, "Practical tradeoffs between
memory, compute, and performance in learned optimizers", arXiv:2203.11860, §2.2 and §4),
``nn_adam`` (ibid., App. C), the divergence guard of ``learnopt.learned.guard`` and every
shipped pretrained optimizer, read from the same weights files as the JAX side with
``msgpack`` and numpy. Nothing here imports JAX. Given the same initial parameters, theta and
gradients (and losses, for the guard), the parameters follow the JAX optimizers' to float32
rounding (tests/torch/test_trajectory.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from learnopt.torch.base import TorchLearnedOptimizer, check_num_steps
from learnopt.torch.fc_lopt import TorchFcLOpt
from learnopt.torch.nn_adam import TorchNNAdam
from learnopt.torch.small_fc_lopt import TorchSmallFcLOpt
from learnopt.torch.weights import WeightsFileError, available, read_pretrained

#: The ported architectures by their learnopt registry name.
ARCHITECTURES: dict[str, type[TorchLearnedOptimizer]] = {
    "small_fc_lopt": TorchSmallFcLOpt,
    "fc_lopt": TorchFcLOpt,
    "nn_adam": TorchNNAdam,
}

__all__ = ["ARCHITECTURES", "TorchFcLOpt", "TorchLearnedOptimizer", "TorchNNAdam",
           "TorchSmallFcLOpt", "WeightsFileError", "available", "from_theta", "pretrained",
           "read_pretrained"]


def from_theta(architecture: str, params: Iterable[Any], theta: Mapping[str, Any],
               num_steps: int, config: Mapping[str, Any] | None = None,
               guard: bool | Mapping[str, Any] | None = None) -> TorchLearnedOptimizer:
    """A ported architecture (registry name) with meta-parameters ``theta`` (nested dicts of
    numpy / JAX / torch arrays, e.g. a JAX ``lopt.init(key)`` or a meta-trained theta) and its
    constructor ``config`` (``lopt.config()`` on the JAX side)."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"learned optimizer {architecture!r} is not ported to PyTorch; "
                         f"ported: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[architecture](params, theta, num_steps, guard=guard, **dict(config or {}))


def pretrained(name: str | os.PathLike, params: Iterable[Any], num_steps: int,
               guard: bool | Mapping[str, Any] | None = None) -> TorchLearnedOptimizer:
    """A shipped pretrained optimizer (see :func:`available`) or a weights file, for ``params``.

    The PyTorch counterpart of ``learnopt.pretrained.optimizer(name, num_steps)``: a file
    whose metadata holds ``guard`` settings comes wrapped in the divergence guard, and then
    ``step`` needs a closure (or ``loss=``); ``guard=False`` gives the bare optimizer,
    ``guard=True`` (or a dict of settings) guards it even if the file does not ask for it.
    """
    num_steps = check_num_steps(num_steps)
    metadata, theta = read_pretrained(name)
    arch = metadata["architecture"]
    if arch not in ARCHITECTURES:
        raise ValueError(f"{name}: architecture {arch!r} is not ported to PyTorch; ported: "
                         f"{', '.join(ARCHITECTURES)}")
    if "architecture_config" in metadata:
        config = dict(metadata["architecture_config"])
    else:  # format-0 files: the optimizer object's attributes, filtered to constructor args
        import inspect

        accepted = set(inspect.signature(ARCHITECTURES[arch].__init__).parameters)
        config = {k: v for k, v in metadata.get("architecture_hyperparameters", {}).items()
                  if k in accepted and k not in ("params", "theta", "num_steps", "guard")}
    settings = metadata.get("guard")
    if guard is None:
        guard = dict(settings) if settings is not None else None
    elif guard is True and settings is not None:
        guard = dict(settings)
    return from_theta(arch, params, theta, num_steps, config, guard)
