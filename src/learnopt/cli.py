"""The ``learnopt`` command line.

learnopt train --task fmnist_mlp_28x28 --optimizer adam --lr 1e-3 --steps 2000
learnopt tasks | optimizers | data
learnopt main            # the README's main job on its built-in default
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_tasks(args) -> int:
    from learnopt.tasks.registry import list_tasks

    entries = list_tasks()
    width = max(len(e.name) for e in entries)
    for e in entries:
        print(f"{e.name:<{width}}  {e.description}")
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
    from learnopt.tasks.registry import get_task
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


def _cmd_main(args) -> int:
    out = Path(args.out)
    summary = run_training("fmnist_mlp_28x28", "adam", 1e-3, args.steps, 0, out)
    print(json.dumps(summary, indent=2))
    print(f"report: {out}/loss.png ({out}/summary.json, {out}/metrics.jsonl)")
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

    m = sub.add_parser("main", help="the main job on its built-in default")
    m.add_argument("--out", default="runs/main")
    m.add_argument("--steps", type=int, default=2000)
    m.set_defaults(fn=_cmd_main)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"learnopt: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
