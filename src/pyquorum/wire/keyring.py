"""The cluster's shared keys, as the codec uses them: one signs, every one verifies (docs/security.md §6).

What this module owns
---------------------
``KeyRing``: a small, immutable set of HMAC-SHA256 keys, each with a one-byte id (1-255) that travels
in every datagram's header. ``keys[send_key_id]`` signs what this node sends; any key in ``keys``
verifies what it receives, looked up by the datagram's key id, so the number of keys never multiplies
the work per datagram. That split is all a key rotation needs (add a key everywhere, then sign with it
everywhere, then retire the old one), and it is why a keyring is replaced whole, never edited.

What it must not know
---------------------
Files. Where keys come from, the key-file format, its permission policy and ``keygen`` belong to
``pyquorum.keyfile``, which builds a ``KeyRing`` and is the only part that touches the file system.
This module is pure: no I/O, no clocks, no randomness, so the codec and the simulation can use it.

Limits
------
At most ``MAX_KEYS`` = 4 keys: a rotation needs two at once; four leave room to start a rotation
before the previous one finished, and keep a forgotten trail of retired keys (each one a secret that
still opens the cluster) from growing. A keyring is shared by the whole cluster, so it authenticates
"a holder of the cluster key", never one particular node (docs/security.md §2).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

__all__ = ["KEY_SIZE", "MAX_KEYS", "KeyRing"]

KEY_SIZE: Final = 32  # HMAC-SHA256 keys as long as the hash (RFC 2104 §3 recommends >= L)
MAX_KEYS: Final = 4


@dataclass(frozen=True, slots=True, repr=False)
class KeyRing:
    """The keys of one key file: ``keys[send_key_id]`` signs, every key in ``keys`` verifies.

    Its ``repr`` shows key ids only, never key bytes, so a keyring may appear in a log line.
    """

    send_key_id: int
    keys: Mapping[int, bytes] = field(compare=False)

    def __post_init__(self) -> None:
        if not 1 <= len(self.keys) <= MAX_KEYS:
            raise ValueError(f"a keyring holds 1-{MAX_KEYS} keys, got {len(self.keys)}")
        for key_id, key in self.keys.items():
            if not 1 <= key_id <= 255:
                raise ValueError(f"key id {key_id} is outside 1-255")
            if len(key) != KEY_SIZE:
                raise ValueError(f"key {key_id} is {len(key)} bytes, expected {KEY_SIZE}")
        if self.send_key_id not in self.keys:
            raise ValueError(f"sending key id {self.send_key_id} is not among the keys")
        object.__setattr__(self, "keys", MappingProxyType(dict(self.keys)))

    def __repr__(self) -> str:
        return f"KeyRing(send_key_id={self.send_key_id}, key_ids={sorted(self.keys)})"
