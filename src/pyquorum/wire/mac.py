"""HMAC-SHA256 (RFC 2104) with each key's padded blocks hashed once, on the interpreter's own SHA-256.

What this module owns
---------------------
The MAC of every authenticated datagram (docs/security.md §4) and the hash of the cluster
fingerprint: ``Mac(key).digest(data)`` equals ``hmac.digest(key, data, "sha256")`` for every key and
every message (tests/wire/test_mac.py checks it against the standard library on random keys and
messages, and against the test vectors of RFC 4231), and ``sha256`` is SHA-256. ``compare_digest``
is the constant-time comparison the codec checks a MAC with.

Why not ``hmac.digest``
-----------------------
* HMAC is ``H((K ^ opad) || H((K ^ ipad) || m))``. The two padded key blocks are the same for every
  datagram signed with one key, so ``Mac`` hashes each once, when the key is loaded, and copies the
  two hash states per datagram: two of the four SHA-256 compressions of a heartbeat's MAC are saved,
  and so is OpenSSL's per-call set-up. Measured (bench/hotpath.py, a 100-byte datagram): 1.1 µs per
  MAC, against 2.4 µs for ``hmac.digest``.
* Importing ``hmac`` or ``hashlib`` loads OpenSSL's libcrypto, 3.6 MB resident in every daemon that
  uses nothing else of it (the daemon loads asyncio without its TLS support either: ``pyquorum.cli``).
  CPython's built-in SHA-256, the module ``hashlib`` itself falls back to without OpenSSL, computes
  the same function; where an interpreter has none, ``hashlib.sha256`` serves.

What it must not know
---------------------
Keys' origin and ids (``pyquorum.keyfile``, ``KeyRing``), the wire format (``codec``). It is pure.

Limits: the copies of the padded states live as long as the ``Codec`` that holds them, like the keys
themselves (a key file reload builds a new ``Codec``). ``compare_digest`` is constant-time in the
length of its arguments, as ``hmac.compare_digest`` is: both are ``_operator._compare_digest``
where OpenSSL is not loaded.
"""

from __future__ import annotations

import importlib
from _operator import _compare_digest as compare_digest
from collections.abc import Callable
from typing import Final, Protocol, cast

__all__ = ["BLOCK_SIZE", "DIGEST_SIZE", "Mac", "compare_digest", "sha256"]

BLOCK_SIZE: Final = 64  # SHA-256's block, the length of the padded key (RFC 2104 §2: B)
DIGEST_SIZE: Final = 32


class Hash(Protocol):
    def update(self, data: bytes, /) -> None: ...
    def digest(self) -> bytes: ...
    def copy(self) -> Hash: ...


def _builtin_sha256() -> Callable[[bytes], Hash]:
    # CPython's own SHA-256: _sha2 from 3.12 on, _sha256 before; else (another interpreter, or a
    # CPython built without it) hashlib's, which may be OpenSSL's.
    for name in ("_sha2", "_sha256"):
        try:
            return cast("Callable[[bytes], Hash]", importlib.import_module(name).sha256)
        except (ImportError, AttributeError):
            continue
    import hashlib

    return cast("Callable[[bytes], Hash]", hashlib.sha256)


sha256: Final = _builtin_sha256()

_IPAD: Final = bytes(x ^ 0x36 for x in range(256))  # byte -> byte ^ 0x36, for bytes.translate
_OPAD: Final = bytes(x ^ 0x5C for x in range(256))


class Mac:
    """HMAC-SHA256 under one key: ``digest(data)`` is ``hmac.digest(key, data, "sha256")``."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        if len(key) > BLOCK_SIZE:  # RFC 2104 §2: a longer key is hashed first
            key = sha256(key).digest()
        block = key.ljust(BLOCK_SIZE, b"\0")
        self._inner = sha256(block.translate(_IPAD))
        self._outer = sha256(block.translate(_OPAD))

    def digest(self, data: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(data)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()
