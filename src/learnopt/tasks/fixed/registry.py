"""Named fixed tasks: ``get_task(name)`` and ``list_tasks()``.

Each entry builds its task lazily (data are read only when the task is built).
Sizes follow the papers where they name one: the 28x28 Fashion-MNIST MLP and
the ConvNet are those of Metz et al. 2022, "Practical tradeoffs", arXiv:2203.11860, App. B; the
8x8 MLP is the small meta-training task a 2-core CPU can afford. The ``[bench]`` entries
(:mod:`.bench`) are the tasks added for the fixed benchmark suite, :mod:`learnopt.bench.suite`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from learnopt.tasks.base import Task
from learnopt.tasks.families.quadratic import QuadraticConfig, QuadraticTask
from learnopt.tasks.fixed.canonical import CANONICAL
from learnopt.tasks.image import ImageClassificationTask, load_image_datasets
from learnopt.tasks.language import LanguageModelTask, load_text_datasets
from learnopt.tasks.models import standard as models


@dataclasses.dataclass(frozen=True)
class TaskEntry:
    name: str
    description: str  # one line
    build: Callable[[], Task]
    canonical: bool = False  # a VeLOdrome-style canonical task (:mod:`.canonical`)
    bench: bool = False  # made for the benchmark suite (:mod:`.bench`, learnopt.bench.suite)


def _image_mlp(name: str, dataset: str, size: int, hidden: tuple[int, ...], batch: int = 128):
    def build() -> Task:
        datasets = load_image_datasets(dataset, size, batch)
        num_classes = datasets.extra_info["num_classes"]
        return ImageClassificationTask(name, models.MLP(hidden, num_classes), datasets)

    return build


def _image_conv(name: str, dataset: str, size: int | None, batch: int = 128):
    def build() -> Task:
        datasets = load_image_datasets(dataset, size, batch)
        model = models.ConvNet(num_outputs=datasets.extra_info["num_classes"])
        return ImageClassificationTask(name, model, datasets)

    return build


def _char_lstm(name: str, corpus: str, batch: int = 32, seq_len: int = 64):
    def build() -> Task:
        datasets = load_text_datasets(corpus, batch, seq_len)
        model = models.CharLSTM(datasets.extra_info["vocab_size"], embed_size=32, hidden_size=128)
        return LanguageModelTask(name, model, datasets)

    return build


_ENTRIES = [
    TaskEntry(
        "fmnist_mlp_8x8",
        "Fashion-MNIST at 8x8, MLP 64-32-10, batch 128 (the meta-training task)",
        _image_mlp("fmnist_mlp_8x8", "fashion_mnist", 8, (32,)),
    ),
    TaskEntry(
        "fmnist_mlp_14x14",
        "Fashion-MNIST at 14x14, MLP 196-32-10, batch 128",
        _image_mlp("fmnist_mlp_14x14", "fashion_mnist", 14, (32,)),
    ),
    TaskEntry(
        "fmnist_mlp_28x28",
        "Fashion-MNIST at 28x28, MLP 784-128-128-10, batch 128 (arXiv:2203.11860, App. B.1)",
        _image_mlp("fmnist_mlp_28x28", "fashion_mnist", 28, (128, 128)),
    ),
    TaskEntry(
        "fmnist_conv",
        "Fashion-MNIST 28x28, ConvNet 32s2-64-64, mean, linear, batch 128 (arXiv:2203.11860 B.2)",
        _image_conv("fmnist_conv", "fashion_mnist", None),
    ),
    TaskEntry(
        "digits_mlp_8x8",
        "scikit-learn 8x8 digits, MLP 64-32-10, batch 128",
        _image_mlp("digits_mlp_8x8", "digits", 8, (32,)),
    ),
    TaskEntry(
        "char_lstm_shakespeare",
        "Shakespeare character LM, LSTM 128, sequence 64, batch 32",
        _char_lstm("char_lstm_shakespeare", "shakespeare"),
    ),
    TaskEntry(
        "char_lstm_kjv",
        "King James Bible character LM, LSTM 128, sequence 64, batch 32",
        _char_lstm("char_lstm_kjv", "kjv"),
    ),
    TaskEntry(
        "char_lstm_austen",
        "Jane Austen character LM, LSTM 128, sequence 64, batch 32",
        _char_lstm("char_lstm_austen", "austen"),
    ),
    TaskEntry(
        "quadratic_d10",
        "0.5||Ax-b||^2 in 10 dimensions, singular values 0.1..1, no data",
        lambda: QuadraticTask(QuadraticConfig(dim=10)),
    ),
]


def _canonical_entries() -> list[TaskEntry]:
    return [
        TaskEntry(name, f"[canonical] {desc}", build, canonical=True)
        for name, (desc, build) in CANONICAL.items()
    ]


def _bench_entries() -> list[TaskEntry]:
    from learnopt.tasks.fixed.bench import entries

    return [
        TaskEntry(name, f"[bench] {desc}", build, bench=True)
        for name, (desc, build) in entries().items()
    ]


TASKS: dict[str, TaskEntry] = {
    e.name: e for e in [*_ENTRIES, *_canonical_entries(), *_bench_entries()]
}


def list_tasks() -> list[TaskEntry]:
    return list(TASKS.values())


def canonical_names() -> list[str]:
    """The names of the canonical (VeLOdrome-style) tasks, in registry order."""
    return [e.name for e in TASKS.values() if e.canonical]


def bench_names() -> list[str]:
    """The names of the tasks made for the benchmark suite (:mod:`.bench`), in registry order."""
    return [e.name for e in TASKS.values() if e.bench]


def param_counts(names: list[str] | None = None) -> dict[str, int]:
    """Parameter counts of named tasks, cached on disk (building a task reads its data)."""
    import json

    from learnopt.tasks.data.paths import cache_dir

    path = cache_dir() / "task_params.json"
    cached = json.loads(path.read_text()) if path.exists() else {}
    out = {}
    for name in names or list(TASKS):
        if name not in cached:
            cached[name] = get_task(name).num_params()
        out[name] = cached[name]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cached, indent=1))
    return out


def get_task(name: str) -> Task:
    """Build the named fixed task; an unknown name lists the valid ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[name].build()
