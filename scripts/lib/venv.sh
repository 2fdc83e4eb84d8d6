# Sourced by scripts/test, scripts/demo and build.sh: make sure .venv exists and holds pyquorum.
#
# Needs only python3 >= 3.10 (override with PYTHON=/path/to/python). Creates .venv in the repository
# on first use and (re)installs pyquorum in editable mode whenever pyproject.toml changed since the
# last install, so a fresh clone and a long-lived checkout behave the same.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$ROOT/.venv"

die() {
    echo "$(basename "$0"): $*" >&2
    exit 1
}

# ensure_python_venv: .venv exists, runs, and has a pip that can install pyproject.toml projects.
ensure_python_venv() {
    if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c '' 2>/dev/null; then
        return
    fi
    local py="${PYTHON:-python3}"
    command -v "$py" >/dev/null 2>&1 || die "'$py' not found: install Python 3.10 or newer"
    "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
        die "pyquorum needs Python 3.10 or newer, '$py' is $("$py" -V 2>&1)"
    echo "creating $VENV with $("$py" -V 2>&1)" >&2
    # --clear: a .venv whose python no longer runs (the system python moved) is rebuilt.
    "$py" -m venv --clear "$VENV" ||
        die "could not create $VENV (on Debian and Ubuntu: apt install python3-venv)"
    # pip before 21.3 (bundled with Python 3.10.0) cannot install a pyproject.toml-only project in
    # editable mode.
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip ||
        die "could not upgrade pip in $VENV"
}

# ensure_venv [EXTRA]: .venv with pyquorum installed in editable mode, plus the optional
# dependencies EXTRA (e.g. "test") when given.
ensure_venv() {
    local extra="${1:-}"
    ensure_python_venv
    local digest stamp
    digest="$("$VENV/bin/python" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$ROOT/pyproject.toml")"
    stamp="$VENV/.pyquorum-installed${extra:+-$extra}"
    if [ "$(cat "$stamp" 2>/dev/null)" = "$digest" ]; then
        return
    fi
    # The test install is a superset of the plain one.
    if [ -z "$extra" ] && [ "$(cat "$VENV/.pyquorum-installed-test" 2>/dev/null)" = "$digest" ]; then
        return
    fi
    echo "installing pyquorum${extra:+[$extra]} into $VENV" >&2
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT${extra:+[$extra]}" ||
        die "could not install pyquorum${extra:+[$extra]} into $VENV (see pip's messages above)"
    echo "$digest" >"$stamp"
}
