"""Learned optimizers that train themselves: a population guided by population-based training.

Metz et al. 2021, "Training Learned Optimizers with Randomly Initialized Learned Optimizers"
(arXiv:2101.07367, §2): a population of randomly initialised learned optimizers in which
each member's meta-parameters are trained by a learned optimizer of the population (the
current, online meta-parameters of the member its pointer names, possibly itself), with no
hand-designed optimizer anywhere; population-based training (Jaderberg et al. 2017,
arXiv:1711.09846) picks which member trains which. Metz et al. 2020 (arXiv:2009.11243, §4.6,
App. F.4) give the learned outer optimizer its inputs: the meta-gradient clipped to
``[-0.1, 0.1]`` and the outer loss as its loss features (:mod:`learnopt.meta.learned_outer`).

One outer step of the population (:meth:`Population.step`):

1. every member computes a meta-gradient estimate at its theta with its own multi-task
   estimator, task draws and truncation length (:mod:`learnopt.meta.pbt_workers`: in this
   process, or on Ray actors);
2. every member's outer learner (:class:`learnopt.meta.learner.Learner`) applies it: with the
   learned outer optimizer of its pointer's theta as it was at the start of the step (so the
   order of members does not matter), or with Adam at the member's own learning rate in the
   Adam-outer arm;
3. every ``exploit_every`` steps, an event (:meth:`Population.exploit`): two members drawn at
   random are scored on the same tasks and seeds (:class:`learnopt.meta.pbt_eval.EvalPool`);
   the loser takes copies of the winner's theta, outer-optimizer state and pointer (and
   truncation length, ``copy_trunc``) and restarts its inner runs; then, with probability
   ``p_switch`` (0.5), its pointer moves to a different member drawn at random (Adam arm: a
   different learning rate of ``adam_lrs``) and, with probability ``p_resample`` (0.1), its
   truncation length is drawn again from ``trunc_lengths * trunc_scale``.

Every random choice derives from the seed, the outer step and the member, so a run resumed
from its checkpoint repeats the uninterrupted run exactly, and the in-process and Ray paths
give the same run. Files in the run directory: ``config.json`` (:class:`PBTConfig`),
``machine.json``, ``checkpoint.msgpack`` (the whole population: thetas, outer-optimizer
states, pointers, truncation lengths, and the estimators' inner runs; written atomically),
``thetas/step_<step>.msgpack`` (every member's theta every ``keep_theta_every`` steps),
``metrics.jsonl`` (one line per outer step), ``events.jsonl`` (every exploit and explore
event), ``eval.json`` and ``eval.png`` (:func:`evaluate_run`, Fig. 2 of arXiv:2101.07367) and
``.lock``. On resume, lines past the checkpoint are dropped from both logs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from learnopt.io import (
    CheckpointError,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    checkpoint_bytes,
    finite_json,
    load_checkpoint,
    machine_info,
    restore_state,
    save_checkpoint,
)
from learnopt.learned.common import ACCUMULATOR_LAYOUT
from learnopt.learned.registry import get_learned_optimizer
from learnopt.meta.learned_outer import learned_outer_optimizer
from learnopt.meta.learner import Learner
from learnopt.meta.pbt_config import PBTConfig
from learnopt.meta.pbt_workers import initial_theta
from learnopt.meta.train import RunInterrupted, RunLock

EVENT_KEY = 0x9B7  # numpy seeds of exploit events: [seed, step, EVENT_KEY]
INIT_KEY = 0x1A1  # and of the initial pointers, learning rates, truncation lengths
FIG2_SEED = 1_000_000  # evaluation seeds of Fig. 2, apart from the exploit events' seeds


def copy_tree(tree: Any) -> Any:
    """A copy of every array of ``tree``: a copied member shares no buffer with its source."""
    return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), tree)


def _record_line(record: dict[str, Any]) -> str:
    clean, bad = finite_json(record)
    if bad:
        clean["nonfinite"] = bad
    return json.dumps(clean, allow_nan=False)


def explore(
    rng: np.random.Generator, config: PBTConfig, member: int, pointer: int, lr: float,
    trunc: int,
) -> dict[str, Any]:
    """The explore step for ``member`` (arXiv:2101.07367, §2). Always consumes the same
    four draws of ``rng``, so later draws do not depend on what fired. Returns ``switch``
    (whether the outer optimizer changed) with the new ``pointer`` (learned arm: a different
    member at random) or ``lr`` (Adam arm: a different rate of ``adam_lrs``), and
    ``resample`` with the new ``trunc`` (drawn from all of the truncation lengths)."""
    u_switch, u_resample = rng.random(), rng.random()
    pick_other, pick_trunc = rng.random(), rng.integers(len(config.truncations()))
    out: dict[str, Any] = {"switch": bool(u_switch < config.p_switch),
                           "resample": bool(u_resample < config.p_resample),
                           "pointer": pointer, "lr": lr, "trunc": trunc}
    if out["switch"]:
        if config.outer == "learned":
            others = [m for m in range(config.population) if m != pointer]
            out["pointer"] = others[int(pick_other * len(others))]
        else:
            others = [x for x in config.adam_lrs if x != lr] or list(config.adam_lrs)
            out["lr"] = others[int(pick_other * len(others))]
    if out["resample"]:
        out["trunc"] = int(config.truncations()[int(pick_trunc)])
    return out


def outer_learner(config: PBTConfig) -> Learner:
    """The members' outer learner (one per config, shared: its update compiles once).

    Learned arm: the members' architecture as the outer optimizer, built on its matmul path
    when it has one (``compute="concat"``: the same function, a smaller program to compile).
    Adam arm: Adam after the clip; each member's rate lives in its own optimizer state."""
    key = (config.outer, config.lopt, json.dumps(dict(config.lopt_config), sort_keys=True),
           config.outer_clip, config.outer_num_steps, config.adam_lrs[0])
    if key not in _LEARNERS:
        clip = config.outer_clip or None
        if config.outer == "learned":
            lopt_config = dict(config.lopt_config)
            if lopt_config.get("compute") == "elementwise":
                lopt_config["compute"] = "concat"
            outer = learned_outer_optimizer(get_learned_optimizer(config.lopt, lopt_config),
                                            None, clip=clip, num_steps=config.outer_num_steps)
            _LEARNERS[key] = Learner(optimizer=outer, max_staleness=None)
        else:
            _LEARNERS[key] = Learner(config.adam_lrs[0], clip=clip, max_staleness=None)
    return _LEARNERS[key]


_LEARNERS: dict[tuple, Learner] = {}


class Population:
    """The population's state and its outer steps (module docstring).

    ``hosts``: :class:`~learnopt.meta.pbt_workers.LocalHosts` or
    :class:`~learnopt.meta.pbt_workers.RayHosts` (anything with their methods)."""

    def __init__(self, config: PBTConfig, hosts: Any):
        self.config = config
        self.hosts = hosts
        self.lopt = get_learned_optimizer(config.lopt, config.lopt_config)
        self.learner = outer_learner(config)
        self.step = 0
        self.seconds = 0.0
        self.num_events = 0
        self.learners: list[Any] = []
        self.pointer: list[int] = []  # learned arm: the member whose theta trains this one
        self.trunc: list[int] = []
        self.generation: list[int] = []

    # -- state -------------------------------------------------------------------------------
    def init(self) -> None:
        """Random thetas; random pointers (possibly to oneself, arXiv:2101.07367, §2), Adam
        learning rates and truncation lengths; fresh inner runs."""
        c = self.config
        rng = np.random.default_rng([c.seed, INIT_KEY])
        pointers = rng.integers(c.population, size=c.population)
        lrs = rng.integers(len(c.adam_lrs), size=c.population)
        truncs = rng.integers(len(c.truncations()), size=c.population)
        self.learners, self.pointer, self.trunc, self.generation = [], [], [], []
        for m in range(c.population):
            state = self.learner.init(initial_theta(c, m, self.lopt))
            if c.outer == "adam":
                state = self.learner.set_learning_rate(state, c.adam_lrs[int(lrs[m])])
            self.learners.append(state)
            self.pointer.append(int(pointers[m]) if c.outer == "learned" else -1)
            self.trunc.append(int(c.truncations()[int(truncs[m])]))
            self.generation.append(0)
            self.hosts.reset(m, state.theta, self.trunc[m], 0)
        self.step, self.seconds, self.num_events = 0, 0.0, 0

    @property
    def thetas(self) -> list[Any]:
        return [s.theta for s in self.learners]

    def lr(self, member: int) -> float | None:
        if self.config.outer != "adam":
            return None
        # held as float32 in the optimizer state: 6 digits give back the configured value
        return float(f"{self.learner.learning_rate(self.learners[member]):.6g}")

    def _template(self) -> dict[str, Any]:
        theta = initial_theta(self.config, 0, self.lopt)
        member = {"learner": self.learner.init(theta), "pointer": 0, "trunc": 0,
                  "generation": 0}
        return {"step": 0, "seconds": 0.0, "events": 0,
                "members": [dict(member) for _ in range(self.config.population)]}

    def state_dict(self) -> dict[str, Any]:
        """Everything that changes between steps, estimators' inner runs included."""
        members = [{"learner": self.learners[m], "pointer": self.pointer[m],
                    "trunc": self.trunc[m], "generation": self.generation[m]}
                   for m in range(self.config.population)]
        estimators = self.hosts.get_states()
        return {"step": self.step, "seconds": self.seconds, "events": self.num_events,
                "accumulator_layout": ACCUMULATOR_LAYOUT, "members": members,
                "estimators": [estimators[m] for m in range(self.config.population)]}

    def load_state_dict(self, raw: dict[str, Any], source: str) -> None:
        raw = dict(raw)
        layout = raw.pop("accumulator_layout", 0)
        if layout != ACCUMULATOR_LAYOUT:
            raise CheckpointError(
                f"{source}: written with accumulator layout {layout}; this learnopt uses "
                f"{ACCUMULATOR_LAYOUT} (learned.common.ACCUMULATOR_LAYOUT), so its inner runs and "
                "learned outer optimizer states cannot be resumed", "start a new run; its "
                "kept thetas can still be evaluated (learnopt.meta.pbt_eval reads thetas only)")
        estimators = raw.pop("estimators")
        state = restore_state(self._template(), raw, source)
        self.step, self.seconds = int(state["step"]), float(state["seconds"])
        self.num_events = int(state["events"])
        members = state["members"]
        self.learners = [members[m]["learner"] for m in range(self.config.population)]
        self.pointer = [int(members[m]["pointer"]) for m in range(self.config.population)]
        self.trunc = [int(members[m]["trunc"]) for m in range(self.config.population)]
        self.generation = [int(members[m]["generation"]) for m in range(self.config.population)]
        if isinstance(estimators, dict):
            estimators = [estimators[str(m)] for m in range(len(estimators))]
        for m in range(self.config.population):
            self.hosts.set_state(m, self.learners[m].theta, self.trunc[m], estimators[m])

    # -- one outer step ----------------------------------------------------------------------
    def step_once(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """One outer step of every member, then an event if one is due. Returns the step's
        metrics record and its event records."""
        c = self.config
        results = self.hosts.estimate(self.step, self.thetas)
        before = self.thetas  # the outer optimizers' online thetas of this step
        members = []
        for m in range(c.population):
            r = results[m]
            if c.outer == "learned":
                state, applied = self.learner.apply(
                    self.learners[m], r["grad"], loss=r["meta_loss"],
                    outer_theta=before[self.pointer[m]])
            else:
                state, applied = self.learner.apply(self.learners[m], r["grad"])
            self.learners[m] = state
            members.append({"meta_loss": r["meta_loss"], "applied": applied,
                            "pointer": self.pointer[m], "lr": self.lr(m),
                            "trunc": self.trunc[m]})
        self.step += 1
        losses = [x["meta_loss"] for x in members if np.isfinite(x["meta_loss"])]
        record = {"step": self.step,
                  "best_meta_loss": min(losses) if losses else None,
                  "mean_meta_loss": float(np.mean(losses)) if losses else None,
                  "members": members,
                  "tasks_hung": sum(int(results[m]["metrics"].get("tasks_hung", 0))
                                    for m in range(c.population)),
                  "estimate_seconds": round(sum(results[m]["metrics"].get("estimate_seconds", 0)
                                                for m in range(c.population)), 3)}
        events = self.exploit() if self.step % c.exploit_every == 0 else []
        return record, events

    def exploit(self) -> list[dict[str, Any]]:
        """The event of this step: compare two random members, copy the winner into the
        loser, explore (:func:`explore`). Returns its log records."""
        c = self.config
        rng = np.random.default_rng([c.seed, self.step, EVENT_KEY])
        a, b = (int(x) for x in rng.choice(c.population, size=2, replace=False))
        seeds = [self.step * c.eval_seeds + k for k in range(c.eval_seeds)]
        score_a, score_b = self.hosts.evaluate([self.thetas[a], self.thetas[b]], seeds)
        winner, loser = (a, b) if score_a <= score_b else (b, a)
        self.num_events += 1
        w = self.learners[winner]
        self.learners[loser] = self.learners[loser]._replace(
            theta=copy_tree(w.theta), opt_state=copy_tree(w.opt_state))
        self.pointer[loser] = self.pointer[winner]
        if c.copy_trunc:
            self.trunc[loser] = self.trunc[winner]
        records = [{"step": self.step, "event": "exploit", "members": [a, b],
                    "scores": [score_a, score_b], "winner": winner, "loser": loser,
                    "pointer": self.pointer[loser], "lr": self.lr(loser),
                    "trunc": self.trunc[loser]}]
        out = explore(rng, c, loser, self.pointer[loser], self.lr(loser) or 0.0,
                      self.trunc[loser])
        if out["switch"]:
            if c.outer == "learned":
                before, self.pointer[loser] = self.pointer[loser], out["pointer"]
                after = out["pointer"]
            else:
                before, after = self.lr(loser), out["lr"]
                self.learners[loser] = self.learner.set_learning_rate(self.learners[loser],
                                                                      after)
            records.append({"step": self.step, "event": "explore", "kind": "switch_outer",
                            "member": loser, "from": before, "to": after})
        if out["resample"]:
            records.append({"step": self.step, "event": "explore", "kind": "resample_trunc",
                            "member": loser, "from": self.trunc[loser], "to": out["trunc"]})
            self.trunc[loser] = out["trunc"]
        self.generation[loser] += 1  # the loser's inner runs restart from its new theta
        self.hosts.reset(loser, self.learners[loser].theta, self.trunc[loser],
                         self.generation[loser])
        return records


# --- the run directory ------------------------------------------------------------------------


class PopulationRun:
    """Owns one run directory: ``run()`` trains the population, resuming from its checkpoint.

    Construction checks the directory and a saved config (same run up to the budget fields)
    and writes nothing."""

    def __init__(self, config: PBTConfig, out: str | os.PathLike):
        self.config = config
        self.out = Path(out)
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"the run directory {self.out} exists and is not a directory")
        base = self.out
        while not base.exists():
            base = base.parent
        if not os.access(base, os.W_OK | os.X_OK):
            raise ValueError(f"cannot write to {base} (permission denied), so not to the run "
                             f"directory {self.out}")
        saved = self.saved_config()
        if saved is not None and not config.same_run(saved):
            raise ValueError(f"{self.out / 'config.json'} holds a different config; use a new "
                             "directory or the same config (only outer_steps, max_seconds, "
                             "checkpoint_every, keep_theta_every, final_eval may change)")
        self._signal: int | None = None

    def saved_config(self) -> PBTConfig | None:
        path = self.out / "config.json"
        if not path.is_file():
            return None
        try:
            return PBTConfig.from_dict(json.loads(path.read_text()))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path} is not a readable population config ({e})") from e

    # -- files -------------------------------------------------------------------------------
    def save(self, pop: Population) -> None:
        atomic_write_bytes(self.out / "checkpoint.msgpack",
                           checkpoint_bytes(pop.state_dict(), self.config.to_dict()))

    def keep_thetas(self, pop: Population) -> None:
        path = self.out / "thetas" / f"step_{pop.step:07d}.msgpack"
        path.parent.mkdir(exist_ok=True)
        save_checkpoint(path, {"thetas": pop.thetas, "pointer": pop.pointer,
                               "trunc": pop.trunc}, self.config.to_dict())

    def _trim(self, name: str, step: int) -> None:
        """Drop the lines of a log past ``step`` (and lines cut short by a kill)."""
        path = self.out / name
        if not path.exists():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
        atomic_write_text(path, "".join(x + "\n" for x in keep))

    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        self._signal = None
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            self._signal = signum

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old if old is not None else signal.SIG_DFL)

    # -- the loop ----------------------------------------------------------------------------
    def run(self, hosts: Any, progress: bool = True) -> Population:
        """Train until ``outer_steps`` or ``max_seconds`` (wall-clock, summed over resumes);
        checkpoints every ``checkpoint_every`` steps and at the end. SIGINT/SIGTERM: the
        current step ends, a checkpoint is written, :class:`RunInterrupted` is raised."""
        self.out.mkdir(parents=True, exist_ok=True)
        lock = RunLock(self.out)
        lock.acquire()
        try:
            with self._stop_on_signals():
                return self._run(hosts, progress)
        finally:
            lock.release()

    def _run(self, hosts: Any, progress: bool) -> Population:
        c = self.config
        pop = Population(c, hosts)
        path = self.out / "checkpoint.msgpack"
        if path.exists():
            pop.load_state_dict(load_checkpoint(path).state, str(path))
        else:
            pop.init()
        if self.saved_config() != c:
            atomic_write_text(self.out / "config.json", c.to_json())
        if not (self.out / "machine.json").exists():
            atomic_write_json(self.out / "machine.json", machine_info())
        for name in ("metrics.jsonl", "events.jsonl"):
            self._trim(name, pop.step)
        if pop.step == 0:
            self.keep_thetas(pop)
        timed = c.max_seconds is not None
        # The bar counts what ends the run: seconds under a time budget, else outer steps.
        bar = tqdm(
            total=c.max_seconds if timed else c.outer_steps,
            initial=min(pop.seconds, c.max_seconds) if timed else min(pop.step, c.outer_steps),
            unit="s" if timed else "step", disable=not progress, mininterval=1.0,
            bar_format=("{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}{postfix}]"
                        if timed else None),
            desc=f"pbt {c.outer}-outer x{c.population}")
        seconds0, t0 = pop.seconds, time.perf_counter()
        interrupted = False
        try:
            with open(self.out / "metrics.jsonl", "a", buffering=1) as metrics, \
                    open(self.out / "events.jsonl", "a", buffering=1) as events:
                while pop.step < c.outer_steps:
                    if self._signal is not None:
                        interrupted = True
                        break
                    if timed and pop.seconds >= c.max_seconds:
                        break
                    record, records = pop.step_once()
                    pop.seconds = seconds0 + time.perf_counter() - t0
                    record["seconds"] = round(pop.seconds, 3)
                    metrics.write(_record_line(record) + "\n")
                    for r in records:
                        events.write(_record_line(r) + "\n")
                    best = record["best_meta_loss"]
                    bar.set_postfix(step=pop.step,
                                    best=f"{best:.4f}" if best is not None else "nan",
                                    events=pop.num_events, refresh=False)
                    if timed:
                        bar.update(max(0.0, min(pop.seconds, c.max_seconds) - bar.n))
                    else:
                        bar.update(1)
                    if pop.step % c.keep_theta_every == 0:
                        self.keep_thetas(pop)
                    if pop.step % c.checkpoint_every == 0:
                        self.save(pop)
        finally:
            bar.close()
        self.save(pop)
        if interrupted:
            raise RunInterrupted(self._signal or signal.SIGINT, pop.step, path)
        return pop


def kept_thetas(run_dir: str | os.PathLike, config: PBTConfig) -> list[tuple[int, list[Any]]]:
    """``(outer step, [theta per member])`` of every ``thetas/step_*.msgpack``, and the
    checkpoint's if it is newer, in order of step."""
    run_dir = Path(run_dir)
    lopt = get_learned_optimizer(config.lopt, config.lopt_config)
    theta = initial_theta(config, 0, lopt)
    template = {"thetas": [theta] * config.population, "pointer": [0] * config.population,
                "trunc": [0] * config.population}
    found = {}
    for path in sorted((run_dir / "thetas").glob("step_*.msgpack")):
        found[int(path.stem.split("_")[1])] = load_checkpoint(path, template).state["thetas"]
    ckpt = run_dir / "checkpoint.msgpack"
    if ckpt.exists():
        raw = load_checkpoint(ckpt).state
        step = int(raw["step"])
        if step not in found:
            members = raw["members"]
            if isinstance(members, dict):
                members = [members[str(m)] for m in range(len(members))]
            found[step] = [restore_state(theta, m["learner"]["theta"], str(ckpt))
                           for m in members]
    return sorted(found.items())


def evaluate_run(run_dir: str | os.PathLike, progress: bool = True) -> dict[str, Any]:
    """Fig. 2 of arXiv:2101.07367 for a run: every member's kept thetas on the evaluation
    pool against fixed-LR and per-task-tuned Adam; writes ``eval.json`` and ``eval.png``."""
    from learnopt.meta.pbt_eval import EvalPool, evaluate_population, plot_population_eval

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir} is not a population run (no config.json)")
    config = PBTConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    kept = kept_thetas(run_dir, config)
    if not kept:
        raise ValueError(f"{run_dir} has no kept thetas to evaluate")
    lopt = get_learned_optimizer(config.lopt, config.lopt_config)
    pool = EvalPool(config.member_meta_config(0, 1).mixture(), lopt, config.eval_tasks,
                    config.eval_steps, config.seed)
    seeds = [FIG2_SEED + k for k in range(config.eval_seeds)]
    if progress:
        print(f"evaluating {len(kept)} kept steps x {config.population} members on "
              f"{len(pool.draws)} tasks x {config.eval_steps} steps x {len(seeds)} seeds",
              flush=True)
    start = time.perf_counter()
    result = evaluate_population(pool, kept, seeds)
    out = {"run": str(run_dir), "outer": config.outer, **result.to_dict(),
           "seconds": round(time.perf_counter() - start, 1)}
    atomic_write_json(run_dir / "eval.json", out)
    plot_population_eval(result, run_dir / "eval.png",
                         f"{config.outer}-outer population of {config.population}")
    return out
