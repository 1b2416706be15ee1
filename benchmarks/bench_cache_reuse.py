"""A second `learnopt bench` run against the first: what the baseline cache and the persistent
compile cache save.

The same command runs three times, each in a fresh process, with a baseline cache (``--cache``)
and a compile cache (``LEARNOPT_COMPILE_CACHE``) that start empty:

1. ``first``: nothing cached (the repository's committed baseline cache is hidden from it);
   it runs every baseline and fills both caches;
2. ``baselines_cached``: every baseline read from the cache, compile cache turned off (the
   optimizer under test is run and compiled again, as it must be: it is what is measured);
3. ``both_cached``: baselines from the cache and compiled programs from the compile cache.

Each run's wall seconds, cache hits and misses and its aggregate table are recorded; the
aggregates must be equal (a cached baseline is the run it replaces). The machine and its load
are recorded too: runs share the machine with whatever else runs, so the ratios, not the
seconds, are the result.

Usage: ``python benchmarks/bench_cache_reuse.py [--suite quick] [--optimizer NAME] [--seeds 2]``;
writes ``benchmarks/results/bench_quick/cache_reuse.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from learnopt.io import atomic_write_json, machine_info

HIDE_REPOSITORY_CACHE = (
    "import sys, pathlib, learnopt.bench.run as r, learnopt.cli as c; "
    "r.REPOSITORY_CACHE = pathlib.Path('/nonexistent'); sys.exit(c.main(sys.argv[1:]))"
)
RUNS = (("first", True), ("baselines_cached", False), ("both_cached", True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", default="quick", choices=("quick", "full"))
    p.add_argument("--optimizer", default="small_fc_lopt_general")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/bench_quick/cache_reuse.json")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="learnopt-bench-reuse-"))
    # The repository's committed baseline cache is hidden, so the first run computes them all.
    learnopt = [sys.executable, "-c", HIDE_REPOSITORY_CACHE]
    result: dict = {"what": __doc__.split("\n\n")[0], "machine": machine_info(),
                    "load_average_before": [round(x, 2) for x in os.getloadavg()], "runs": {}}
    for name, compile_cache in RUNS:
        command = [*learnopt, "bench", "--suite", args.suite, "--optimizer", args.optimizer,
                   "--seeds", str(args.seeds), "--baselines", "", "--cache", str(work / "cache"),
                   "--no-progress", "--out", str(work / name)]
        env = dict(os.environ, LEARNOPT_COMPILE_CACHE=str(work / "xla") if compile_cache else "0")
        start = time.perf_counter()
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
        report = json.loads((work / name / "results.json").read_text())
        result["runs"][name] = {"seconds": round(seconds, 1), "cache": report["cache"],
                                "compile_cache": compile_cache,
                                "aggregate": report["aggregate"]}
        print(name, round(seconds, 1), report["cache"], flush=True)
    runs = result["runs"]
    first = runs["first"]["seconds"]
    result["ratio_baselines_cached"] = runs["baselines_cached"]["seconds"] / first
    result["ratio_both_cached"] = runs["both_cached"]["seconds"] / first
    result["same_aggregate"] = all(r["aggregate"] == runs["first"]["aggregate"]
                                   for r in runs.values())
    result["command"] = " ".join(["learnopt", *command[3:]]).replace(str(work), "TMP")
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    atomic_write_json(Path(args.out), result)
    print(json.dumps({k: v for k, v in result.items() if k.startswith(("ratio", "same"))}))


if __name__ == "__main__":
    main()
