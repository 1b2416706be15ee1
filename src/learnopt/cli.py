"""The ``learnopt`` command line.

learnopt train --task fmnist_mlp_28x28 --optimizer adam --lr 1e-3 --steps 2000
learnopt tasks | optimizers | data
learnopt time-model --out time_model.json   # calibrate the budgeted sampler on this machine
learnopt main            # the README's main job on its built-in default
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path

# --- validation: every input is checked before anything is written ------------------------


def _positive_int(flag: str, value: int | None, hint: str = "") -> None:
    if value is not None and value < 1:
        raise ValueError(f"{flag} must be >= 1, got {value}{hint}")


def _non_negative_int(flag: str, value: int | None) -> None:
    if value is not None and value < 0:
        raise ValueError(f"{flag} must be >= 0, got {value}")


def _positive_number(flag: str, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ValueError(f"{flag} must be a finite number > 0, got {value}")


def _creatable(path: Path, what: str) -> None:
    """``path`` (absent) can be created: its first existing ancestor is a directory where a
    probe directory can be made (and is removed again)."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"cannot create {what} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot create {what} {path}: {parent} is not writable")
    try:  # access() is not the whole story (root, read-only or virtual file systems)
        os.rmdir(tempfile.mkdtemp(prefix=".learnopt-probe-", dir=parent))
    except OSError as e:
        raise ValueError(f"cannot create {what} {path}: {e.strerror or e} in {parent}") from e


def check_out_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """``path`` is a directory, or can be created as one; nothing is left behind here."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{flag} {path} exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"{flag} {path} is not writable")
    else:
        _creatable(path, f"the {flag} directory")
    return path


def check_out_file(path: str | os.PathLike, flag: str = "--out") -> Path:
    """``path`` is a writable file, or can be created as one; nothing is left behind here."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory; name a file")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise ValueError(f"{flag} {path} is not writable")
    else:
        _creatable(path, f"the {flag} file")
    return path


def _task_names(names) -> None:
    from learnopt.tasks.fixed.registry import get_task

    for name in names:
        get_task(name)  # an unknown name lists the valid ones; missing data names its set-up


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line ``learnopt: error: ...`` (exit code 2), as all bad input."""

    def error(self, message: str):
        command = self.prog.removeprefix("learnopt").strip()
        where = f"{command}: " if command else ""
        self.exit(2, f"learnopt: error: {where}{message} (see {self.prog} --help)\n")


def _cmd_tasks(args) -> int:
    if getattr(args, "families", False):
        from learnopt.tasks.families.registry import list_families

        rows = list_families()
        width = max(len(name) for name, _ in rows)
        for name, desc in rows:
            print(f"{name:<{width}}  {desc}")
        return 0

    from learnopt.tasks.fixed.registry import list_tasks, param_counts

    entries = list_tasks()
    width = max(len(e.name) for e in entries)
    for e in entries:
        try:
            count = f"{param_counts([e.name])[e.name]:>9,}"
        except FileNotFoundError:
            count = f"{'no data':>9}"
        print(f"{e.name:<{width}}  {count}  {e.description}")
    return 0


def _cmd_optimizers(args) -> int:
    """Hand-designed optimizers, learned architectures and shipped pretrained optimizers."""
    from learnopt import pretrained
    from learnopt.learned.registry import list_learned_optimizers
    from learnopt.optimizers.registry import list_optimizers

    sections = [
        ("hand-designed (learnopt train --optimizer NAME)", list_optimizers()),
        ("learned architectures (learnopt meta-train --lopt NAME)", list_learned_optimizers()),
        (
            "pretrained (learnopt evaluate --pretrained NAME; learnopt.pretrained.optimizer)",
            [(name, pretrained.describe(name)) for name in pretrained.available()],
        ),
    ]
    width = max(len(name) for _, rows in sections for name, _ in rows)
    for i, (title, rows) in enumerate(sections):
        print(("\n" if i else "") + f"{title}:")
        for name, desc in rows or [("(none)", "")]:
            print(f"  {name:<{width}}  {desc}".rstrip())
    return 0


def _cmd_data(args) -> int:
    from learnopt.tasks.data.registry import format_table

    print(format_table())
    return 0


def run_training(
    task_name: str,
    optimizer: str,
    lr: float | None,
    steps: int,
    seed: int,
    out: Path,
    augment: str | None = None,
    progress: bool = True,
):
    """Train a named task with a named optimizer; write JSONL metrics, a PNG and a summary.

    ``optimizer`` is any :func:`learnopt.resolve.resolve_optimizer` spec: a hand-designed
    name (``lr`` its learning rate), ``adam:lr=3e-3``, a shipped pretrained name or a
    meta-training run directory. ``augment`` (``"delay=1"``, ``"bf16=true,batch_fraction=0.5"``,
    ...) wraps the task in those augmentations
    (:func:`learnopt.tasks.augment.parse_augmentation`). Every input is checked before
    ``out`` is created."""
    from learnopt.plotting import plot_training
    from learnopt.resolve import resolve_optimizer
    from learnopt.tasks import augment as augmentations
    from learnopt.tasks.fixed.registry import get_task
    from learnopt.training import train

    _positive_int("--steps", steps)
    _positive_number("--lr", lr)
    check_out_dir(out)
    config = augmentations.parse_augmentation(augment) if augment else None
    named = resolve_optimizer(optimizer, learning_rate=lr)
    opt = named.make(steps)
    task = get_task(task_name)
    if config is not None:
        task = augmentations.apply(task, config)
    out.mkdir(parents=True, exist_ok=True)
    result = train(task, opt, steps, seed=seed, log_path=out / "metrics.jsonl", desc=task_name,
                   progress=progress)
    plot_training(out / "loss.png", result.train_loss, result.evals,
                  f"{task_name}: {named.label} ({named.setting})")
    summary = {
        "task": task_name,
        "augment": augment,
        "optimizer": optimizer,
        "kind": named.kind,
        "setting": named.setting,
        "learning_rate": lr,
        "steps": steps,
        "seed": seed,
        "seconds": round(result.seconds, 2),
        "final_train_loss_mean_last_100": float(result.train_loss[-100:].mean()),
        **{k: v for k, v in result.final_eval.items() if k != "step"},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _cmd_train(args) -> int:
    label = re.sub(r"[^\w.=,-]+", "_", args.optimizer.rstrip("/")).strip("_") or "optimizer"
    out = Path(args.out or f"runs/train/{args.task}_{label}_s{args.seed}")
    summary = run_training(
        args.task, args.optimizer, args.lr, args.steps, args.seed, out, args.augment,
        progress=not args.no_progress,
    )
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}/metrics.jsonl, {out}/loss.png, {out}/summary.json")
    return 0


# MetaTrainConfig fields set by flags of the same name (dashes for underscores).
_META_FLAGS = (
    "task", "lopt", "estimator", "num_tasks", "horizon", "trunc_length", "outer_lr",
    "outer_steps", "max_seconds", "checkpoint_every", "seed", "meta_loss_split", "task_slots",
    "keep_theta_every",
)


def _json_object(text: str | None, flag: str) -> dict | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag} must be a JSON object, e.g. '{{\"std\": 0.02}}'; {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object, got {text!r}")
    return value


def _meta_config(args, run_dir: Path | None = None):
    """The MetaTrainConfig of a meta-training command.

    The base is ``--config FILE`` if given, else ``RUN_DIR/config.json`` if the run exists
    (so a bare rerun resumes it), else the command's defaults; flags given explicitly
    override it.
    """
    import dataclasses
    import math

    from learnopt.meta.sources import TaskMixture
    from learnopt.meta.train import MetaTrainConfig

    # Numbers given on the command line, checked before anything else (and by flag name).
    flags = (*_META_FLAGS, "keep_checkpoints", "max_nonfinite_steps")
    for name in ("num_tasks", "task_slots", "horizon", "trunc_length", "outer_steps",
                 "checkpoint_every", "keep_theta_every", "keep_checkpoints"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            hint = ": nothing to train" if name == "outer_steps" else ""
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, "
                             f"got {value}{hint}")
    if getattr(args, "max_nonfinite_steps", None) is not None and args.max_nonfinite_steps < 0:
        raise ValueError(f"--max-nonfinite-steps must be >= 0 (0: never stop), got "
                         f"{args.max_nonfinite_steps}")
    for name in ("outer_lr", "max_seconds", "std"):
        value = getattr(args, name, None)
        if value is not None and not (math.isfinite(value) and value > 0):
            hint = ": nothing to train" if name == "max_seconds" else ""
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number > 0, "
                             f"got {value}{hint}")

    if args.config is not None:
        base = MetaTrainConfig.from_file(args.config)
    elif run_dir is not None and (run_dir / "config.json").is_file():
        path = run_dir / "config.json"
        try:
            base = MetaTrainConfig.from_json(path.read_text())
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path} is not a readable run config ({e}); fix or delete it, "
                             "or use another --out") from e
    else:
        base = MetaTrainConfig(**args.meta_defaults)
    changes = {k: getattr(args, k) for k in flags if getattr(args, k, None) is not None}
    if changes.get("max_nonfinite_steps") == 0:
        changes["max_nonfinite_steps"] = None
    # --task replaces the base's task distribution when that is just the base's own task
    # (the config completes tasks=None with it); a declared mixture is kept.
    if "task" in changes and base.tasks == TaskMixture.single(base.task).to_dict():
        changes["tasks"] = None
    # A different estimator or architecture starts from its own defaults, not the base's.
    new_estimator = changes.get("estimator", base.estimator) != base.estimator
    options = _json_object(args.estimator_options, "--estimator-options") or {}
    if args.std is not None:
        options["std"] = args.std
    if options or new_estimator:
        changes["estimator_options"] = {**({} if new_estimator else base.estimator_options),
                                        **options}
    new_lopt = changes.get("lopt", base.lopt) != base.lopt
    lopt_config = _json_object(args.lopt_config, "--lopt-config") or {}
    if lopt_config or new_lopt:
        changes["lopt_config"] = {**({} if new_lopt else base.lopt_config), **lopt_config}
    return dataclasses.replace(base, **changes)


def _cmd_meta_train(args) -> int:
    from learnopt.meta.report import plot_meta_training
    from learnopt.meta.train import MetaTrainer

    out = Path(args.out)
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    if args.ray_address and not args.workers:
        raise ValueError("--ray-address needs --workers N (how many workers to start there)")
    config = _meta_config(args, out)
    trainer = MetaTrainer(config, out)  # checks OUT and a saved config; writes nothing
    if args.workers:
        from learnopt.distributed import RayMetaGradients

        with RayMetaGradients(config.to_dict(), args.workers, address=args.ray_address) as g:
            trainer.run(progress=not args.no_progress, gradients=g)
    else:
        trainer.run(progress=not args.no_progress)
    plot_meta_training(out)
    print(f"wrote {out}/theta.msgpack, {out}/metrics.jsonl, {out}/meta_loss.png")
    return 0


def _cmd_meta_eval(args) -> int:
    from learnopt.io import atomic_write_json
    from learnopt.learned.registry import learned_optimizer_from_config
    from learnopt.meta.heldout import HELDOUT_SEED, heldout_meta_loss
    from learnopt.meta.report import plot_heldout
    from learnopt.meta.sources import TaskSource
    from learnopt.meta.train import MetaTrainConfig, run_thetas

    run = Path(args.run)
    _positive_int("--draws", args.draws)
    _positive_int("--steps", args.steps)
    if not (run / "config.json").is_file():
        raise FileNotFoundError(f"{run} is not a meta-training run (no config.json)")
    check_out_dir(run, "--run")  # heldout.json and heldout.png are written there
    try:
        config = MetaTrainConfig.from_json((run / "config.json").read_text())
    except (ValueError, TypeError) as e:
        raise ValueError(f"{run}/config.json is not a readable run config ({e})") from e
    lopt = learned_optimizer_from_config(config.lopt, config.lopt_config)
    steps, thetas = zip(*run_thetas(run, lopt), strict=True)
    mixture = config.mixture()
    # Under a time-budget curriculum, every theta is scored on draws at the scale of the
    # run's last outer step: the distribution it ended on.
    scale = TaskSource(mixture, HELDOUT_SEED).scale_at(max(steps))
    at_scale = "" if scale is None else f" at time scale {scale:g}"
    print(f"{len(thetas)} thetas (outer steps {', '.join(map(str, steps))}) on {args.draws} "
          f"held-out draws of the run's task distribution{at_scale}, {args.steps} steps each")
    result = heldout_meta_loss(
        mixture, lopt, list(thetas), args.draws, args.steps,
        progress=lambda i, name: print(f"  task {i + 1}/{args.draws}: {name}", flush=True),
        scale=scale,
    )
    out = {"run": str(run), "steps": list(steps), "num_steps": args.steps, **result.to_dict()}
    atomic_write_json(run / "heldout.json", out)
    plot_heldout(run / "heldout.png", steps, result, f"{config.lopt}: held-out meta-loss")
    for step, value, better in zip(steps, result.mean, result.tasks_improved, strict=True):
        print(f"  outer step {step:>7}: {value:.4f}  (below step {steps[0]}'s loss on {better} "
              f"of {len(result.tasks)} tasks)")
    print(f"wrote {run}/heldout.json, {run}/heldout.png")
    return 0


def _load_lopt(run: str | None, pretrained: str | None):
    """``(lopt, theta, label, default_task)`` from a run directory or a shipped name."""
    from learnopt import pretrained as shipped
    from learnopt.meta.train import MetaTrainConfig
    from learnopt.resolve import learned_from_spec

    if (run is None) == (pretrained is None):
        raise ValueError("give exactly one of --run DIR or --pretrained NAME")
    if pretrained is not None:
        lopt, theta, meta = shipped.load(pretrained)
        return lopt, theta, pretrained, meta.get("task")
    if not (Path(run) / "config.json").is_file():
        raise FileNotFoundError(f"{run} is not a meta-training run (no config.json)")
    lopt, theta, _ = learned_from_spec(run)
    config = MetaTrainConfig.from_json((Path(run) / "config.json").read_text())
    return lopt, theta, f"{config.lopt} (meta-trained)", config.task


def _cmd_evaluate(args) -> int:
    """Each task: the learned optimizer, LR-tuned Adam (and NAdamW search), one bar stage
    each (:mod:`learnopt.bench.compare`)."""
    from tqdm.auto import tqdm

    from learnopt.bench import compare
    from learnopt.tasks.fixed.registry import get_task

    _positive_int("--seeds", args.seeds)
    _positive_int("--steps", args.steps)
    _non_negative_int("--nadamw-trials", args.nadamw_trials)
    check_out_dir(args.out)
    lopt, theta, label, default_task = _load_lopt(args.run, args.pretrained)
    from learnopt.tasks.fixed.registry import TASKS

    if not args.task and default_task not in TASKS:
        raise ValueError(f"{label} was meta-trained on {default_task}, not one named task: "
                         "give --task NAME (`learnopt tasks`)")
    tasks = args.task or [default_task]
    _task_names(tasks)
    seeds = list(range(args.seeds))
    stages = [("learned", lambda task: compare.score_learned(
                   task, label, lopt, theta, seeds, args.steps)),
              (f"Adam x {len(compare.LR_GRID)} learning rates",
               lambda task: compare.tune_adam(task, seeds, args.steps))]
    if args.nadamw_trials > 0:
        stages.append((f"NAdamW x {args.nadamw_trials} trials", lambda task: compare.tune_nadamw(
            task, seeds, args.steps, args.nadamw_trials)))
    print(f"evaluate {label} on {len(tasks)} task(s): {len(stages)} optimizer runs of "
          f"{args.seeds} seeds x {args.steps} steps each", flush=True)
    bar = tqdm(total=len(tasks) * len(stages), desc="evaluate", unit="run",
               disable=args.no_progress, bar_format="{l_bar}{bar}| {n}/{total} runs "
               "[{elapsed}<{remaining}{postfix}]")
    tables = []
    try:
        for task_name in tasks:
            task = get_task(task_name)
            scores = []
            for what, score in stages:
                bar.set_postfix_str(f"{task_name}: {what}")
                scores.append(score(task))
                bar.update(1)
            out = Path(args.out) / task_name
            tables.append((out, compare.write_report(out, task_name, scores, args.steps)))
    finally:
        bar.close()
    for out, table in tables:
        print(table.read_text())
        print(f"wrote {out}/results.json, {out}/table.md, {out}/curves.png")
    return 0


def _bench_cache(path: str | None):
    """The baseline cache of ``learnopt bench``: ``path``, else ``$LEARNOPT_BENCH_CACHE``, else
    ``~/.cache/learnopt/bench``; a repository checkout's committed cache is read as well."""
    import os

    from learnopt.bench.cache import BaselineCache
    from learnopt.bench.run import REPOSITORY_CACHE

    root = path or os.environ.get("LEARNOPT_BENCH_CACHE") or Path.home() / ".cache/learnopt/bench"
    extra = [REPOSITORY_CACHE] if REPOSITORY_CACHE.is_dir() else []
    return BaselineCache(root, read_only=extra)


def run_bench_command(optimizers, suite, seeds, out, *, tasks=None, baselines=None,
                      nadamw_trials=8, baseline_factor=3.0, cache=None, progress=True,
                      command="") -> dict:
    """Resolve the optimizers, run the benchmark, write the report; returns the result."""
    from learnopt.bench.report import write_report
    from learnopt.bench.run import BASELINES, run_bench
    from learnopt.bench.suite import suite as suite_tasks
    from learnopt.resolve import resolve_optimizer

    _positive_int("--seeds", seeds)
    _non_negative_int("--nadamw-trials", nadamw_trials)
    if not math.isfinite(baseline_factor) or baseline_factor < 1:
        raise ValueError(f"--baseline-factor: baseline_factor must be >= 1 (and finite), got "
                         f"{baseline_factor}")
    unknown = sorted(set(baselines or ()) - set(BASELINES))
    if unknown:
        raise ValueError(f"unknown baselines {unknown}; valid: {', '.join(BASELINES)} "
                         "(comma-separated, '' for Adam only)")
    names = [t.name for t in suite_tasks(suite)]
    bad = [t for t in tasks or () if t not in names]
    if bad:
        raise ValueError(f"tasks {bad} are not in the {suite!r} suite; its tasks: "
                         f"{', '.join(names)}")
    check_out_dir(out)
    if cache is not None:
        check_out_dir(cache, "--cache")
    contenders = [resolve_optimizer(spec) for spec in optimizers]
    result = run_bench(contenders, suite, seeds, _bench_cache(cache), baseline_factor,
                       tuple(baselines) if baselines is not None else BASELINES,
                       nadamw_trials, tasks, progress, command)
    files = write_report(result, out)
    return {"result": result, "files": files}


def _cmd_bench(args) -> int:
    baselines = [b for b in args.baselines.split(",") if b] if args.baselines else []
    done = run_bench_command(
        args.optimizer, args.suite, args.seeds, Path(args.out), tasks=args.task,
        baselines=baselines, nadamw_trials=args.nadamw_trials,
        baseline_factor=args.baseline_factor, cache=args.cache,
        progress=not args.no_progress, command="learnopt " + " ".join(sys.argv[1:]),
    )
    print(Path(done["files"]["markdown"]).read_text())
    print("wrote " + ", ".join(str(p) for p in done["files"].values()))
    return 0


#: The optimizer ``learnopt main`` benchmarks: the shipped general-purpose one.
MAIN_OPTIMIZER = "small_fc_lopt_general"


def _cmd_main(args) -> int:
    """The main job: a short meta-training demo, then the quick benchmark suite for the
    shipped general optimizer and the demo's theta against tuned and untuned Adam."""
    from learnopt import pretrained
    from learnopt.meta.report import plot_meta_training, read_metrics
    from learnopt.meta.train import MetaTrainer
    from learnopt.resolve import resolve_optimizer

    out = check_out_dir(args.out)
    _positive_int("--seeds", args.seeds)
    shipped = args.optimizer or (MAIN_OPTIMIZER if MAIN_OPTIMIZER in pretrained.available()
                                 else pretrained.available()[0])
    resolve_optimizer(shipped)  # refused now, not after the meta-training demo
    config = _meta_config(args, out / "meta")
    MetaTrainer(config, out / "meta")  # checks OUT/meta and a saved config; writes nothing
    print(f"1/2 meta-training demo: {config.lopt} with {config.estimator} on {config.task} "
          f"for {config.max_seconds:g} s", flush=True)
    MetaTrainer(config, out / "meta").run(progress=not args.no_progress)
    plot_meta_training(out / "meta")
    rows = read_metrics(out / "meta")
    print(f"2/2 the {args.suite} benchmark suite: {shipped} and the demo's theta against "
          "LR-tuned Adam and Adam at 1e-3", flush=True)
    done = run_bench_command(
        [shipped, str(out / "meta")], args.suite, args.seeds, out / "bench", baselines=[],
        progress=not args.no_progress, command="learnopt main",
    )
    lines = [
        "# learnopt main job",
        "",
        f"1. Meta-training demo: `{config.lopt}` with `{config.estimator}` on `{config.task}`, "
        f"{rows[-1]['step'] if rows else 0} outer steps in {config.max_seconds:g} s "
        f"(`meta/meta_loss.png`). The demo's theta is `meta` in the tables below.",
        f"2. `{shipped}`: {pretrained.describe(shipped)}.",
        "",
        Path(done["files"]["markdown"]).read_text(),
    ]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    print(report.read_text())
    print(f"report: {report} (plots under {out / 'bench'})")
    return 0


def _cmd_time_model(args) -> int:
    import jax

    from learnopt.tasks import timing as T
    from learnopt.tasks.families.registry import velo_families

    _positive_int("--samples", args.samples)
    check_out_file(args.out)
    families = velo_families(args.families or None, size=args.size, data="synthetic")
    names = list(families)
    model = T.calibrate(families, args.samples, jax.random.PRNGKey(args.seed), path=args.out,
                        log=lambda msg: print(msg, flush=True))
    info = model.info
    print(f"time model of {len(names)} families x {args.samples} tasks written to {args.out}: "
          f"fit within x2 on {info['fit_within_factor_2']:.0%} of them, "
          f"RMS log error {info['fit_rms_log_error']:.3f}")
    return 0


def _add_tasks(sub) -> None:
    ts = sub.add_parser("tasks", help="list the named fixed tasks (--families: the families)")
    ts.add_argument("--families", action="store_true", help="list the sampled task families")
    ts.set_defaults(fn=_cmd_tasks)


def _add_optimizers(sub) -> None:
    sub.add_parser("optimizers", help="list the hand-designed, learned and pretrained "
                   "optimizers").set_defaults(fn=_cmd_optimizers)


def _add_data(sub) -> None:
    sub.add_parser("data", help="list datasets, whether present, shapes, sources").set_defaults(
        fn=_cmd_data
    )


def _add_train(sub) -> None:
    t = sub.add_parser("train", help="train a task with an optimizer (hand-designed, "
                       "pretrained or meta-trained)")
    t.add_argument("--task", required=True, help="a name from `learnopt tasks`")
    t.add_argument("--optimizer", required=True, metavar="NAME",
                   help="a hand-designed optimizer (adam, or with options adam:lr=3e-3), a "
                   "shipped pretrained name or a meta-training run directory (`learnopt "
                   "optimizers`)")
    t.add_argument("--lr", type=float, default=None,
                   help="learning rate of a hand-designed optimizer (default: per optimizer)")
    t.add_argument("--steps", type=int, required=True, help="training steps")
    t.add_argument("--seed", type=int, default=0, help="seed of the initial parameters and "
                   "batches (0)")
    t.add_argument("--out", default=None, help="output directory (default runs/train/...)")
    t.add_argument(
        "--augment",
        default=None,
        metavar="FIELD=VALUE,...",
        help="wrap the task in augmentations, e.g. delay=1 or bf16=true,batch_fraction=0.5 "
        "(fields of learnopt.tasks.augment.AugmentationConfig)",
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(fn=_cmd_train)


def _add_meta_eval(sub) -> None:
    me = sub.add_parser("meta-eval", help="a run's held-out meta-loss: its thetas train fresh "
                        "draws of its task distribution")
    me.add_argument("--run", required=True, help="a meta-training run directory")
    me.add_argument("--draws", type=int, default=8, help="held-out tasks drawn (8)")
    me.add_argument("--steps", type=int, default=500, help="inner steps per task (500)")
    me.set_defaults(fn=_cmd_meta_eval)


def _add_meta_train(sub) -> None:
    mt = sub.add_parser("meta-train", help="meta-train a learned optimizer (resumable)")
    _add_meta_args(mt, outer_steps=100_000, max_seconds=None)
    mt.add_argument("--out", required=True, help="run directory (resumes if it has a checkpoint)")
    mt.add_argument("--no-progress", action="store_true", help="no progress bar")
    mt.add_argument("--workers", type=int, default=0,
                    help="meta-gradients from N Ray workers (an embedded local Ray unless "
                    "--ray-address); 0: this process (default)")
    mt.add_argument("--ray-address", default=None,
                    help="join the Ray cluster at this address (docs/distributed.md)")
    mt.set_defaults(fn=_cmd_meta_train)


def _add_evaluate(sub) -> None:
    ev = sub.add_parser("evaluate", help="a learned optimizer vs LR-tuned Adam (and NAdamW)")
    ev.add_argument("--run", default=None, metavar="DIR",
                    help="a meta-training run directory (or give --pretrained)")
    ev.add_argument("--pretrained", default=None, metavar="NAME",
                    help="a shipped pretrained name from `learnopt optimizers` (or give --run)")
    ev.add_argument("--task", action="append", metavar="NAME",
                    help="a task from `learnopt tasks` (repeatable; default: the task the "
                    "optimizer was meta-trained on)")
    ev.add_argument("--seeds", type=int, default=5, help="seeds per optimizer (5)")
    ev.add_argument("--steps", type=int, default=2000, help="training steps per run (2000)")
    ev.add_argument("--nadamw-trials", type=int, default=0,
                    help="random-search trials of NAdamW; 0: no NAdamW (0)")
    ev.add_argument("--out", default="runs/evaluate",
                    help="output directory, one subdirectory per task (runs/evaluate)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.set_defaults(fn=_cmd_evaluate)


def _add_bench(sub) -> None:
    b = sub.add_parser("bench", help="optimizers against LR-tuned Adam and other tuned "
                       "baselines on a task suite: speedups (VeLO §4.1), report and plots")
    b.add_argument("--optimizer", action="append", required=True, metavar="NAME",
                   help="an optimizer under test (repeatable): a shipped pretrained name, a "
                   "meta-training run directory, or a hand-designed optimizer with options, "
                   "e.g. adam:lr=3e-3")
    b.add_argument("--suite", choices=("quick", "full"), default="quick",
                   help="the task suite (docs/benchmark.md): quick (~6 tasks) or full")
    b.add_argument("--task", action="append", default=None,
                   help="only these tasks of the suite (repeatable)")
    b.add_argument("--seeds", type=int, default=2, help="seeds per configuration (2)")
    b.add_argument("--baselines", default="sgdm,adamw,nadamw",
                   help="tuned baselines besides Adam, comma-separated from sgdm, adamw, "
                   "nadamw ('' for Adam only); default all")
    b.add_argument("--nadamw-trials", type=int, default=8,
                   help="random-search trials of NAdamW (8)")
    b.add_argument("--baseline-factor", type=float, default=3.0,
                   help="LR-tuned Adam runs this many times the step budget: the largest "
                   "measurable speedup (3)")
    b.add_argument("--cache", default=None,
                   help="baseline cache directory (default $LEARNOPT_BENCH_CACHE or "
                   "~/.cache/learnopt/bench)")
    b.add_argument("--out", default="runs/bench", help="report directory (runs/bench)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(fn=_cmd_bench)


def _add_time_model(sub) -> None:
    tm = sub.add_parser("time-model", help="time sampled tasks on this machine and fit the "
                        "step-time model of the budgeted sampler (VeLO, App. C.4)")
    tm.add_argument("--families", nargs="*", default=None,
                    help="VeLO families to time, e.g. mlp conv (default: all nine)")
    tm.add_argument("--samples", type=int, default=5, help="sampled tasks timed per family (5)")
    tm.add_argument("--size", default="cpu", choices=["cpu", "paper", "tiny"],
                    help="the families' size ranges: cpu (default), paper or tiny")
    tm.add_argument("--seed", type=int, default=0, help="seed of the sampled tasks (0)")
    tm.add_argument("--out", default="time_model.json",
                    help="the model file written (time_model.json)")
    tm.set_defaults(fn=_cmd_time_model)


def _add_main(sub) -> None:
    m = sub.add_parser("main", help="the main job: a short meta-training demo, then the quick "
                       "benchmark suite for the shipped general optimizer vs tuned Adam")
    _add_meta_args(m, outer_steps=100_000, max_seconds=180.0)
    m.add_argument("--optimizer", default=None,
                   help=f"the optimizer benchmarked beside the demo (default {MAIN_OPTIMIZER})")
    m.add_argument("--suite", choices=("quick", "full"), default="quick",
                   help="the benchmark suite (quick)")
    m.add_argument("--seeds", type=int, default=2, help="seeds per configuration (2)")
    m.add_argument("--out", default="runs/main",
                   help="output directory: meta/, bench/ and report.md (runs/main)")
    m.add_argument("--no-progress", action="store_true", help="no progress bars")
    m.set_defaults(fn=_cmd_main)


#: The subcommands in ``learnopt --help`` order: each adds its parser (with ``fn``, the
#: function that runs it) to the subparsers. A new command is one more entry.
def _add_pbt(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "pbt", help="a population of learned optimizers that train each other, guided by "
        "population-based training (Metz et al. 2021, arXiv:2101.07367); resumable")
    p.add_argument("--config", default=None,
                   help="the population's TOML file (configs/pbt_*.toml) or a run's "
                   "config.json; default: OUT/config.json of a run to resume")
    p.add_argument("--out", required=True,
                   help="run directory (resumes from its checkpoint if it has one)")
    p.add_argument("--workers", type=int, default=None,
                   help="Ray actors hosting the members (dealt round-robin; an embedded local "
                   "Ray unless --ray-address); 0: every member in this process; default: "
                   "min(population, CPU count)")
    p.add_argument("--ray-address", default=None,
                   help="join the Ray cluster at this address instead of starting one")
    p.add_argument("--outer-steps", type=int, default=None,
                   help="outer steps of the population (overrides the config's outer_steps)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="wall-clock budget in seconds, compiles included, summed over resumes "
                   "(overrides the config's max_seconds)")
    p.add_argument("--eval-only", action="store_true",
                   help="do not train: evaluate the run's kept thetas (Fig. 2) and plot")
    p.add_argument("--no-eval", action="store_true",
                   help="skip the evaluation after training")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=_cmd_pbt)
    return p


def _pbt_config(args):
    from learnopt.meta.pbt_config import PBTConfig

    out = Path(args.out)
    source = args.config
    if source is None:
        if not (out / "config.json").is_file():
            raise ValueError(f"give --config FILE (there is no {out / 'config.json'} to "
                             "resume)")
        source = out / "config.json"
    config = PBTConfig.from_file(source)
    changes = {}
    if args.outer_steps is not None:
        changes["outer_steps"] = args.outer_steps
    if args.max_seconds is not None:
        changes["max_seconds"] = args.max_seconds
    if changes:
        config = PBTConfig.from_dict({**config.to_dict(), **changes})
    return config


def _cmd_pbt(args) -> int:
    """``learnopt pbt`` (:mod:`learnopt.meta.pbt`): bad input raises before anything is
    written."""
    import numpy as np

    from learnopt.meta.pbt import PopulationRun, evaluate_run
    from learnopt.meta.pbt_workers import LocalHosts, RayHosts

    if args.eval_only:
        result = evaluate_run(args.out, progress=not args.no_progress)
        _print_pbt_eval(result, args.out)
        return 0
    if args.workers is not None and args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    if args.ray_address and args.workers == 0:
        raise ValueError("--ray-address needs Ray workers (--workers N with N >= 1)")
    config = _pbt_config(args)
    run = PopulationRun(config, args.out)  # checks the directory; writes nothing
    workers = args.workers
    if workers is None:
        workers = min(config.population, os.cpu_count() or 1)
    hosts = LocalHosts(config) if workers == 0 else RayHosts(config, workers, args.ray_address)
    try:
        pop = run.run(hosts, progress=not args.no_progress)
    finally:
        hosts.close()
    best = int(np.argmin([_pbt_last_loss(Path(args.out), m) for m in range(config.population)]))
    print(f"population at outer step {pop.step} ({pop.num_events} events, "
          f"{pop.seconds:.0f} s); member {best} has the lowest last meta-loss")
    done = pop.step >= config.outer_steps or (
        config.max_seconds is not None and pop.seconds >= config.max_seconds)
    if done and config.final_eval and not args.no_eval:
        result = evaluate_run(args.out, progress=not args.no_progress)
        _print_pbt_eval(result, args.out)
    print(f"wrote {args.out}/checkpoint.msgpack, metrics.jsonl, events.jsonl")
    return 0


def _pbt_last_loss(run_dir: Path, member: int) -> float:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    if not lines:
        return float("inf")
    value = json.loads(lines[-1])["members"][member]["meta_loss"]
    return float("inf") if value is None else float(value)


def _print_pbt_eval(result: dict, out: str) -> None:
    print(f"evaluation ({len(result['tasks'])} tasks x {result['num_steps']} steps, mean "
          f"normalised training loss; lower is better):")
    for step, best in zip(result["steps"], result["population_best"], strict=True):
        print(f"  outer step {step:>7}: population best {best}")
    print(f"  Adam, best single LR ({result['adam_best_fixed_lr_value']:.0e}): "
          f"{result['adam_best_fixed_lr']}")
    print(f"  Adam, LR tuned per task: {result['adam_per_task_tuned']}")
    print(f"wrote {out}/eval.json, {out}/eval.png")


COMMANDS = [
    _add_tasks,
    _add_optimizers,
    _add_data,
    _add_train,
    _add_meta_eval,
    _add_meta_train,
    _add_evaluate,
    _add_bench,
    _add_time_model,
    _add_main,
    _add_pbt,
]


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="learnopt", description="Learned optimizers in JAX.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in COMMANDS:
        add(sub)
    return p


def _add_meta_args(p: argparse.ArgumentParser, outer_steps: int, max_seconds: float | None):
    """Flags of the MetaTrainConfig fields. Each defaults to None ("not given"): the config
    is the run's saved one (or ``--config``, or the defaults shown) with given flags
    overriding it; see :func:`_meta_config`."""
    from learnopt.meta.estimators.registry import ESTIMATORS

    p.set_defaults(meta_defaults={"outer_steps": outer_steps, "max_seconds": max_seconds})
    p.add_argument("--config", default=None,
                   help="a run file to start from: configs/*.toml or a run's config.json")
    p.add_argument("--task", help="a name from `learnopt tasks` (default fmnist_mlp_8x8)")
    p.add_argument("--lopt", help="a learned architecture from `learnopt optimizers` "
                   "(default small_fc_lopt)")
    p.add_argument("--lopt-config", help="its hyperparameters as JSON, e.g. '{\"hidden_size\": 8}'")
    p.add_argument("--estimator", choices=list(ESTIMATORS), help="gradient estimator (pes)")
    p.add_argument("--estimator-options", help="its options as JSON, e.g. '{\"std\": 0.02}'")
    p.add_argument("--std", type=float, help="perturbation std of pes/truncated_es (0.01)")
    p.add_argument("--num-tasks", type=int, help="inner runs per task (8)")
    p.add_argument("--task-slots", type=int,
                   help="different tasks per outer step, drawn from the config's [tasks] (1)")
    p.add_argument("--horizon", type=int, help="inner training length (2000)")
    p.add_argument("--trunc-length", type=int, help="truncation length (20)")
    p.add_argument("--outer-lr", type=float, help="outer Adam learning rate (3e-4)")
    p.add_argument("--outer-steps", type=int, help=f"outer steps ({outer_steps})")
    p.add_argument("--max-seconds", type=float,
                   help="time budget in seconds of training, not counting compile time (the "
                   f"first call of each compiled program) ({max_seconds})")
    p.add_argument("--checkpoint-every", type=int, help="outer steps between checkpoints (100)")
    p.add_argument("--keep-checkpoints", type=int,
                   help="keep the last N checkpoints as OUT/checkpoint_<step>.msgpack; a "
                   "resume falls back along them past a corrupt one (3)")
    p.add_argument("--max-nonfinite-steps", type=int,
                   help="stop (checkpointed, exit code 3) after N consecutive outer steps "
                   "whose meta-gradient was not finite; 0: never stop (20)")
    p.add_argument("--keep-theta-every", type=int,
                   help="keep a copy of theta every N outer steps under OUT/thetas/ (off)")
    p.add_argument("--seed", type=int, help="seed (0)")
    p.add_argument("--meta-loss-split", help="split of the meta-objective's loss (train)")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Run a command. Bad input (a usage error, ``ValueError``, ``OSError`` such as a missing
    or unwritable file) is one line ``learnopt: error: ...`` and exit code 2; an error that
    carries an ``exit_code`` (a diverged meta-training run: 3) one such line and that code;
    an interrupt (Ctrl-C, SIGTERM during meta-training) one line and 128 + the signal
    number. learnopt's own warnings are one line ``learnopt: warning: ...``. No traceback
    in any of these cases; docs/errors.md lists every bad input tried."""
    import warnings

    from learnopt.compilation import enable_persistent_cache

    args = build_parser().parse_args(argv)
    enable_persistent_cache()
    show = warnings.showwarning

    def one_line(message, category, filename, lineno, file=None, line=None):
        if category.__module__.startswith("learnopt."):
            print(f"learnopt: warning: {message}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.showwarning = one_line
        try:
            return args.fn(args)
        except (ValueError, OSError) as e:  # bad input, file-system faults
            print(f"learnopt: error: {_one_line(e)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as e:
            print(f"learnopt: {str(e) or 'interrupted'}", file=sys.stderr)
            return getattr(e, "exit_code", 130)
        except Exception as e:
            code = getattr(e, "exit_code", None)
            if not isinstance(code, int):
                raise
            print(f"learnopt: error: {e}", file=sys.stderr)
            return code


if __name__ == "__main__":
    sys.exit(main())
