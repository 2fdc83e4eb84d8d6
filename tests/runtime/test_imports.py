"""What a daemon process loads: nothing it does not use (each module is resident memory in every node).

The daemon's imports are chosen for its footprint (docs/benchmarks.md, "Cost"): asyncio without its TLS
support, the MAC on the interpreter's own SHA-256 (and no ``secrets``, which loads OpenSSL through
``hmac``), no TOML parser without a --config file. These tests
import what ``pyquorum.cli`` imports to run a daemon, in a fresh interpreter, and list what came in.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

# what the daemon must not load: OpenSSL (ssl, _ssl, _hashlib: libssl and libcrypto, 4 MB, which hmac,
# hashlib and secrets load too), the TOML parser (only for a --config file)
NOT_LOADED = ("ssl", "_ssl", "_hashlib", "hashlib", "hmac", "secrets", "tomllib")

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
