"""Key files: where the cluster's keys live on disk, and who may read them (docs/security.md §6).

This module is the file-system half of the keys: it reads, checks and writes key files and builds a
pure ``pyquorum.wire.keyring.KeyRing`` from them, which is all the wire code ever sees.

Format: UTF-8 text, one key per line, ``<key id 1-255> <base64 of 32 random bytes>``; ``#`` starts a
comment, blank lines are ignored. The FIRST key signs every datagram we send; every listed key is
accepted. That is all a rotation needs, one restart (or reload) of every node per step:

1. add the new key as the second line on every node (all accept it, all still sign with the old);
2. move it to the first line on every node (all sign with it, the old is still accepted);
3. remove the old line on every node.

At most ``MAX_KEYS`` = 4 keys (``pyquorum.wire.keyring`` says why).

The file must be a regular file owned by root or by the user running pyquorum, with no permission
bits for group or others (as ssh's StrictModes): a key that others can read is a key others hold.
Every problem is reported at once, as a ``ConfigError`` an operator can act on; no message ever
contains key material.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import re
import stat
from typing import Final

from pyquorum.core.errors import ConfigError
from pyquorum.wire.keyring import KEY_SIZE, MAX_KEYS, KeyRing

__all__ = ["keygen", "load_keyring"]

MAX_FILE_SIZE: Final = 64 * 1024  # four keys take ~200 bytes; anything huge is the wrong file

_ID_RE: Final = re.compile(r"[0-9]{1,3}")

_HEADER: Final = (
    "# pyquorum key file (docs/security.md §6). Keep it mode 0600 and identical on every node.\n"
    "# One key per line: <key id 1-255> <base64 of 32 random bytes>.\n"
    "# The first key signs what this node sends; every listed key is accepted.\n"
)


def load_keyring(path: str | os.PathLike[str]) -> KeyRing:
    """Read and check a key file. Raises ``ConfigError`` listing every problem found.

    The caller (the daemon, at start-up and on reload) hands the result to its ``Endpoint``.
    """
    shown = os.fspath(path)
    return _parse(_read_key_file(shown), shown)


def keygen(path: str | os.PathLike[str], add: bool = False) -> int:
    """Create a key file with one fresh key, or with ``add=True`` append a fresh key to one.

    Returns the new key's id and prints nothing (the CLI tells the operator what to do next).
    A new file is created with ``O_CREAT | O_EXCL`` and mode 0600, so it is never readable by
    others, not even for an instant, and an existing file is never overwritten. An added key gets
    id max+1 (or the lowest free id once 255 is taken) on a line after the others: it is accepted
    but does not sign until an operator moves it first (rotation step 2). The file is rewritten
    through a temporary file and ``os.replace``, keeping its comments.
    """
    shown = os.fspath(path)
    line = f"{{}} {base64.b64encode(os.urandom(KEY_SIZE)).decode('ascii')}\n"
    if not add:
        _create_exclusive(shown, _HEADER + line.format(1))
        return 1
    text = _read_key_file(shown)
    ring = _parse(text, shown)
    if len(ring.keys) >= MAX_KEYS:
        raise ConfigError([f"key file {shown} already has {MAX_KEYS} keys: remove a retired key first"])
    new_id = max(ring.keys) + 1
    if new_id > 255:
        new_id = min(set(range(1, 256)) - set(ring.keys))
    if text and not text.endswith("\n"):
        text += "\n"
    _replace(shown, text + line.format(new_id))
    return new_id


def _read_key_file(path: str) -> str:
    # O_NONBLOCK: a FIFO at the path must not hang the daemon; fstat after open: no check/use race
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(
            [f"key file {path} does not exist: create it with `pyquorum keygen {path}`"]
        ) from None
    except OSError as exc:
        raise ConfigError([f"key file {path} cannot be opened: {exc.strerror}"]) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError([f"key file {path} is not a regular file"])
        problems = _permission_problems(path, st)
        if problems:
            raise ConfigError(problems)
        raw = b""
        while len(raw) <= MAX_FILE_SIZE:
            chunk = os.read(fd, MAX_FILE_SIZE + 1 - len(raw))
            if not chunk:
                break
            raw += chunk
    except OSError as exc:
        raise ConfigError([f"key file {path} cannot be read: {exc.strerror}"]) from None
    finally:
        os.close(fd)
    if len(raw) > MAX_FILE_SIZE:
        raise ConfigError([f"key file {path} is larger than {MAX_FILE_SIZE} bytes: wrong file?"])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError([f"key file {path} is not UTF-8 text: wrong file?"]) from None


def _permission_problems(path: str, st: os.stat_result) -> list[str]:
    problems = []
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        if mode & 0o004:
            what = "readable by others"
        elif mode & 0o040:
            what = "readable by its group"
        elif mode & 0o022:
            what = "writable by group or others"
        else:
            what = "accessible by group or others"
        problems.append(f"key file {path} is {what} (mode {mode:04o}): run chmod 600 {path}")
    euid = os.geteuid()
    if st.st_uid not in (0, euid):
        problems.append(
            f"key file {path} is owned by uid {st.st_uid}, not by root or by this user "
            f"(uid {euid}), who could replace the key: run chown {euid} {path}"
        )
    return problems


def _parse(text: str, path: str) -> KeyRing:
    problems: list[str] = []
    keys: dict[int, bytes] = {}
    first_line: dict[int, int] = {}
    send_key_id = 0
    for lineno, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"key file {path} line {lineno}"
        fields = line.split()
        if len(fields) != 2:
            problems.append(f"{where}: expected '<key id 1-255> <base64 key>', found {len(fields)} fields")
            continue
        id_text, key_text = fields
        if not _ID_RE.fullmatch(id_text) or not 1 <= int(id_text) <= 255:
            problems.append(f"{where}: key id must be a number from 1 to 255")
            continue
        key_id = int(id_text)
        try:
            key = base64.b64decode(key_text, validate=True)
        except (binascii.Error, ValueError):
            problems.append(f"{where}: key {key_id} is not valid base64")
            continue
        if len(key) != KEY_SIZE:
            problems.append(
                f"{where}: key {key_id} is {len(key)} bytes, expected {KEY_SIZE} "
                f"(make one with `pyquorum keygen --add {path}`)"
            )
            continue
        if key_id in keys:
            problems.append(f"{where}: key id {key_id} is already used on line {first_line[key_id]}")
            continue
        keys[key_id] = key
        first_line[key_id] = lineno
        if not send_key_id:
            send_key_id = key_id
    if not problems and not keys:
        problems.append(f"key file {path} contains no keys: add one with `pyquorum keygen --add`")
    if len(keys) > MAX_KEYS:
        problems.append(
            f"key file {path} has {len(keys)} keys, at most {MAX_KEYS} are allowed: remove retired keys"
        )
    if problems:
        raise ConfigError(problems)
    return KeyRing(send_key_id=send_key_id, keys=keys)


def _create_exclusive(path: str, text: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise ConfigError(
            [
                f"key file {path} already exists: add a key with `pyquorum keygen --add {path}`, "
                "or remove the file first"
            ]
        ) from None
    except OSError as exc:
        raise ConfigError([f"cannot create key file {path}: {exc.strerror}"]) from None
    try:
        _write_all(fd, text)
    except OSError as exc:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)  # a half-written key file must not be mistaken for a good one
        raise ConfigError([f"cannot write key file {path}: {exc.strerror}"]) from None
    os.close(fd)
    _fsync_dir(path)


def _replace(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.urandom(4).hex()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConfigError([f"cannot create {tmp}: {exc.strerror}"]) from None
    try:
        try:
            _write_all(fd, text)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise ConfigError([f"cannot rewrite key file {path}: {exc.strerror}"]) from None
    _fsync_dir(path)


def _write_all(fd: int, text: str) -> None:
    data = text.encode("utf-8")
    while data:
        data = data[os.write(fd, data) :]
    os.fsync(fd)


def _fsync_dir(path: str) -> None:
    # the new directory entry must survive a crash as well as the file's content
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise ConfigError([f"cannot sync the directory of {path}: {exc.strerror}"]) from None
