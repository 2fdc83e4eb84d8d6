"""Telling systemd how the daemon is doing: the sd_notify(3) protocol, with the standard library.

What this module owns
---------------------
The messages a ``Type=notify`` service sends and when (``Notifier``'s stage methods, which the daemon
calls at each stage of its life), and the protocol under them: one datagram per message, of
newline-separated ``NAME=value`` assignments, to the AF_UNIX socket named by ``$NOTIFY_SOCKET``,
either a path (``/run/systemd/notify``) or, with a leading ``@``, a name in Linux's abstract socket
namespace. systemd documents this as a stable interface; the Python packages that wrap it are
unmaintained or C extensions, and the whole client is a socket and a ``sendto``.

The stages, in the order the daemon goes through them:

* socket bound, state loaded: ``ready(status)`` sends ``READY=1``, ``STATUS=slave term=3 master=none``;
* role, term or master changed: ``status(text)`` sends ``STATUS=master term=4`` (if it changed);
* every protocol tick that is on time: ``watchdog(now_s)`` sends ``WATCHDOG=1``, at most every half
  ``$WATCHDOG_USEC``;
* a reload begins: ``reloading()`` sends ``RELOADING=1``, ``MONOTONIC_USEC=...``, ``STATUS=reloading``;
* the reload is done, applied or refused: ``reloaded(status)`` sends ``READY=1``, ``STATUS=...``;
* a shutdown begins: ``stopping(status)`` sends ``STOPPING=1``, ``STATUS=stopping ...``.

``MONOTONIC_USEC`` is what ``Type=notify-reload`` (systemd 253 and later) requires with
``RELOADING=1``; older systemd ignores it. ``WATCHDOG=1`` proves the event loop is alive, so the
daemon must send it from its protocol ticker and only while the ticker is on time: a wedged loop
then stops pinging and systemd restarts it (``WatchdogSec=``). The watchdog is systemd's, for the
daemon; the script's safety does not depend on it (the guard holds the kill deadline, protocol.md
§4.4).

What it must not do
-------------------
Raise into the caller or block it. Without ``$NOTIFY_SOCKET`` (not under systemd, or another
``Type``) every method does nothing and returns False. A failed send (systemd restarting, a full
queue: the socket is non-blocking) returns False and is logged once, at warning level, then again
only after a success; the daemon goes on. ``from_environ(unset=True)`` removes the variables from
the environment, as sd_notify's ``unset_environment`` does, so that the script, which inherits the
daemon's environment, does not talk to systemd in the daemon's name (systemd would refuse it with
``NotifyAccess=main`` anyway, and log a complaint each time).

Honest limits
-------------
Linux only (the abstract namespace, and systemd). ``vsock:`` addresses (systemd 254 and later, for
virtual machines) are not supported: the notifier disables itself and logs why. A ``STATUS`` text is
cut to ``MAX_STATUS_CHARS`` and its newlines become spaces, so that it can neither exceed systemd's
limit on a message nor inject assignments.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping

from pyquorum.runtime.logs import log_event

__all__ = ["MAX_STATUS_CHARS", "Notifier", "status_text"]

log = logging.getLogger("pyquorum.sdnotify")

NOTIFY_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
# systemd reads at most a pipe buffer's worth (4096 bytes) per notification message; a status is
# one line on `systemctl status`, so 400 characters are plenty and leave room for the rest.
MAX_STATUS_CHARS = 400


def status_text(role: str, term: int, master: str | None = None, detail: str = "") -> str:
    """The ``STATUS=`` line, as ``systemctl status`` shows it: ``slave term=7 master=10.0.0.2:51621``."""
    text = f"{role} term={term}"
    if role != "master":
        text += f" master={master or 'none'}"
    return f"{text} {detail}" if detail else text


class Notifier:
    """The daemon's line to systemd. Build it with ``from_environ()`` once, at start-up, before the
    script can inherit the environment; then call the stage methods (module docstring)."""

    def __init__(
        self, address: str | None, *, watchdog_interval_s: float | None = None, source: str = ""
    ) -> None:
        self._address: str | bytes | None = None
        self._sock: socket.socket | None = None
        self._failing = False
        self._last_status: str | None = None
        self._last_ping_s: float | None = None
        self.watchdog_interval_s = watchdog_interval_s
        """Ping at least this often (half of ``$WATCHDOG_USEC``), or None: no watchdog."""
        if address:
            if address.startswith("@"):
                self._address = b"\0" + address[1:].encode()
            elif address.startswith("/"):
                self._address = address
            else:
                log_event(
                    log,
                    logging.WARNING,
                    "sd_notify_disabled",
                    reason="unsupported_address",
                    address=address + source,
                    hint="only a path or an @abstract name is supported",
                )

    @classmethod
    def from_environ(
        cls,
        environ: MutableMapping[str, str] | None = None,
        *,
        pid: int | None = None,
        unset: bool = True,
    ) -> Notifier:
        """A notifier for ``$NOTIFY_SOCKET``, with the watchdog of ``$WATCHDOG_USEC`` if
        ``$WATCHDOG_PID`` is unset or this process (``pid``, default ours). With ``unset``, the
        three variables are removed from ``environ`` (default: ``os.environ``)."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET")
        interval = watchdog_interval_s(env, os.getpid() if pid is None else pid)
        if unset:
            for name in NOTIFY_VARIABLES:
                env.pop(name, None)
        return cls(address, watchdog_interval_s=interval, source=" (from $NOTIFY_SOCKET)")

    @property
    def enabled(self) -> bool:
        """True under systemd with ``Type=notify`` (a usable ``$NOTIFY_SOCKET``)."""
        return self._address is not None

    # -- the stages ----------------------------------------------------------------------------

    def ready(self, status: str) -> bool:
        """Start-up is complete: the socket is bound and the state loaded."""
        self._last_status = _clean(status)
        return self.send("READY=1", f"STATUS={self._last_status}")

    def status(self, status: str) -> bool:
        """The role, term or master changed; sends only when the text differs from the last."""
        text = _clean(status)
        if text == self._last_status:
            return False
        self._last_status = text
        return self.send(f"STATUS={text}")

    def watchdog(self, now_s: float) -> bool:
        """Call from every protocol tick that is on time (``now_s``: monotonic seconds); sends
        ``WATCHDOG=1`` when half the watchdog period has passed since the last ping."""
        if self.watchdog_interval_s is None or self._address is None:
            return False
        if self._last_ping_s is not None and now_s - self._last_ping_s < self.watchdog_interval_s:
            return False
        sent = self.send("WATCHDOG=1")
        if sent:
            self._last_ping_s = now_s
        return sent

    def reloading(self) -> bool:
        """A reload begins (SIGHUP or ``pyquorum reload``)."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._last_status = "reloading"
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading")

    def reloaded(self, status: str) -> bool:
        """The reload is over, applied or refused: ``status`` says which, and the state."""
        self._last_status = _clean(status)
        return self.send("READY=1", f"STATUS={self._last_status}")

    def stopping(self, status: str = "stopping") -> bool:
        """A shutdown begins (SIGTERM): systemd now waits up to ``TimeoutStopSec``."""
        self._last_status = _clean(status)
        return self.send("STOPPING=1", f"STATUS={self._last_status}")

    # -- the protocol --------------------------------------------------------------------------

    def send(self, *assignments: str) -> bool:
        """Send ``NAME=value`` assignments as one datagram. True if sent; never raises."""
        if self._address is None:
            return False
        data = "\n".join(assignments).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(data, self._address)
        except OSError as exc:
            if not self._failing:
                log_event(
                    log,
                    logging.WARNING,
                    "sd_notify_failed",
                    error=repr(exc),
                    assignments=" ".join(assignments)[:200],
                )
            self._failing = True
            return False
        self._failing = False
        return True

    def close(self) -> None:
        """Close the socket (a later message opens a new one)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval_s(environ: Mapping[str, str], pid: int) -> float | None:
    """Half of ``$WATCHDOG_USEC`` in seconds, as sd_watchdog_enabled(3) recommends, if the
    watchdog is meant for ``pid``; None otherwise (unset, malformed, zero, another process's)."""
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    owner = environ.get("WATCHDOG_PID", "")
    if owner and (not owner.isdigit() or int(owner) != pid):
        return None
    return int(usec) / 2e6


def _clean(text: str) -> str:
    one_line = " ".join(text.split())
    return one_line if len(one_line) <= MAX_STATUS_CHARS else one_line[: MAX_STATUS_CHARS - 3] + "..."
