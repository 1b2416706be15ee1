"""The ``learnopt`` command line.

learnopt train --task fmnist_mlp_28x28 --optimizer adam --lr 1e-3 --steps 2000
learnopt tasks | optimizers | data
learnopt time-model --out time_model.json   # calibrate the budgeted sampler on this machine
learnopt main            # the README's main job on its built-in default
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_tasks(args) -> int:
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
    from learnopt.optimizers.registry import list_optimizers

    rows = list_optimizers()
    width = max(len(name) for name, _ in rows)
    for name, desc in rows:
        print(f"{name:<{width}}  {desc}")
    return 0


def _cmd_data(args) -> int:
    from learnopt.tasks.data.registry import format_table

    print(format_table())
    return 0


def run_training(
    task_name: str, optimizer: str, lr: float | None, steps: int, seed: int, out: Path
):
    """Train a named task with a named optimizer; write JSONL metrics, a PNG and a summary."""
    from learnopt.optimizers.registry import get_optimizer
    from learnopt.plotting import plot_training
    from learnopt.tasks.fixed.registry import get_task
    from learnopt.training import train

    opt = get_optimizer(optimizer, learning_rate=lr, num_steps=steps)
    task = get_task(task_name)
    out.mkdir(parents=True, exist_ok=True)
    result = train(task, opt, steps, seed=seed, log_path=out / "metrics.jsonl", desc=task_name)
    label = f"{optimizer}" + (f" lr={lr:g}" if lr is not None else "")
    plot_training(out / "loss.png", result.train_loss, result.evals, f"{task_name}: {label}")
    summary = {
        "task": task_name,
        "optimizer": optimizer,
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
    out = Path(args.out or f"runs/train/{args.task}_{args.optimizer}_s{args.seed}")
    summary = run_training(args.task, args.optimizer, args.lr, args.steps, args.seed, out)
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}/metrics.jsonl, {out}/loss.png, {out}/summary.json")
    return 0


def _meta_config(args):
    from learnopt.meta.train import MetaTrainConfig

    return MetaTrainConfig(
        task=args.task,
        lopt=args.lopt,
        estimator=args.estimator,
        num_tasks=args.num_tasks,
        horizon=args.horizon,
        trunc_length=args.trunc_length,
        std=args.std,
        outer_lr=args.outer_lr,
        outer_steps=args.outer_steps,
        max_seconds=args.max_seconds,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        meta_loss_split=args.meta_loss_split,
    )


def _cmd_meta_train(args) -> int:
    from learnopt.meta.report import plot_meta_training
    from learnopt.meta.train import MetaTrainer

    out = Path(args.out)
    MetaTrainer(_meta_config(args), out).run()
    plot_meta_training(out)
    print(f"wrote {out}/theta.msgpack, {out}/metrics.jsonl, {out}/meta_loss.png")
    return 0


def _load_lopt(run: str | None, pretrained: str | None):
    """``(lopt, theta, label, default_task)`` from a run directory or a shipped name."""
    from learnopt import pretrained as shipped
    from learnopt.learned.registry import get_learned_optimizer
    from learnopt.meta.train import MetaTrainConfig, load_theta

    if (run is None) == (pretrained is None):
        raise ValueError("give exactly one of --run DIR or --pretrained NAME")
    if pretrained is not None:
        lopt, theta, meta = shipped.load(pretrained)
        return lopt, theta, pretrained, meta.get("task")
    config = MetaTrainConfig.from_json((Path(run) / "config.json").read_text())
    lopt = get_learned_optimizer(config.lopt)
    return lopt, load_theta(run, lopt), f"{config.lopt} (meta-trained)", config.task


def _cmd_evaluate(args) -> int:
    from learnopt.bench.compare import compare_on_task

    lopt, theta, label, default_task = _load_lopt(args.run, args.pretrained)
    tasks = args.task or [default_task]
    for task_name in tasks:
        out = Path(args.out) / task_name
        _, table = compare_on_task(
            task_name, lopt, theta, label, out, args.seeds, args.steps, args.nadamw_trials
        )
        print(table.read_text())
        print(f"wrote {out}/results.json, {out}/table.md, {out}/curves.png")
    return 0


def _cmd_main(args) -> int:
    """Meta-train small_fc_lopt with PES for a bounded time, then evaluate it."""
    from learnopt.bench.compare import compare_on_task
    from learnopt.meta.report import plot_meta_training, write_main_report
    from learnopt.meta.train import MetaTrainer, load_theta

    out = Path(args.out)
    config = _meta_config(args)
    trainer = MetaTrainer(config, out / "meta")
    trainer.run()
    plot_meta_training(out / "meta")
    theta = load_theta(out / "meta", trainer.lopt)
    tables = []
    for task_name in (config.task, args.heldout_task):
        _, table = compare_on_task(
            task_name,
            trainer.lopt,
            theta,
            f"{config.lopt} (meta-trained)",
            out / "eval" / task_name,
            args.seeds,
            config.horizon,
            args.nadamw_trials,
        )
        tables.append(table)
    report = write_main_report(out, config, tables)
    print(report.read_text())
    print(f"report: {report}")
    return 0


def _cmd_time_model(args) -> int:
    import jax

    from learnopt.tasks.families import velo as F
    from learnopt.tasks import timing as T

    names = args.families or list(F.FAMILIES)
    unknown = [n for n in names if n not in F.FAMILIES]
    if unknown:
        raise ValueError(f"unknown family {unknown[0]!r}; valid families: {', '.join(F.FAMILIES)}")
    families = {n: F.make_family(n, size=args.size, data="synthetic") for n in names}
    model = T.calibrate(families, args.samples, jax.random.PRNGKey(args.seed), path=args.out,
                        log=lambda msg: print(msg, flush=True))
    info = model.info
    print(f"time model of {len(names)} families x {args.samples} tasks written to {args.out}: "
          f"fit within x2 on {info['fit_within_factor_2']:.0%} of them, "
          f"RMS log error {info['fit_rms_log_error']:.3f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="learnopt", description="Learned optimizers in JAX.")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("tasks", help="list the named fixed tasks").set_defaults(fn=_cmd_tasks)
    sub.add_parser("optimizers", help="list the optimizers").set_defaults(fn=_cmd_optimizers)
    sub.add_parser("data", help="list datasets, whether present, shapes, sources").set_defaults(
        fn=_cmd_data
    )

    t = sub.add_parser("train", help="train a task with an optimizer")
    t.add_argument("--task", required=True, help="a name from `learnopt tasks`")
    t.add_argument("--optimizer", required=True, help="a name from `learnopt optimizers`")
    t.add_argument("--lr", type=float, default=None, help="learning rate (default: per optimizer)")
    t.add_argument("--steps", type=int, required=True)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default=None, help="output directory (default runs/train/...)")
    t.set_defaults(fn=_cmd_train)

    mt = sub.add_parser("meta-train", help="meta-train a learned optimizer (resumable)")
    _add_meta_args(mt, outer_steps=100_000, max_seconds=None)
    mt.add_argument("--out", required=True, help="run directory (resumes if it has a checkpoint)")
    mt.set_defaults(fn=_cmd_meta_train)

    ev = sub.add_parser("evaluate", help="a learned optimizer vs LR-tuned Adam (and NAdamW)")
    ev.add_argument("--run", default=None, help="a meta-training run directory")
    ev.add_argument("--pretrained", default=None, help="a shipped pretrained name")
    ev.add_argument("--task", action="append", help="task(s) (default: the meta-training task)")
    ev.add_argument("--seeds", type=int, default=5)
    ev.add_argument("--steps", type=int, default=2000)
    ev.add_argument("--nadamw-trials", type=int, default=0)
    ev.add_argument("--out", default="runs/evaluate")
    ev.set_defaults(fn=_cmd_evaluate)

    tm = sub.add_parser("time-model", help="time sampled tasks on this machine and fit the "
                        "step-time model of the budgeted sampler (seed 001 C.4)")
    tm.add_argument("--families", nargs="*", default=None, help="default: all sampled families")
    tm.add_argument("--samples", type=int, default=5, help="sampled tasks timed per family")
    tm.add_argument("--size", default="cpu", choices=["cpu", "paper", "tiny"])
    tm.add_argument("--seed", type=int, default=0)
    tm.add_argument("--out", default="time_model.json")
    tm.set_defaults(fn=_cmd_time_model)

    m = sub.add_parser("main", help="the main job: meta-train small_fc_lopt, then evaluate it")
    _add_meta_args(m, outer_steps=100_000, max_seconds=600.0)
    m.add_argument("--heldout-task", default="digits_mlp_8x8")
    m.add_argument("--seeds", type=int, default=5)
    m.add_argument("--nadamw-trials", type=int, default=0)
    m.add_argument("--out", default="runs/main")
    m.set_defaults(fn=_cmd_main)
    return p


def _add_meta_args(p: argparse.ArgumentParser, outer_steps: int, max_seconds: float | None):
    p.add_argument("--task", default="fmnist_mlp_8x8")
    p.add_argument("--lopt", default="small_fc_lopt")
    p.add_argument("--estimator", default="pes", choices=["pes", "tbptt"])
    p.add_argument("--num-tasks", type=int, default=8)
    p.add_argument("--horizon", type=int, default=2000, help="inner training length")
    p.add_argument("--trunc-length", type=int, default=20)
    p.add_argument("--std", type=float, default=0.01, help="PES perturbation std")
    p.add_argument("--outer-lr", type=float, default=3e-4)
    p.add_argument("--outer-steps", type=int, default=outer_steps)
    p.add_argument("--max-seconds", type=float, default=max_seconds, help="wall-time budget")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--meta-loss-split", default="train", help="split of the meta-objective's loss")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"learnopt: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
