"""``python -m learnopt.distributed``: meta-train with a learner here and N Ray workers.

Writes to ``--out``: ``config.json`` (the MetaTrainConfig), ``learner.json`` (the
LearnerConfig), ``metrics.jsonl`` (one line per gradient received) and ``theta.msgpack`` (a
``learnopt.io`` checkpoint of the final theta, as ``MetaTrainer`` writes it). No resume:
workers hold their inner runs in memory. See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from learnopt.distributed.loop import run_learner
from learnopt.distributed.ray_backend import RayMetaGradients
from learnopt.distributed.worker import initial_theta
from learnopt.io import atomic_write_json, save_checkpoint
from learnopt.meta.learner import Learner, LearnerConfig
from learnopt.meta.train import MetaTrainConfig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m learnopt.distributed", description=__doc__)
    p.add_argument("--config", help="a MetaTrainConfig JSON file (default: the defaults)")
    p.add_argument("--learner", help="a LearnerConfig JSON file (default: the config's "
                   "outer_lr and clip, max_staleness 5)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, help="outer updates to apply (default: outer_steps)")
    p.add_argument("--out", required=True)
    p.add_argument("--ray-address", help="join this Ray cluster (e.g. auto, HEAD_IP:6379); "
                   "default: start a local Ray with --workers CPUs")
    args = p.parse_args(argv)
    config = (MetaTrainConfig.from_json(Path(args.config).read_text()) if args.config
              else MetaTrainConfig())
    if args.learner:
        learner_config = LearnerConfig.from_dict(json.loads(Path(args.learner).read_text()))
    else:
        learner_config = LearnerConfig(learning_rate=config.outer_lr, clip=config.clip)
    learner = Learner.from_config(learner_config)
    out = Path(args.out)
    atomic_write_json(out / "config.json", config.to_dict())
    atomic_write_json(out / "learner.json", learner_config.to_dict())
    steps = args.steps if args.steps is not None else config.outer_steps
    with open(out / "metrics.jsonl", "w", buffering=1) as log, RayMetaGradients(
        config, args.workers, address=args.ray_address
    ) as grads:
        state, _ = run_learner(grads, learner, learner.init(initial_theta(config)), steps,
                               on_record=lambda r: log.write(json.dumps(r) + "\n"))
    save_checkpoint(out / "theta.msgpack", state.theta, config.to_dict())
    print(f"{int(state.step)} updates applied, {int(state.num_stale)} stale and "
          f"{int(state.num_dropped)} non-finite gradients dropped; theta in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
