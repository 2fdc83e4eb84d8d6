"""wire.mac: HMAC-SHA256 with the padded key blocks hashed once is HMAC-SHA256. Reference: security.md §4."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyquorum.wire.mac import BLOCK_SIZE, DIGEST_SIZE, Mac, compare_digest, sha256

# RFC 4231 §4: test cases 1, 2, 3, 6 and 7 (case 5 truncates the output; case 4's key is 25 bytes of
# 0x01..0x19). Case 6 and 7's 131-byte key is longer than a block: hashed first (RFC 2104 §2).
RFC_4231 = [
    (b"\x0b" * 20, b"Hi There", "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"),
    (
        b"Jefe",
        b"what do ya want for nothing?",
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
    ),
    (b"\xaa" * 20, b"\xdd" * 50, "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe"),
    (
        bytes(range(1, 26)),
        b"\xcd" * 50,
        "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b",
    ),
    (
        b"\xaa" * 131,
        b"Test Using Larger Than Block-Size Key - Hash Key First",
        "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
    ),
    (
        b"\xaa" * 131,
        b"This is a test using a larger than block-size key and a larger than block-size data. The key "
        b"needs to be hashed before being used by the HMAC algorithm.",
        "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2",
    ),
]


@pytest.mark.parametrize(("key", "data", "expected"), RFC_4231)
def test_mac_matches_rfc_4231_vectors(key: bytes, data: bytes, expected: str) -> None:
    assert Mac(key).digest(data).hex() == expected


@given(st.binary(max_size=3 * BLOCK_SIZE), st.lists(st.binary(max_size=1500), min_size=1, max_size=4))
def test_mac_equals_hmac_digest_for_any_key_and_messages(key: bytes, messages: list[bytes]) -> None:
    mac = Mac(key)
    for data in messages:  # one Mac serves many messages: the saved states are copied, never spent
        assert mac.digest(data) == hmac.digest(key, data, "sha256")


def test_mac_digest_size_and_sha256() -> None:
    assert len(Mac(b"k" * 32).digest(b"")) == DIGEST_SIZE
    assert sha256(b"abc").digest() == hashlib.sha256(b"abc").digest()


def test_compare_digest_tells_equal_from_different() -> None:
    a = Mac(b"k" * 32).digest(b"datagram")
    assert compare_digest(a, bytes(a))
    assert not compare_digest(a, a[:-1] + bytes([a[-1] ^ 1]))
    assert not compare_digest(a, a[:-1])
