"""learnopt.io: atomic writes, versioned checkpoints, clear errors naming the file."""

import json
import os
import stat
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

from learnopt import io


class State(NamedTuple):
    w: jnp.ndarray
    step: jnp.ndarray
    extra: dict


STATE = State(jnp.arange(6.0).reshape(2, 3), jnp.asarray(7), {"b": jnp.asarray([1.5, -2.0])})
CONFIG = {"lopt": "small_fc_lopt", "horizon": 2000, "decays": [0.9, 0.99], "clip": None}


def template():
    return State(jnp.zeros((2, 3)), jnp.asarray(0), {"b": jnp.zeros(2)})


def test_atomic_writes_replace_the_file_whole_and_leave_nothing_behind(tmp_path):
    path = tmp_path / "sub" / "dir" / "f.json"  # missing parents are created
    io.atomic_write_json(path, {"a": 1, "b": [1, 2]})
    assert json.loads(path.read_text()) == {"a": 1, "b": [1, 2]}
    assert path.read_text().endswith("\n")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644  # not mkstemp's 0600
    io.atomic_write_text(path, "héllo")
    assert path.read_bytes() == "héllo".encode()
    io.atomic_write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert os.listdir(path.parent) == ["f.json"]
    # A write that fails midway leaves the old content and no temporary file.
    with pytest.raises(RuntimeError, match="disk full"):
        with io.atomic_open(path) as f:
            f.write(b"half a fi")
            raise RuntimeError("disk full")
    assert path.read_bytes() == b"\x00\x01"
    assert os.listdir(path.parent) == ["f.json"]


def test_checkpoint_round_trip_keeps_state_config_and_version(tmp_path):
    path = io.save_checkpoint(tmp_path / "c.msgpack", STATE, CONFIG)
    ckpt = io.load_checkpoint(path, template())
    assert ckpt.format_version == io.CHECKPOINT_FORMAT_VERSION == 1
    assert ckpt.config == CONFIG
    assert isinstance(ckpt.state, State) and int(ckpt.state.step) == 7
    np.testing.assert_array_equal(ckpt.state.w, np.arange(6.0).reshape(2, 3))
    np.testing.assert_array_equal(ckpt.state.extra["b"], [1.5, -2.0])
    # Without a template: the raw state dict (NamedTuple fields by name).
    raw = io.load_checkpoint(path).state
    assert sorted(raw) == ["extra", "step", "w"]
    # Equal inputs give equal bytes (an interrupted and resumed run compares byte-wise).
    assert path.read_bytes() == io.checkpoint_bytes(STATE, dict(reversed(CONFIG.items())))
    assert path.read_bytes() != io.checkpoint_bytes(STATE, {**CONFIG, "horizon": 20})


def test_a_file_from_before_format_versions_reads_as_format_0(tmp_path):
    path = tmp_path / "old.msgpack"
    path.write_bytes(serialization.to_bytes(STATE))
    ckpt = io.load_checkpoint(path, template())
    assert ckpt.format_version == 0 and ckpt.config is None
    np.testing.assert_array_equal(ckpt.state.w, STATE.w)


def test_unreadable_checkpoints_raise_errors_naming_the_file(tmp_path):
    good = io.checkpoint_bytes(STATE, CONFIG)
    cut = tmp_path / "cut.msgpack"
    cut.write_bytes(good[: len(good) // 2])
    with pytest.raises(io.CheckpointError, match=f"{cut}: not a readable checkpoint"):
        io.load_checkpoint(cut)
    junk = tmp_path / "junk.msgpack"
    junk.write_bytes(b"\x07")  # valid msgpack (the integer 7), not a checkpoint
    with pytest.raises(io.CheckpointError, match=f"{junk}: not a checkpoint"):
        io.load_checkpoint(junk)
    future = tmp_path / "future.msgpack"
    blob = {"format_version": 99, "config": "{}", "state": {}}
    future.write_bytes(serialization.msgpack_serialize(blob))
    with pytest.raises(
        io.CheckpointError, match=f"{future}: unknown checkpoint format version 99"
    ):
        io.load_checkpoint(future)
    wrong = io.save_checkpoint(tmp_path / "wrong.msgpack", STATE._replace(w=jnp.zeros((3, 2))))
    with pytest.raises(io.CheckpointError, match=r"wrong.msgpack: .*w.* shape \(3, 2\)"):
        io.load_checkpoint(wrong, template())
    other = io.save_checkpoint(tmp_path / "other.msgpack", {"theta": jnp.zeros(2)})
    with pytest.raises(io.CheckpointError, match="other.msgpack: the checkpoint does not match"):
        io.load_checkpoint(other, template())
    with pytest.raises(FileNotFoundError):
        io.load_checkpoint(tmp_path / "missing.msgpack")
    assert issubclass(io.CheckpointError, ValueError)  # the CLI reports ValueErrors cleanly


def test_machine_info_describes_this_machine():
    import jax

    info = io.machine_info()
    assert info["cpu_count"] == os.cpu_count() and info["jax"] == jax.__version__
    assert info["backend"] == jax.default_backend() and len(info["devices"]) >= 1
    json.dumps(info)  # JSON-ready
