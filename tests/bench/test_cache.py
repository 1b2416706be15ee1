"""learnopt.bench.cache: baseline curves on disk, reused, never trusted blindly."""

import hashlib
import json
import os
import shutil
import warnings

import numpy as np
import pytest

from learnopt.bench.cache import CACHE_VERSION, BaselineCache, CacheWarning

HP = {"lr": 1e-3, "b1": 0.9}
CURVE = np.array([2.0, np.nan, np.inf, 0.5], dtype=np.float32)


def test_round_trip_preserves_the_curve_and_extra(tmp_path):
    cache = BaselineCache(tmp_path / "c")
    assert not (tmp_path / "c").exists()  # created lazily
    path = cache.put(
        "quad", "adam", HP, 4, 0, CURVE, extra={"test_loss": 0.25, "acc": np.float32(0.5)}
    )
    assert path == tmp_path / "c" / "quad" / f"{cache.key('quad', 'adam', HP, 4, 0)}.npz"
    assert os.listdir(path.parent) == [path.name]  # no temporary file left behind
    run = cache.get("quad", "adam", HP, 4, 0)
    assert run.curve.dtype == np.float32
    np.testing.assert_array_equal(run.curve, CURVE)  # NaN and inf kept
    assert run.extra == {"test_loss": 0.25, "acc": 0.5}
    # the file says what it is
    with np.load(path) as data:
        meta = json.loads(str(data["meta"]))
    assert meta["key"] == {
        "version": CACHE_VERSION, "task": "quad", "optimizer": "adam",
        "hparams": {"lr": 0.001, "b1": 0.9}, "steps": 4, "seed": 0, "fingerprint": "",
    }  # fmt: skip


def test_hits_and_misses_and_reuse_by_a_second_run(tmp_path):
    cache = BaselineCache(tmp_path)
    assert cache.get("quad", "adam", HP, 4, 0) is None
    assert (cache.hits, cache.misses) == (0, 1)
    cache.put("quad", "adam", HP, 4, 0, CURVE)
    assert cache.get("quad", "adam", HP, 4, 0) is not None
    assert (cache.hits, cache.misses) == (1, 1)
    second = BaselineCache(tmp_path)
    assert second.get("quad", "adam", HP, 4, 0) is not None
    assert (second.hits, second.misses) == (1, 0)


def test_key_is_a_stable_digest_of_canonical_json():
    cache = BaselineCache("unused")
    text = (
        '{"fingerprint":"","hparams":{"lr":0.001},"optimizer":"adam",'
        '"seed":0,"steps":10,"task":"quad","version":1}'
    )
    assert (
        cache.key("quad", "adam", {"lr": 0.001}, 10, 0) == hashlib.sha256(text.encode()).hexdigest()
    )
    same = [
        cache.key("quad", "adam", {"lr": 1e-3, "b1": 0.9}, 10, 0),
        cache.key("quad", "adam", {"b1": 0.9, "lr": 0.001}, 10, 0),  # dict order
        cache.key("quad", "adam", {"b1": np.float32(0.9), "lr": np.float64(1e-3)}, 10, 0),
        cache.key("quad", "adam", {"b1": 0.9, "lr": 0.001}, np.int64(10), 0),
    ]
    assert len(set(same)) == 1


def test_every_key_field_matters():
    cache = BaselineCache("unused")
    base = ("quad", "adam", {"lr": 1e-3}, 10, 0)
    variants = [
        ("quad2", "adam", {"lr": 1e-3}, 10, 0),
        ("quad", "sgd", {"lr": 1e-3}, 10, 0),
        ("quad", "adam", {"lr": 3e-3}, 10, 0),
        ("quad", "adam", {"lr": 1e-3}, 11, 0),
        ("quad", "adam", {"lr": 1e-3}, 10, 1),
    ]
    keys = {cache.key(*base)} | {cache.key(*v) for v in variants}
    keys.add(cache.key(*base, fingerprint="n_params=6"))
    assert len(keys) == 7


def test_different_seed_or_steps_is_a_different_entry(tmp_path):
    cache = BaselineCache(tmp_path)
    cache.put("quad", "adam", HP, 4, 0, CURVE)
    assert cache.get("quad", "adam", HP, 4, 1) is None
    assert cache.get("quad", "adam", HP, 3, 0) is None
    cache.put("quad", "adam", HP, 4, 1, CURVE * 2)
    np.testing.assert_array_equal(cache.get("quad", "adam", HP, 4, 1).curve, CURVE * 2)
    np.testing.assert_array_equal(cache.get("quad", "adam", HP, 4, 0).curve, CURVE)
    assert len(os.listdir(tmp_path / "quad")) == 2


def test_read_only_directories_are_searched_but_never_written(tmp_path):
    shipped = tmp_path / "shipped"
    BaselineCache(shipped).put("quad", "adam", HP, 4, 0, CURVE, extra={"a": 1})
    before = {p: p.stat().st_mtime_ns for p in shipped.rglob("*")}
    cache = BaselineCache(tmp_path / "local", read_only=[tmp_path / "missing", shipped])
    run = cache.get("quad", "adam", HP, 4, 0)
    assert run.extra == {"a": 1} and cache.hits == 1
    cache.put("quad", "adam", HP, 4, 1, CURVE)
    assert {p: p.stat().st_mtime_ns for p in shipped.rglob("*")} == before
    assert (tmp_path / "local" / "quad").is_dir()
    # the writable root comes first
    cache.put("quad", "adam", HP, 4, 0, CURVE * 3)
    np.testing.assert_array_equal(cache.get("quad", "adam", HP, 4, 0).curve, CURVE * 3)


def test_a_truncated_file_is_a_miss_with_a_warning(tmp_path):
    cache = BaselineCache(tmp_path)
    path = cache.put("quad", "adam", HP, 4, 0, CURVE)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.warns(CacheWarning, match=str(path.name)):
        assert cache.get("quad", "adam", HP, 4, 0) is None
    assert (cache.hits, cache.misses) == (0, 1)
    cache.put("quad", "adam", HP, 4, 0, CURVE)  # a new put repairs it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.get("quad", "adam", HP, 4, 0) is not None


def test_a_file_with_other_key_fields_is_a_miss(tmp_path):
    cache = BaselineCache(tmp_path)
    src = cache.put("quad", "adam", HP, 4, 0, CURVE)
    dst = cache.path("quad", "adam", HP, 4, 1)
    shutil.copy(src, dst)  # seed 0's run under seed 1's name
    with pytest.warns(CacheWarning, match="do not match"):
        assert cache.get("quad", "adam", HP, 4, 1) is None


def test_a_curve_of_the_wrong_length_is_a_miss_and_falls_back(tmp_path):
    shipped = BaselineCache(tmp_path / "shipped")
    shipped.put("quad", "adam", HP, 4, 0, CURVE)
    cache = BaselineCache(tmp_path / "local", read_only=[tmp_path / "shipped"])
    path = cache.put("quad", "adam", HP, 4, 0, CURVE)
    with np.load(path) as data:
        meta = str(data["meta"])
    with open(path, "wb") as f:
        np.savez(f, curve=CURVE[:3], meta=np.array(meta))
    with pytest.warns(CacheWarning, match=r"shape \(3,\)"):
        run = cache.get("quad", "adam", HP, 4, 0)
    np.testing.assert_array_equal(run.curve, CURVE)  # from the read-only copy
    assert cache.hits == 1


def test_put_checks_the_length_and_task_names_become_safe_paths(tmp_path):
    cache = BaselineCache(tmp_path)
    with pytest.raises(ValueError, match="shape"):
        cache.put("quad", "adam", HP, 5, 0, CURVE)
    path = cache.put("../mlp/mnist 8x8", "adam", HP, 4, 0, CURVE)
    assert path.parent == tmp_path / "_mlp_mnist_8x8"
    assert cache.get("../mlp/mnist 8x8", "adam", HP, 4, 0) is not None
