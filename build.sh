#!/usr/bin/env bash
# Build pyquorum's wheel into dist/ (the original design's build step). Then, on any machine with
# Python 3.10 or newer:  pip install ./dist/pyquorum-*.whl   (gives the 'pyquorum' command).
# Uses .venv only for its pip (a system python3 may have none); the wheel itself is pure Python.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/scripts/lib/venv.sh"
ensure_python_venv
cd "$ROOT"
rm -f dist/pyquorum-*.whl
"$VENV/bin/python" -m pip wheel -q --disable-pip-version-check --no-deps -w dist .
ls dist/pyquorum-*.whl
