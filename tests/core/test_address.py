"""Addresses and their order. Reference: protocol.md §1 and §3.3 (lowest address first)."""

from __future__ import annotations

import pytest

from pyquorum.core.address import NodeAddress, sort_nodes
from pyquorum.core.quorum import has_quorum, quorum_size


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("127.0.0.1", "127.0.0.1:51621"),
        ("127.0.0.1:6000", "127.0.0.1:6000"),
        ("::1", "[::1]:51621"),
        ("[::1]", "[::1]:51621"),
        ("[::1]:6000", "[::1]:6000"),
        ("[0:0::1]:6000", "[::1]:6000"),
    ],
)
def test_parse_canonical(text: str, canonical: str) -> None:
    assert str(NodeAddress.parse(text)) == canonical


@pytest.mark.parametrize("bad", ["", "foo", "1.2.3.4:0", "1.2.3.4:70000", "[::1", "[::1]x", "1.2.3.4:x"])
def test_parse_rejects(bad: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the message is for operators, checked in test_cli
        NodeAddress.parse(bad)


def test_order_is_numeric_then_port_and_ipv4_first() -> None:
    nodes = ["127.0.0.10:1", "127.0.0.9:2", "127.0.0.9:1", "[::1]:1"]
    assert sort_nodes(nodes) == ["127.0.0.9:1", "127.0.0.9:2", "127.0.0.10:1", "[::1]:1"]


@pytest.mark.parametrize(("n", "q"), [(1, 1), (2, 2), (3, 2), (4, 3), (5, 3), (7, 4)])
def test_quorum_size(n: int, q: int) -> None:
    assert quorum_size(n) == q


def test_has_quorum_counts_members_only() -> None:
    members = frozenset({"a", "b", "c"})
    assert has_quorum({"a", "b"}, members)
    assert not has_quorum({"a", "x", "y"}, members)
