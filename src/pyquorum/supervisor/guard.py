"""pyquorum-guard: holds one script run's kill deadline, independently of the daemon.

The daemon (``pyquorum.supervisor.ScriptSupervisor``) starts one guard per script run, by path and
in its own session, so that the guard starts fast and no terminal signal reaches it::

    python -I -S guard.py --report-fd N --stop-timeout G --kill-margin K --deadline D -- argv...

or, ahead of time, a standby guard that waits for the start, so that starting the script costs only
a fork and an exec, not the 20-80 ms of a Python interpreter's start-up::

    python -I -S guard.py --report-fd N --stop-timeout G --kill-margin K --standby -- argv...

each with ``--renew-fd R`` before ``--`` when the daemon sends its renewals on a pipe of their own
("Renewals without a wake-up", below). The daemon runs it as ``python -I -S -c <boot> .../guard.py
<arguments>``, where the boot line imports this file as the module ``guard`` from its directory and
calls ``main``: imported, it runs from its compiled bytecode, where a script given by path is
compiled at every start (supervisor/run.py, ``_GUARD_BOOT``).

Why a separate process (protocol.md §4.4; docs/design-notes.md, "Supervising a child"): a daemon that
is SIGKILLed or frozen (SIGSTOP, swap, a long GC pause) cannot enforce its own lease, and its script
would run on beside a new master. The guard is small, never blocks, and enforces the kill deadline on
its own clock: ``time.monotonic()`` (CLOCK_MONOTONIC) is one clock for every process on the host, and
it keeps running while the daemon is stopped, so a deadline computed by the daemon means the same
moment here.

Rules (protocol.md §4.3, §4.4), with kill deadline D, stop timeout G and kill margin K:

- absent renewal, SIGTERM the script's process group at D - G - K and SIGKILL it at D - K;
- a requested stop sends SIGTERM now and SIGKILL at min(now + G, D - K);
- once SIGTERM has been sent, for whatever reason, renewals are ignored: the script is stopping;
- when the script's main process exits, for whatever reason, what is left is SIGKILLed and reaped.

Input, stdin, one command per line; deadlines are ``time.monotonic()`` values (``repr`` of a float):

    start <D> <env>    standby only, and first: start the script with kill deadline D and exactly
                       the environment <env> (a standby guard runs with the daemon's): its entries
                       NAME=VALUE, one space between two, in which "%", space and newline are written
                       %25, %20 and %0A; bytes are the entries' own (UTF-8, undecodable bytes kept as
                       such); ``start_line`` writes it, ``parse_start`` reads it. Not JSON: json would
                       cost every standby guard (and so every master's) 1.3 MB of resident modules.
    renew <D>          move the kill deadline later (an earlier value is ignored)
    stop <D>           stop now; D may move the deadline earlier, never later

A standby guard reports ``ready`` and then sleeps in poll() (no timer: idle costs no CPU) until the
start line. EOF or SIGTERM before it, the daemon's way of closing a standby guard (EOF also comes when
the daemon dies), make it exit 0 at once, having started nothing; other lines before it are reported
on stderr and ignored. From the start line on, it is a guard like any other.

Renewals without a wake-up (``--renew-fd R``). The daemon renews every heartbeat round (ten times a
second at the defaults), and a renewal on stdin wakes the guard each time, for nothing: the deadline
only matters at the moment it would act on it. So the daemon writes its ``renew <D>`` lines to a pipe
of their own, fd R, which the guard never polls: it reads everything waiting there (non-blocking) each
time it wakes up for any reason, before it acts, and it wakes up at least at its next planned moment
(SIGTERM at D - G - K) and at least every ``_RENEW_DRAIN_S`` (1 s: a pipe's 64 KiB hold about 2,500
renewals, the single page a spent pipe quota grants about 150; a renewal that does not fit is dropped
by the daemon, which keeps the guard's earlier deadline, the safe side). At that moment it takes
the newest deadline written so far and, renewed, sleeps again until the new D - G - K: about two and
a half wake-ups a second at the default timing instead of ten. It acts on the same deadline as if it
had read each renewal on arrival: a renewal written before a command, or before the moment, is read
before the guard acts on either. ``renew`` on stdin still works (it wakes the guard); lines on fd R
other than ``renew`` are reported and ignored, and EOF there (the daemon closed it) means nothing.

EOF on stdin (the daemon died, or closed the pipe) is ``stop`` with the current deadline; so is SIGTERM
sent to the guard itself. SIGINT and SIGHUP are ignored: they are meant for the daemon. Renewals sent
while the guard was starting up are applied before it checks that the deadline leaves time to run (the
daemon renews every heartbeat round, and a loaded host can take longer to start the guard than the
lease's slack); other early commands wait until the script has started.

Output, on the report fd, one line each, in this order:

    ready                              standby only: waiting for the start line
    forked <pid>                       the script's process exists; its pid is its process group id
    started <pid>                      the script was exec'd
    hardened mlock=<m> sched=<s>       what hardening obtained ("Punctuality", below): the memory is
                                       locked once the script runs
    exited <returncode> <reaped_at> deadline=<D> kill_due=<t> kill_sent=<t>
                                       returncode as in subprocess (-N: killed by signal N); reaped_at
                                       the monotonic time by which the group was dead and reaped; D the
                                       kill deadline in force at the end; kill_due and kill_sent when
                                       the planned SIGKILL was due and when it went out ("-" if none
                                       was sent: the script ended before it was due)
or, instead of ``started`` and ``exited`` (``forked`` may come first):
    error <message>                    nothing is running (no such program, deadline too close ...)

The guard then exits 0 (2 on a command-line error). Lines that are not commands are reported on stderr
and ignored.

Punctuality (protocol.md §4.4). Every planned signal goes out at its moment, not after it: poll()
takes whole milliseconds, so the guard polls for the whole milliseconds left and sleeps the rest with
``time.sleep`` (nanosleep). What it cannot control is being scheduled: on a host with more runnable
processes than cores a wake-up can come milliseconds late, and K is all the slack there is. So the
guard hardens itself, best effort and never fatally (``_lock_memory``, ``_raise_priority``):
``mlockall(MCL_CURRENT | MCL_FUTURE)``, so that no page fault (swap, a dropped page cache) stands
between its timer and its SIGKILL; and the real-time policy SCHED_RR at priority 1, the lowest
real-time priority (above every ordinary process, below the kernel's own real-time threads), or,
where that is refused, a nice value of -10. Neither reaches the script: the policy is set with
SCHED_RESET_ON_FORK, so the script starts with the normal policy, and a lowered nice value is
restored in the child before its exec; memory locks are never inherited across fork. Real-time
scheduling needs root or CAP_SYS_NICE (or an RLIMIT_RTPRIO); locking memory needs root or
CAP_IPC_LOCK (or an RLIMIT_MEMLOCK above the guard's 16 MB: locked, its resident size grows from
about 10 MB to about 13). An unprivileged guard gets neither, says so in its ``hardened`` line, and
runs on as before. A guard that inherited a real-time policy (a daemon run under chrt) keeps it, and
so does its script. The ``exited`` line says how late the planned SIGKILL went out, so that the
daemon logs every kill's lateness and its slack against the deadline. A SIGKILLed process still has
to be scheduled to die, and under load an ordinary one can wait 10-15 ms for a CPU (measured:
bench/supervisor.py): a guard that runs at a real-time priority lends it to the processes it has
just SIGKILLed (``_signal_all``). A guard takes its priority before it forks the script (a standby
guard while it waits: it costs nothing, and the start line then wakes a guard that preempts ordinary
processes), and locks its memory once the script has been exec'd: mlockall maps every page, about
2 ms (more if pages were swapped out) that no start should wait for, and the first signal the lock
is for is at least G + K away (the deadline check). Locked while it waits, an idle standby guard
would hold those 3 MB on every follower to guard nothing.

Containment. The script is exec'd without a shell, in a new session (its pid is its process group id),
with stdin from /dev/null, the guard's stdout, stderr and environment, and PR_SET_PDEATHSIG=SIGKILL so
that it dies when the guard dies. The guard is a child subreaper (PR_SET_CHILD_SUBREAPER): descendants
that leave the process group (setsid, double fork) are reparented to the guard when their parent dies,
so the final sweep finds, kills and reaps them too. Signals to the group are sent while the main process
is not yet reaped, so its pid (the group id) cannot have been reused; processes are signalled by pid only
while they are our unreaped children.

Limits, honestly: if the guard itself is SIGKILLed, the script dies by PDEATHSIG and the daemon kills
its process group, but a descendant that escaped the group (setsid, double fork) survives; a process
in uninterruptible sleep (D state) cannot be reaped by anyone, and the guard waits for it (saying so
on stderr every second, with the pids); a set-user-ID program the guard may not signal is out of its
reach. A stopped guard, or a paused host or VM, enforces nothing: only fencing tokens cover that
(protocol.md §4.5).

This file imports nothing from pyquorum and is never imported by the guard process itself; the daemon
imports it only for ``group_alive``, ``group_members`` and ``start_line``. Keep its imports few:
every one delays the script's start and stays resident in every guard, locked by ``mlockall``.
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import signal
import sys
import time

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
# Meant for the daemon's terminal, never for the guard (its own session has no terminal anyway).
_IGNORED = (signal.SIGINT, signal.SIGHUP)
# Ignored dispositions survive exec: give the script the defaults it expects, including SIGPIPE and
# SIGXFSZ, which CPython ignores at start-up (subprocess restore_signals does the same).
_RESET_IN_CHILD = (*_IGNORED, signal.SIGTERM, signal.SIGCHLD, signal.SIGPIPE, signal.SIGXFSZ)
_BLOCKED_AROUND_FORK = frozenset({*_IGNORED, signal.SIGTERM, signal.SIGCHLD})
# How often the final sweep looks again when a SIGKILLed process is slow to die (D state), and how
# often it says so on stderr meanwhile.
_SWEEP_RETRY_MS = 10
_SWEEP_COMPLAIN_S = 1.0
# Hardening (see "Punctuality" above): the lowest real-time priority, else this nice value.
_RT_PRIORITY = 1
_NICE = -10
_MCL_CURRENT, _MCL_FUTURE = 1, 2
# The longest the guard goes without reading the renewal pipe while its script runs ("Renewals
# without a wake-up" above).
_RENEW_DRAIN_S = 1.0
_EXIT_USAGE = 2
_USAGE = (
    "guard.py --report-fd N [--renew-fd R] --stop-timeout G --kill-margin K (--deadline D | --standby)"
    " -- argv..."
)


class _UsageError(Exception):
    pass


class _StartError(Exception):
    """A standby guard's start line it cannot act on: reported as ``error``, nothing started."""


# The start line's escapes, "%" first: every "%" written starts one of these three tokens, so
# reading them back in the other order (``%25`` last) gives exactly what was written.
_ESCAPES = (("%", "%25"), (" ", "%20"), ("\n", "%0A"))
_ENTRY_ENCODING = ("utf-8", "surrogateescape")  # how os.environ holds undecodable bytes


def start_line(deadline: float, env: dict[str, str]) -> bytes:
    """The start line that gives a standby guard ``deadline`` and the script's ``env`` (the module
    docstring); ValueError for a name that no environment can hold (empty, or with "="), TypeError
    for a name or value that is not a string."""
    entries = []
    for name, value in env.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise TypeError(f"environment names and values must be strings, not {name!r}: {value!r}")
        if not name or "=" in name:
            raise ValueError(f"environment name {name!r}: want a non-empty name without '='")
        entry = f"{name}={value}"
        for char, token in _ESCAPES:
            entry = entry.replace(char, token)
        entries.append(entry)
    return f"start {deadline!r} {' '.join(entries)}\n".encode(*_ENTRY_ENCODING)


def parse_start(raw: bytes) -> tuple[float, dict[str, str]]:
    """The deadline and environment of a start line (without its newline); _StartError if it is
    not one that ``start_line`` could have written."""
    line = raw.decode(*_ENTRY_ENCODING)
    _, _, rest = line.partition(" ")
    value, _, body = rest.partition(" ")
    try:
        deadline = float(value)
    except ValueError:
        raise _StartError(f"bad start command: deadline {value!r} is not a number") from None
    if not math.isfinite(deadline):
        raise _StartError(f"bad start command: deadline {value!r}, want a finite one")
    env: dict[str, str] = {}
    for entry in body.split(" ") if body else ():
        if entry.count("%") != sum(entry.count(token) for _, token in _ESCAPES):
            raise _StartError(f"bad start command: {entry!r}: a '%' that is not %25, %20 or %0A")
        for char, token in reversed(_ESCAPES):
            entry = entry.replace(token, char)
        name, eq, env_value = entry.partition("=")
        if not name or not eq:
            raise _StartError(f"bad start command: {entry!r}, want NAME=VALUE with a non-empty NAME")
        env[name] = env_value
    return deadline, env


def _log(message: str) -> None:
    with contextlib.suppress(OSError):
        os.write(2, f"pyquorum-guard[{os.getpid()}]: {message}\n".encode(errors="replace"))


def _report(fd: int, line: str) -> None:
    # One short line (< PIPE_BUF): atomic. A dead daemon (EPIPE) cannot be told anything.
    with contextlib.suppress(OSError):
        os.write(fd, (" ".join(line.split()) + "\n").encode(errors="replace"))


def _ms_until(at: float, now: float) -> int:
    # poll() takes whole milliseconds: round up, so that we never wake before `at` and spin.
    return max(0, math.ceil((at - now) * 1000.0))


def _whole_ms_until(at: float, now: float) -> int:
    # Round down instead, for a timer that must not be late: the caller sleeps the rest.
    return max(0, math.floor((at - now) * 1000.0))


def _stat_fields(pid: str) -> tuple[str, int, int] | None:
    """(state, ppid, pgrp) of a process from /proc/<pid>/stat, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
    fields = data[data.rfind(b")") + 2 :].split()
    return fields[0].decode(), int(fields[1]), int(fields[2])


def _proc_pids() -> list[str]:
    return [name for name in os.listdir("/proc") if name.isdigit()]


def group_members(pgid: int) -> list[int]:
    """The live processes of group ``pgid``, from /proc; zombies waiting to be reaped by some other
    parent count as dead (they run nothing and hold no resources but a pid)."""
    members = []
    for pid in _proc_pids():
        fields = _stat_fields(pid)
        if fields is not None and fields[2] == pgid and fields[0] not in ("Z", "X"):
            members.append(int(pid))
    return members


def group_alive(pgid: int) -> bool:
    """True while a process of group ``pgid`` is alive, in the sense of ``group_members``."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return bool(group_members(pgid))


def _pid_states(pids: list[int]) -> list[str]:
    """``pid:state`` for each live one of ``pids`` (state as in ps: D is uninterruptible sleep)."""
    described = []
    for pid in pids:
        fields = _stat_fields(str(pid))
        if fields is not None:
            described.append(f"{pid}:{fields[0]}")
    return described


def _children() -> list[int]:
    """Our children, zombies included."""
    me = os.getpid()
    try:
        # The guard has a single thread, whose tid is its pid.
        with open(f"/proc/{me}/task/{me}/children", "rb") as f:
            return [int(pid) for pid in f.read().split()]
    except FileNotFoundError:  # a kernel without CONFIG_PROC_CHILDREN
        pass
    children = []
    for pid in _proc_pids():
        fields = _stat_fields(pid)
        if fields is not None and fields[1] == me:
            children.append(int(pid))
    return children


def _noop(signum: int, frame: object) -> None:
    # The C-level handler writes the signal number to the wakeup fd; the poll loop acts on it.
    pass


class _Prctl:
    """prctl(2) through ctypes. Importing ctypes takes a few ms, and the daemon never needs it: a
    guard started for one run loads it when it spawns the script, a standby guard before it reports
    ready."""

    def __init__(self) -> None:
        import ctypes

        self.libc = ctypes.CDLL(None, use_errno=True)

    def __call__(self, option: int, value: int) -> None:
        import ctypes  # already loaded: a lookup in sys.modules

        zero = ctypes.c_ulong(0)
        if self.libc.prctl(option, ctypes.c_ulong(value), zero, zero, zero) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def mlockall(self, flags: int) -> None:
        import ctypes

        if self.libc.mlockall(ctypes.c_int(flags)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))


def _errno_name(e: OSError) -> str:
    import errno

    return errno.errorcode.get(e.errno or 0, str(e.errno))


def _lock_memory(prctl: _Prctl) -> str:
    """Best effort, never fatal (see "Punctuality" above): lock our memory, every page resident from
    now on; the ``mlock=`` word of the ``hardened`` report."""
    try:
        prctl.mlockall(_MCL_CURRENT | _MCL_FUTURE)  # never inherited across fork
        return "yes"
    except OSError as e:  # ENOMEM: over RLIMIT_MEMLOCK; EPERM: no CAP_IPC_LOCK and a zero limit
        return _errno_name(e)


def _raise_priority() -> tuple[str, int | None, tuple[int, int] | None]:
    """Best effort, never fatal: raise our scheduling priority without letting the script inherit
    it. Returns the ``sched=`` word of the ``hardened`` report, the nice value to restore in the
    script's process if ours was lowered, and our real-time (policy, priority) if we have one."""
    policy = os.sched_getscheduler(0)
    if policy in (os.SCHED_FIFO, os.SCHED_RR):  # inherited: the operator's choice, left alone
        name = "fifo" if policy == os.SCHED_FIFO else "rr"
        priority = os.sched_getparam(0).sched_priority
        return f"inherited-{name}:{priority}", None, (policy, priority)
    nice = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        os.sched_setscheduler(0, os.SCHED_RR | os.SCHED_RESET_ON_FORK, os.sched_param(_RT_PRIORITY))
        # From a real-time parent SCHED_RESET_ON_FORK also sets the child's nice value to 0 (not
        # only a negative one, as sched(7) says): give it back the daemon's.
        restore = nice if nice != 0 else None
        return f"rr:{_RT_PRIORITY}", restore, (os.SCHED_RR, _RT_PRIORITY)
    except OSError as e:
        refused = _errno_name(e)
    if nice <= _NICE:
        return f"inherited-nice:{nice}", None, None
    try:
        # Keep the normal policy; the flag alone makes a child start at nice 0 if ours is negative.
        os.sched_setscheduler(0, os.SCHED_OTHER | os.SCHED_RESET_ON_FORK, os.sched_param(0))
        os.setpriority(os.PRIO_PROCESS, 0, _NICE)
        return f"nice:{_NICE}", nice, None
    except OSError as e:
        return f"rr-{refused},nice-{_errno_name(e)}", None, None


class _Guard:
    def __init__(
        self,
        report_fd: int,
        stop_timeout_s: float,
        kill_margin_s: float,
        deadline: float,
        renew_fd: int | None = None,
    ) -> None:
        self.report_fd = report_fd
        self.renew_fd = renew_fd  # the renewal pipe, read on every wake-up, never polled
        self.renew_pending = b""  # a partial line from it
        self.grace = stop_timeout_s
        self.margin = kill_margin_s
        self.deadline = deadline
        self.pid = 0  # the script's main process, also its process group id
        self.term_sent_at: float | None = None
        self.kill_sent = False
        # The planned SIGKILL: when it was due, and when it went out (for the ``exited`` report).
        self.kill_due_at: float | None = None
        self.kill_sent_at: float | None = None
        self.sched: str | None = None  # set by raise_priority(): what it obtained, as reported
        self.restore_nice: int | None = None  # set by raise_priority(): the script's nice value
        self.realtime: tuple[int, int] | None = None  # set by raise_priority(): (policy, priority)
        self.pending = b""  # a partial command line from stdin
        self.early: list[str] = []  # commands read before the script started, for run() to act on
        self.prctl: _Prctl | None = None
        self.wake_r, wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        self.poller = select.poll()
        self.poller.register(self.wake_r, select.POLLIN)
        self.poller.register(0, select.POLLIN)

    # ---- standing by ------------------------------------------------------------------------------

    def await_start(self) -> dict[str, str] | None:
        """Standby: sleep until the start line, then take its kill deadline and return the script's
        environment; lines after it stay in ``pending`` for ``read_early_commands``. None on EOF or
        SIGTERM: the daemon closed us, or died."""
        while True:
            for fd, events in self.poller.poll():  # no timeout: a standby guard costs no CPU
                if fd == self.wake_r:
                    try:
                        received = os.read(self.wake_r, 512)
                    except BlockingIOError:
                        continue
                    if signal.SIGTERM in received:
                        return None
                    continue
                data = b""
                if not events & select.POLLNVAL:
                    with contextlib.suppress(OSError):
                        data = os.read(0, 65536)
                if not data:
                    return None
                self.pending += data
                while b"\n" in self.pending:
                    raw, self.pending = self.pending.split(b"\n", 1)
                    if raw.startswith(b"start "):
                        self.deadline, env = parse_start(raw)
                        return env
                    line = raw.decode(errors="replace")
                    _log(f"standby: ignoring a line that is not a start command: {line!r}")

    # ---- starting ---------------------------------------------------------------------------------

    def read_early_commands(self) -> None:
        """Before the script starts: apply the renewals the daemon sent while we were starting up (a
        loaded host can take longer than the lease's slack), so that the start-up check sees the
        current deadline. Any other command, and every one after it, waits in ``early`` for
        ``replay_early_commands``, which needs the script's pid; EOF stays for run() to see."""
        self.take_renewals()
        self._take_early(b"")  # what a standby guard read along with its start line
        poller = select.poll()
        poller.register(0, select.POLLIN)
        while poller.poll(0):
            try:
                data = os.read(0, 4096)
            except OSError:
                return
            if not data:
                return
            self._take_early(data)

    def _take_early(self, data: bytes) -> None:
        lines = (self.pending + data).split(b"\n")
        self.pending = lines.pop()
        for raw in lines:
            line = raw.decode(errors="replace")
            if not self.early and line.startswith("renew "):
                self._command(line)
            else:
                self.early.append(line)

    def take_renewals(self) -> None:
        """Apply every renewal waiting in the renewal pipe (``--renew-fd``), without blocking; a
        no-op without one. Called on every wake-up before anything is decided."""
        while self.renew_fd is not None:
            try:
                data = os.read(self.renew_fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:  # EOF: the daemon closed it; stdin says what that means
                os.close(self.renew_fd)
                self.renew_fd = None
                return
            lines = (self.renew_pending + data).split(b"\n")
            self.renew_pending = lines.pop()
            for raw in lines:
                line = raw.decode(errors="replace")
                if line.startswith("renew "):
                    self._command(line)
                else:
                    _log(f"ignoring a line on the renewal pipe that is not a renewal: {line!r}")

    def replay_early_commands(self) -> None:
        """Once the script has started: act on the commands ``read_early_commands`` kept."""
        early, self.early = self.early, []
        for line in early:
            self._command(line)

    def load_prctl(self) -> _Prctl:
        if self.prctl is None:
            self.prctl = _Prctl()
        return self.prctl

    def raise_priority(self) -> None:
        """``_raise_priority``, once, before the fork: a standby guard does it while it waits (it
        costs no memory, and the start line then wakes a guard that preempts ordinary processes)."""
        if self.sched is None:
            self.sched, self.restore_nice, self.realtime = _raise_priority()

    def harden(self) -> None:
        """Lock memory (the priority is raised already), once the script runs; report both."""
        mlock = _lock_memory(self.load_prctl())
        self.raise_priority()
        _report(self.report_fd, f"hardened mlock={mlock} sched={self.sched}")

    def spawn(self, argv: list[str], env: dict[str, str] | None) -> str | None:
        """Fork and exec the script, with environment ``env`` (None: ours); None on success, else
        why it did not start."""
        prctl = self.load_prctl()
        try:
            prctl(_PR_SET_CHILD_SUBREAPER, 1)
        except OSError as e:
            return f"cannot become a child subreaper: {e.strerror}"
        devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        err_r, err_w = os.pipe()  # close-on-exec: EOF means the exec succeeded
        guard_pid = os.getpid()
        # Nothing may run our Python signal handlers in the child before it has reset them.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _BLOCKED_AROUND_FORK)
        try:
            pid = os.fork()
        except OSError as e:  # EAGAIN: out of processes, or of memory
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            for fd in (devnull, err_r, err_w):
                os.close(fd)
            return f"cannot fork: {e.strerror}"
        if pid == 0:  # the child: never returns
            try:
                signal.set_wakeup_fd(-1)
                for signum in _RESET_IN_CHILD:
                    signal.signal(signum, signal.SIG_DFL)
                os.setsid()
                prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
                if os.getppid() != guard_pid:  # the guard died before prctl took effect
                    os._exit(1)
                if self.restore_nice is not None:  # the script gets the daemon's nice value
                    with contextlib.suppress(OSError):
                        os.setpriority(os.PRIO_PROCESS, 0, self.restore_nice)
                os.dup2(devnull, 0)
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                if env is None:
                    os.execvp(argv[0], argv)
                else:  # the program is looked up in env's PATH, as it would be by our own exec
                    os.execvpe(argv[0], argv, env)
            except BaseException as e:
                reason = e.strerror if isinstance(e, OSError) and e.strerror else repr(e)
                os.write(err_w, f"cannot execute {argv[0]!r}: {reason}".encode(errors="replace"))
            finally:
                os._exit(127)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(err_w)
        os.close(devnull)
        self.pid = pid
        # From now on the daemon knows the group to kill should we die before "started".
        _report(self.report_fd, f"forked {pid}")
        try:
            return self._await_exec(err_r)
        finally:
            os.close(err_r)

    def _await_exec(self, err_r: int) -> str | None:
        # Read the child's exec error, if any; EOF means it exec'd. Bounded by the kill deadline.
        poller = select.poll()
        poller.register(err_r, select.POLLIN)
        message = b""
        while True:
            limit = self.deadline - self.margin
            now = time.monotonic()
            if now >= limit or not poller.poll(_ms_until(limit, now)):
                os.kill(self.pid, signal.SIGKILL)  # our unreaped child: its pid is still its own
                os.waitpid(self.pid, 0)
                return "the script did not start before its kill deadline"
            chunk = os.read(err_r, 4096)
            if not chunk:
                break
            message += chunk
        if message:
            os.waitpid(self.pid, 0)
            return message.decode(errors="replace")
        return None

    # ---- running ----------------------------------------------------------------------------------

    def run(self) -> tuple[int, float]:
        """Enforce the rules until the script's main process exits; then kill and reap the rest.
        Returns (returncode, reaped_at)."""
        while True:
            self.take_renewals()
            now = time.monotonic()
            self._enforce(now)
            if self._main_exited():
                break
            at = self._next_action_at()
            if at is not None and at - now < 0.001:
                # Less than poll()'s millisecond left: sleep exactly that (signals and commands
                # wait the same sub-millisecond), and act on time rather than up to 1 ms late.
                time.sleep(max(0.0, at - now))
                continue
            if self.renew_fd is not None and self.term_sent_at is None:
                at = now + _RENEW_DRAIN_S if at is None else min(at, now + _RENEW_DRAIN_S)
            timeout = -1 if at is None else _whole_ms_until(at, now)
            ready = self.poller.poll(timeout)
            self.take_renewals()  # written before the command or signal that woke us: first
            for fd, events in ready:
                if fd == self.wake_r:
                    self._on_signals()
                else:
                    self._on_stdin(events)
        return self._sweep()

    def _next_action_at(self) -> float | None:
        if self.kill_sent:
            return None
        if self.term_sent_at is None:
            # protocol.md §4.3: absent renewal, SIGTERM at D - G - K
            return self.deadline - self.grace - self.margin
        return self._kill_at()

    def _kill_at(self) -> float:
        # protocol.md §4.3: SIGKILL at D - K, or G after the SIGTERM if that comes first
        assert self.term_sent_at is not None
        return min(self.term_sent_at + self.grace, self.deadline - self.margin)

    def _enforce(self, now: float) -> None:
        if self.term_sent_at is None and now >= self.deadline - self.grace - self.margin:
            self._terminate(now)
        if self.term_sent_at is not None and not self.kill_sent and now >= self._kill_at():
            self.kill_sent = True
            self.kill_due_at = self._kill_at()
            self.kill_sent_at = time.monotonic()  # the group's SIGKILL is the next system call
            self._signal_all(signal.SIGKILL)

    def _terminate(self, now: float) -> None:
        if self.term_sent_at is None:
            self.term_sent_at = now
            self._signal_all(signal.SIGTERM)

    def _stop(self, deadline: float) -> None:
        self.deadline = min(self.deadline, deadline)
        now = time.monotonic()
        self._terminate(now)
        self._enforce(now)

    def _signal_all(self, signum: int) -> None:
        # The group (pinned by our unreaped main process), then each child of ours outside it:
        # orphans that left the group were reparented to us, and an unreaped child's pid cannot
        # be reused. Once each: a second SIGTERM means "hurry" to many programs.
        # EPERM: a set-user-ID program we may not signal (documented as out of reach).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)
        children = _children()
        for pid in children:
            fields = _stat_fields(str(pid))
            if pid == self.pid or fields is None or fields[2] == self.pid:
                continue
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)
        if signum == signal.SIGKILL and self.realtime is not None:
            # A SIGKILLed process dies only when it next runs, and on a busy host an ordinary
            # process may wait many ms for a CPU: lend it our priority to die at once. It runs no
            # more of its own code (SIGKILL is taken before any return to user space). Our
            # unreaped children only, whose pids cannot be reused: the main process at the
            # planned kill, and in the final sweep every descendant (reparented to us by then).
            policy, priority = self.realtime
            for pid in children:
                with contextlib.suppress(OSError):
                    os.sched_setscheduler(pid, policy, os.sched_param(priority))

    def _main_exited(self) -> bool:
        # WNOWAIT: leave it a zombie, so that its pid, our handle on the group, stays ours.
        flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
        return os.waitid(os.P_PID, self.pid, flags) is not None

    def _reap_others(self) -> bool:
        """Reap every exited child except the main process; True if another child is left."""
        left = False
        for pid in _children():
            if pid == self.pid:
                continue
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            left = left or done == 0
        return left

    def _on_signals(self) -> None:
        try:
            received = os.read(self.wake_r, 512)
        except BlockingIOError:
            return
        if signal.SIGTERM in received:
            self._stop(self.deadline)
        if signal.SIGCHLD in received:
            self._reap_others()  # orphans of the script, reparented to us, that have exited

    def _on_stdin(self, events: int) -> None:
        data = b""
        if not events & select.POLLNVAL:
            try:
                data = os.read(0, 4096)
            except OSError:
                data = b""
        if not data:  # EOF: the daemon died or gave up on us; stop at once
            self.poller.unregister(0)
            self._stop(self.deadline)
            return
        lines = (self.pending + data).split(b"\n")
        self.pending = lines.pop()
        for line in lines:
            self._command(line.decode(errors="replace"))

    def _command(self, line: str) -> None:
        words = line.split()
        try:
            verb, value = words
            deadline = float(value)
        except ValueError:
            verb, deadline = "", 0.0
        if not math.isfinite(deadline):  # an infinite deadline would disable the guard
            verb = ""
        if verb == "renew":
            if self.term_sent_at is None:
                self.deadline = max(self.deadline, deadline)
        elif verb == "stop":
            self._stop(deadline)
        else:
            _log(f"ignoring a line that is not a command: {line!r}")

    # ---- finishing --------------------------------------------------------------------------------

    def _sweep(self) -> tuple[int, float]:
        # The main process is an unreaped zombie: SIGKILL its group and every child, again, until
        # it is our only child left; every group member is its descendant, and so ends as our child.
        started = time.monotonic()
        complain_at = started + _SWEEP_COMPLAIN_S
        with contextlib.suppress(KeyError):
            self.poller.unregister(0)  # commands no longer matter
        while True:
            self._signal_all(signal.SIGKILL)
            if not self._reap_others():
                break
            self.poller.poll(_SWEEP_RETRY_MS)  # woken early by SIGCHLD
            self._drain_wakeups()
            now = time.monotonic()
            if now >= complain_at:
                # Uninterruptible sleep (D state): SIGKILL waits for the system call to return.
                complain_at = now + _SWEEP_COMPLAIN_S
                left = " ".join(_pid_states([pid for pid in _children() if pid != self.pid]))
                _log(f"SIGKILLed processes of the script still alive after {now - started:.0f}s: {left}")
        _, status = os.waitpid(self.pid, 0)
        return os.waitstatus_to_exitcode(status), time.monotonic()

    def exited_line(self, returncode: int, reaped_at: float) -> str:
        def at(t: float | None) -> str:
            return "-" if t is None else repr(t)

        return (
            f"exited {returncode} {reaped_at!r} deadline={self.deadline!r} "
            f"kill_due={at(self.kill_due_at)} kill_sent={at(self.kill_sent_at)}"
        )

    def _drain_wakeups(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self.wake_r, 512)

    def emergency_kill(self) -> None:
        """Something went wrong inside the guard: leave nothing running."""
        if self.pid:
            with contextlib.suppress(ChildProcessError):
                self._sweep()


def _parse(args: list[str]) -> tuple[int, int | None, float, float, float | None, list[str]]:
    """(report fd, renewal fd or None, G, K, the kill deadline or None for a standby guard, argv)."""
    # Hand-rolled: argparse alone costs more start-up time than the rest of the guard.
    options: dict[str, str] = {}
    names = ("--report-fd", "--renew-fd", "--stop-timeout", "--kill-margin", "--deadline")
    i = 0
    while i < len(args) and args[i] != "--":
        if args[i] == "--standby":
            options[args[i]] = ""
            i += 1
            continue
        if args[i] not in names or i + 1 >= len(args):
            raise _UsageError(f"unexpected argument {args[i]!r}")
        options[args[i]] = args[i + 1]
        i += 2
    argv = args[i + 1 :]
    standby = "--standby" in options
    if standby and "--deadline" in options:
        raise _UsageError("--deadline and --standby exclude each other")
    optional = {"--renew-fd", *(["--deadline"] if standby else [])}
    missing = [name for name in names if name not in options and name not in optional]
    if missing:
        raise _UsageError(f"missing {', '.join(missing)}")
    if not argv:
        raise _UsageError("no script given after --")
    try:
        report_fd = int(options["--report-fd"])
        renew_fd = int(options["--renew-fd"]) if "--renew-fd" in options else None
        grace, margin = (float(options[name]) for name in ("--stop-timeout", "--kill-margin"))
        deadline = None if standby else float(options["--deadline"])
    except ValueError as e:
        raise _UsageError(str(e)) from None
    if not (all(map(math.isfinite, (grace, margin, deadline or 0.0))) and grace >= 0 and margin >= 0):
        raise _UsageError("--stop-timeout and --kill-margin must be >= 0, all numbers finite")
    return report_fd, renew_fd, grace, margin, deadline, argv


def main(args: list[str]) -> int:
    try:
        report_fd, renew_fd, grace, margin, deadline, argv = _parse(args)
        os.set_inheritable(report_fd, False)  # the script must not hold our report pipe
        if renew_fd is not None:  # nor our renewal pipe, which we read without blocking
            os.set_inheritable(renew_fd, False)
            os.set_blocking(renew_fd, False)
    except (_UsageError, OSError) as e:
        _log(f"usage: {_USAGE}: {e}")
        return _EXIT_USAGE
    for signum in _IGNORED:
        signal.signal(signum, signal.SIG_IGN)
    # A standby guard's deadline comes with its start line; until then it has no script to guard.
    guard = _Guard(report_fd, grace, margin, -math.inf if deadline is None else deadline, renew_fd)
    signal.signal(signal.SIGTERM, _noop)
    signal.signal(signal.SIGCHLD, _noop)
    env: dict[str, str] | None = None
    if deadline is None:
        # Load now, while nothing waits, what starting the script would load: ctypes for prctl, and
        # warnings, which os.execvp imports (in the forked child!) to search PATH. The priority
        # now, so that the start line wakes a guard that preempts ordinary processes; the memory
        # lock not: locked, an idle standby guard would hold 3 MB more resident on every follower,
        # to guard nothing (docs/benchmarks.md, "Cost"); every guard locks itself once its script
        # runs.
        import warnings  # noqa: F401

        guard.load_prctl()
        guard.raise_priority()
        _report(report_fd, "ready")
        try:
            env = guard.await_start()
        except _StartError as e:
            _report(report_fd, f"error {e}")
            return 0
        if env is None:  # closed (EOF or SIGTERM) before any start: nothing to do
            return 0
    guard.raise_priority()  # before the fork: the script's start is ours until its exec
    guard.read_early_commands()
    left = guard.deadline - time.monotonic()
    if left <= grace + margin:
        # protocol.md §4.3: SIGTERM would be due already; a script must not start without a lease.
        _report(
            report_fd,
            f"error the kill deadline is {left:.3f}s away, not more than stop "
            f"timeout + kill margin ({grace + margin:.3f}s): not starting",
        )
        return 0
    try:
        problem = guard.spawn(argv, env)
        if problem is not None:
            _report(report_fd, f"error {problem}")
            return 0
        _report(report_fd, f"started {guard.pid}")
        guard.replay_early_commands()
        # After the exec, not before the fork: mlockall maps every page, 2 ms (more if pages were
        # swapped out) that no start should wait for, and the first signal the lock is for is
        # G + K away at least (the check above). Then reported: ``hardened``.
        guard.harden()
        returncode, reaped_at = guard.run()
    except BaseException:
        guard.emergency_kill()
        raise
    _report(report_fd, guard.exited_line(returncode, reaped_at))
    # Done: the script's group is dead and reaped, and the report is written (os.write: nothing is
    # buffered). Exit now rather than through the interpreter's finalization, which took about
    # 10 ms here: the daemon hears the run's end when this process is reaped, and a planned handover
    # (protocol.md §3.7) waits for exactly that before it sends Resign.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
