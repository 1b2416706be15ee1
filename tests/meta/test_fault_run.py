"""The fault run: ``learnopt meta-train`` under SIGKILL at chosen and random moments and a
second writer on its run directory reaches the uninterrupted run's theta, with each outer step
in ``metrics.jsonl`` once and in order.

The harness is ``benchmarks/fault_run.py`` (imported from its file: the benchmark that wrote
the committed ``benchmarks/results/fault_run.json`` and these tests run the same code, and the
library holds no test harness). The default run kills the tiny run of the meta-training tests
3 times; ``-m slow`` runs the benchmark's full 24-kill run."""

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
from test_train import TINY  # the tiny run of the meta-training tests

from learnopt.meta.train import MetaTrainer

ROOT = Path(__file__).resolve().parents[2]


def _benchmark():
    name = "learnopt_benchmark_fault_run"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "fault_run.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _assert_ok(result):
    failed = [name for name, ok in result["checks"].items() if not ok]
    assert not failed, (failed, json.dumps({k: v for k, v in result.items()
                                            if k != "kill_log"}, indent=1))
    assert result["ok"] and result["max_abs_theta_difference"] == 0.0


def test_three_kills_and_a_second_writer_reach_the_uninterrupted_theta(tmp_path):
    """A kill within an outer step, one inside an atomic write (the first temporary file seen
    after step 20), one at a random moment of startup; the second writer during the first
    run while that run is stopped (SIGSTOP) with its lock held. (This tiny run ends within a
    second writer's start-up, so the second writer beside a running holder is checked by the
    full run: ``test_the_committed_fault_run_passed_its_checks``.)"""
    bench = _benchmark()
    plan = [{"kind": "step", "after_step": 12}, {"kind": "write", "after_step": 20},
            {"kind": "startup"}]
    for attempt in range(2):
        result = bench.fault_run(tmp_path / str(attempt), bench.FAST, kills=3, seed=1, plan=plan,
                                 second_writer_at=0, log=lambda line: None,
                                 writer_modes=(True,))
        missed = [name for name, ok in result["checks"].items() if not ok]
        if missed != ["at_least_min_kills"]:
            break
        # Every check of the runs passed, but a planned kill did not land before the tiny run
        # ended: on a loaded machine the watcher can miss its moment (a write's temporary file
        # lives for about 100 us). A miss of the harness, not of learnopt: run it once more.
    _assert_ok(result)
    kills = result["kill_log"]
    assert [k["planned"] for k in kills] == ["step", "write", "startup"]
    assert kills[1]["landed"].startswith("atomic write of ")
    assert result["attempts"] == 4 and result["metrics"]["lines"] == 40
    writers = result["second_writer"]
    assert [w["holder_running"] for w in writers] == ["stopped (SIGSTOP), lock held"]
    for w in writers:
        assert w["exit_code"] == 2 and w["refused"] and w["untouched"], w
        assert f"process {w['holder_pid']} is meta-training into it" in w["stderr"]


def test_a_resume_removes_the_temporary_files_a_killed_write_left(tmp_path):
    """A SIGKILL inside ``learnopt.io.atomic_open`` leaves its ``.NAME.XXXX.tmp`` (a copy
    of the checkpoint's size each time); the next run removes those of its own files under
    the lock and keeps everything else."""
    run = tmp_path / "run"
    (run / "thetas").mkdir(parents=True)
    stale = [".checkpoint.msgpack.k2b9x_q1.tmp", ".checkpoint_0000004.msgpack.a1b2c3d4.tmp",
             ".theta.msgpack.5ljs5jt5.tmp", ".metrics.jsonl.zz9_a0b1.tmp",
             ".config.json.q1w2e3r4.tmp", ".machine.json.t5y6u7i8.tmp",
             "thetas/.theta_0000004.msgpack.o9p8i7u6.tmp"]
    kept = [".heldout.json.m1n2b3v4.tmp", "notes.tmp", "thetas/notes.tmp"]
    for name in stale + kept:
        (run / name).write_bytes(b"\x00" * 64)
    MetaTrainer(dataclasses.replace(TINY, outer_steps=2), run).run(progress=False)
    assert [name for name in stale if (run / name).exists()] == []
    assert [name for name in kept if (run / name).exists()] == kept


def test_the_committed_fault_run_passed_its_checks():
    result = json.loads((ROOT / "benchmarks" / "results" / "fault_run.json").read_text())
    _assert_ok(result)
    assert result["kills"] >= 20 and len(result["kill_log"]) == result["kills"]
    assert result["checks"]["at_least_min_kills"] and result["min_kills"] >= 20
    assert result["config"]["outer_steps"] == result["metrics"]["lines"]
    assert len({k["landed"].split(" ")[0] for k in result["kill_log"]}) >= 4  # spread out
    modes = [w["holder_running"] for w in result["second_writer"]]
    assert modes == ["running", "stopped (SIGSTOP), lock held"]
    assert all(w["holder_alive_after"] and w["refused"] for w in result["second_writer"])


@pytest.mark.slow
def test_the_full_fault_run(tmp_path):
    """The benchmark's run: 24 kills of 100 outer steps of small_fc_lopt (about 10 minutes
    on two busy cores)."""
    bench = _benchmark()
    result = bench.fault_run(tmp_path, bench.FULL, kills=24, min_kills=20, seed=0)
    _assert_ok(result)
    assert result["kills"] >= 20
