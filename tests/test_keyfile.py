"""Key files: keygen, load_keyring and every operator-facing error. Reference: security.md §6."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from pyquorum.core.errors import ConfigError
from pyquorum.keyfile import keygen, load_keyring
from pyquorum.wire.keyring import KEY_SIZE, MAX_KEYS, KeyRing


def b64key(fill: int) -> str:
    return base64.b64encode(bytes([fill]) * KEY_SIZE).decode("ascii")


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_keyring(path)
    return info.value.problems


def test_keygen_creates_one_key_with_mode_0600(tmp_path: Path) -> None:
    """Reference: security.md §6 (deployment step 1)."""
    path = tmp_path / "key"
    old_umask = os.umask(0)  # even a permissive umask must not widen the mode
    try:
        assert keygen(path) == 1
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    ring = load_keyring(path)
    assert ring.send_key_id == 1
    assert set(ring.keys) == {1}
    assert len(ring.keys[1]) == KEY_SIZE


def test_keygen_keys_are_random(tmp_path: Path) -> None:
    keygen(tmp_path / "a")
    keygen(tmp_path / "b")
    assert load_keyring(tmp_path / "a").keys[1] != load_keyring(tmp_path / "b").keys[1]


def test_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "key"
    keygen(path)
    before = path.read_bytes()
    with pytest.raises(ConfigError, match=r"already exists: add a key with `pyquorum keygen --add"):
        keygen(path)
    assert path.read_bytes() == before


def test_keygen_add_appends_an_accepted_not_sending_key(tmp_path: Path) -> None:
    """Rotation step 1 adds the new key second. Reference: security.md §6."""
    path = write(tmp_path / "key", f"# my comment\n1 {b64key(1)}\n")
    assert keygen(path, add=True) == 2
    text = path.read_text()
    assert text.startswith(f"# my comment\n1 {b64key(1)}\n2 ")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    ring = load_keyring(path)
    assert ring.send_key_id == 1
    assert set(ring.keys) == {1, 2}
    assert ring.keys[1] == bytes([1]) * KEY_SIZE
    assert not list(tmp_path.glob("key.tmp-*"))


def test_keygen_add_to_file_without_final_newline(tmp_path: Path) -> None:
    path = write(tmp_path / "key", f"7 {b64key(1)}")
    assert keygen(path, add=True) == 8
    assert set(load_keyring(path).keys) == {7, 8}


def test_keygen_add_wraps_to_lowest_free_id(tmp_path: Path) -> None:
    path = write(tmp_path / "key", f"255 {b64key(1)}\n1 {b64key(2)}\n")
    assert keygen(path, add=True) == 2
    assert load_keyring(path).send_key_id == 255


def test_keygen_add_refuses_beyond_max_keys(tmp_path: Path) -> None:
    path = tmp_path / "key"
    keygen(path)
    for _ in range(MAX_KEYS - 1):
        keygen(path, add=True)
    assert len(load_keyring(path).keys) == MAX_KEYS
    with pytest.raises(ConfigError, match="already has 4 keys: remove a retired key first"):
        keygen(path, add=True)


def test_keygen_add_needs_an_existing_safe_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        keygen(tmp_path / "missing", add=True)
    path = write(tmp_path / "key", f"1 {b64key(1)}\n", mode=0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        keygen(path, add=True)


def test_keygen_in_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot create key file"):
        keygen(tmp_path / "no" / "key")


def test_load_missing_file_says_how_to_create_it(tmp_path: Path) -> None:
    path = tmp_path / "key"
    assert problems(path) == [f"key file {path} does not exist: create it with `pyquorum keygen {path}`"]


@pytest.mark.parametrize(
    ("mode", "what"),
    [
        (0o644, "readable by others"),
        (0o604, "readable by others"),
        (0o640, "readable by its group"),
        (0o620, "writable by group or others"),
        (0o610, "accessible by group or others"),
    ],
)
def test_load_rejects_group_or_other_access(tmp_path: Path, mode: int, what: str) -> None:
    """Reference: security.md §6 (mode 0600)."""
    path = write(tmp_path / "key", f"1 {b64key(1)}\n", mode=mode)
    assert problems(path) == [f"key file {path} is {what} (mode {mode:04o}): run chmod 600 {path}"]


def test_load_accepts_mode_0400(tmp_path: Path) -> None:
    path = write(tmp_path / "key", f"1 {b64key(1)}\n", mode=0o400)
    assert load_keyring(path).send_key_id == 1


def test_load_rejects_file_owned_by_someone_else(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "key", f"1 {b64key(1)}\n")
    owner = path.stat().st_uid
    if owner == 0:  # root may own the file: pretend to run as another user who does not
        monkeypatch.setattr(os, "geteuid", lambda: 4242)
        os.chown(path, 4343, -1)
        owner = 4343
    else:
        monkeypatch.setattr(os, "geteuid", lambda: owner + 1)
    [problem] = problems(path)
    assert f"is owned by uid {owner}, not by root or by this user" in problem
    assert "run chown" in problem


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_load_unreadable_file(tmp_path: Path) -> None:
    path = write(tmp_path / "key", f"1 {b64key(1)}\n", mode=0o000)
    [problem] = problems(path)
    assert problem.startswith(f"key file {path} cannot be opened: Permission denied")


def test_load_rejects_directory_and_fifo_without_hanging(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir(mode=0o700)
    assert problems(tmp_path / "dir") == [f"key file {tmp_path / 'dir'} is not a regular file"]
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    assert problems(fifo) == [f"key file {fifo} is not a regular file"]


def test_load_follows_symlink_to_a_safe_file(tmp_path: Path) -> None:
    target = write(tmp_path / "real", f"3 {b64key(1)}\n")
    (tmp_path / "link").symlink_to(target)
    assert load_keyring(tmp_path / "link").send_key_id == 3


def test_load_comments_blank_lines_and_order(tmp_path: Path) -> None:
    """The first key line signs, every key verifies. Reference: security.md §6."""
    path = write(
        tmp_path / "key",
        f"# header\n\n   \n  9 {b64key(9)}   # new key, signs\n#1 {b64key(0)}\n1\t{b64key(1)}\n",
    )
    ring = load_keyring(path)
    assert ring.send_key_id == 9
    assert dict(ring.keys) == {9: bytes([9]) * KEY_SIZE, 1: bytes([1]) * KEY_SIZE}


def test_load_reports_every_bad_line_with_its_number(tmp_path: Path) -> None:
    short = base64.b64encode(b"x" * 16).decode()
    path = write(
        tmp_path / "key",
        "\n".join(
            [
                f"1 {b64key(1)}",  # line 1: fine
                "2",  # line 2: one field
                f"0 {b64key(2)}",  # line 3: id 0
                f"256 {b64key(2)}",  # line 4: id too big
                f"x1 {b64key(2)}",  # line 5: not a number
                "3 not*base64!",  # line 6
                f"4 {short}",  # line 7: 16 bytes
                f"1 {b64key(5)}",  # line 8: duplicate
                f"5 {b64key(5)} extra",  # line 9: three fields
            ]
        ),
    )
    where = f"key file {path} line"
    assert problems(path) == [
        f"{where} 2: expected '<key id 1-255> <base64 key>', found 1 fields",
        f"{where} 3: key id must be a number from 1 to 255",
        f"{where} 4: key id must be a number from 1 to 255",
        f"{where} 5: key id must be a number from 1 to 255",
        f"{where} 6: key 3 is not valid base64",
        f"{where} 7: key 4 is 16 bytes, expected 32 (make one with `pyquorum keygen --add {path}`)",
        f"{where} 8: key id 1 is already used on line 1",
        f"{where} 9: expected '<key id 1-255> <base64 key>', found 3 fields",
    ]


def test_load_errors_never_show_key_material(tmp_path: Path) -> None:
    secret = b64key(7)
    path = write(tmp_path / "key", f"1 {secret}\n1 {secret}\n2 {secret} {secret}\n3 {secret}x\n")
    error = str(ConfigError(problems(path)))
    assert secret not in error
    assert secret[:8] not in error


def test_load_empty_file(tmp_path: Path) -> None:
    path = write(tmp_path / "key", "# only a comment\n")
    assert problems(path) == [f"key file {path} contains no keys: add one with `pyquorum keygen --add`"]


def test_load_too_many_keys(tmp_path: Path) -> None:
    path = write(tmp_path / "key", "".join(f"{i} {b64key(i)}\n" for i in range(1, 6)))
    assert problems(path) == [f"key file {path} has 5 keys, at most 4 are allowed: remove retired keys"]


def test_load_binary_and_huge_files(tmp_path: Path) -> None:
    binary = tmp_path / "bin"
    binary.write_bytes(b"\xff\xfe\x00key")
    binary.chmod(0o600)
    assert problems(binary) == [f"key file {binary} is not UTF-8 text: wrong file?"]
    huge = write(tmp_path / "huge", "#" * (70 * 1024))
    assert problems(huge) == [f"key file {huge} is larger than 65536 bytes: wrong file?"]


def test_keyring_repr_hides_keys() -> None:
    ring = KeyRing(send_key_id=2, keys={2: b"\xaa" * KEY_SIZE, 1: b"\xbb" * KEY_SIZE})
    assert repr(ring) == "KeyRing(send_key_id=2, key_ids=[1, 2])"
    assert "aa" not in repr(ring).lower().replace("key_ids", "")


def test_keyring_is_immutable() -> None:
    source = {1: b"\x01" * KEY_SIZE}
    ring = KeyRing(send_key_id=1, keys=source)
    source[2] = b"\x02" * KEY_SIZE
    assert set(ring.keys) == {1}
    with pytest.raises(TypeError):
        ring.keys[3] = b"\x03" * KEY_SIZE  # type: ignore[index]


@pytest.mark.parametrize(
    ("send", "keys", "match"),
    [
        (1, {}, "1-4 keys"),
        (1, {i: b"k" * KEY_SIZE for i in range(1, 6)}, "1-4 keys"),
        (2, {1: b"k" * KEY_SIZE}, "not among the keys"),
        (0, {0: b"k" * KEY_SIZE}, "outside 1-255"),
        (1, {1: b"k" * 31}, "expected 32"),
    ],
)
def test_keyring_validates(send: int, keys: dict[int, bytes], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        KeyRing(send_key_id=send, keys=keys)
