"""Where a population's members compute: a host of members, in this process or as Ray actors.

A :class:`MemberHost` holds, for each member it hosts, the member's multi-task gradient
estimator (:class:`learnopt.meta.multitask.MultiTaskEstimator` over the member's own task draws
and truncation length) and the estimator's state (inner runs, accumulators). The driver
(:mod:`learnopt.meta.pbt`) keeps every member's meta-parameters and outer optimizer and sends
the current thetas each outer step; a host returns the meta-gradient estimates. The members
of a host share its compiled estimators (one compile per task and truncation length per host).

Every random choice is a function of the run seed, the member index, the outer step and the
member's generation (how often its inner runs were restarted), never of where the member is
hosted, so :class:`LocalHosts` (one host in this process, ``--workers 0``) and
:class:`RayHosts` (``--workers N`` Ray actors, members dealt round-robin) give the same run.

Exploit evaluations (two members on the same tasks and seeds, Metz et al. 2021,
arXiv:2101.07367, §2) also run on a host: :func:`learnopt.meta.pbt_eval.EvalPool` scores a
stack of thetas on a fixed pool of draws of the training mixture.
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from learnopt.compilation import enable_persistent_cache
from learnopt.io import restore_state
from learnopt.learned.registry import get_learned_optimizer
from learnopt.meta.pbt_config import PBTConfig
from learnopt.meta.pbt_eval import EvalPool
from learnopt.meta.train import build_estimator_over_tasks

# Keys of a member's random choices: fold_in(PRNGKey(seed), purpose), then member, then step.
THETA_KEY, STATE_KEY, ESTIMATE_KEY = 1, 2, 3
MEMBER_SEED_STRIDE = 1_000_003


def member_seed(seed: int, member: int) -> int:
    """The seed of member ``member``'s task draws."""
    return (seed + MEMBER_SEED_STRIDE * (member + 1)) % 2**31


def member_key(seed: int, purpose: int, member: int, *more: int) -> jax.Array:
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), purpose), member)
    for x in more:
        key = jax.random.fold_in(key, x)
    return key


def initial_theta(config: PBTConfig, member: int, lopt=None) -> Any:
    """Member ``member``'s random initial meta-parameters."""
    if lopt is None:
        lopt = get_learned_optimizer(config.lopt, config.lopt_config)
    return lopt.init(member_key(config.seed, THETA_KEY, member))


def _numpy(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: np.array(x, copy=True), jax.device_get(tree))


class MemberHost:
    """Estimators and estimator states of the members ``members`` (module docstring).

    Only picklable arguments, so Ray can build it in another process."""

    def __init__(self, config: PBTConfig | Mapping[str, Any], members: Sequence[int]):
        enable_persistent_cache()  # hosts of one machine compile the same programs
        self.config = config if isinstance(config, PBTConfig) else PBTConfig.from_dict(config)
        self.members = [int(m) for m in members]
        self.lopt = get_learned_optimizer(self.config.lopt, self.config.lopt_config)
        self._shared = collections.OrderedDict()  # compiled estimators, shared by members
        self._estimators: dict[tuple[int, int], Any] = {}
        self.trunc: dict[int, int] = {}
        self.state: dict[int, Any] = {}
        self._eval: EvalPool | None = None

    def pid(self) -> int:
        return os.getpid()

    def estimator(self, member: int, trunc: int):
        """Member ``member``'s estimator at truncation length ``trunc`` (built once)."""
        key = (member, trunc)
        if key not in self._estimators:
            meta = self.config.member_meta_config(member_seed(self.config.seed, member), trunc)
            self._estimators[key] = build_estimator_over_tasks(
                meta, self.lopt, cache_size=64, shared_cache=self._shared
            )
        return self._estimators[key]

    def reset(self, member: int, theta: Any, trunc: int, generation: int) -> None:
        """Fresh inner runs for ``member`` at ``trunc`` (its ``generation``-th start)."""
        est = self.estimator(member, int(trunc))
        self.trunc[member] = int(trunc)
        self.state[member] = est.init_state(
            theta, member_key(self.config.seed, STATE_KEY, member, int(generation))
        )

    def estimate(self, step: int, thetas: Mapping[int, Any]) -> dict[int, dict[str, Any]]:
        """One meta-gradient estimate per member of ``thetas`` at outer step ``step``:
        ``{member: {"meta_loss", "grad", "metrics"}}`` (numpy)."""
        out = {}
        for member in sorted(thetas):
            est = self.estimator(member, self.trunc[member])
            start = time.perf_counter()
            key = member_key(self.config.seed, ESTIMATE_KEY, member, int(step))
            meta_loss, grad, self.state[member], metrics = est.estimate(
                thetas[member], self.state[member], key
            )
            record = {k: float(np.asarray(v)) for k, v in metrics.items() if np.ndim(v) == 0}
            record["estimate_seconds"] = time.perf_counter() - start
            out[member] = {"meta_loss": float(meta_loss), "grad": _numpy(grad),
                           "metrics": record}
        return out

    def get_states(self) -> dict[int, Any]:
        """The hosted members' estimator states (numpy), for a checkpoint."""
        return {m: _numpy(self.state[m]) for m in self.members if m in self.state}

    def set_state(self, member: int, theta: Any, trunc: int, saved: Any) -> None:
        """Restore ``member``'s estimator state from a checkpoint's raw ``saved`` state."""
        est = self.estimator(member, int(trunc))
        template = est.state_template(theta, saved)
        self.trunc[member] = int(trunc)
        self.state[member] = restore_state(template, saved, f"member {member}")

    def evaluate(self, thetas: Sequence[Any], seeds: Sequence[int]) -> list[float]:
        """The exploit score of each theta: mean normalised training loss on the pool."""
        if self._eval is None:
            c = self.config
            self._eval = EvalPool(c.member_meta_config(0, 1).mixture(), self.lopt,
                                  c.eval_tasks, c.eval_steps, c.seed)
        return [float(x) for x in self._eval.scores(thetas, seeds)]


def _split(members: int, hosts: int) -> list[list[int]]:
    return [list(range(h, members, hosts)) for h in range(hosts)]


class LocalHosts:
    """Every member on one :class:`MemberHost` in this process (``--workers 0``)."""

    def __init__(self, config: PBTConfig):
        self.host = MemberHost(config, range(config.population))

    def reset(self, member: int, theta: Any, trunc: int, generation: int) -> None:
        self.host.reset(member, theta, trunc, generation)

    def set_state(self, member: int, theta: Any, trunc: int, saved: Any) -> None:
        self.host.set_state(member, theta, trunc, saved)

    def estimate(self, step: int, thetas: Sequence[Any]) -> dict[int, dict[str, Any]]:
        return self.host.estimate(step, dict(enumerate(thetas)))

    def get_states(self) -> dict[int, Any]:
        return self.host.get_states()

    def evaluate(self, thetas: Sequence[Any], seeds: Sequence[int]) -> list[float]:
        return self.host.evaluate(thetas, seeds)

    def close(self) -> None:
        pass


class RayHosts:
    """Members dealt round-robin to ``workers`` Ray actors, each a :class:`MemberHost`.

    Ray is started here (embedded, ``num_cpus=workers``) unless it already runs in this
    process, or joins the cluster at ``address``; :meth:`close` shuts down what it started."""

    def __init__(self, config: PBTConfig, workers: int, address: str | None = None):
        import ray

        from learnopt.distributed.ray_backend import start_ray

        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive integer, got {workers!r}")
        workers = min(workers, config.population)
        self.ray = ray
        self.owns_ray = start_ray(address, workers)
        actor = ray.remote(MemberHost).options(num_cpus=1, max_restarts=0)
        self.split = _split(config.population, workers)
        self.hosts = [actor.remote(config.to_dict(), ms) for ms in self.split]
        self.where = {m: h for h, ms in enumerate(self.split) for m in ms}

    def _host(self, member: int):
        return self.hosts[self.where[member]]

    def reset(self, member: int, theta: Any, trunc: int, generation: int) -> None:
        self.ray.get(self._host(member).reset.remote(member, _numpy(theta), trunc, generation))

    def set_state(self, member: int, theta: Any, trunc: int, saved: Any) -> None:
        self.ray.get(self._host(member).set_state.remote(member, _numpy(theta), trunc, saved))

    def estimate(self, step: int, thetas: Sequence[Any]) -> dict[int, dict[str, Any]]:
        refs = [host.estimate.remote(step, {m: _numpy(thetas[m]) for m in ms})
                for host, ms in zip(self.hosts, self.split, strict=True)]
        out: dict[int, dict[str, Any]] = {}
        for part in self.ray.get(refs):
            out.update(part)
        return out

    def get_states(self) -> dict[int, Any]:
        out: dict[int, Any] = {}
        for part in self.ray.get([h.get_states.remote() for h in self.hosts]):
            out.update(part)
        return out

    def evaluate(self, thetas: Sequence[Any], seeds: Sequence[int]) -> list[float]:
        return self.ray.get(self.hosts[0].evaluate.remote([_numpy(t) for t in thetas],
                                                          list(seeds)))

    def close(self) -> None:
        for host in self.hosts:
            try:
                self.ray.kill(host, no_restart=True)
            except Exception:  # already gone
                pass
        self.hosts = []
        if self.owns_ray and self.ray.is_initialized():
            self.ray.shutdown()
            self.owns_ray = False
