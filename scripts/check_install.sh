#!/usr/bin/env bash
# Installs mftcoder as a library would be installed next to other packages: a fresh virtual environment in a
# temporary folder, torch==2.13.0 first (the CPU build here; an unpinned torch would be the multi-GB CUDA
# build), then `pip install <repo>` with NO constraints file, so pip resolves pyproject.toml's ranges on its
# own. Then `pip check`, `import mftcoder` and `mftcoder --help`. Exits non-zero on any failure; prints how
# long it took. .ci/run calls it after the tests.
#   bash scripts/check_install.sh            (PYTHON=python3.X to choose the interpreter)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
started=$(date +%s)
workdir="$(mktemp -d "${TMPDIR:-/tmp}/mftcoder-check-install.XXXXXX")"
# Deleting a torch venv (~37,000 files) took ~2 minutes on this disk: it goes in a detached background process
# that holds none of this script's output.
cleanup() { setsid rm -rf "$workdir" </dev/null >/dev/null 2>&1 & }
trap cleanup EXIT
step() { echo "check_install: $*"; }

step "fresh venv in $workdir ($("$PYTHON" --version 2>&1))"
"$PYTHON" -m venv "$workdir/venv"
pip=("$workdir/venv/bin/pip" --quiet --disable-pip-version-check)
step "pip install torch==2.13.0"
"${pip[@]}" install "torch==2.13.0"
# A copy of the tracked and untracked (not ignored) files, so that no build output lands in the repository
# and a stale build/ or .egg-info there cannot leak into the result.
mkdir "$workdir/src"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
  [ -e "$f" ] && printf '%s\0' "$f"; done | tar -cf - --null -T -) | tar -xf - -C "$workdir/src"
step "pip install <repo> (no constraints file: pyproject.toml's ranges only)"
"${pip[@]}" install "$workdir/src"
step "pip check"
"$workdir/venv/bin/pip" check --disable-pip-version-check
step "import mftcoder"
(cd "$workdir" && "$workdir/venv/bin/python" -c "import mftcoder, mftcoder.train.loop, mftcoder.merge, mftcoder.infer; print('  mftcoder', mftcoder.__version__, 'from', mftcoder.__file__)")
step "mftcoder --help"
(cd "$workdir" && "$workdir/venv/bin/mftcoder" --help >/dev/null)
"$workdir/venv/bin/pip" list --disable-pip-version-check 2>/dev/null | grep -iE '^(torch|transformers|peft|tokenizers|safetensors|tensorboard|numpy) ' \
  | awk '{printf "  %s %s\n", $1, $2}'
step "OK in $(( $(date +%s) - started )) s (the temporary venv is being removed in the background)"
