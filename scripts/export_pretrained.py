"""Ship a meta-training run's theta as a pretrained optimizer of the package.

    .venv/bin/python scripts/export_pretrained.py --run runs/general \
        --name small_fc_lopt_general --guard --lineage benchmarks/results/mixture_1h \
        --command "learnopt meta-train --config configs/general_small_fc_lopt.toml ..."

writes ``src/learnopt/pretrained/NAME.msgpack`` through :func:`learnopt.pretrained.export_run`:
the theta with the run's config, task distribution, estimator, outer steps, wall time, machine
and the reproducing command. ``--guard`` makes :func:`learnopt.pretrained.optimizer` wrap it in
the divergence guard (docs/stability.md); ``--lineage DIR`` (repeatable) records earlier runs
the run started from (``init_theta``): their config, outer steps, wall time and machine.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from learnopt import pretrained
from learnopt.meta.report import read_metrics


def lineage_entry(run: Path) -> dict:
    packed = run / "metrics.jsonl.gz"
    if packed.exists():  # a run archived under benchmarks/results
        last = json.loads(gzip.decompress(packed.read_bytes()).decode().splitlines()[-1])
    else:
        last = read_metrics(run)[-1]
    machine = run / "machine.json"
    return {
        "run": str(run),
        "config": json.loads((run / "config.json").read_text()),
        "outer_steps": last["step"],
        "wall_seconds": last["seconds"],
        "machine": json.loads(machine.read_text()) if machine.exists() else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, type=Path)
    parser.add_argument("--name", required=True)
    parser.add_argument("--command", required=True, help="the command that reproduces the run")
    parser.add_argument("--guard", action="store_true", help="ship with the divergence guard")
    parser.add_argument("--lineage", action="append", type=Path, default=[])
    parser.add_argument("--evaluation", type=Path, default=None,
                        help="a bench results.json whose aggregate row for the run is recorded")
    args = parser.parse_args()
    evaluation = None
    if args.evaluation is not None:
        result = json.loads(args.evaluation.read_text())
        evaluation = {"suite": result["suite"], "seeds": result["seeds"],
                      "aggregate": result["aggregate"]}
    guard = {"blowup_factor": 1.0, "shrink": 0.5} if args.guard else None
    path = pretrained.export_run(args.run, args.name, args.command, evaluation, guard=guard,
                                 lineage=[lineage_entry(r) for r in args.lineage])
    print(f"wrote {path}: {pretrained.describe(args.name)}")


if __name__ == "__main__":
    main()
