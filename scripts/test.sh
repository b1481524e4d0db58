#!/usr/bin/env bash
# Install skindiff in a fresh virtual environment and run everything CI runs:
# export check, clean-notebook check, README check, every notebook (nbdev-test), the study's ci profile
# through the real papermill runner, and pytest. Prints the time each stage took; exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SKINDIFF_TEST_VENV:-.venv-test}"
PY="${PYTHON:-python3}"
declare -a TIMES=()
stage() {  # stage NAME COMMAND...
  local name=$1; shift
  echo "=== ${name}"
  local t0=$SECONDS
  if "$@"; then TIMES+=("$(printf '%-28s %5d s  ok' "$name" $((SECONDS-t0)))")
  else local rc=$?; TIMES+=("$(printf '%-28s %5d s  FAILED (exit %d)' "$name" $((SECONDS-t0)) "$rc")"); report; exit "$rc"; fi
}
report() { echo; echo "=== stage times"; printf '%s\n' "${TIMES[@]}"; }

fresh_venv() { rm -rf "$VENV" && "$PY" -m venv "$VENV" && "$VENV/bin/python" -m pip install -q --upgrade pip; }
install() { "$VENV/bin/python" -m pip install -q -e ".[dev]"; }
stage "fresh venv" fresh_venv
stage "install (pip -e .[dev])" install
export PATH="$PWD/$VENV/bin:$PATH"
export MPLBACKEND=Agg
export SKINDIFF_CACHE="${SKINDIFF_CACHE:-$HOME/.cache/skindiff}"

# nbdev-export and nbdev-clean must leave the folder they write exactly as they found it. Comparing its state before and after (not against HEAD) lets a
# developer run this on uncommitted work, while a clean clone in CI is held to what was committed.
tree_state() { git status --porcelain -- "$1"; git diff -- "$1" | sha256sum; git ls-files -z --others --exclude-standard -- "$1" | xargs -0 -r sha256sum; }
unchanged_by() {  # unchanged_by PATH COMMAND...
  local path=$1; shift; local before; before=$(tree_state "$path")
  "$@" || return
  if [ "$before" != "$(tree_state "$path")" ]; then git status --short -- "$path"; echo "$* changed $path: run it and commit the result"; return 1; fi
}
export_check() { unchanged_by skindiff nbdev-export; }
clean_check() { unchanged_by nbs nbdev-clean; }
readme_check() { python scripts/make_readme.py --check; }
nb_test() { nbdev-test --n-workers 1 --timing; }
study_ci() { local d; d=$(mktemp -d); skindiff study --profile ci --out "$d/ci" && ls "$d/ci/figures" && rm -rf "$d"; }
pytests() { python -m pytest -q; }

stage "nbdev-export matches skindiff/" export_check
stage "notebooks are clean" clean_check
stage "README matches index.ipynb" readme_check
stage "nbdev-test (every notebook)" nb_test
stage "skindiff study --profile ci" study_ci
stage "pytest" pytests
report
