"""Config: identity, the cluster text the fingerprint hashes, and validation. Loopback only.

The command-line tests (tests/runtime/test_cli.py) cover each problem as an operator meets it; these
check Config directly.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from pyquorum.config import Config
from pyquorum.core.address import NodeAddress
from pyquorum.core.lease import Timing


def make(tmp_path: Path, me: str = "127.0.0.1:51621", *peers: str, **kwargs: object) -> Config:
    return Config(
        me=NodeAddress.parse(me),
        peers=tuple(NodeAddress.parse(p) for p in peers),
        state_dir=tmp_path / "state",
        **kwargs,  # type: ignore[arg-type]
    )


def test_config_members_sorted_in_protocol_order(tmp_path: Path) -> None:
    config = make(tmp_path, "127.0.0.2:51621", "127.0.0.10:51621", "127.0.0.1:6000", "127.0.0.1:51621")
    assert config.node_id == "127.0.0.2:51621"
    assert config.members == ("127.0.0.1:6000", "127.0.0.1:51621", "127.0.0.2:51621", "127.0.0.10:51621")


def test_config_cluster_text_same_for_every_member(tmp_path: Path) -> None:
    ids = ["127.0.0.1:51621", "127.0.0.2:51621", "127.0.0.3:51621"]
    texts = {make(tmp_path, me, *(i for i in ids if i != me)).cluster_text for me in ids}
    assert len(texts) == 1


def test_config_cluster_text_changes_with_timing(tmp_path: Path) -> None:
    a = make(tmp_path, "127.0.0.1:1", "127.0.0.2:1")
    b = make(tmp_path, "127.0.0.1:1", "127.0.0.2:1", timing=Timing(election_timeout_s=1.5))
    assert a.timing_text != b.timing_text
    assert "election_timeout_s=1.5" in b.timing_text
    assert b.cluster_text.splitlines() == [
        "pyquorum-cluster-v1",
        "members=127.0.0.1:1,127.0.0.2:1",
        *b.timing_text.split(" "),
    ]


def test_config_peer_name_shows_resolution(tmp_path: Path) -> None:
    config = Config(
        me=NodeAddress.parse("127.0.0.1:1"),
        peers=(NodeAddress.parse("127.0.0.1:2"), NodeAddress.parse("127.0.0.3:1")),
        peer_names=("localhost:2", "127.0.0.3:1"),
        state_dir=tmp_path,
    )
    assert config.peer_name(0) == "localhost:2 (127.0.0.1:2)"
    assert config.peer_name(1) == "127.0.0.3:1"


def test_config_valid_three_nodes(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = make(tmp_path, f"127.0.0.1:{port}", "127.0.0.2:1", "127.0.0.3:1")
    assert config.validate() == []


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"restart": "sometimes"}, "--restart 'sometimes'"),
        ({"restart_backoff_s": 0.0}, "restart backoff must be positive"),
        ({"restart_backoff_s": 5.0, "restart_backoff_max_s": 1.0}, "backoff cap"),
        ({"max_failures": 0}, "max failures"),
        ({"failure_window_s": -1.0}, "failure window"),
        ({"script": "relative/job.sh"}, "must be an absolute path"),
        ({"notify": "relative/hook"}, "notify hook 'relative/hook' must be an absolute path"),
        ({"notify": "/nonexistent/hook"}, "notify hook /nonexistent/hook does not exist: check the --notify"),
        ({"notify": "/"}, "notify hook / is not a regular file"),
        ({"notify_timeout_s": 0.0}, "--notify-timeout must be a positive number of seconds"),
        ({"notify_timeout_s": float("nan")}, "--notify-timeout must be a positive number of seconds"),
    ],
)
def test_config_restart_and_script_problems(tmp_path: Path, kwargs: dict[str, object], needle: str) -> None:
    config = make(tmp_path, "127.0.0.1:51621", "127.0.0.2:51621", "127.0.0.3:51621", **kwargs)
    assert any(needle in p for p in config.validate())


def test_config_warnings(tmp_path: Path) -> None:
    one = make(tmp_path, "127.0.0.1:1")
    assert any("nothing to fail over to" in w for w in one.warnings())
    five = make(tmp_path, "127.0.0.1:1", "127.0.0.2:1", "127.0.0.3:1", "127.0.0.4:1", "127.0.0.5:1")
    assert [w for w in five.warnings() if "servers" in w] == []
    six = make(tmp_path, "127.0.0.1:1", *(f"127.0.0.{i}:1" for i in range(2, 7)))
    assert any("6 servers: a majority needs 4, so it survives 2 failures" in w for w in six.warnings())
    keyed = make(tmp_path, "127.0.0.1:1", "127.0.0.2:1", "127.0.0.3:1", key_file=tmp_path / "k")
    assert keyed.warnings() == []


def test_config_notify_hook_must_be_executable(tmp_path: Path) -> None:
    hook = tmp_path / "hook.sh"
    hook.write_text("#!/bin/sh\n")
    hook.chmod(0o644)
    config = make(tmp_path, "127.0.0.1:51621", "127.0.0.2:51621", "127.0.0.3:51621", notify=str(hook))
    assert f"notify hook {hook} is not executable: run 'chmod +x {hook}'" in config.validate()
    hook.chmod(0o755)
    assert not [p for p in config.validate() if "notify" in p]
