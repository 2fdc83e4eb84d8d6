"""The configuration file: one TOML key for each command-line option of the daemon.

What this module owns
---------------------
``KEYS``, the table that names, for every option of the daemon, its key in the file, the argparse
destination it fills and the TOML type it takes; and ``load()``, which reads a file with the standard
library's TOML parser (``tomllib``; on Python 3.10 ``tomli``, the same code published separately) and
returns its values converted to exactly what argparse produces from the equivalent command line: a
float for seconds, an int for a port, a ``Path`` for a directory, a list of strings for the peers. The
command line (``cli.parse_daemon_args``) installs them as the parser's defaults, so an option given on
the command line overrides the file, and ``cli.build_config`` turns either into the same ``Config``.

What it must not know
---------------------
What a value means. Here a port is an integer from 1 to 65535 and a timeout a finite number; whether
the timing is safe, the address local or the script executable is ``Config.validate()``'s business, so
that a value from the file and the same value from the command line meet the same checks and the same
messages.

Format
------
UTF-8 TOML, every key at the top level (no tables), named after its long option with ``_`` for
``-``: ``--heartbeat-interval 0.1`` is ``heartbeat_interval = 0.1``. The SERVER arguments are
``peers = ["10.0.0.2", "10.0.0.3"]``; ``-v``/``-vv`` are ``log_level = "info"``/``"debug"``. Paths
must be absolute (a service's working directory is ``/``; ``~`` is expanded); the script may also be
a bare command name, looked up on ``$PATH`` as with ``-s``. docs/operations.md has the table for
operators; a test checks that it lists every key.

Adding an option: add it to the parser in cli.py, then one line to ``KEYS`` (its key, kind and, if the
destination differs from the key, ``dest=``). The tests fail until both exist and the option has a
sample value in tests/test_configfile.py and a row in docs/operations.md.

Honest limits
-------------
The parser reports the line and column of a syntax error, and those are passed on; it does not say
where a key or a value was, so an unknown key or a wrong type is reported with the file and the key
but no line. Every such problem in the file is reported at once; a syntax error stops the reading
there (the parser cannot go on), so problems after it show on the next attempt.
"""

from __future__ import annotations

import json
import math
import os
import stat
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pyquorum.config import LOG_FORMATS, LOG_LEVELS, RESTART_POLICIES

__all__ = ["KEYS", "MAX_FILE_SIZE", "Key", "Kind", "load"]

# A configuration is a few hundred bytes; a file a thousand times larger is the wrong file.
MAX_FILE_SIZE = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Kind:
    """The TOML type a key takes: ``what`` for messages and the docs, ``convert`` raises
    ``ValueError`` when a value does not fit and returns what argparse would have produced."""

    what: str
    convert: Callable[[object], object]


def _seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError
    return float(value)


def _port(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError
    return value


def _text(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError
    return value


def _path(value: object) -> Path:
    text = _text(value)
    if not os.path.isabs(os.path.expanduser(text)):
        raise ValueError
    return Path(text)  # expanded by cli.build_config, as for the command line's Path


def _command(value: object) -> str:
    text = _text(value)
    if os.sep in text and not os.path.isabs(os.path.expanduser(text)):
        raise ValueError
    return text


def _text_list(value: object) -> list[str]:
    if not isinstance(value, list):
        raise ValueError
    return [_text(item) for item in value]


def _choice(choices: tuple[str, ...]) -> Kind:
    def convert(value: object) -> str:
        if not isinstance(value, str) or value not in choices:
            raise ValueError
        return value

    return Kind("one of " + ", ".join(f'"{c}"' for c in choices), convert)


SECONDS = Kind("a number of seconds", _seconds)
PORT = Kind("an integer from 1 to 65535", _port)
ADDRESS = Kind('a string (an IP address, e.g. "10.0.0.1")', _text)
PATH = Kind('an absolute path (a string, e.g. "/etc/pyquorum/key")', _path)
COMMAND = Kind("an absolute path or a command name on $PATH (a string)", _command)
SERVERS = Kind('an array of strings (e.g. ["10.0.0.2", "db3:6000"])', _text_list)


def _priorities(value: object) -> list[str]:
    if not isinstance(value, dict):
        raise ValueError
    out = []
    for node, prio in value.items():
        if isinstance(prio, bool) or not isinstance(prio, int):
            raise ValueError
        out.append(f"{_text(node)}={prio}")
    return out


PRIORITIES = Kind('a table of member = integer (e.g. {"10.0.0.1" = 2, "10.0.0.2" = 1})', _priorities)


@dataclass(frozen=True, slots=True)
class Key:
    """One key of the file. ``dest`` is the argparse destination it fills (the key by default);
    ``covers`` lists other destinations of the parser that this key stands for."""

    name: str
    kind: Kind
    dest: str = ""
    covers: tuple[str, ...] = ()

    @property
    def target(self) -> str:
        return self.dest or self.name


# The order of the documentation table (docs/operations.md).
KEYS: tuple[Key, ...] = (
    Key("bind", ADDRESS),
    Key("port", PORT),
    Key("peers", SERVERS, dest="servers"),
    Key("script", COMMAND),
    Key("heartbeat_interval", SECONDS),
    Key("election_timeout", SECONDS),
    Key("stop_timeout", SECONDS),
    Key("start_delay", SECONDS),
    Key("kill_margin", SECONDS),
    Key("state_dir", PATH),
    Key("key_file", PATH),
    Key("restart", _choice(RESTART_POLICIES)),
    Key("priorities", PRIORITIES, dest="priority"),
    Key("witnesses", SERVERS, dest="witness"),
    Key("preempt_after", SECONDS),
    Key("notify", PATH),
    Key("notify_timeout", SECONDS),
    Key("log_level", _choice(tuple(LOG_LEVELS)), covers=("verbose", "very_verbose")),
    Key("log_format", _choice(LOG_FORMATS)),
    Key("http", Kind('a string "ADDRESS:PORT" (e.g. "127.0.0.1:9621")', _text)),
)

_BY_NAME: Mapping[str, Key] = {key.name: key for key in KEYS}


def load(path: str | os.PathLike[str]) -> tuple[dict[str, object], list[str]]:
    """Read a configuration file: (values by argparse destination, every problem found).

    A value that does not fit its key is left out of the values and reported; the caller goes on
    with the rest, so that one run reports every problem, and refuses to start if there was any.
    """
    shown = os.fspath(path)
    where = f"config file {shown}"
    try:
        data = _read(shown)
    except _Unreadable as exc:
        return {}, [f"{where}: {exc}"]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return {}, [f"{where} is not UTF-8 text (byte {exc.start}): TOML files are UTF-8"]
    # Imported only when there is a file to read: a daemon run from its command line alone (a
    # systemd unit, a test cluster) does not carry the parser (0.1 MB resident).
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # the dependency `tomli>=2; python_version<"3.11"` in pyproject.toml
        import tomli as tomllib
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return {}, [f"{where} is not valid TOML: {exc}"]
    values: dict[str, object] = {}
    problems: list[str] = []
    for name, value in document.items():
        key = _BY_NAME.get(name)
        if key is None:
            problems.append(f"{where}: {_unknown(name, value)}")
            continue
        try:
            values[key.target] = key.kind.convert(value)
        except ValueError:
            problems.append(f"{where}: key '{name}' must be {key.kind.what}, not {_show(value)}")
    return values, problems


class _Unreadable(Exception):
    pass


def _read(path: str) -> bytes:
    # O_NONBLOCK: a FIFO at the path must not hang the start; fstat after open: what we check is
    # what we read.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise _Unreadable(exc.strerror or str(exc)) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _Unreadable("not a regular file")
        if info.st_size > MAX_FILE_SIZE:
            raise _Unreadable(f"{info.st_size} bytes, more than a configuration file can be")
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise _Unreadable(exc.strerror or str(exc)) from None
    finally:
        os.close(fd)


def _unknown(name: str, value: object) -> str:
    import difflib  # only for a mistake: not loaded into every daemon (0.4 MB)

    message = f"unknown key '{name}'"
    close = difflib.get_close_matches(name.replace("-", "_"), list(_BY_NAME), n=1, cutoff=0.6)
    if close:
        message += f" (did you mean '{close[0]}'?)"
    else:
        message += f"; the keys are {', '.join(_BY_NAME)}"
    if isinstance(value, dict):
        message += "; there are no tables: write every key at the top level, above any [header]"
    return message


def _show(value: object) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = json.dumps(value)
    elif isinstance(value, dict):
        return "a table"
    else:
        text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{text} ({_type_name(value)})"


def _type_name(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "a date or time"
