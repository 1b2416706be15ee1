"""Two population runs side by side: training meta-loss and the Fig. 2 evaluation.

Metz et al. 2021, "Training Learned Optimizers with Randomly Initialized Learned Optimizers"
(arXiv:2101.07367, Fig. 2) compares a self-training population with populations trained by
Adam. This reads two ``learnopt pbt`` run directories (their ``metrics.jsonl`` and, once the
budget is spent, ``eval.json``) and draws both on one figure:

* left: the population-best training meta-loss per outer step (mean over windows of
  ``--window`` steps; the tasks of a step differ between steps, so single steps are noisy);
* right: the population-best evaluation score of each kept theta step (the mean normalised
  training loss on the fixed evaluation pool, lower is better), with Adam at its best single
  learning rate and Adam tuned per task on the same pool.

It also writes the numbers as JSON: the windowed meta-loss, the evaluation per kept step, the
first kept step at which the self-training arm's score is at or below the other arm's, and
the number of non-finite member scores (divergences).

Usage: ``python benchmarks/pbt_compare.py RUN_A RUN_B [--labels A B] [--out PATH.png]``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from learnopt.io import atomic_write_json  # noqa: E402


def read_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    opener = open
    if not path.is_file():
        path, opener = run / "metrics.jsonl.gz", gzip.open
    with opener(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def windowed(rows: list[dict], window: int) -> tuple[list[int], list[float]]:
    """Mean population-best training meta-loss over consecutive windows of outer steps."""
    steps, values = [], []
    for start in range(0, len(rows) - window + 1, window):
        chunk = [r["best_meta_loss"] for r in rows[start:start + window]]
        chunk = [x for x in chunk if x is not None and math.isfinite(x)]
        if chunk:
            steps.append(rows[start + window - 1]["step"])
            values.append(sum(chunk) / len(chunk))
    return steps, values


def summarize(run: Path, window: int) -> dict:
    rows = read_metrics(run)
    steps, values = windowed(rows, window)
    out = {"run": str(run), "outer_steps": rows[-1]["step"] if rows else 0,
           "seconds": rows[-1].get("seconds") if rows else None,  # wall time, cumulative
           "meta_loss_window": window, "meta_loss_steps": steps, "meta_loss": values}
    eval_path = run / "eval.json"
    if eval_path.is_file():
        ev = json.loads(eval_path.read_text())
        out["eval"] = {k: ev[k] for k in ("steps", "population_best", "adam_best_fixed_lr",
                                           "adam_best_fixed_lr_value", "adam_per_task_tuned")}
        out["eval"]["nonfinite_member_scores"] = sum(
            x is None for row in ev["members"] for x in row)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs=2, type=Path)
    p.add_argument("--labels", nargs=2, default=["self-training", "Adam-outer"])
    p.add_argument("--window", type=int, default=100)
    p.add_argument("--out", type=Path, default=Path("docs/pbt_2h.png"))
    args = p.parse_args()
    arms = {label: summarize(run, args.window) for label, run in zip(args.labels, args.runs,
                                                                       strict=True)}
    a, b = (arms[label] for label in args.labels)
    if "eval" in a and "eval" in b:
        caught = [s for s, x, y in zip(a["eval"]["steps"], a["eval"]["population_best"],
                                       b["eval"]["population_best"], strict=False)
                  if x is not None and y is not None and x <= y]
        arms["first_kept_step_a_at_or_below_b"] = caught[0] if caught else None

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for label in args.labels:
        arm = arms[label]
        left.plot(arm["meta_loss_steps"], arm["meta_loss"], label=label)
        if "eval" in arm:
            right.plot(arm["eval"]["steps"], arm["eval"]["population_best"], marker="o",
                       label=f"{label}, population best")
    left.set(xlabel="outer step", ylabel=f"best training meta-loss (mean of {args.window})",
             title="training meta-loss")
    left.legend()
    ev = next((arms[label]["eval"] for label in args.labels if "eval" in arms[label]), None)
    if ev is not None:
        right.axhline(ev["adam_best_fixed_lr"], color="gray", ls="--",
                      label=f"Adam, best single lr ({ev['adam_best_fixed_lr_value']:.3g})")
        right.axhline(ev["adam_per_task_tuned"], color="black", label="Adam, lr tuned per task")
    right.set(xlabel="outer step", ylabel="mean normalised training loss (lower is better)",
              title="evaluation pool (Fig. 2)")
    if right.get_legend_handles_labels()[0]:
        right.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    atomic_write_json(args.out.with_suffix(".json"), arms)
    print(json.dumps({k: (v if not isinstance(v, dict) else
                          {kk: v[kk] for kk in ("outer_steps", "seconds")})
                      for k, v in arms.items()}))


if __name__ == "__main__":
    main()
