"""The README's shell blocks and the files it names (its ```python blocks run in
tests/test_readme.py).

Every command line of every non-Python code block (and every inline ``learnopt ...`` span)
is parsed by the command line's own argparse tree; then, by the kind of command:

* run as written: ``learnopt data``, ``tasks``, ``tasks --families``, ``optimizers``
  (through ``.venv/bin/learnopt`` where the virtual environment exists, else in-process);
* run with tiny arguments (the README's flags kept, a few changed or appended, the output
  under a temporary directory): ``learnopt train`` (5 steps), ``learnopt evaluate`` (1 seed,
  5 steps) and the quick ``learnopt bench`` (one task, Adam only from the committed
  baseline cache);
* parsed and checked without running (they take minutes to hours): ``make run`` and ``make
  test`` (the Makefile targets exist and call ``learnopt main`` and pytest), ``learnopt
  main``, ``learnopt bench --suite full`` (each ``--optimizer`` resolves, except the run
  directory the user makes first), ``learnopt meta-train`` (its ``--config`` loads and the
  run is accepted by the trainer's checks, which write nothing), ``learnopt meta-eval`` and
  ``learnopt time-model``.

Every path the README names (links, inline code, commands) is inside the repository:
relative, without ``..``, and existing, except what commands write (``runs/...``,
``curves/``, ``time_model.json``), the virtual environment ``.venv`` that set-up makes and the data
directory under ``~/.cache``.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from learnopt.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = [(lang, body) for lang, body in re.findall(r"```(\w*)\n(.*?)```", README, re.S)
          if lang != "python"]
RUN = {"data", "tasks", "optimizers"}
TINY = {"train", "bench", "evaluate"}
PARSED = {"main", "meta-train", "meta-eval", "time-model"}


def _lines(body: str) -> list[str]:
    """Command lines of a shell block: continuations joined, prompts and comments dropped."""
    body = body.replace("\\\n", " ")
    lines = []
    for line in body.splitlines():
        line = line.strip().removeprefix("$ ")
        if line.startswith("#"):
            continue
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line:
            lines.append(line)
    return lines


COMMANDS = [line for _, body in BLOCKS for line in _lines(body)]
INLINE = sorted({m for m in re.findall(r"`((?:\.venv/bin/)?learnopt [^`]+)`", README)
                 if not re.search(r"\b[A-Z]{2,}\b", m)})  # not `learnopt COMMAND --help`
LEARNOPT = [c for c in COMMANDS if shlex.split(c)[0].endswith("learnopt")]


def _argv(command: str) -> list[str]:
    words = shlex.split(command)
    assert words[0] in ("learnopt", ".venv/bin/learnopt"), command
    return words[1:]


def test_the_readme_starts_with_its_two_commands_and_make_defines_them():
    first = _lines(BLOCKS[0][1])
    assert first == ["make run", "make test"] and README.startswith("```\nmake run")
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^run: setup\n\t\$\(BIN\)/learnopt main$", makefile, re.M)
    assert re.search(r"^test: setup\n\t\$\(BIN\)/python -m pytest", makefile, re.M)
    assert re.search(r"^setup:\n\tbash scripts/setup.sh$", makefile, re.M)
    assert (ROOT / "scripts" / "setup.sh").is_file()
    build_parser().parse_args(["main"])  # what `make run` runs


def test_every_command_is_a_make_target_or_a_learnopt_command_that_parses():
    assert len(LEARNOPT) >= 10
    for command in COMMANDS:
        if command.startswith("make "):
            continue
        args = build_parser().parse_args(_argv(command))
        assert args.command in RUN | TINY | PARSED, command
    for command in INLINE:  # `learnopt time-model --out time_model.json` and the like
        build_parser().parse_args(_argv(command))


@pytest.mark.parametrize("command", [c for c in LEARNOPT if _argv(c)[0] in RUN])
def test_listing_commands_run_as_written(command, capsys):
    entry = ROOT / ".venv" / "bin" / "learnopt"
    if command.startswith(".venv/bin/") and entry.exists():
        done = subprocess.run(shlex.split(command), cwd=ROOT, capture_output=True, text=True,
                              timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        assert done.returncode == 0, done.stderr
        out = done.stdout
    else:
        assert main(_argv(command)) == 0
        out = capsys.readouterr().out
    assert len(out.splitlines()) >= 3


def _tiny(argv: list[str], flag: str, value: str) -> list[str]:
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


@pytest.mark.parametrize("command", [c for c in LEARNOPT if _argv(c)[0] == "train"])
def test_train_runs_with_tiny_arguments(command, tmp_path, capsys):
    import json

    argv = _tiny(_argv(command), "--steps", "5")
    assert main([*argv, "--out", str(tmp_path / "train"), "--no-progress"]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "train" / "summary.json").read_text())["steps"] == 5


def test_evaluate_runs_with_tiny_arguments(tmp_path, capsys):
    [command] = [c for c in LEARNOPT if _argv(c)[0] == "evaluate"]
    argv = _tiny(_tiny(_argv(command), "--steps", "5"), "--seeds", "1")
    assert main([*argv, "--out", str(tmp_path / "ev"), "--no-progress"]) == 0
    assert "adam" in capsys.readouterr().out
    assert len(list((tmp_path / "ev").glob("*/results.json"))) == 1


def test_the_quick_bench_runs_on_one_task(tmp_path, capsys):
    [command] = [c for c in LEARNOPT if _argv(c)[0] == "bench" and "--suite" not in c]
    argv = [*_argv(command), "--task", "Synthetic_Rosenbrock_d10", "--baselines", "",
            "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "bench"),
            "--no-progress"]
    assert main(argv) == 0
    capsys.readouterr()
    assert (tmp_path / "bench" / "report.md").is_file()


def test_long_commands_are_accepted_without_running(tmp_path, monkeypatch):
    """The full benchmark, meta-training and held-out evaluation: their inputs checked."""
    from learnopt.cli import _meta_config
    from learnopt.meta.train import MetaTrainer
    from learnopt.resolve import resolve_optimizer

    checked = set()
    for command in LEARNOPT:
        argv = _argv(command)
        args = build_parser().parse_args(argv)
        if args.command == "bench":
            for spec in args.optimizer:
                if not spec.startswith("runs/"):  # a run the user meta-trains first
                    resolve_optimizer(spec)
            checked.add("bench")
        elif args.command == "meta-train":
            assert (ROOT / args.config).is_file()
            monkeypatch.chdir(ROOT)
            out = tmp_path / Path(args.out).name
            MetaTrainer(_meta_config(args, out), out)  # its checks; writes nothing
            assert not out.exists()
            checked.add("meta-train")
        elif args.command == "meta-eval":
            assert args.run.startswith("runs/") and args.draws >= 1 and args.steps >= 1
            checked.add("meta-eval")
    assert checked == {"bench", "meta-train", "meta-eval"}


# --- paths -----------------------------------------------------------------------------------

OUTPUTS = ("runs/", "curves/", ".venv/", "~/", "$LEARNOPT_DATA_DIR", "time_model.json")
PATHLIKE = re.compile(r"^[\w.$~<>*-]+(?:/[\w.$~<>*-]*)+$")


def _named_paths() -> list[str]:
    links = re.findall(r"\]\(([^)\s]+)\)", README)
    spans = re.findall(r"`([^`\n]+)`", README)
    words = [w for command in COMMANDS for w in shlex.split(command)]
    found = links + [s for s in spans if PATHLIKE.match(s)] + [w for w in words
                                                              if PATHLIKE.match(w)]
    return sorted(set(found))


def _exists(path: str) -> bool:
    path = path.split("#")[0].rstrip("/")
    for base in (ROOT, ROOT / "src" / "learnopt"):  # module paths as `meta/sources.py`
        if any(base.glob(path)) if "*" in path else (base / path).exists():
            return True
    return False


def test_the_readme_names_only_files_in_the_repository():
    paths = _named_paths()
    assert "docs/errors.md" in paths and "configs/cpu_mixture.toml" in paths
    for link in re.findall(r"\]\(([^)\s]+)\)", README):
        assert not re.match(r"^(/|\.\.|[a-z]+:)", link), f"a link out of the repository: {link}"
    for path in paths:
        assert ".." not in path.split("/") and not path.startswith("/"), path
        if path.startswith(OUTPUTS) or "<" in path:
            continue
        assert _exists(path), f"README names {path}, which is not in the repository"
