"""The state file: durable, atomic, never silently reset, never shared. Reference: protocol.md §3.4,
§3.6 (the promise), §3.9 (a missing file is a node that may have lost its state), §1 (the members)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pyquorum.core.errors import ConfigError, LocalProtocolError
from pyquorum.runtime import storage
from pyquorum.runtime.storage import (
    STATE_VERSION,
    PersistedState,
    StateStore,
    read_status,
    write_status,
)


@pytest.fixture
def store(tmp_path: Path):
    with StateStore(tmp_path / "state") as s:
        yield s


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_storage_missing_file_is_a_node_that_may_have_lost_its_state(store: StateStore) -> None:
    """Reference: protocol.md §3.9: never silently treated as a brand-new node."""
    assert store.load() == PersistedState(term=0, voted_for=None, boot_epoch=0, recovering=True)
    assert store.bump_epoch() > 1
    assert store.load().recovering  # persisted at once: a crash while recovering stays recovering


def test_storage_round_trip(store: StateStore) -> None:
    state = PersistedState(
        term=7,
        voted_for="[::1]:51621",
        boot_epoch=3,
        promise_s=1.25,
        recovering=True,
        members=("[::1]:51621", "[::1]:51622", "[::1]:51623"),
    )
    store.save(state)
    assert store.load() == state
    assert StateStore(store.state_dir).load() == state  # another reader sees the same
    store.save(PersistedState(term=8))
    assert store.load() == PersistedState(term=8, voted_for=None, boot_epoch=0)


def test_storage_reads_a_file_written_before_promise_recovering_and_members(store: StateStore) -> None:
    old = {"version": 1, "term": 4, "voted_for": None, "boot_epoch": 2}
    store.state_file.write_text(json.dumps(old))
    assert store.load() == PersistedState(term=4, boot_epoch=2, promise_s=0.0, recovering=False, members=None)


@pytest.mark.parametrize(
    ("key", "value"),
    [("promise_s", "1"), ("promise_s", -1), ("recovering", 1), ("members", "a,b"), ("members", [])],
)
def test_storage_refuses_bad_new_fields(store: StateStore, key: str, value: object) -> None:
    data = {"version": 1, "term": 4, "voted_for": None, "boot_epoch": 2, key: value}
    store.state_file.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=key):
        store.load()


def test_storage_creates_private_directory_and_file(tmp_path: Path) -> None:
    state_dir = tmp_path / "a" / "b"
    with StateStore(state_dir) as store:
        store.save(PersistedState(term=1))
    assert state_dir.stat().st_mode & 0o777 == 0o700
    assert store.state_file.stat().st_mode & 0o777 == 0o600


def test_storage_save_leaves_no_temp_file(store: StateStore) -> None:
    for term in range(5):
        store.save(PersistedState(term=term))
    assert _leftovers(store.state_dir) == []


def test_storage_failed_save_keeps_old_state_and_no_temp_file(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.save(PersistedState(term=3, voted_for="127.0.0.1:1"))

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space"):
        store.save(PersistedState(term=4))
    monkeypatch.undo()
    assert store.load() == PersistedState(term=3, voted_for="127.0.0.1:1")
    assert _leftovers(store.state_dir) == []


def test_storage_save_fsyncs_file_and_directory(store: StateStore, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    store.save(PersistedState(term=1))
    assert len(synced) == 2
    assert synced[0].endswith(".tmp")  # the data, before the rename
    assert synced[1] == str(store.state_dir)  # the rename itself


def test_storage_stale_temp_files_swept_when_locked(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / ".state.json.abc123.tmp").write_text("half a write")
    with StateStore(state_dir):
        assert _leftovers(state_dir) == []


@pytest.mark.parametrize(
    ("content", "detail"),
    [
        ("", "not JSON"),
        ('{"version": 1, "term": 3', "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"version": 1, "term": -1, "voted_for": null, "boot_epoch": 0}', "term -1"),
        ('{"version": 1, "term": true, "voted_for": null, "boot_epoch": 0}', "term True"),
        ('{"version": 1, "term": 2, "voted_for": 5, "boot_epoch": 0}', "voted_for 5"),
        ('{"version": 1, "term": 2, "voted_for": null}', "boot_epoch None"),
        ('{"version": 1, "term": 2.5, "voted_for": null, "boot_epoch": 0}', "term 2.5"),
    ],
)
def test_storage_corrupt_file_is_an_error_not_a_reset(store: StateStore, content: str, detail: str) -> None:
    store.state_file.write_text(content)
    with pytest.raises(ConfigError) as info:
        store.load()
    message = "\n".join(info.value.problems)
    assert str(store.state_file) in message
    assert detail in message
    assert "move it aside" in message  # says what to do
    with pytest.raises(ConfigError):
        store.bump_epoch()  # never overwrites what it could not read
    assert store.state_file.read_text() == content


def test_storage_binary_garbage_is_an_error(store: StateStore) -> None:
    store.state_file.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="corrupt"):
        store.load()


def test_storage_wrong_version_is_an_error(store: StateStore) -> None:
    data = {"version": STATE_VERSION + 1, "term": 1, "voted_for": None, "boot_epoch": 0}
    store.state_file.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=f"format version {STATE_VERSION + 1}"):
        store.load()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_storage_unreadable_file_is_an_error(store: StateStore) -> None:
    store.save(PersistedState(term=1))
    store.state_file.chmod(0)
    with pytest.raises(ConfigError, match="Permission denied"):
        store.load()


def test_storage_state_file_that_is_a_directory_is_an_error(store: StateStore) -> None:
    store.state_file.mkdir()
    with pytest.raises(ConfigError, match="directory"):
        store.load()


def test_storage_bump_epoch_grows_and_keeps_term_and_vote(store: StateStore) -> None:
    store.save(PersistedState(term=5, voted_for="127.0.0.2:51621", boot_epoch=0))
    assert store.bump_epoch(wall_clock_us=1_000) == 1_000
    assert store.bump_epoch(wall_clock_us=1_000) == 1_001  # same clock reading: still one more
    assert store.bump_epoch(wall_clock_us=500) == 1_002  # a clock set back: still one more
    assert store.load() == PersistedState(term=5, voted_for="127.0.0.2:51621", boot_epoch=1_002)


def test_storage_bump_epoch_reads_the_wall_clock(store: StateStore) -> None:
    before_us = time.time_ns() // 1000
    epoch = store.bump_epoch()
    assert before_us <= epoch <= time.time_ns() // 1000
    assert store.load().boot_epoch == epoch


def test_storage_epoch_does_not_go_backwards_when_the_state_is_lost(tmp_path: Path) -> None:
    """A node whose state.json is moved aside used to come back at epoch 1, below what its peers had
    seen, and was refused both ways. Reference: docs/security.md §5 (the epoch rule)."""
    with StateStore(tmp_path / "state") as store:
        first = store.bump_epoch()
        second = store.bump_epoch()
        store.state_file.rename(tmp_path / "state.json.lost")
        # a lost state reads as term 0, no vote, recovering (protocol.md §3.9)
        assert store.load() == PersistedState(recovering=True)
        after_loss = store.bump_epoch()
    assert first < second < after_loss


def test_storage_upgrade_from_start_counters(store: StateStore) -> None:
    store.save(PersistedState(term=2, boot_epoch=41))  # written by a pyquorum that counted starts
    assert store.bump_epoch() > 41


def test_storage_epoch_beyond_64_bits_is_an_error(store: StateStore) -> None:
    store.save(PersistedState(term=2, boot_epoch=2**64 - 1))
    with pytest.raises(ConfigError, match="64 bits"):
        store.bump_epoch(wall_clock_us=1)


def test_storage_fsyncs_the_parents_of_a_new_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[Path] = []
    real = storage._fsync_dir

    def record(directory: Path) -> None:
        synced.append(Path(directory))
        real(directory)

    monkeypatch.setattr(storage, "_fsync_dir", record)
    with StateStore(tmp_path / "a" / "b" / "state"):
        pass
    assert synced == [tmp_path, tmp_path / "a", tmp_path / "a" / "b"]
    synced.clear()
    with StateStore(tmp_path / "a" / "b" / "state"):
        pass
    assert synced == []  # nothing new to make durable


def test_storage_save_needs_the_lock(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    with pytest.raises(LocalProtocolError, match="acquire"):
        store.save(PersistedState(term=1))


def test_storage_second_store_on_same_dir_is_refused(tmp_path: Path) -> None:
    with StateStore(tmp_path / "s"):
        second = StateStore(tmp_path / "s")
        with pytest.raises(ConfigError) as info:
            second.acquire()
        (problem,) = info.value.problems
        assert f"state dir {tmp_path / 's'} is in use by pid {os.getpid()}" in problem
        assert not second.locked
    with StateStore(tmp_path / "s") as third:  # released on exit
        assert third.locked


def test_storage_lock_held_by_another_process(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys
                from pathlib import Path
                from pyquorum.runtime.storage import StateStore
                with StateStore(Path({str(tmp_path)!r})):
                    print("locked", flush=True)
                    sys.stdin.read()
                """
            ),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(ConfigError, match=f"in use by pid {holder.pid}"):
            StateStore(tmp_path).acquire()
    finally:
        holder.communicate("", timeout=10)
    with StateStore(tmp_path) as store:  # the lock dies with its holder
        assert store.locked


def test_storage_lock_file_not_inherited_by_children(store: StateStore) -> None:
    assert store._lock_fd is not None
    assert not os.get_inheritable(store._lock_fd)


def test_storage_unusable_dir_is_config_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="cannot be used"):
        StateStore(tmp_path / "file" / "state").acquire()


def test_storage_write_status_is_atomic_and_readable(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    assert read_status(path) is None
    write_status(path, {"node": "127.0.0.1:51621", "role": "slave", "term": 3})
    write_status(path, {"node": "127.0.0.1:51621", "role": "master", "term": 4})
    assert read_status(path) == {"node": "127.0.0.1:51621", "role": "master", "term": 4}
    assert _leftovers(tmp_path) == []
    assert path.stat().st_mode & 0o777 == 0o644


def test_storage_read_status_rejects_non_object(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    path.write_text("[]")
    with pytest.raises(ValueError, match="not a JSON object"):
        read_status(path)
