"""A node that lost its state directory rejoins a running keyed cluster by itself; a peer that stays
refused is a WARNING. Reference: docs/security.md §5 (the epoch rule, and its limit).

Real daemons on loopback (tests/harness, as the hostile-traffic tests run them: heartbeat 0.05 s,
election timeout 0.5 s), with a key file, so that the replay guard is at work: without a key nothing is
refused for an epoch that went backwards by accident, and with one it was refused both ways until every peer
restarted ("stale-epoch" at the peers, "bad-echo" at the node), logged at debug level only.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import re
import time
from pathlib import Path

import pytest

from pyquorum import keyfile
from pyquorum.runtime.udp import REFUSED_WARN_AFTER_S, _RefusedPeers
from tests.harness.cluster import Cluster, Node
from tests.runtime.test_hostile import (
    agreed_master,
    assert_all_running,
    hostile_cluster,
    persisted,
    statuses,
    stop,
    wait_for_master,
)

REJOIN_BOUND_S = 1.5  # "about a second": the handshake is one heartbeat round (0.05 s) here


def lose_state(node: Node) -> None:
    """What an ephemeral disk or a moved state dir does: state.json is gone (moved aside)."""
    state = node.state_dir / "state.json"
    state.rename(node.state_dir / "state.json.lost")


def follows(c: Cluster, node: Node, master: Node, term: int) -> bool | None:
    st = c.status(node)
    return (st is not None and st["master"] == master.name and st["term"] == term) or None


def logged_between(c: Cluster, node: Node, first: str, then: str) -> float:
    """Seconds between the last ``first`` line of ``node``'s log and the next ``then`` line, by the
    log's own timestamps (one process, one clock): the daemon's view, without interpreter start-up."""
    stamps: dict[str, datetime.datetime] = {}
    for line in c.log(node).splitlines():
        stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f") if line[:2] == "20" else None
        if stamp is None:
            continue
        if first in line:
            stamps = {"first": stamp}
        elif then in line and "first" in stamps and "then" not in stamps:
            stamps["then"] = stamp
    assert "then" in stamps, f"no {then!r} after {first!r} in {node.name}'s log"
    return (stamps["then"] - stamps["first"]).total_seconds()


def refusal_lines(c: Cluster, node: Node) -> list[str]:
    return [ln for ln in c.log(node).splitlines() if "event=peer_refused" in ln]


# -- the tracker, without processes --------------------------------------------------------------


def test_refused_peers_measures_episodes_of_refusal():
    peers = _RefusedPeers(after_s=3.0)
    assert peers.refused("a", 100.0) == 0.0  # a first-contact refusal: an episode of length 0
    assert peers.accepted("a", 100.05) is None  # accepted next: nothing to report
    assert peers.refused("a", 200.0) == 0.0  # a new episode
    assert peers.refused("a", 201.0) == 1.0
    assert peers.refused("a", 203.5) == 3.5  # refused without a pause: it lasts
    assert peers.refused("b", 203.5) == 0.0  # peers are independent
    peers.warned.add("a")
    assert peers.accepted("a", 204.0) == 4.0  # warned about, so its recovery is reported
    assert peers.accepted("a", 205.0) is None


def test_refused_peers_a_silence_starts_a_new_episode():
    """One first-contact refusal after a long silence is not a long refusal (it stays at debug)."""
    peers = _RefusedPeers(after_s=3.0)
    peers.refused("a", 10.0)  # refused once, then the peer went silent (stopped)
    assert peers.refused("a", 3610.0) == 0.0  # an hour later it restarts: one refusal, not 3600 s
    assert peers.refused("a", 3612.0) == 2.0


# -- live -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_node_with_lost_state_rejoins_a_keyed_cluster_by_itself(tmp_path: Path) -> None:
    key_file = tmp_path / "cluster.key"
    keyfile.keygen(key_file)
    with hostile_cluster(key_file) as c:
        c.start()
        master, term = wait_for_master(c)
        f, g = (n for n in c.nodes if n is not master)
        # one ordinary restart first: a node that lost its state has usually lived more than once
        # (with a start counter, its first life after the loss would reuse epoch 1 and go unnoticed)
        assert stop(c, f) == 0
        c.start([f])
        c.wait_for(lambda: follows(c, f, master, term), 10.0, f"{f.name} to follow {master.name}")
        old_epoch = int(persisted(f)["boot_epoch"])
        assert stop(c, f) == 0
        lose_state(f)

        c.start([f])
        c.wait_for(lambda: follows(c, f, master, term), 10.0, f"{f.name} to follow {master.name} again")
        rejoin_s = logged_between(c, f, "event=started", f"event=following term={term} master={master.name}")
        print(f"\nrejoined {rejoin_s:.3f}s after its start (from its log)")
        assert rejoin_s < REJOIN_BOUND_S
        assert int(persisted(f)["boot_epoch"]) > old_epoch
        assert persisted(f)["term"] == term  # it learnt the term from the master's heartbeats

        # Its datagrams are accepted too: with g stopped, the master's quorum is itself and f, so
        # it keeps its lease (and stays master in the same term) only on f's acknowledgements.
        assert stop(c, g) == 0
        time.sleep(3 * 0.5)  # three election timeouts: a lease not renewed would have lapsed
        assert agreed_master(c, among=[master, f]) == (master, term), statuses(c, [master, f])
        assert master.running and f.running
        for n in (master, f):
            assert not refusal_lines(c, n), refusal_lines(c, n)  # the handshake's refusals stay at debug
            assert "Traceback" not in c.log(n)


@pytest.mark.slow
def test_a_peer_refused_for_seconds_is_a_warning(tmp_path: Path) -> None:
    """The limit of the epoch rule, made on purpose: the wall clock was AHEAD at a node's last start
    (its persisted epoch is in the future) and its state is then lost, so it comes back with a
    lower epoch than its peers saw. They refuse it ("stale-epoch") and it refuses them ("bad-echo");
    each side says so at WARNING level, naming the other, and a peer's restart heals it."""
    key_file = tmp_path / "cluster.key"
    keyfile.keygen(key_file)
    with hostile_cluster(key_file, verbosity=0) as c:
        n0, n1, n2 = c.nodes
        n2.state_dir.mkdir(mode=0o700, parents=True)
        future_us = time.time_ns() // 1000 + 10**13  # about 116 days ahead
        state = {"version": 1, "term": 0, "voted_for": None, "boot_epoch": future_us}
        fd = os.open(n2.state_dir / "state.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(state, out)
        c.start()
        wait_for_master(c)
        assert stop(c, n2) == 0
        lose_state(n2)
        c.start([n2], wait=False)

        def warned(node: Node, peer: Node, reason: str) -> str | None:
            lines = [ln for ln in refusal_lines(c, node) if f"peer={peer.name} reason={reason}" in ln]
            return lines[0] if lines else None

        # n2 hears only the master (followers of a live master send nothing: protocol.md §3.2), so
        # it warns about the master; both others hear n2's keep-alives and warn about n2
        master, _ = wait_for_master(c, among=[n0, n1])
        # the default log level (WARNING): a line there at all is a warning
        for node, peer, reason in (
            (n0, n2, "stale-epoch"),
            (n1, n2, "stale-epoch"),
            (n2, master, "bad-echo"),
        ):
            line = c.wait_for(
                functools.partial(warned, node, peer, reason),
                15.0,
                f"{node.name} warning about {peer.name} ({reason})",
            )
            print(f"\n{node.name}: {line}")
            assert f" WARNING node={node.name} event=peer_refused" in line
            match = re.search(r"refused_for_s=([0-9.]+)", line)
            assert match is not None and float(match.group(1)) >= REFUSED_WARN_AFTER_S
        stale = warned(n0, n2, "stale-epoch")
        assert stale is not None and "restarting this node" in stale
        assert len(refusal_lines(c, n0)) <= 2, "rate-limited: one line per peer per 10 s"

        # The remedy the warning names: restart the peer that refuses it; it forgets the newer epoch.
        assert stop(c, master) == 0
        c.start([master], wait=False)
        c.wait_for(
            lambda: f"event=peer_accepted peer={master.name}" in c.log(n2) or None,
            15.0,
            f"{n2.name} accepting {master.name} again",
        )
        assert_all_running(c)
        for n in c.nodes:
            assert "Traceback" not in c.log(n)
