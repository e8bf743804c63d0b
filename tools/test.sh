#!/usr/bin/env bash
# The whole test suite, as CI runs it: install the dev extras into an isolated virtual environment, check that
# notebooks and package agree, run the notebook lessons and pytest, build the offline docs site and check it.
# Usage: bash tools/test.sh        (FSMIS_VENV=path to use another virtual environment; default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FSMIS_VENV:-.venv}"
step() { printf '\n=== %s (%s) ===\n' "$1" "$(date +%H:%M:%S)"; }

step "install into $VENV"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[dev]"
export PATH="$PWD/$VENV/bin:$PATH" MPLBACKEND=Agg PYTHONHASHSEED=0

step "notebooks, package and README in sync (nbdev-clean, nbdev-export, tools/readme.py change nothing)"
before=$(git status --porcelain)
nbdev-clean
nbdev-export
python tools/readme.py
after=$(git status --porcelain)
if [ "$before" != "$after" ]; then
  echo "nbdev-clean / nbdev-export / tools/readme.py changed files; run them and commit the result:"; diff <(echo "$before") <(echo "$after") || true
  exit 1
fi

step "notebook lessons (nbdev-test; slow, cuda and data cells skipped)"
nbdev-test --n-workers 2 --timing

step "docs site (tools/build_docs.py: Sphinx + MyST-NB + Furo -> _site/, checked by tests/test_docs.py in headless chromium)"
if ! command -v chromium >/dev/null 2>&1; then
  echo "installing chromium (apt-get) for the docs screenshots"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null &&
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } ||
    echo "warning: could not install chromium: the browser checks in tests/test_docs.py skip (and fail when CI is set)"
fi
python tools/build_docs.py
export FSMIS_DOCS_SITE="$PWD/_site"

step "pytest"
python -m pytest -n 2 -q -p no:cacheprovider tests

step "done"
