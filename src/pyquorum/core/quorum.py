"""Majority arithmetic (after etcd-io/raft quorum/majority.go). Reference: protocol.md §1."""

from __future__ import annotations

from collections.abc import Iterable


def quorum_size(n: int) -> int:
    """Votes needed out of ``n`` members: floor(n/2) + 1."""
    if n < 1:
        raise ValueError("a cluster has at least one member")
    return n // 2 + 1


def has_quorum(voters: Iterable[str], members: frozenset[str]) -> bool:
    """True when the members among ``voters`` are a majority of ``members``."""
    return len(members.intersection(voters)) >= quorum_size(len(members))
