"""What a daemon process loads: nothing it does not use (each module is resident memory in every node).

The daemon's imports are chosen for its footprint (docs/benchmarks.md, "Cost"): asyncio without its TLS
support, the MAC on the interpreter's own SHA-256 (and no ``secrets``, which loads OpenSSL through
``hmac``), no TOML parser without a --config file, none of the modules that a single call would bring
in for good (tempfile and shutil, with zlib, bz2 and lzma behind them; datetime; difflib). These tests
import what ``pyquorum.cli`` imports to run a daemon, in a fresh interpreter, and list what came in.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

# what the daemon must not load: OpenSSL (ssl, _ssl, _hashlib: libssl and libcrypto, 4 MB, which hmac,
# hashlib and secrets load too), the TOML parser (only for a --config file), tempfile and shutil (1 MB
# with the compression modules shutil imports; zlib itself the codec uses, for its CRC), datetime
# (0.7 MB) and difflib (0.4 MB: the "did you mean" of a config file's unknown key)
NOT_LOADED = (
    *("ssl", "_ssl", "_hashlib", "hashlib", "hmac", "secrets", "tomllib"),
    *("tempfile", "shutil", "bz2", "lzma", "datetime", "_datetime", "difflib"),
)

PROBE = """
import json, sys
from pyquorum import cli
cli._import_asyncio_without_tls()
import pyquorum.runtime.daemon
config = cli.load_config(["-b", "127.0.0.1", "127.0.0.2", "127.0.0.3"])
print(json.dumps(sorted(sys.modules)))
"""


def loaded(probe: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(SRC)!r})\n{probe}"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return set(json.loads(out.stdout))


def test_daemon_loads_no_openssl_toml_or_tempfile() -> None:
    modules = loaded(PROBE)
    assert "asyncio" in modules and "pyquorum.runtime.daemon" in modules
    assert sorted(m for m in NOT_LOADED if m in modules) == []


def test_asyncio_without_tls_leaves_ssl_importable() -> None:
    modules = loaded(PROBE.replace("print(", "import ssl, asyncio.sslproto\nprint("))
    assert "ssl" in modules


def test_the_daemons_writes_and_timestamps_load_none_of_them(tmp_path: Path) -> None:
    # What a running daemon does that once needed tempfile or datetime: persist its state (the
    # atomic write), write a status file, log a JSON line, stamp a hook's event.
    probe = PROBE.replace(
        "print(",
        f"""import logging
from pyquorum.runtime import hooks, logs, storage
store = storage.StateStore(__import__("pathlib").Path({str(tmp_path)!r}))
store.acquire()
store.save(storage.PersistedState(term=3, voted_for="127.0.0.1:5000"))
storage.write_status(store.state_dir / "status.json", {{"term": 3}})
logs.JsonFormatter("127.0.0.1:5000", False).format(logging.LogRecord("pyquorum", 20, "", 0, "x", (), None))
hooks._wall_clock_text()
print(""",
    )
    modules = loaded(probe)
    assert "pyquorum.runtime.hooks" in modules
    assert sorted(m for m in NOT_LOADED if m in modules) == []
    assert storage_files(tmp_path) == ["state.json", "status.json"]


def storage_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != "lock")


# What a standby guard must not load for its start line: json, and the re that json brings (what
# else json needs, enum, functools and collections, signal and contextlib load anyway): 1.3 MB locked
# resident in every standby guard, and so in every master's guard, which was a standby guard before
# its start (docs/benchmarks.md, "Cost").
GUARD_NOT_LOADED = ("json", "_json", "re", "_sre")

GUARD_PROBE = """
import sys
sys.path.insert(0, {directory!r})
import guard
deadline, env = guard.parse_start(guard.start_line(12.5, {{"A": "x y%\\n", "B": "\\udcff"}})[:-1])
assert (deadline, env) == (12.5, {{"A": "x y%\\n", "B": "\\udcff"}}), (deadline, env)
print(" ".join(sorted(sys.modules)))
"""


def test_the_guard_reads_its_start_line_without_json() -> None:
    directory = str(SRC / "pyquorum" / "supervisor")
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", GUARD_PROBE.format(directory=directory)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    modules = set(out.stdout.split())
    assert "guard" in modules
    assert sorted(m for m in GUARD_NOT_LOADED if m in modules) == []
