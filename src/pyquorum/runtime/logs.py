"""Log lines for people and for machines: one event per line, the same fields in both formats.

What this module owns
---------------------
How the ``pyquorum`` loggers write to stderr (``configure_logging``), and the one way to log a state
change (``log_event``): an event name and its fields, e.g. ``log_event(log, logging.INFO,
"became_master", term=7, votes="3/3")``. The fields travel in the ``LogRecord`` (``extra=``), so each
formatter renders them from the values, never by parsing text:

* text, for people: ``2026-01-02 03:04:05,678 INFO node=10.0.0.1:51621 event=became_master term=7
  votes=3/3``. Fields are ``name=value`` (logfmt); a string value with anything but printable ASCII
  other than ``"``, ``=`` and ``\\`` in it (a space, a newline, an escape sequence), or nothing, is
  written as a JSON string (``reason="lost quorum"``), so that no value can forge a field or a line.
  Floats are written in their shortest round-trip form, as JSON writes them, so the two formats show
  the same numbers.
* json, for collectors: one object per line, ``{"time": "2026-01-02T03:04:05.678Z", "level":
  "INFO", "node": "10.0.0.1:51621", "logger": "pyquorum", "event": "became_master", "term": 7,
  "votes": "3/3"}``. Records logged without ``log_event`` (another library's) carry
  ``"message"`` instead of ``"event"`` and fields; an exception (``log_exception``) adds
  ``"exception"``.

Under systemd
-------------
journald stamps every line with the time it received it, so a line of ours with its own timestamp
shows two. When stderr is the journal (``$JOURNAL_STREAM`` names the device and inode of our stderr,
the check sd_journal_stream_fd(3) documents; a child that inherited the variable but writes
elsewhere is not fooled), text lines carry no timestamp and no level word: each line starts with the
syslog priority instead, ``<6>node=... event=...``, which journald strips and stores as the entry's
PRIORITY (``SyslogLevelPrefix=yes``, its default), so ``journalctl -p warning`` works and the level is
not written twice. JSON lines get the same prefix and keep their ``"time"`` and ``"level"``: they are
data for a collector, which should find the same fields wherever the line went. Every line of a
multi-line record (a traceback) gets the prefix, so journald files all of it at the same priority.

Honest limits
-------------
Field values are str, int, float, bool or None (text ``true``/``false``/``null``, as in JSON);
anything else is written as its ``str()`` in both formats. Non-finite floats become the strings
``"nan"``/``"inf"``/``"-inf"``, since JSON has no such numbers. Field names are lower-case
identifiers other than the fields every line has (``time level node logger event message
exception``); another name is a bug of ours and raises ``ValueError`` at the call.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Mapping
from typing import IO, Any

from pyquorum.config import LogFormat

__all__ = [
    "JsonFormatter",
    "TextFormatter",
    "configure_logging",
    "log_event",
    "log_exception",
    "render_fields",
    "stderr_is_journal",
]

ROOT_LOGGER = "pyquorum"
# The LogRecord attributes log_event() sets (through extra=, so never a clash with logging's own).
EVENT_ATTR = "pyquorum_event"
FIELDS_ATTR = "pyquorum_fields"
RESERVED_FIELDS = frozenset({"time", "level", "node", "logger", "event", "message", "exception"})

Value = str | int | float | bool | None

_FIELD_NAME = re.compile(r"[a-z][a-z0-9_]*")
# Written without quotes: printable ASCII but space, double quote, equals sign and backslash.
# Anything else is a JSON string, so that a value (perhaps a peer's text) cannot forge a field.
_BARE = re.compile(r"[\x21\x23-\x3c\x3e-\x5b\x5d-\x7e]+")
# syslog(3) priorities for Python's levels; journald reads them from a "<N>" line prefix.
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
_checked_names: set[str] = set()


def log_event(logger: logging.Logger, level: int, event: str, /, **fields: Value) -> None:
    """Log one event with its fields: ``event=<event> name=value ...`` in text, an object in json.

    Costs one ``isEnabledFor`` when the level is off, so per-datagram debug events are cheap.
    """
    if not logger.isEnabledFor(level):
        return
    _check_names(fields)
    text = render_fields({"event": event, **fields})
    logger.log(level, "%s", text, extra={EVENT_ATTR: event, FIELDS_ATTR: dict(fields)})


def log_exception(logger: logging.Logger, event: str, /, **fields: Value) -> None:
    """``log_event`` at ERROR with the exception being handled (its traceback follows the line in
    text, and is the ``"exception"`` member in json). Call it from an ``except`` block."""
    _check_names(fields)
    text = render_fields({"event": event, **fields})
    logger.error("%s", text, exc_info=True, extra={EVENT_ATTR: event, FIELDS_ATTR: dict(fields)})


def _check_names(fields: Mapping[str, Value]) -> None:
    for name in fields:
        if name not in _checked_names:
            if not _FIELD_NAME.fullmatch(name) or name in RESERVED_FIELDS:
                raise ValueError(f"log field name {name!r} is not allowed (reserved or not lower_snake)")
            _checked_names.add(name)


def render_fields(fields: Mapping[str, Value]) -> str:
    """``name=value`` pairs separated by spaces, each value as the text format writes it."""
    return " ".join(f"{name}={_text_value(value)}" for name, value in fields.items())


def _json_value(value: object) -> Value:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return str(value)


def _text_value(value: object) -> str:
    value = _json_value(value)
    if isinstance(value, str):
        return value if _BARE.fullmatch(value) else json.dumps(value)
    if value is None or isinstance(value, bool):
        return "null" if value is None else "true" if value else "false"
    return repr(value)  # what json.dumps writes for an int or a finite float, without its cost


def stderr_is_journal(stream: IO[Any] | None = None, environ: Mapping[str, str] | None = None) -> bool:
    """True when ``stream`` (default: stderr) is the journald stream systemd gave this service."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        info = os.fstat((sys.stderr if stream is None else stream).fileno())
    except (OSError, ValueError, AttributeError):
        return False  # no file descriptor (a test's capture, a closed stream): not the journal
    return info.st_dev == int(device) and info.st_ino == int(inode)


class _Formatter(logging.Formatter):
    def __init__(self, node: str, journal: bool) -> None:
        super().__init__()
        self.node = node
        self.journal = journal

    def _prefix_lines(self, record: logging.LogRecord, text: str) -> str:
        if not self.journal:
            return text
        prefix = f"<{_PRIORITY.get(record.levelno, _priority(record.levelno))}>"
        return "\n".join(prefix + line for line in text.split("\n"))


def _priority(levelno: int) -> int:
    # a custom level: the priority of the nearest standard level at or below it
    below = [level for level in _PRIORITY if level <= levelno]
    return _PRIORITY[max(below)] if below else 7


class TextFormatter(_Formatter):
    """``<time> <LEVEL> node=<id> <message>``; under journald ``<N>node=<id> <message>``."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            message = f"{message}\n{record.exc_text}"
        if self.journal:
            return self._prefix_lines(record, f"node={self.node} {message}")
        return f"{self.formatTime(record)} {record.levelname} node={self.node} {message}"


def utc_text(ns: int, *, places: int) -> str:
    """``ns`` nanoseconds since the epoch as ISO 8601 in UTC, ``places`` digits of a second (1-9):
    ``utc_text(0, places=3) == "1970-01-01T00:00:00.000Z"``. The time module's, not datetime's:
    datetime stays out of the daemon (0.7 MB resident, for two timestamps)."""
    seconds, rest = divmod(ns, 1_000_000_000)
    fraction = f"{rest:09d}"[:places]
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{fraction}Z"


class JsonFormatter(_Formatter):
    """One JSON object per line; the fields of ``log_event`` as members, never parsed from text."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Value] = {
            "time": utc_text(round(record.created * 1e9), places=3),
            "level": record.levelname,
            "node": self.node,
            "logger": record.name,
        }
        event = getattr(record, EVENT_ATTR, None)
        fields = getattr(record, FIELDS_ATTR, None)
        if isinstance(event, str) and isinstance(fields, dict):
            out["event"] = event
            for name, value in fields.items():
                out[name] = _json_value(value)
        else:
            out["message"] = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exception"] = record.exc_text
        return self._prefix_lines(record, json.dumps(out, allow_nan=False))


class _PyquorumHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler configure_logging() installed, so a second call replaces it."""


def configure_logging(
    level: int,
    node: str,
    log_format: LogFormat = "text",
    *,
    stream: IO[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> logging.Handler:
    """Send the ``pyquorum`` loggers to ``stream`` (default: stderr) in ``log_format``, at ``level``.

    Detects journald on the stream (see the module docstring). Calling it again replaces the
    handler it installed before; returns the new one.
    """
    out = sys.stderr if stream is None else stream
    journal = stderr_is_journal(out, environ)
    logger = logging.getLogger(ROOT_LOGGER)
    for handler in list(logger.handlers):
        if isinstance(handler, _PyquorumHandler):
            logger.removeHandler(handler)
    handler = _PyquorumHandler(out)
    formatter = JsonFormatter if log_format == "json" else TextFormatter
    handler.setFormatter(formatter(node, journal))
    logger.addHandler(handler)
    logger.setLevel(level)
    return handler
