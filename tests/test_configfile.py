"""The --config TOML file: one key per option, the same Config as the command line, and clear errors.

Loopback only: building a Config checks the bind address and the port with bind() on 127.0.0.1.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from pathlib import Path

import pytest

from pyquorum import cli, configfile
from pyquorum.config import Config
from pyquorum.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
# Options that only make sense on the command line.
CLI_ONLY = {"help", "version", "config"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Node:
    """A valid node 127.0.0.1:<free port> with its own state dir, a script and a key file, and for
    each key a sample value different from the default: as TOML text and as command-line words."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.port = free_port()
        self.script = tmp_path / "job.sh"
        self.script.write_text("#!/bin/sh\nexec sleep 1000\n")
        self.script.chmod(0o755)
        self.hook = tmp_path / "hook.sh"
        self.hook.write_text("#!/bin/sh\nexit 0\n")
        self.hook.chmod(0o755)
        self.key = tmp_path / "cluster.key"
        assert cli.main(["keygen", str(self.key)]) == 0
        state = tmp_path / "state"
        other_state = tmp_path / "other-state"
        # key -> (TOML value, the equivalent command line)
        self.samples: dict[str, tuple[str, list[str]]] = {
            "bind": ('"127.0.0.1"', ["-b", "127.0.0.1"]),
            "port": (str(self.port), ["-p", str(self.port)]),
            "peers": ('["127.0.0.2", "localhost:7000"]', ["127.0.0.2", "localhost:7000"]),
            "script": (f'"{self.script}"', ["-s", str(self.script)]),
            "heartbeat_interval": ("0.05", ["--heartbeat-interval", "0.05"]),
            "election_timeout": ("2", ["--election-timeout", "2"]),
            "stop_timeout": ("0.25", ["--stop-timeout", "0.25"]),
            "start_delay": ("0.5", ["--start-delay", "0.5"]),
            "kill_margin": ("0.03", ["--kill-margin", "0.03"]),
            "state_dir": (f'"{other_state}"', ["--state-dir", str(other_state)]),
            "key_file": (f'"{self.key}"', ["--key-file", str(self.key)]),
            "restart": ('"never"', ["--restart", "never"]),
            "notify": (f'"{self.hook}"', ["--notify", str(self.hook)]),
            "notify_timeout": ("5", ["--notify-timeout", "5"]),
            "log_level": ('"debug"', ["--log-level", "debug"]),
            "log_format": ('"json"', ["--log-format", "json"]),
            "http": (f'"127.0.0.1:{self.port}"', ["--http", f"127.0.0.1:{self.port}"]),
            "priorities": ('{"127.0.0.2" = 2}', ["--priority", "127.0.0.2=2"]),
            "witnesses": ('["127.0.0.2"]', ["--witness", "127.0.0.2"]),
            "preempt_after": ("5", ["--preempt-after", "5"]),
        }
        # What every test node needs: this node's address and port, a state dir, the peers.
        self.base: dict[str, tuple[str, list[str]]] = {
            "bind": self.samples["bind"],
            "port": self.samples["port"],
            "state_dir": (f'"{state}"', ["--state-dir", str(state)]),
            "peers": ('["127.0.0.2", "127.0.0.3"]', ["127.0.0.2", "127.0.0.3"]),
        }

    def write(self, text: str, name: str = "node.toml") -> Path:
        path = self.tmp / name
        path.write_text(text)
        return path

    def toml(self, entries: dict[str, tuple[str, list[str]]]) -> str:
        return "".join(f"{key} = {value}\n" for key, (value, _) in entries.items())

    def argv(self, entries: dict[str, tuple[str, list[str]]]) -> list[str]:
        words = [w for key, (_, cli_words) in entries.items() if key != "peers" for w in cli_words]
        return words + (entries["peers"][1] if "peers" in entries else [])


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path)


def config_or_none(argv: list[str]) -> Config | None:
    try:
        return cli.load_config(argv)
    except ConfigError:
        return None


# -- one key per option --------------------------------------------------------------------------


def test_configfile_every_daemon_option_has_a_key() -> None:
    parser = cli._daemon_parser()
    dests = {action.dest for action in parser._actions} - CLI_ONLY
    covered = {key.target for key in configfile.KEYS} | {d for key in configfile.KEYS for d in key.covers}
    assert dests - covered == set(), "options without a key in configfile.KEYS"
    assert covered - dests == set(), "keys for options the daemon does not have"


def test_configfile_every_key_has_a_sample_and_a_documentation_row(node: Node) -> None:
    names = [key.name for key in configfile.KEYS]
    assert sorted(node.samples) == sorted(names), "give each key a sample in Node.samples"
    doc = (ROOT / "docs" / "operations.md").read_text()
    undocumented = [name for name in names if not re.search(rf"^\| `{name}` \|", doc, re.MULTILINE)]
    assert undocumented == [], "docs/operations.md: the configuration table lacks these keys"


@pytest.mark.parametrize("key", [key.name for key in configfile.KEYS])
def test_configfile_key_gives_the_same_config_as_the_option(node: Node, key: str) -> None:
    entries = {**node.base, key: node.samples[key]}
    from_file = cli.load_config(["--config", str(node.write(node.toml(entries)))])
    from_argv = cli.load_config(node.argv(entries))
    assert from_file == from_argv
    # and the key does something: without it the result differs (or cannot be built)
    without = {k: v for k, v in entries.items() if k != key}
    assert config_or_none(node.argv(without)) != from_file


def test_configfile_every_key_at_once_gives_the_same_config(node: Node) -> None:
    from_file = cli.load_config(["--config", str(node.write(node.toml(node.samples)))])
    from_argv = cli.load_config(node.argv(node.samples))
    assert from_file == from_argv
    defaults = cli.load_config(node.argv(node.base))
    same = [f for f in Config.__dataclass_fields__ if getattr(from_file, f) == getattr(defaults, f)]
    # every field an option sets differs from the defaults (the rest have no option yet)
    assert sorted(same) == sorted(
        ["me", "restart_backoff_s", "restart_backoff_max_s", "max_failures", "failure_window_s"]
    )


@pytest.mark.parametrize(
    ("value", "flags", "level"),
    [
        ('"info"', ["-v"], logging.INFO),
        ('"debug"', ["-vv"], logging.DEBUG),
        ('"error"', ["--log-level", "error"], logging.ERROR),
    ],
)
def test_configfile_log_level_covers_v_and_vv(node: Node, value: str, flags: list[str], level: int) -> None:
    path = node.write(node.toml(node.base) + f"log_level = {value}\n")
    from_file = cli.load_config(["--config", str(path)])
    from_argv = cli.load_config([*flags, *node.argv(node.base)])
    assert from_file == from_argv
    assert from_file.log_level == level


def test_configfile_vv_wins_over_v_in_either_order(node: Node) -> None:
    # as before --log-level existed: -v and -vv are flags, the more verbose wins
    for flags in (["-v", "-vv"], ["-vv", "-v"], ["-vv", "--log-level", "error"]):
        assert cli.load_config([*flags, *node.argv(node.base)]).log_level == logging.DEBUG


# -- the command line overrides the file ---------------------------------------------------------


def test_configfile_command_line_overrides_the_file(node: Node, tmp_path: Path) -> None:
    other_port = free_port()
    path = node.write(node.toml(node.base) + 'log_level = "error"\nrestart = "always"\n')
    config = cli.load_config(
        ["--config", str(path), "-p", str(other_port), "-v", "--restart", "never", "127.0.0.9"]
    )
    assert config.me.port == other_port
    assert config.log_level == logging.INFO
    assert config.restart == "never"
    assert [str(p) for p in config.peers] == [f"127.0.0.9:{other_port}"]  # SERVERs replace peers
    assert config.state_dir == tmp_path / "state"  # from the file


def test_configfile_servers_from_the_file_or_nowhere(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    entries = {k: v for k, v in node.base.items() if k != "peers"}
    path = node.write(node.toml(entries))
    assert cli.main(["--config", str(path)]) == 2
    assert "no SERVER given" in capsys.readouterr().err


def test_configfile_relative_path_from_the_command_line_still_works(
    node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # only the file insists on absolute paths (a service's working directory is /)
    monkeypatch.chdir(tmp_path)
    config = cli.load_config([*node.argv(node.base), "--key-file", node.key.name])
    assert config.key_file == node.key


# -- mistakes in the file ------------------------------------------------------------------------


def file_problems(node: Node, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        cli.load_config(["--config", str(node.write(node.toml(node.base) + text))])
    return info.value.problems


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('port = "6000"\n', """key 'port' must be an integer from 1 to 65535, not "6000" (a string)"""),
        ("port = 0\n", "key 'port' must be an integer from 1 to 65535, not 0 (an integer)"),
        ("port = 70000\n", "key 'port' must be an integer"),
        ("port = true\n", "not true (a boolean)"),
        ('heartbeat_interval = "0.1"\n', "key 'heartbeat_interval' must be a number of seconds"),
        ("heartbeat_interval = nan\n", "not nan (a number)"),
        ("election_timeout = inf\n", "key 'election_timeout' must be a number of seconds"),
        ("stop_timeout = 1979-05-27\n", "(a date or time)"),
        ('peers = "127.0.0.2"\n', "key 'peers' must be an array of strings"),
        ("peers = [2]\n", "key 'peers' must be an array of strings"),
        ('bind = ""\n', "key 'bind' must be a string"),
        ("bind = [1, 2]\n", "not [1, 2] (an array)"),
        ('state_dir = "state"\n', "key 'state_dir' must be an absolute path"),
        ('key_file = "keys/cluster.key"\n', "key 'key_file' must be an absolute path"),
        ('script = "bin/job"\n', "key 'script' must be an absolute path or a command name"),
        ('restart = "sometimes"\n', """key 'restart' must be one of "on-failure", "always", "never\""""),
        ('log_level = "INFO"\n', "key 'log_level' must be one of"),
        ('log_format = "xml"\n', """key 'log_format' must be one of "text", "json\""""),
    ],
)
def test_configfile_wrong_type_names_file_and_key(node: Node, text: str, needle: str) -> None:
    # the base has these keys too; TOML forbids a key twice, so write the sample in their place
    key = text.split(" ", 1)[0]
    base = {k: v for k, v in node.base.items() if k != key}
    path = node.write(node.toml(base) + text)
    with pytest.raises(ConfigError) as info:
        cli.load_config(["--config", str(path)])
    problems = [p for p in info.value.problems if p.startswith(f"config file {path}: ")]
    assert len(problems) == 1, info.value.problems
    assert needle in problems[0]


def test_configfile_unknown_key_suggests_the_right_one(node: Node) -> None:
    (problem,) = file_problems(node, "heartbeat-interval = 0.1\n")
    assert problem.endswith("unknown key 'heartbeat-interval' (did you mean 'heartbeat_interval'?)")
    (problem,) = file_problems(node, "colour = 1\n")
    assert "unknown key 'colour'; the keys are bind, port, peers," in problem


def test_configfile_tables_are_refused_with_a_hint(node: Node) -> None:
    (problem,) = file_problems(node, "[timing]\nheartbeat_interval = 0.1\n")
    assert "unknown key 'timing'" in problem
    assert "write every key at the top level" in problem


def test_configfile_every_problem_at_once(node: Node, tmp_path: Path) -> None:
    problems = file_problems(
        node,
        f'colour = 1\nrestart = "sometimes"\nscript = "{tmp_path}/missing"\nelection_timeout = 0.2\n',
    )
    text = "\n".join(problems)
    assert "unknown key 'colour'" in text
    assert "key 'restart' must be one of" in text
    assert "does not exist" in text  # found by Config.validate(), after the file's own problems
    assert "at least 5 x --heartbeat-interval" in text
    assert "unsafe timing" in text
    assert len(problems) == 5


def test_configfile_syntax_error_gives_line_and_column(node: Node) -> None:
    path = node.write('bind = "127.0.0.1"\nport = \n')
    with pytest.raises(ConfigError) as info:
        cli.load_config(["--config", str(path)])
    assert f"config file {path} is not valid TOML: Invalid value (at line 2, column 8)" in info.value.problems


def test_configfile_a_key_given_twice_is_a_syntax_error(node: Node) -> None:
    path = node.write("port = 1\nport = 2\n")
    with pytest.raises(ConfigError) as info:
        cli.load_config(["--config", str(path), "127.0.0.2"])
    assert any("is not valid TOML" in p and "line 2" in p for p in info.value.problems)


@pytest.mark.parametrize("what", ["missing", "directory", "fifo", "not-utf8", "huge"])
def test_configfile_unreadable_file(node: Node, tmp_path: Path, what: str) -> None:
    path = tmp_path / what
    needle = {
        "missing": "No such file or directory",
        "directory": "not a regular file",
        "fifo": "not a regular file",
        "not-utf8": "is not UTF-8 text (byte 7)",
        "huge": "more than a configuration file can be",
    }[what]
    if what == "directory":
        path.mkdir()
    elif what == "fifo":
        os.mkfifo(path)  # never opened for writing: reading it must not hang
    elif what == "not-utf8":
        path.write_bytes(b"bind = \xff\n")
    elif what == "huge":
        path.write_bytes(b"#" * (configfile.MAX_FILE_SIZE + 1))
    with pytest.raises(ConfigError) as info:
        cli.load_config(["--config", str(path), *node.argv(node.base)])
    assert any(p.startswith(f"config file {path}") and needle in p for p in info.value.problems), (
        info.value.problems
    )


def test_configfile_command_line_errors_still_come_first(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    # a malformed command line is one usage error, whatever the file says
    path = node.write("colour = 1\n")
    assert cli.main(["--config", str(path), "--bogus"]) == 2
    err = capsys.readouterr().err
    assert err.count("pyquorum: error: ") == 1
    assert "--bogus" in err


def test_configfile_example_in_the_docs_is_valid(node: Node, tmp_path: Path) -> None:
    # the production example of docs/operations.md, with this test's addresses and paths
    doc = (ROOT / "docs" / "operations.md").read_text()
    match = re.search(r"```toml\n(.*?)```", doc, re.DOTALL)
    assert match, "docs/operations.md has no ```toml example"
    values, problems = configfile.load(node.write(match.group(1), "example.toml"))
    assert problems == []
    assert {"bind", "servers", "key_file", "script"} <= set(values)
