"""The simulation on the wire: every message is encoded, carried as bytes and received through the
real ``pyquorum.wire.Endpoint``, so epochs, the replay guard and restarts are part of every run.
Reference: docs/security.md §5 (epochs, the handshake, the epoch rule)."""

from __future__ import annotations

import pytest

from pyquorum.core.lease import Timing
from tests.sim.sim import Cluster

A, B, C = (f"127.0.0.{i}:51621" for i in range(1, 4))
FAST = Timing(heartbeat_interval_s=0.05, election_timeout_s=0.5, stop_timeout_s=0.2)


def settled(keyed: bool, seed: int = 1) -> Cluster:
    c = Cluster(3, FAST, seed=seed, keyed=keyed)
    c.run_for(3.0)
    assert c.master() == A
    return c


@pytest.mark.parametrize("keyed", [False, True], ids=["crc32", "hmac"])
def test_sim_start_costs_one_refusal_per_direction(keyed: bool) -> None:
    c = settled(keyed)
    # first contact: each node greets every peer at its first duty (protocol.md §3.2); the first
    # datagram in each direction echoes 0 (security.md §5)
    assert c.wire_rejects == {"bad-echo": 6}, c.wire_rejects
    assert c.wire_delivered > 100


def test_sim_duplicated_datagrams_are_refused_as_replayed_not_stepped_twice() -> None:
    c = settled(keyed=False)
    delivered, replayed = c.wire_delivered, c.wire_rejects["replayed"]
    c.net.duplicate = 1.0  # every datagram arrives twice
    c.run_for(2.0)
    new_delivered = c.wire_delivered - delivered
    new_replayed = c.wire_rejects["replayed"] - replayed
    assert new_delivered > 100
    assert new_replayed == new_delivered  # every second copy, and nothing else, is refused
    assert c.master() == A


@pytest.mark.parametrize("keyed", [False, True], ids=["crc32", "hmac"])
def test_sim_restart_gets_a_higher_epoch_and_one_handshake(keyed: bool) -> None:
    c = settled(keyed)
    node = c.nodes[2]
    assert node.endpoint is not None
    before = node.endpoint.epoch
    refused = c.wire_rejects["bad-echo"]
    c.crash(C)
    c.run_for(0.3)
    c.restart(C)
    c.run_for(1.0)
    assert node.endpoint.epoch > before and node.disk_epoch == node.endpoint.epoch
    assert c.roles()[C] == "slave" and node.core is not None and node.core.master == A
    assert c.wire_rejects["bad-echo"] - refused <= 4  # its first datagrams, in both directions
    for peer in c.nodes[:2]:
        assert peer.endpoint is not None and peer.endpoint.peer_epoch(C) == node.endpoint.epoch


def test_sim_node_that_lost_its_epoch_rejoins() -> None:
    """The epoch rule in the simulation: the epoch on disk is gone (0), the wall clock still gives
    a higher one, and the peers take the node back at once."""
    c = settled(keyed=True)
    node = c.nodes[1]
    c.crash(B)  # one ordinary restart first (with a start counter, a lost first life reused epoch 1)
    c.run_for(0.5)
    c.restart(B)
    c.run_for(0.5)
    c.crash(B)
    c.run_for(0.5)
    node.disk_epoch = 0  # what a lost state.json would leave (the term is kept, for this test only)
    c.restart(B)
    c.run_for(0.5)
    assert node.core is not None and node.core.master == A, c.wire_rejects
    assert not c.wire_rejects["stale-epoch"], c.wire_rejects
