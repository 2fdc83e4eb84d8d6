"""Log formats: text and JSON carry the same fields; journald is detected from stderr itself."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from pyquorum import cli
from pyquorum.config import LogFormat
from pyquorum.runtime import logs
from pyquorum.runtime.logs import configure_logging, log_event

from .test_cli import FakeDaemon, daemon, free_port  # noqa: F401  (daemon is a fixture)

NODE = "10.0.0.1:51621"


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    root = logging.getLogger("pyquorum")
    handlers, level = list(root.handlers), root.level
    yield logging.getLogger("pyquorum.test")
    root.handlers[:] = handlers
    root.setLevel(level)


def parse_logfmt(text: str) -> dict[str, str]:
    """``a=1 b="x y"`` -> {"a": "1", "b": "x y"}: the reading a log collector does."""
    fields: dict[str, str] = {}
    decoder = json.JSONDecoder()
    i = 0
    while i < len(text):
        eq = text.index("=", i)
        name = text[i:eq]
        if text[eq + 1 : eq + 2] == '"':
            value, end = decoder.raw_decode(text, eq + 1)
        else:
            end = text.find(" ", eq + 1)
            end = len(text) if end < 0 else end
            value = text[eq + 1 : end]
        fields[name] = value
        i = end + 1
    return fields


FIELDS: dict[str, Any] = {
    "term": 7,
    "votes": "3/3",
    "reason": "lost quorum",
    "acked": "1/3",
    "deadline_in_s": 0.52,
    "rtt_s": 0.1 + 0.2,  # 0.30000000000000004: the same digits in both formats
    "authenticated": True,
    "master": None,
    "quote": 'say "hi"',
    "equals": "a=b",
    "newline": "one\ntwo",
    "escape": "\x1b[31mred",
    "empty": "",
    "unicode": "Zürich",
}


def emit(logger: logging.Logger, fmt: LogFormat) -> str:
    stream = io.StringIO()
    configure_logging(logging.DEBUG, NODE, fmt, stream=stream, environ={})
    log_event(logger, logging.WARNING, "became_slave", **FIELDS)
    return stream.getvalue()


def test_logs_text_line(logger: logging.Logger) -> None:
    out = emit(logger, "text")
    assert out.count("\n") == 1, "one line per event, whatever the values hold"
    date, time, level, rest = out.rstrip("\n").split(" ", 3)
    assert len(date) == 10 and len(time) == 12  # 2026-01-02 03:04:05,678
    assert level == "WARNING"
    assert rest.startswith(f'node={NODE} event=became_slave term=7 votes=3/3 reason="lost quorum" ')
    assert "rtt_s=0.30000000000000004" in rest
    assert "authenticated=true master=null" in rest
    assert r'newline="one\ntwo"' in rest
    assert r'escape="\u001b[31mred"' in rest  # no terminal escape reaches the screen
    assert 'empty=""' in rest


def test_logs_json_line(logger: logging.Logger) -> None:
    out = emit(logger, "json")
    assert out.count("\n") == 1
    record = json.loads(out)
    assert record.pop("time").endswith("Z")
    assert record == {
        "level": "WARNING",
        "node": NODE,
        "logger": "pyquorum.test",
        "event": "became_slave",
        **FIELDS,
    }


def test_logs_text_and_json_have_the_same_fields(logger: logging.Logger) -> None:
    text = emit(logger, "text").rstrip("\n").split(" ", 3)[3]
    record = json.loads(emit(logger, "json"))
    from_text = parse_logfmt(text)
    assert from_text.pop("node") == record.pop("node")
    for key in ("time", "level", "logger"):
        record.pop(key)
    assert sorted(from_text) == sorted(record)
    for name, value in record.items():
        # text is untyped: a string is itself, anything else is written as JSON writes it
        assert from_text[name] == (value if isinstance(value, str) else json.dumps(value)), name


def test_logs_plain_records_and_exceptions(logger: logging.Logger) -> None:
    stream = io.StringIO()
    configure_logging(logging.INFO, NODE, "json", stream=stream, environ={})
    logger.info("event=legacy term=%d", 3)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception("event=internal_error")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "event=legacy term=3"
    assert "event" not in first
    assert second["message"] == "event=internal_error"
    assert "RuntimeError: boom" in second["exception"]


def test_logs_non_finite_numbers_and_other_types(logger: logging.Logger) -> None:
    stream = io.StringIO()
    configure_logging(logging.INFO, NODE, "json", stream=stream, environ={})
    log_event(logger, logging.INFO, "odd", nan=float("nan"), inf=float("inf"), path=Path("/x"))  # type: ignore[arg-type]
    assert json.loads(stream.getvalue()) | {"time": 0} == {
        "time": 0,
        "level": "INFO",
        "node": NODE,
        "logger": "pyquorum.test",
        "event": "odd",
        "nan": "nan",
        "inf": "inf",
        "path": "/x",
    }


def test_logs_level_filters_and_costs_nothing_when_off(
    logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = io.StringIO()
    configure_logging(logging.WARNING, NODE, "text", stream=stream, environ={})

    def fail(fields: object) -> str:
        raise AssertionError("rendered a disabled event")

    monkeypatch.setattr(logs, "render_fields", fail)
    log_event(logger, logging.DEBUG, "heartbeat_sent", term=1)
    assert stream.getvalue() == ""


@pytest.mark.parametrize("name", ["level", "time", "node", "message", "Term", "9lives"])
def test_logs_reserved_or_bad_field_names_raise(logger: logging.Logger, name: str) -> None:
    configure_logging(logging.INFO, NODE, "text", stream=io.StringIO(), environ={})
    with pytest.raises(ValueError, match="not allowed"):
        log_event(logger, logging.INFO, "x", **{name: 1})


def test_logs_configure_twice_replaces_the_handler(logger: logging.Logger) -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging(logging.INFO, NODE, "text", stream=first, environ={})
    configure_logging(logging.INFO, NODE, "json", stream=second, environ={})
    log_event(logger, logging.INFO, "once")
    assert first.getvalue() == ""
    assert json.loads(second.getvalue())["event"] == "once"


# -- journald ------------------------------------------------------------------------------------


def journal_stream_of(stream: IO[Any]) -> str:
    info = os.fstat(stream.fileno())
    return f"{info.st_dev}:{info.st_ino}"


def test_logs_journald_detected_only_for_the_stream_it_names(tmp_path: Path) -> None:
    with open(tmp_path / "journal", "w") as journal, open(tmp_path / "other", "w") as other:
        environ = {"JOURNAL_STREAM": journal_stream_of(journal)}
        assert logs.stderr_is_journal(journal, environ)
        # inherited by a child whose stderr goes elsewhere: not the journal
        assert not logs.stderr_is_journal(other, environ)
        assert not logs.stderr_is_journal(journal, {})
        assert not logs.stderr_is_journal(journal, {"JOURNAL_STREAM": "garbage"})
        assert not logs.stderr_is_journal(io.StringIO(), environ)  # no file descriptor


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_logs_under_journald_priority_prefix_and_no_timestamp(
    logger: logging.Logger, tmp_path: Path, fmt: LogFormat
) -> None:
    path = tmp_path / "journal"
    with open(path, "w") as journal:
        configure_logging(
            logging.DEBUG, NODE, fmt, stream=journal, environ={"JOURNAL_STREAM": journal_stream_of(journal)}
        )
        log_event(logger, logging.INFO, "became_master", term=7, votes="3/3")
        log_event(logger, logging.WARNING, "became_slave", term=8, reason="lost quorum")
        log_event(logger, logging.ERROR, "script_start_failed", term=9)
        log_event(logger, logging.DEBUG, "tick")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logger.exception("event=internal_error")
    lines = path.read_text().splitlines()
    priorities = [line[: line.index(">") + 1] for line in lines]
    assert priorities[:4] == ["<6>", "<4>", "<3>", "<7>"]
    # text: every line of the traceback carries the priority, so journald files all of it as an
    # error; json: the traceback is a string in the one line
    assert set(priorities[4:]) == {"<3>"}
    assert len(lines) > 5 if fmt == "text" else len(lines) == 5
    if fmt == "text":
        assert lines[0] == f"<6>node={NODE} event=became_master term=7 votes=3/3"
        assert lines[1] == f'<4>node={NODE} event=became_slave term=8 reason="lost quorum"'
    else:
        record = json.loads(lines[0].removeprefix("<6>"))
        assert record["event"] == "became_master" and record["term"] == 7 and "time" in record


def test_logs_journald_through_a_real_process(tmp_path: Path) -> None:
    # the daemon's command line configures logging from its own stderr and environment
    path = tmp_path / "stderr"
    code = (
        "import logging, sys\n"
        "from pyquorum.runtime.logs import configure_logging, log_event\n"
        "configure_logging(logging.INFO, 'n1', 'text')\n"
        "log_event(logging.getLogger('pyquorum'), logging.WARNING, 'started', term=1)\n"
    )
    with open(path, "w") as stderr:
        env = {**os.environ, "JOURNAL_STREAM": journal_stream_of(stderr)}
        subprocess.run([sys.executable, "-c", code], stderr=stderr, env=env, check=True, timeout=60)
    assert path.read_text() == "<4>node=n1 event=started term=1\n"
    with open(path, "w") as stderr:
        env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
        subprocess.run([sys.executable, "-c", code], stderr=stderr, env=env, check=True, timeout=60)
    assert path.read_text().endswith(" WARNING node=n1 event=started term=1\n")


def test_logs_daemon_command_line_sets_the_format(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    daemon: FakeDaemon,  # noqa: F811
    logger: logging.Logger,
) -> None:
    # --config with log_format = "json": the daemon's logging is configured from the Config
    path = tmp_path / "node.toml"
    path.write_text(
        f'bind = "127.0.0.1"\nport = {free_port()}\nstate_dir = "{tmp_path / "state"}"\n'
        'peers = ["127.0.0.2", "127.0.0.3"]\nlog_format = "json"\nlog_level = "info"\n'
    )
    assert cli.main(["--config", str(path)]) == 0
    (config,) = daemon.configs
    assert (config.log_format, config.log_level) == ("json", logging.INFO)
    capsys.readouterr()
    log_event(logger, logging.INFO, "became_master", term=7)
    record = json.loads(capsys.readouterr().err)
    assert (record["node"], record["event"], record["term"]) == (config.node_id, "became_master", 7)
