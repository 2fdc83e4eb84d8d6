"""The node's durable state: term, vote, promise, boot epoch and member list, in one small file
(protocol.md §3.4, §3.6, §3.9, §1).

A node must never forget a vote it gave or a term it saw: a node that restarts with an older term could
vote twice in one term and let two masters win it. So ``save()`` returns only once the new state is on
disk (temp file, fsync, rename over the old file, fsync of the directory; a state directory it
creates is made durable by an fsync of its parent too), and the daemon calls it BEFORE it sends any
message that depends on that state. A crash at any moment leaves either the old file or the new one,
never a mix. A state file that cannot be read is an error the operator must look at, never a silent
reset to term 0. A state file that does not exist is a node that may have lost its state: it loads as
``recovering`` (protocol.md §3.9), unless ``pyquorum init`` recorded a new node.

The state directory holds (one directory per node; ``StateStore`` owns it):

- ``state.json``  ``{"version": 1, "term": 7, "voted_for": "10.0.0.2:51621",
                  "boot_epoch": 1767225600000000, "promise_s": 1.0, "recovering": false,
                  "members": ["10.0.0.1:51621", ...]}``: the boot epoch is the wall clock in
                  microseconds at the last start, or the previous epoch + 1 if that is higher
                  (``bump_epoch``); the last three keys are absent in files written before they
                  existed, and then read as 0, false and unknown (the current list is recorded)
- ``lock``        flock()ed by the running daemon, and holding its pid, so that two daemons never
                  share one directory (and so one term and vote)
- ``status.json`` the daemon's role, term, master and script pid for the demo and the test harness,
                  rewritten by ``write_status`` when one of them (or the signing key) changes (see
                  ``STATUS_KEYS``); not needed for safety, not fsynced. The live facts (counters,
                  members, lease) are the daemon's to tell over ``control.sock`` (runtime/control.py)
- ``control.sock`` the daemon's control socket, mode 0600, while it runs
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any, TypeGuard

from pyquorum.core.errors import ConfigError, LocalProtocolError
from pyquorum.wire.replay import next_boot_epoch

STATE_VERSION = 1
STATE_FILE_NAME = "state.json"
LOCK_FILE_NAME = "lock"
STATUS_FILE_NAME = "status.json"

# The status.json contract, written by the daemon when the role, term, master, script or signing key
# changes (runtime/daemon.py, from its one Snapshot) and read by `pyquorum demo` and tests/harness:
#   node               str    this node's canonical id, "127.0.0.1:51621"
#   role               str    "master" | "precandidate" | "candidate" | "slave", or "stopped" at the end
#   term               int    current term (the fencing token while master)
#   master             str|None  the master this node follows (itself when master), None if unknown
#   script_pid         int|None  pid of the running script (master only), None when none runs
#   authenticated      bool   whether cluster traffic is signed (a key file is in use)
#   send_key_id        int|None  the key id it signs with
#   members            list   every member's id
#   updated_monotonic  float  time.monotonic() when written (CLOCK_MONOTONIC: same clock host-wide)
#   pid                int    the daemon's pid
# The daemon may add keys (counters, members); readers ignore what they do not know.
STATUS_KEYS = (
    "node",
    "role",
    "term",
    "master",
    "script_pid",
    "authenticated",
    "send_key_id",
    "members",
    "updated_monotonic",
    "pid",
)


@dataclass(frozen=True, slots=True)
class PersistedState:
    """What survives a restart. ``boot_epoch`` is the epoch of the daemon's last start (see
    ``bump_epoch``); ``promise_s`` and ``recovering`` are the core's (``HardState``); ``members`` is the
    member list the node last ran with (None: not recorded yet), which it must not silently change
    (protocol.md §1)."""

    term: int = 0
    voted_for: str | None = None
    boot_epoch: int = 0
    promise_s: float = 0.0
    recovering: bool = False
    members: tuple[str, ...] | None = None


class StateStore:
    """The state directory of one node. Use it as ``with StateStore(state_dir) as store:`` (or call
    ``acquire()`` / ``release()``): acquiring creates the directory (mode 0700) and locks it, so a
    second daemon on the same directory gets a ``ConfigError``. Then ``bump_epoch()`` once, before
    sending anything, and ``save()`` before sending any message that depends on a new term or vote.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.state_file = self.state_dir / STATE_FILE_NAME
        self.lock_file = self.state_dir / LOCK_FILE_NAME
        self.status_file = self.state_dir / STATUS_FILE_NAME
        self._lock_fd: int | None = None

    @property
    def locked(self) -> bool:
        return self._lock_fd is not None

    def acquire(self) -> None:
        """Create the directory if needed and take its lock; raise ``ConfigError`` if another
        process holds it or the directory cannot be used."""
        if self._lock_fd is not None:
            return
        try:
            created = _missing_dirs(self.state_dir)
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            # a new directory's entry is durable only once its parent is synced, like a renamed file's
            for directory in created:
                _fsync_dir(directory.parent)
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(
                [
                    f"state dir {self.state_dir} cannot be used: {exc.strerror or exc}; fix its "
                    "permissions or use --state-dir"
                ]
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"pid {holder}" if holder else "another process"
            raise ConfigError(
                [
                    f"state dir {self.state_dir} is in use by {who} (another pyquorum node?): "
                    "stop it, or give this node its own --state-dir"
                ]
            ) from None
        except OSError as exc:
            os.close(fd)
            raise ConfigError(
                [f"cannot lock {self.lock_file}: {exc.strerror or exc}; use another --state-dir"]
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        # A crash between writing a temp file and its rename leaves it; we hold the lock, so it is stale.
        for stale in self.state_dir.glob(f".{STATE_FILE_NAME}.*.tmp"):
            with contextlib.suppress(OSError):
                stale.unlink()

    def release(self) -> None:
        """Drop the lock (closing the file releases it). The lock file stays: removing it could let
        a second daemon lock a new file while a third still holds the old one."""
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            os.close(fd)

    def __enter__(self) -> StateStore:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def load(self) -> PersistedState:
        """The saved state; if there is no file, a recovering one (term 0, no vote, epoch 0: the node
        may have lost its state, protocol.md §3.9). Raise ``ConfigError`` if the file exists but
        cannot be read or trusted."""
        try:
            text = self.state_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            return PersistedState(recovering=True)
        except (OSError, UnicodeDecodeError) as exc:
            raise self._corrupt(str(getattr(exc, "strerror", None) or exc)) from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise self._corrupt(f"not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise self._corrupt("not a JSON object")
        version = data.get("version")
        if version != STATE_VERSION:
            raise ConfigError(
                [
                    f"state file {self.state_file} has format version {version!r}, but this "
                    f"pyquorum reads version {STATE_VERSION}: run the pyquorum version that wrote "
                    "it, or see below for how to start afresh",
                    *_start_afresh(self.state_file),
                ]
            )
        term, voted_for, epoch = data.get("term"), data.get("voted_for"), data.get("boot_epoch")
        promise, recovering = data.get("promise_s", 0.0), data.get("recovering", False)
        members = data.get("members")
        if not _is_count(term):
            raise self._corrupt(f"term {term!r} is not a non-negative integer")
        if voted_for is not None and not isinstance(voted_for, str):
            raise self._corrupt(f"voted_for {voted_for!r} is neither a node id nor null")
        if not _is_count(epoch):
            raise self._corrupt(f"boot_epoch {epoch!r} is not a non-negative integer")
        if isinstance(promise, bool) or not isinstance(promise, (int, float)) or not 0 <= promise < 1e6:
            raise self._corrupt(f"promise_s {promise!r} is not a number of seconds")
        if not isinstance(recovering, bool):
            raise self._corrupt(f"recovering {recovering!r} is neither true nor false")
        if members is not None and not (
            isinstance(members, list) and members and all(isinstance(m, str) for m in members)
        ):
            raise self._corrupt(f"members {members!r} is not a list of node ids")
        return PersistedState(
            term=term,
            voted_for=voted_for,
            boot_epoch=epoch,
            promise_s=float(promise),
            recovering=recovering,
            members=None if members is None else tuple(members),
        )

    def save(self, state: PersistedState) -> None:
        """Write ``state`` durably; when this returns, a crash cannot lose it. Needs the lock."""
        if self._lock_fd is None:
            raise LocalProtocolError("StateStore.save() without the lock: call acquire() first")
        data: dict[str, Any] = {
            "version": STATE_VERSION,
            "term": state.term,
            "voted_for": state.voted_for,
            "boot_epoch": state.boot_epoch,
            "promise_s": state.promise_s,
            "recovering": state.recovering,
        }
        if state.members is not None:
            data["members"] = list(state.members)
        _atomic_write(self.state_file, json.dumps(data) + "\n", durable=True, mode=0o600)

    def bump_epoch(self, wall_clock_us: int | None = None) -> int:
        """Mark this start: load, pick the new boot epoch, save it durably, and return it. Call once
        at start-up, after ``acquire()`` and before sending anything.

        The epoch is ``max(persisted + 1, wall clock in microseconds since 1970)``
        (``pyquorum.wire.replay.next_boot_epoch``), so it cannot go backwards even when the state
        file was lost: peers then recognise the new life at once instead of refusing it. The wall
        clock (``wall_clock_us``, read here when not given) serves as an identity only, never for
        timing."""
        state = self.load()
        if wall_clock_us is None:
            wall_clock_us = time.time_ns() // 1000
        try:
            epoch = next_boot_epoch(state.boot_epoch, wall_clock_us)
        except ValueError as exc:
            raise self._corrupt(str(exc)) from None
        self.save(replace(state, boot_epoch=epoch))
        return epoch

    def _corrupt(self, detail: str) -> ConfigError:
        return ConfigError(
            [
                f"state file {self.state_file} is unreadable or corrupt ({detail}). It holds this "
                "node's term and vote, and pyquorum will not guess them",
                *_start_afresh(self.state_file),
            ]
        )


def write_status(path: Path, status: Mapping[str, Any]) -> None:
    """Replace the status file at ``path`` atomically (readers see the old or the new one, whole).
    Not fsynced: after a crash it is stale anyway, and ``pid`` tells the reader so."""
    _atomic_write(Path(path), json.dumps(dict(status), indent=2) + "\n", durable=False, mode=0o644)


def read_status(path: Path) -> dict[str, Any] | None:
    """The status a daemon last wrote at ``path``, or None if there is none. Raise ``ValueError``
    if the file is not a JSON object."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object")
    return data


def _atomic_write(path: Path, text: str, *, durable: bool, mode: int) -> None:
    # The temp file lives in the same directory, so os.replace() is a rename within one file system:
    # atomic. Its name starts with a dot and ends in .tmp so acquire() can sweep leftovers.
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            if durable:
                os.fsync(f.fileno())
            os.fchmod(f.fileno(), mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        # The rename is durable only once the directory entry is on disk.
        _fsync_dir(path.parent)


def _create_temp(path: Path) -> tuple[int, str]:
    """A new file ``.<name>.<random>.tmp`` beside ``path``, mode 0600, opened for writing: what
    ``tempfile.mkstemp`` makes (O_EXCL, so never a file someone else made; O_NOFOLLOW). Not tempfile
    itself: it imports shutil, which loads zlib, bz2 and lzma, 1 MB resident in every daemon for
    one call (issue 12's memory target)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):  # 48 random bits: a collision is a leftover of ours, not a race
        tmp = os.path.join(path.parent, f".{path.name}.{os.urandom(6).hex()}.tmp")
        try:
            return os.open(tmp, flags, 0o600), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary file name beside {path}")


def _fsync_dir(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _missing_dirs(directory: Path) -> list[Path]:
    # the directories mkdir(parents=True) will create, outermost first
    missing = []
    for candidate in [directory, *directory.parents]:
        if candidate.exists():
            break
        missing.append(candidate)
    return missing[::-1]


def _is_count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _start_afresh(state_file: Path) -> list[str]:
    return [
        f"if it cannot be repaired, move it aside (mv {state_file} {state_file}.bad) and start the "
        "node: without a state file it recovers, voting only once it has heard the current term of "
        "every member (docs/protocol.md §3.9); restart no other node until its log says "
        "event=recovered"
    ]


def member_change_problem(state_file: Path, recorded: tuple[str, ...], members: tuple[str, ...]) -> str:
    """The refusal of a node started with another member list than the one it last ran with
    (protocol.md §1 and §8), with what to do."""
    added = [m for m in members if m not in recorded]
    removed = [m for m in recorded if m not in members]
    change = ", ".join([*(f"+{m}" for m in added), *(f"-{m}" for m in removed)])
    return (
        f"this node last ran with the members {','.join(recorded)} ({state_file}), not "
        f"{','.join(members)} ({change}). Two member lists can each elect a master, so a node never "
        "changes its list by itself. To change it safely: (1) stop pyquorum on enough servers that "
        "neither list has a running majority (simplest: on all of them); (2) wait the election timeout "
        "plus the start delay after the last stop; (3) on each server run 'pyquorum accept-members' "
        "with the new list and the daemon's other options; (4) start every server with the new list "
        "(docs/protocol.md §8). To keep the old list, start this node with it"
    )
