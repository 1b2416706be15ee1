"""A fault run of meta-training: ``learnopt meta-train`` under repeated SIGKILL, and a second
writer on the same run directory.

One ``learnopt meta-train --out RUN ...`` command is started as a subprocess and killed with
SIGKILL at seeded random moments, then started again, the same command, until it finishes.
The moments are drawn so that kills land in every phase of a run: **startup** (a delay drawn
up to the reference run's time to its first outer step: imports, building the estimator,
taking the run lock, restoring and trimming, the XLA compile of the first step), **step** (a
random time within the outer step after a drawn step ``T``, counted only once this process
has opened ``metrics.jsonl``, i.e. after its resume), **write** (from a drawn step ``T`` on,
the first moment the process has an atomic write's temporary file open or present: the
checkpoint, its numbered copy, ``theta.msgpack``, a trimmed ``metrics.jsonl``) and **final**
(a random time after the last outer step's metrics line: the final checkpoint or the plot).
Where each kill landed is read off the process just before the kill (its open files under
``/proc/PID/fd``, whether it holds ``RUN/.lock``, the steps written) and off the directory
just after (the checkpoint's step, a line cut short, temporary files left behind).

In one of the runs, once it holds the lock, the same command is started a second time on
the same directory, twice: while the first runs on (it must be refused: exit code 2, one line
naming the holder's pid; the holder's ``.lock``, ``config.json`` and ``machine.json`` are
unchanged and the holder is still alive afterwards, so the two overlapped), and while the
first is stopped with SIGSTOP (it still holds the lock), where every file and folder under
the run directory is compared byte for byte, with sizes and mtimes, before and after.

The same config is then compared with an uninterrupted run in another directory (run first,
which also times the phases the kill moments are drawn from). Checks: the final
``theta.msgpack`` is byte-identical (and every leaf of theta, the Adam state, the step
counters and the estimator state in ``checkpoint.msgpack`` is exactly equal; ``seconds`` is
wall-clock time and differs); ``metrics.jsonl`` holds each outer step exactly once and in
order, and every value but the timings (``seconds``, ``compile_seconds``) equals the
uninterrupted run's, so no step was lost or applied twice; the checkpoint's step and the
learner's count of applied updates equal the configured outer steps; no resume fell back to
an older checkpoint; the run lock never refused a restart after a kill.

Every command runs a copy of this checkout's ``src/learnopt`` taken at the start (put first
on ``PYTHONPATH``), so an edit of the checkout during the run cannot change the numbers of
the restarts after it (the first version of this run, in a checkout being edited, diverged at
the first restart after an edit of the learned optimizer's code).

The logic lives here, not in the library; ``tests/meta/test_fault_run.py`` imports
:func:`fault_run` from this file (3 kills in the default test run, the full run as a slow
test).

Usage: ``python benchmarks/fault_run.py [--kills 24] [--min-kills 20] [--seed 0] [--fast]
[--work DIR] [--out PATH]``;
writes ``benchmarks/results/fault_run.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "fault_run.json"

# The benchmark's run: small_fc_lopt meta-trained with PES on a 10-d quadratic, 100 outer
# steps, a checkpoint every 3 (so a kill between two loses up to 2 steps, recomputed on resume).
FULL = {"task": "quadratic_d10", "lopt": "small_fc_lopt", "estimator": "pes", "num_tasks": 8,
        "horizon": 100, "trunc_length": 10, "outer_lr": 1e-2, "seed": 3, "outer_steps": 100,
        "checkpoint_every": 3, "keep_checkpoints": 2}
# The fast test's run: the tiny run of the meta-training tests (learnable_sgd), 40 steps.
FAST = {"task": "quadratic_d10", "lopt": "learnable_sgd", "estimator": "pes", "num_tasks": 4,
        "horizon": 30, "trunc_length": 5, "outer_lr": 1e-2, "seed": 3, "outer_steps": 40,
        "checkpoint_every": 2, "keep_checkpoints": 2}

# metrics.jsonl values that are wall-clock times, not results of the computation.
TIMING_KEYS = ("seconds", "compile_seconds")


def learnopt_command(out: Path, config: Mapping[str, Any]) -> list[str]:
    """``learnopt meta-train --out OUT --FLAG VALUE ... --no-progress`` (the console script
    next to this Python, else ``python -m learnopt.cli``)."""
    script = Path(sys.executable).with_name("learnopt")
    base = [str(script)] if script.exists() else [sys.executable, "-m", "learnopt.cli"]
    flags = []
    for key, value in config.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    return [*base, "meta-train", "--out", str(out), *flags, "--no-progress"]


def _env(source: Path | None = None) -> dict[str, str]:
    """The environment of every command: CPU JAX, and ``source`` (a copy of the package)
    ahead of the installed one."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if source is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source),
                                                          env.get("PYTHONPATH")]))
    return env


def freeze_source(work: Path) -> tuple[Path | None, dict[str, Any]]:
    """Copy this checkout's ``src/learnopt`` to ``work/src``: every command of the run then
    runs the same code, however the checkout changes meanwhile (an edit between two restarts
    would change the numbers and read as a resume bug). Returns the copy (None outside a
    checkout) and where it came from (git commit, a hash of the copied files)."""
    package = ROOT / "src" / "learnopt"
    if not package.is_dir():
        return None, {}
    target = work / "src"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(package, target / "learnopt",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    digest = hashlib.sha256()
    for path in sorted((target / "learnopt").rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(target)).encode() + b"\0" + path.read_bytes())
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "src/learnopt"],
                           capture_output=True, text=True).stdout.strip()
    return target, {"git_head": head or None, "src_learnopt_modified": bool(dirty),
                    "src_learnopt_sha256": digest.hexdigest()}


# --- watching a run -------------------------------------------------------------------------


def _tmp_target(name: str) -> str:
    """The file an atomic write's temporary file ``.NAME.XXXX.tmp`` replaces."""
    return name[1:].rsplit(".", 2)[0]


def _tmp_files(out: Path) -> set[str]:
    """Temporary files of atomic writes in ``out`` (and ``out/thetas``)."""
    found = set()
    for folder in (out, out / "thetas"):
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            continue
        found |= {str((folder / n).relative_to(out)) for n in names
                  if n.startswith(".") and n.endswith(".tmp")}
    return found


def _last_step(out: Path) -> tuple[int, bool]:
    """The step of the last complete line of ``metrics.jsonl`` (0 if none) and whether a line
    is cut short at its end."""
    try:
        text = (out / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return 0, False
    cut = bool(text) and not text.endswith("\n")
    lines = text.split("\n")[:-1]
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"]), cut
        except (ValueError, KeyError, TypeError):
            cut = True
    return 0, cut


def _checkpoint_step(out: Path) -> int | None:
    from learnopt.io import load_checkpoint

    path = out / "checkpoint.msgpack"
    if not path.exists():
        return None
    return int(load_checkpoint(path).state["step"])


class Attempt:
    """One start of the command; ``observe()`` samples what it is doing."""

    def __init__(self, command: list[str], out: Path, log_path: Path,
                 env: Mapping[str, str] | None = None):
        self.out = out
        self.log = open(log_path, "w")  # noqa: SIM115 (closed in wait/kill)
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=dict(env or _env()), start_new_session=True)
        self.t0 = time.monotonic()
        self.seen_lock = self.seen_metrics = False
        self.start_step: int | None = None  # metrics.jsonl's last step when first seen open
        self.times: dict[str, float] = {}
        self.tmp_before: set[str] = set()  # temporary files left by earlier attempts

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def open_files(self) -> list[str]:
        """Files under the run directory this process has open (relative names)."""
        root = str(self.out.resolve()) + os.sep
        found = []
        try:
            fds = os.listdir(f"/proc/{self.pid}/fd")
        except OSError:
            return found
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{self.pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith(root):
                found.append(target[len(root):])
        return found

    def holds_lock(self) -> bool:
        try:
            return (self.out / ".lock").read_text().strip() == str(self.pid)
        except OSError:
            return False

    def observe(self) -> dict[str, Any]:
        files = self.open_files()
        lock = self.holds_lock()
        metrics_open = "metrics.jsonl" in files
        step, cut = _last_step(self.out)
        if lock and not self.seen_lock:
            self.seen_lock = True
            self.times.setdefault("lock", self.elapsed())
        if metrics_open and not self.seen_metrics:
            self.seen_metrics, self.start_step = True, step
            self.times.setdefault("metrics_open", self.elapsed())
        if self.start_step is not None and step > self.start_step:
            self.times.setdefault("first_line", self.elapsed())
        return {"t": round(self.elapsed(), 4), "lock": lock, "metrics_open": metrics_open,
                "tmp_open": sorted(f for f in files if os.path.basename(f).startswith(".")
                                   and f.endswith(".tmp")),
                "tmp_present": sorted(_tmp_files(self.out)), "last_step": step, "cut": cut}

    def where(self, sample: Mapping[str, Any], n_steps: int) -> str:
        """Where a kill at ``sample`` landed, in words."""
        tmp = sample["tmp_open"] or [t for t in sample["tmp_present"]
                                     if t not in self.tmp_before]
        if tmp:
            names = ", ".join(_tmp_target(os.path.basename(t)) for t in tmp)
            return f"atomic write of {names}"
        if not self.seen_lock:
            return "startup: imports, config, estimator (before the run lock)"
        if sample["metrics_open"]:
            if sample["last_step"] == self.start_step:
                return (f"first outer step of this process (step {sample['last_step'] + 1}, "
                        "with the XLA compile)")
            return f"outer step {sample['last_step'] + 1}"
        if not self.seen_metrics:
            return "resume: restoring the checkpoint, trimming metrics.jsonl"
        if sample["lock"]:
            return "after the last step: the final checkpoint"
        return "after training: writing the plot"

    def poll_until(self, done: Callable[[dict[str, Any]], bool], tight: bool = False,
                   timeout: float = 900.0) -> dict[str, Any] | None:
        """Observe until ``done(sample)``; None if the process exits first."""
        deadline = time.monotonic() + timeout
        while self.alive():
            sample = self.observe()
            if done(sample):
                return sample
            if time.monotonic() > deadline:
                raise TimeoutError(f"pid {self.pid}: condition not met in {timeout} s")
            if not tight:
                time.sleep(0.003)
        return None

    def wait_for(self, seconds: float) -> dict[str, Any] | None:
        """Observe for ``seconds`` more; the last sample, None if the process exits first."""
        until = self.elapsed() + seconds
        return self.poll_until(lambda s: self.elapsed() >= until)

    def wait_for_write(self) -> dict[str, Any] | None:
        """Observe as often as possible until an atomic write's temporary file is open or
        present (one not left by an earlier attempt); None if the process exits first."""
        before = self.tmp_before
        return self.poll_until(lambda s: bool(s["tmp_open"] or set(s["tmp_present"]) - before),
                               tight=True)

    def kill(self) -> int:
        os.killpg(self.pid, signal.SIGKILL)
        return self.finish()

    def finish(self, timeout: float | None = None) -> int:
        code = self.proc.wait(timeout)
        self.log.close()
        return code


# --- the second writer ----------------------------------------------------------------------


def _snapshot(out: Path) -> dict[str, Any]:
    """Every file and folder under ``out``: kind, size, mtime and a hash of the content."""
    found = {}
    for path in sorted(out.rglob("*")):
        st = path.lstat()
        entry = {"dir": path.is_dir(), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                 "inode": st.st_ino, "mode": st.st_mode}
        if path.is_file():
            entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        found[str(path.relative_to(out))] = entry
    return found


def second_writer(command: list[str], out: Path, holder: Attempt, freeze: bool,
                  env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run ``command`` on ``out`` while ``holder`` holds its lock (running on, or stopped
    with SIGSTOP when ``freeze``); check it is refused and leaves the directory alone."""
    fixed = [".lock", "config.json", "machine.json"]
    if not holder.alive():
        raise RuntimeError(f"the holder (pid {holder.pid}) ended before the second writer "
                           "started: put the second writer in an attempt with more steps ahead")
    if freeze:
        os.kill(holder.pid, signal.SIGSTOP)
    try:
        before = _snapshot(out)
        t0 = time.monotonic()
        done = subprocess.run(command, capture_output=True, text=True, env=dict(env or _env()),
                              timeout=600)
        seconds = time.monotonic() - t0
        after = _snapshot(out)
    finally:
        if freeze:
            os.kill(holder.pid, signal.SIGCONT)
    expected = (f"learnopt: error: {out} is in use: process {holder.pid} is meta-training into "
                f"it (it holds {out / '.lock'}); wait for it to finish or stop it, or use "
                "another run directory")
    if freeze:
        untouched = before == after
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    else:  # the holder writes on: only the files it wrote before are compared
        changed = [k for k in fixed if before.get(k) != after.get(k)]
        untouched = not changed
    result = {
        "holder_running": "stopped (SIGSTOP), lock held" if freeze else "running",
        "holder_pid": holder.pid, "exit_code": done.returncode,
        "stderr": done.stderr.strip(), "stdout": done.stdout.strip(),
        "seconds": round(seconds, 2),
        "holder_step": _last_step(out)[0],
        "holder_alive_after": holder.alive(),
        "changed": changed,
        "refused": done.returncode == 2 and done.stderr.strip() == expected and not done.stdout,
        "untouched": untouched,
    }
    result["ok"] = result["refused"] and untouched and result["holder_alive_after"]
    return result


# --- the plan of kills ----------------------------------------------------------------------


def make_plan(rng: random.Random, kills: int, n_steps: int, checkpoint_every: int) -> list[dict]:
    """``kills`` kills: about a quarter at startup, a quarter in atomic writes, one after
    the last step (with 4 or more), the rest within outer steps; step targets drawn without
    replacement over the run and sorted, so the kills are spread over it."""
    n_final = 1 if kills >= 4 else 0
    n_startup = max(1, round(kills / 4)) if kills >= 2 else 0
    n_write = max(1, round(kills / 4)) if kills >= 3 else 0
    n_step = kills - n_final - n_startup - n_write
    room = range(1, n_steps - 2 * checkpoint_every)
    targets = sorted(rng.sample(room, n_step + n_write))
    kinds = ["step"] * n_step + ["write"] * n_write
    rng.shuffle(kinds)
    plan = [{"kind": k, "after_step": t} for k, t in zip(kinds, targets, strict=True)]
    for _ in range(n_startup):
        plan.insert(rng.randrange(len(plan) + 1), {"kind": "startup"})
    plan += [{"kind": "final"}] * n_final
    return plan


def _time_reference(command: list[str], out: Path, log: Path,
                    env: Mapping[str, str]) -> dict[str, float]:
    """Run the uninterrupted reference, timing its phases."""
    attempt = Attempt(command, out, log, env)
    last_line = None
    n_last = 0
    while attempt.alive():
        sample = attempt.observe()
        if sample["last_step"] > n_last:
            n_last, last_line = sample["last_step"], attempt.elapsed()
        time.sleep(0.003)
    code = attempt.finish()
    total = attempt.elapsed()
    if code != 0:
        raise RuntimeError(f"the uninterrupted run failed (exit {code}); see {log}")
    first = attempt.times.get("first_line", total)
    steps = max(n_last - (attempt.start_step or 0), 1)
    return {"seconds": total, "lock": attempt.times.get("lock", 0.0),
            "first_step_done": first,
            "step": max(((last_line or total) - first) / max(steps - 1, 1), 1e-3),
            "tail": max(total - (last_line or total), 0.05)}


# --- comparing the runs ---------------------------------------------------------------------


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}/{k}" if prefix else str(k)))
        return out
    return {prefix: tree}


def compare_states(a: Path, b: Path) -> dict[str, Any]:
    """Leaf by leaf: theta in ``theta.msgpack`` and the full state of ``checkpoint.msgpack``
    (``seconds`` left out: wall-clock time)."""
    from learnopt.io import load_checkpoint

    def diff(x: dict, y: dict) -> tuple[list[str], float]:
        differ, worst = sorted(set(x) ^ set(y)), 0.0
        for key in sorted(set(x) & set(y)):
            u, v = np.asarray(x[key]), np.asarray(y[key])
            if u.shape != v.shape or u.dtype != v.dtype or u.tobytes() != v.tobytes():
                differ.append(key)
                if u.shape == v.shape and np.issubdtype(u.dtype, np.number):
                    d = np.abs(u.astype(np.float64) - v.astype(np.float64))
                    worst = max(worst, float(np.max(d, initial=0.0)))
                else:
                    worst = float("inf")
        return differ, worst

    theta_a = _flat(load_checkpoint(a / "theta.msgpack").state)
    theta_b = _flat(load_checkpoint(b / "theta.msgpack").state)
    theta_differ, theta_worst = diff(theta_a, theta_b)
    state_a = _flat(load_checkpoint(a / "checkpoint.msgpack").state)
    state_b = _flat(load_checkpoint(b / "checkpoint.msgpack").state)
    for state in (state_a, state_b):
        state.pop("seconds", None)
    state_differ, state_worst = diff(state_a, state_b)
    return {
        "theta_file_bytes_equal": (a / "theta.msgpack").read_bytes()
        == (b / "theta.msgpack").read_bytes(),
        "theta_leaves": len(theta_a), "theta_params": int(sum(np.size(v)
                                                             for v in theta_a.values())),
        "theta_leaves_differing": theta_differ, "max_abs_theta_diff": theta_worst,
        "state_leaves": len(state_a), "state_leaves_differing": state_differ,
        "max_abs_state_diff": state_worst,
        "checkpoint_step": int(state_a["step"]),
        "learner_updates": int(state_a["learner/step"]),
        "learner_dropped": int(state_a["learner/num_dropped"]),
    }


def compare_metrics(run: Path, reference: Path) -> dict[str, Any]:
    """Steps of ``run``'s metrics.jsonl, and its values against the reference's."""
    def read(path: Path) -> list[dict]:
        return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]

    got, want = read(run), read(reference)
    differ = set()
    for g, w in zip(got, want, strict=False):
        for key in set(g) | set(w):
            if key not in TIMING_KEYS and g.get(key) != w.get(key):
                differ.add(key)
    raw = (run / "metrics.jsonl").read_text()
    return {"steps": [r["step"] for r in got], "lines": len(got),
            "strict_lines": raw.endswith("\n") and all(line for line in raw.split("\n")[:-1]),
            "values_differing": sorted(differ),
            "meta_loss_equal": [r["meta_loss"] for r in got] == [r["meta_loss"] for r in want]}


def kills_by_where(records: list[dict]) -> dict[str, int]:
    """How many kills landed where (outer steps and checkpoint copies not told apart)."""
    landed: dict[str, int] = {}
    for r in records:
        key = re.sub(r"checkpoint_\d+", "checkpoint_<step>", r["landed"].split(" (")[0])
        key = "outer step (mid-step)" if key.startswith("outer step ") else key
        landed[key] = landed.get(key, 0) + 1
    return landed


# --- the fault run --------------------------------------------------------------------------


def fault_run(work: str | os.PathLike, config: Mapping[str, Any] = FULL, *, kills: int = 24,
              min_kills: int | None = None, seed: int = 0, second_writer_at: int | None = None,
              plan: list[dict] | None = None, log: Callable[[str], None] = print,
              writer_modes: tuple[bool, ...] = (False, True)) -> dict[str, Any]:
    """Meta-train ``config`` in ``work/killed`` under ``kills`` SIGKILLs (restarting the same
    command until it finishes) with a second writer during attempt ``second_writer_at``
    (default: drawn), and uninterrupted in ``work/reference``; returns the record with
    ``checks`` (name -> bool) and ``ok``. A planned kill can miss (the run ended first: the
    one after the last step races the end of the run); ``min_kills`` (default ``kills``) is
    how many must land.

    ``plan`` (a list of ``{"kind": "startup" | "step" | "write" | "final", "after_step": T}``)
    replaces the drawn one. ``writer_modes``: the second writer while the holder runs on
    (False) and while it is stopped with SIGSTOP (True); a holder that finishes within a
    second writer's start-up (a few seconds of imports) cannot be tested running on."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    killed, reference, logs = work / "killed", work / "reference", work / "logs"
    for path in (killed, reference, logs):
        if path.exists():
            shutil.rmtree(path)
    logs.mkdir()
    n_steps, every = int(config["outer_steps"]), int(config["checkpoint_every"])
    command = learnopt_command(killed, config)
    rng = random.Random(seed)
    start = time.monotonic()
    source, provenance = freeze_source(work)
    env = _env(source)

    log(f"uninterrupted reference run: {' '.join(learnopt_command(reference, config))}")
    timing = _time_reference(learnopt_command(reference, config), reference,
                             logs / "reference.log", env)
    log(f"  {timing['seconds']:.1f} s: first step done at {timing['first_step_done']:.1f} s, "
        f"{timing['step'] * 1000:.0f} ms per outer step, {timing['tail']:.1f} s after the last")

    if plan is None:
        plan = make_plan(rng, kills, n_steps, every)
    plan = [dict(p) for p in plan]
    if second_writer_at is None:
        middle = [i for i, p in enumerate(plan) if p["kind"] in ("step", "write")]
        second_writer_at = middle[len(middle) // 2] if middle else 0
    log(f"fault run: {len(plan)} planned kills into {killed}, seed {seed}, second writer "
        f"during attempt {second_writer_at + 1}")

    records, writers, attempts = [], [], 0
    final_code, fallbacks, refused_restarts = None, [], []
    item_index = 0
    while True:
        item = plan[item_index] if item_index < len(plan) else {"kind": None}
        attempts += 1
        tmp_before = _tmp_files(killed)
        attempt = Attempt(command, killed, logs / f"attempt_{attempts:02d}.log", env)
        attempt.tmp_before = tmp_before
        try:
            if item_index == second_writer_at and item["kind"] is not None:
                if attempt.poll_until(lambda s: s["lock"]) is not None:
                    for freeze in writer_modes:
                        w = second_writer(command, killed, attempt, freeze, env)
                        writers.append({"attempt": attempts, **w})
                        log(f"  second writer ({w['holder_running']}, holder at step "
                            f"{w['holder_step']}): exit {w['exit_code']}, "
                            f"{'refused' if w['refused'] else 'NOT REFUSED'}, "
                            f"{'untouched' if w['untouched'] else 'CHANGED ' + str(w['changed'])}"
                            f" [{w['stderr'][:90]}...]")
            kind = item["kind"]
            delay = None
            if kind == "startup":
                delay = rng.uniform(0.0, timing["first_step_done"])
                sample = attempt.wait_for(delay)
            elif kind in ("step", "write"):
                target = item["after_step"]

                def reached(s, target=target):
                    return s["metrics_open"] and s["last_step"] >= target

                sample = attempt.poll_until(reached)
                if sample is not None and kind == "step":
                    delay = rng.uniform(0.0, timing["step"])
                    sample = attempt.wait_for(delay)
                elif sample is not None:
                    sample = attempt.wait_for_write()
            elif kind == "final":
                sample = attempt.poll_until(lambda s: s["last_step"] >= n_steps)
                if sample is not None:
                    delay = rng.uniform(0.0, timing["tail"] / 2)
                    sample = attempt.wait_for(delay)
            else:
                sample = None
                code = attempt.finish(timeout=900)
            if kind is not None and sample is not None and attempt.alive():
                where = attempt.where(sample, n_steps)
                code = attempt.kill()
            elif kind is not None:  # the process ended before the kill
                code, where = attempt.finish(), None
        except BaseException:
            if attempt.alive():
                attempt.kill()
            raise
        text = (logs / f"attempt_{attempts:02d}.log").read_text()
        warned = [line for line in text.splitlines() if "warning" in line]
        fallbacks += warned
        if "is in use" in text:
            refused_restarts.append(attempts)
        if kind is None or code != -signal.SIGKILL:
            final_code = code
            log(f"attempt {attempts}: exit {code} after {attempt.elapsed():.1f} s "
                f"(planned: {kind or 'run to the end'})")
            if kind is not None and code == 0:
                log("  the run finished before the planned kill")
            break  # finished, or failed (the checks say so)
        ckpt = _checkpoint_step(killed)
        step, cut = _last_step(killed)
        left = sorted(_tmp_files(killed) - tmp_before)
        record = {"kill": len(records) + 1, "attempt": attempts, "pid": attempt.pid,
                  "planned": kind, "after_step": item.get("after_step"),
                  "delay_s": None if delay is None else round(delay, 4),
                  "at_s": sample["t"], "landed": where,
                  "steps_in_metrics": step, "line_cut_short": cut,
                  "checkpoint_step": ckpt, "tmp_files_left": left,
                  "resumes_from": ckpt or 0, "steps_to_redo": step - (ckpt or 0)}
        records.append(record)
        log(f"kill {record['kill']:2d} ({kind}, {sample['t']:.2f} s into attempt {attempts}): "
            f"{where}; metrics at step {step}{' + a cut line' if cut else ''}, checkpoint at "
            f"{ckpt}{'; left ' + ', '.join(left) if left else ''}")
        item_index += 1
    seconds = time.monotonic() - start

    states = compare_states(killed, reference)
    metrics = compare_metrics(killed, reference)
    checks = {
        "at_least_min_kills": len(records) >= (kills if min_kills is None else min_kills),
        "finished_with_exit_0": final_code == 0,
        "second_writer_refused_naming_the_pid": bool(writers) and all(w["refused"]
                                                                      for w in writers),
        "second_writer_left_the_directory_untouched": bool(writers)
        and all(w["untouched"] for w in writers),
        "second_writer_overlapped_a_live_writer": bool(writers)
        and all(w["holder_alive_after"] for w in writers),
        "no_restart_refused_by_a_stale_lock": not refused_restarts,
        "no_checkpoint_fallback": not fallbacks,
        "no_temporary_files_left": not _tmp_files(killed),
        "theta_bitwise_equal": states["theta_file_bytes_equal"]
        and not states["theta_leaves_differing"],
        "full_state_equal_except_seconds": not states["state_leaves_differing"],
        "each_step_once_in_order": metrics["steps"] == list(range(1, n_steps + 1)),
        "metrics_equal_except_timings": not metrics["values_differing"]
        and metrics["meta_loss_equal"],
        "metrics_lines_whole": metrics["strict_lines"],
        "checkpoint_step_is_outer_steps": states["checkpoint_step"] == n_steps,
        "learner_updates_are_outer_steps": states["learner_updates"]
        + states["learner_dropped"] == n_steps,
    }
    landed = kills_by_where(records)
    result = {
        "what": "learnopt meta-train under repeated SIGKILL at seeded random moments, "
                "restarted with the same command until it finished, and a second writer on "
                "the same run directory; compared with an uninterrupted run",
        "command": learnopt_command(Path("RUN"), config),
        "config": dict(config), "seed": seed, "source": provenance,
        "kills": len(records), "kills_planned": len(plan),
        "min_kills": kills if min_kills is None else min_kills, "attempts": attempts,
        "kills_by_where": landed,
        "steps_recomputed_after_kills": sum(max(r["steps_to_redo"], 0) for r in records),
        "tmp_files_left_in_run_dir": sorted(_tmp_files(killed)),
        "seconds": round(seconds, 1),
        "reference_seconds": round(timing["seconds"], 1),
        "reference_timing": {k: round(v, 3) for k, v in timing.items()},
        "max_abs_theta_difference": states["max_abs_theta_diff"],
        "theta": {k: states[k] for k in ("theta_file_bytes_equal", "theta_leaves",
                                          "theta_params", "theta_leaves_differing")},
        "state": {k: states[k] for k in ("state_leaves", "state_leaves_differing",
                                          "max_abs_state_diff", "checkpoint_step",
                                          "learner_updates", "learner_dropped")},
        "metrics": {k: metrics[k] for k in ("lines", "values_differing", "meta_loss_equal")},
        "second_writer": writers,
        "checkpoint_fallback_warnings": fallbacks,
        "restarts_refused": refused_restarts,
        "checks": checks,
        "ok": all(checks.values()),
        "kill_log": records,
    }
    machine = reference / "machine.json"
    if machine.exists():
        result["machine"] = json.loads(machine.read_text())
    log(f"{len(records)} kills in {attempts} attempts, {seconds:.0f} s; max |theta diff| "
        f"{states['max_abs_theta_diff']}; checks: "
        + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in checks.items()))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=24, help="kills planned (24)")
    p.add_argument("--min-kills", type=int, default=20, help="kills that must land (20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fast", action="store_true", help="the fast test's tiny run (40 steps)")
    p.add_argument("--work", default=None, help="run directories (default: a temporary one)")
    p.add_argument("--out", default=str(RESULT))
    args = p.parse_args(argv)
    config = FAST if args.fast else FULL
    with tempfile.TemporaryDirectory(prefix="fault_run_") as tmp:
        result = fault_run(args.work or tmp, config, kills=args.kills,
                           min_kills=args.min_kills, seed=args.seed)
    from learnopt.io import atomic_write_json

    atomic_write_json(args.out, result)
    print(f"wrote {args.out}: {'all checks passed' if result['ok'] else 'CHECKS FAILED'}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
