"""The step watchdog (fake steps that sleep; no JAX hang needed) and the XLA workaround switch."""

from __future__ import annotations

import time

import pytest

from learnopt import watchdog as wd
from learnopt.watchdog import StepHangError, StepWatchdog, run_with_timeout


def _sleep(seconds, value=None):
    time.sleep(seconds)
    return value


def test_fast_steps_return_and_are_recorded():
    dog = StepWatchdog(factor=10.0, floor_s=0.5, first_s=2.0, warmup=1, block=False)
    assert dog.run(_sleep, 0.0, "compiled", task="t") == "compiled"  # warm-up: not recorded
    assert dog.median_s is None
    assert dog.limit_s() == (2.0, "first-call limit, compilation included")
    for _ in range(3):
        assert dog.run(_sleep, 0.01, 7, task="t") == 7
    assert len(dog.durations) == 3 and 0.005 < dog.median_s < 0.2
    limit, how = dog.limit_s()
    assert limit == 0.5 and how.startswith("floor")  # 10 x ~0.01 s is below the floor
    assert dog.hangs == []


def test_hung_step_is_reported_near_its_limit_and_names_the_task():
    seen = []
    dog = StepWatchdog(factor=10.0, floor_s=0.05, first_s=5.0, warmup=0, block=False,
                       on_hang=seen.append)
    for _ in range(3):
        dog.record(0.02)  # median 0.02 s -> limit 0.2 s
    assert dog.limit_s()[0] == pytest.approx(0.2)
    t0 = time.perf_counter()
    with pytest.raises(StepHangError) as info:
        dog.run(_sleep, 3.0, task="mlp_vae_seed17")
    waited = time.perf_counter() - t0
    assert 0.2 <= waited < 1.0  # reported at the limit, not when the step ends
    err = info.value
    assert isinstance(err, TimeoutError)
    assert err.task == "mlp_vae_seed17" and err.limit_s == pytest.approx(0.2)
    assert err.elapsed_s >= 0.2
    msg = str(err)
    assert "'mlp_vae_seed17'" in msg and "past its limit of 0.2 s" in msg
    assert "10 x median step 0.02 s" in msg and "docs/hangs.md" in msg
    assert seen == [err] and dog.hangs == [err]
    assert dog.abandoned_alive == 1  # the sleeper is abandoned, not killed
    assert len(dog.durations) == 3  # the hung step is not recorded
    # the caller carries on: the next step runs normally
    assert dog.run(_sleep, 0.0, "next", task="other") == "next"


def test_calls_share_one_thread_until_a_hang_abandons_it():
    import threading

    dog = StepWatchdog(factor=10.0, floor_s=0.1, first_s=5.0, warmup=0, block=False)
    first = [dog.run(threading.current_thread) for _ in range(3)]
    assert len(set(first)) == 1 and first[0] is not threading.current_thread()
    with pytest.raises(StepHangError):
        dog.run(_sleep, 0.5, task="slow")
    after = dog.run(threading.current_thread)
    assert after is not first[0]  # a fresh thread; the hung one is left to finish
    first[0].join(timeout=5.0)
    assert not first[0].is_alive() and dog.abandoned_alive == 0  # it exits after the call
    dog.close()
    after.join(timeout=5.0)
    assert not after.is_alive()


def test_expected_time_and_floor():
    dog = StepWatchdog(factor=4.0, floor_s=0.1, first_s=60.0, block=False)
    assert dog.limit_s(expected_s=0.05) == (pytest.approx(0.2), "4 x expected 0.05 s")
    assert dog.limit_s(expected_s=0.001)[0] == 0.1
    t0 = time.perf_counter()
    with pytest.raises(StepHangError, match="4 x expected 0.05 s"):
        dog.run(_sleep, 2.0, task="q", expected_s=0.05)  # first call, but expected_s given
    assert time.perf_counter() - t0 < 1.0


def test_exceptions_propagate_and_jax_outputs_are_waited_for():
    def boom():
        raise ValueError("nan loss")

    dog = StepWatchdog(floor_s=1.0, first_s=1.0)
    with pytest.raises(ValueError, match="nan loss"):
        dog.run(boom, task="t")
    jnp = pytest.importorskip("jax.numpy")
    out = run_with_timeout(lambda x: x * 2, jnp.arange(3), timeout_s=30.0, task="jax")
    assert out.tolist() == [0, 2, 4]


def test_run_with_timeout_raises():
    with pytest.raises(StepHangError, match="'slow'"):
        run_with_timeout(_sleep, 2.0, timeout_s=0.1, task="slow", block=False)


def test_workaround_switch_respects_the_user(monkeypatch):
    monkeypatch.setattr(wd, "jaxlib_affected", lambda version=None: True)
    env = {}
    assert wd.apply_xla_workaround(env) is not None and env["PJRT_NPROC"] == "1"
    env = {"PJRT_NPROC": "4"}
    assert wd.apply_xla_workaround(env) is None and env["PJRT_NPROC"] == "4"
    env = {"NPROC": "4"}
    assert wd.apply_xla_workaround(env) is None and "PJRT_NPROC" not in env
    env = {"LEARNOPT_XLA_WORKAROUND": "0"}
    assert wd.apply_xla_workaround(env) is None and "PJRT_NPROC" not in env
    monkeypatch.setattr(wd, "jaxlib_affected", lambda version=None: False)
    env = {}
    assert wd.apply_xla_workaround(env) is None and env == {}


def test_affected_versions():
    affected = wd.jaxlib_affected
    assert affected("0.10.0") and affected("0.10.2") and affected("0.11.0")
    assert not affected("0.9.2") and not affected("0.11.1") and not affected("0.4.38")
    assert affected("0.10.2.dev20260601")
