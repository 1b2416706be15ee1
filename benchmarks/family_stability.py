"""Does an optimizer stay stable on fresh draws of every task family?

A shipped optimizer must not diverge: on every draw, its training loss stays finite and ends
below where it started. For each registered family (``learnopt tasks --families``), this
script draws ``--draws`` tasks (seeded, so another run draws the same ones), trains each for
``--steps`` steps with every ``--optimizer`` from the same initial parameters and batches
(:func:`learnopt.bench.curves.loss_curves`, one seed), and records per draw: whether every loss
was finite, the first loss, the final loss (EMA-smoothed, as the bench's speedup uses) and
whether it ended below the first. A draw whose loss is already non-finite at its initial
parameters (the same for every optimizer: same initialisation, same first batch) cannot be
trained by any optimizer; it is counted apart (``invalid_draws``), not as an optimizer's
failure. TaskSet's sampled initialisations produce a few: a vanilla RNN whose recurrent
weights are drawn with standard deviation ~4 overflows within one sequence.

Usage: ``python benchmarks/family_stability.py --optimizer small_fc_lopt_general
--optimizer adam --draws 5 --steps 300 [--families velo_mlp ...]
[--out benchmarks/results/family_stability.json]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from learnopt.bench.curves import loss_curves
from learnopt.bench.speedup import final_loss
from learnopt.io import atomic_write_json, machine_info
from learnopt.resolve import resolve_optimizer
from learnopt.tasks.families.registry import FAMILIES, get_family

ROOT = Path(__file__).resolve().parent


def one_draw(family, key, optimizers, steps: int) -> dict:
    config = family.sample(key)
    task = family.task(config)
    row = {"task": task.name, "optimizers": {}}
    for opt in optimizers:
        curves, _ = loss_curves(task, lambda _, o=opt: o.make(steps), jnp.zeros((1,)), [0], steps)
        curve = np.asarray(curves, np.float64)[0, 0]
        finite = bool(np.all(np.isfinite(curve)))
        final = final_loss(curve[None])
        row["optimizers"][opt.label] = {
            "finite": finite,
            "first_loss": float(curve[0]),
            "final_loss": final if np.isfinite(final) else None,
            "ends_below_start": bool(finite and final < curve[0]),
        }
    return row


def _finite_at_init(row: dict) -> bool:
    """The draw's loss at its initial parameters is finite (NaN / None: it is not)."""
    firsts = [o["first_loss"] for o in row["optimizers"].values()]
    return all(f is not None and np.isfinite(f) for f in firsts)


def summarize(optimizer_labels, rows: dict) -> dict:
    """Per optimizer: draws, non-finite runs, runs not ending below their start and the
    families with a failure, over the draws that are trainable at initialisation."""
    summary = {}
    invalid = [r["task"] for rs in rows.values() for r in rs
               if "optimizers" in r and not _finite_at_init(r)]
    for label in optimizer_labels:
        done = [r["optimizers"][label] for rs in rows.values() for r in rs
                if "optimizers" in r and _finite_at_init(r)]
        summary[label] = {
            "draws": len(done),
            "nonfinite": sum(not d["finite"] for d in done),
            "not_below_start": sum(not d["ends_below_start"] for d in done),
            "families_with_a_failure": sorted(
                name for name, rs in rows.items()
                if any("optimizers" in r and _finite_at_init(r)
                       and not r["optimizers"][label]["ends_below_start"] for r in rs)),
        }
    summary["invalid_draws"] = {"count": len(invalid), "tasks": invalid,
                                "why": "loss non-finite at the initial parameters"}
    return summary


def _result(args, optimizers, rows: dict, seconds: float) -> dict:
    summary = summarize([opt.label for opt in optimizers], rows)
    return {
        "what": "training loss finite and ending below its start on fresh family draws",
        "command": "python benchmarks/family_stability.py " + " ".join(sys.argv[1:]),
        "draws_per_family": args.draws,
        "steps": args.steps,
        "families_done": len(rows),
        "seconds": seconds,
        "machine": machine_info(),
        "summary": summary,
        "families": rows,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizer", action="append", required=True)
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--families", nargs="*", default=list(FAMILIES))
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "family_stability.json")
    args = parser.parse_args(argv)
    optimizers = [resolve_optimizer(o) for o in args.optimizer]
    start = time.perf_counter()
    rows: dict[str, list] = {}
    bar = tqdm(total=len(args.families) * args.draws, desc="draws", unit="task")
    for name in args.families:
        family = get_family(name)
        rows[name] = []
        for i in range(args.draws):
            key = jax.random.fold_in(jax.random.PRNGKey(args.seed), i)
            bar.set_postfix_str(name)
            try:
                rows[name].append(one_draw(family, key, optimizers, args.steps))
            except Exception as e:  # a draw that cannot be built or trained is reported
                rows[name].append({"error": f"{type(e).__name__}: {e}"})
            bar.update(1)
        result = _result(args, optimizers, rows, time.perf_counter() - start)
        atomic_write_json(args.out, result)  # after every family: a cut-short run keeps them
    bar.close()
    for label, s in result["summary"].items():
        if label == "invalid_draws":
            print(f"{s['count']} draws non-finite at initialisation: {', '.join(s['tasks'])}")
            continue
        print(f"{label}: {s['draws']} draws, {s['nonfinite']} non-finite, "
              f"{s['not_below_start']} not below start ({', '.join(s['families_with_a_failure'])})")
    return result


if __name__ == "__main__":
    main()
