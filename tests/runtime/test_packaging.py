"""The wheel installs into a clean virtual environment and gives a working ``pyquorum`` command.

This is the original design's path (build.sh, then ``pip install ./dist/pyquorum-*.whl``) and the
README's ``pip install .``.
"""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

from pyquorum import __version__

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_runs(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--disable-pip-version-check",
            "--no-deps",
            "-w",
            dist,
            ROOT,
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = dist.glob("pyquorum-*.whl")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    subprocess.run(
        [py, "-m", "pip", "install", "-q", "--disable-pip-version-check", wheel], check=True, timeout=300
    )
    out = subprocess.run(
        [env_dir / "bin" / "pyquorum", "--version"], capture_output=True, text=True, check=True
    )
    assert __version__ in out.stdout
    out = subprocess.run([py, "-m", "pyquorum", "--version"], capture_output=True, text=True, check=True)
    assert __version__ in out.stdout
    # the installed package carries its guard program and its type marker
    files = subprocess.run(
        [py, "-c", "import pyquorum.supervisor as s, pathlib; print(pathlib.Path(s.GUARD_PATH).is_file())"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert files.stdout.strip() == "True"
    bad = subprocess.run([env_dir / "bin" / "pyquorum", "--no-such-option"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
