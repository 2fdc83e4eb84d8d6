"""Timing parameters and the pure lease arithmetic (protocol.md §4).

Notation (protocol.md §4.1): h heartbeat interval, E election timeout, G stop timeout (SIGTERM to
SIGKILL grace), D start delay of a new master, K the kill margin (SIGKILL goes out K before the kill
deadline: the allowance for the group to die and be reaped), rho the bound on how far any clock's
RATE may differ from true time (|rate - 1| <= rho). Nothing here reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass

# protocol.md §4.1: 1% is the bound Raft's lease reads and client-go assume; crystal oscillators are
# within 0.01%, NTP slews at most 0.05%, so 1% leaves a hundredfold margin.
DEFAULT_DRIFT_BOUND = 0.01
# protocol.md §4.1, §4.4: the guard sends SIGKILL this long before the kill deadline, for the group to
# die and be reaped. A hardened guard on an idle host needs about 1 ms; 25 ms leaves room for a busy
# one (bench/supervisor.py measures it). At the drift bound it is the only slack there is.
DEFAULT_KILL_MARGIN_S = 0.025
# Below this even an idle host cannot kill and reap a process group in time, whatever the guard does.
MIN_KILL_MARGIN_S = 0.005
# The master may lose this many consecutive heartbeat rounds before it starts stopping its script.
MIN_ROUNDS_BEFORE_STOP = 3


def _fmt(x: float) -> str:
    return f"{x:.3f}".rstrip("0").rstrip(".")


@dataclass(frozen=True, slots=True)
class Timing:
    """The cluster's timing. Every node must use the same values (they are part of the cluster
    fingerprint). Call ``validate()`` and refuse to start when it returns problems."""

    # Raft's and etcd's defaults: heartbeat 100 ms, election timeout 10 heartbeats (1 s).
    heartbeat_interval_s: float = 0.1
    election_timeout_s: float = 1.0
    # Half a second: long enough for a script to flush and exit, short enough for D = 0 at E = 1 s.
    stop_timeout_s: float = 0.5
    start_delay_s: float = 0.0
    drift_bound: float = DEFAULT_DRIFT_BOUND
    kill_margin_s: float = DEFAULT_KILL_MARGIN_S

    @property
    def lease_kill_s(self) -> float:
        """L_kill: how long after the send time of its newest majority-acknowledged heartbeat round
        the master's script must be fully reaped, on the master's own clock (protocol.md §4.2)."""
        rho = self.drift_bound
        return (1.0 - rho) * (self.election_timeout_s + self.start_delay_s) / (1.0 + rho)

    @property
    def stop_begin_s(self) -> float:
        """Lease age at which the master steps down and sends SIGTERM (protocol.md §4.3)."""
        return self.lease_kill_s - self.stop_timeout_s - self.kill_margin_s

    @property
    def slot_s(self) -> float:
        """Time one candidate gets before the next in address order tries (protocol.md §3.3)."""
        return self.election_timeout_s / 4.0

    @property
    def retry_interval_s(self) -> float:
        """How often a candidate re-sends an unanswered (pre-)vote request: often enough that a
        request refused because it overtook the master's Resign is repeated at once."""
        return min(self.heartbeat_interval_s, self.slot_s) / 4.0

    def kill_deadline(self, lease_start: float) -> float:
        """The moment (same clock as ``lease_start``) by which the script must be reaped."""
        return lease_start + self.lease_kill_s

    def stop_at(self, lease_start: float) -> float:
        """The moment the master must send SIGTERM if no newer round has been acknowledged."""
        return lease_start + self.stop_begin_s

    def failover_bound_s(self) -> float:
        """Upper bound on the time from a master's crash to the first moment a new master may run its
        script, when a majority stays connected with round-trip time well under h (protocol.md §5)."""
        h, e = self.heartbeat_interval_s, self.election_timeout_s
        # last heartbeat up to h before the crash; E (clock rate up to 1 + rho); rank 0 starts at once,
        # but may be dead or one-way: allow two slots, plus retries, plus D and one ack round.
        return (h + e) * (1 + self.drift_bound) + 2 * self.slot_s + 3 * h + self.start_delay_s

    def handover_bound_s(self) -> float:
        """Upper bound on the time from the old master's script being reaped to the moment the new
        master may run its script, in a planned handover (a step-down or a shutdown) with a majority
        connected and round-trip time well under h (protocol.md §5.3)."""
        h = self.heartbeat_interval_s
        # the Resign, then the successor proposes at once; if it cannot (it died just after being
        # named, or it resigned itself within 2E), the next one one slot later: two slots, plus a
        # re-sent request, one ack round and D, as in the failover bound.
        return 2 * self.slot_s * (1 + self.drift_bound) + 3 * h + self.start_delay_s

    def liveness_bound_s(self, n: int) -> float:
        """Upper bound on the time from the moment every one of the ``n`` nodes is up and the network
        is healthy again to the moment a master runs its script (protocol.md §5.2)."""
        e, s, h = self.election_timeout_s, self.slot_s, self.heartbeat_interval_s
        # stickiness and the restart embargo end within E, a resigned node's quiet period within 2E;
        # then the lowest live node has its slot; N + 2 slots and 4h cover attempts already scheduled
        # and a failed one; D and one more E for the new master's start and its first lease.
        return (2 * e + (n + 2) * s + 4 * h) * (1 + self.drift_bound) + self.start_delay_s + e

    def validate(self) -> list[str]:
        """Every reason these settings cannot be safe, each saying what would work. Empty if fine."""
        h, e, g, d = (
            self.heartbeat_interval_s,
            self.election_timeout_s,
            self.stop_timeout_s,
            self.start_delay_s,
        )
        problems: list[str] = []
        if h <= 0:
            problems.append(f"--heartbeat-interval must be positive (got {_fmt(h)})")
        if e <= 0:
            problems.append(f"--election-timeout must be positive (got {_fmt(e)})")
        if g < 0:
            problems.append(f"--stop-timeout must not be negative (got {_fmt(g)})")
        if d < 0:
            problems.append(f"--start-delay must not be negative (got {_fmt(d)})")
        if not self.kill_margin_s >= MIN_KILL_MARGIN_S:
            problems.append(
                f"--kill-margin ({_fmt(self.kill_margin_s)}s) must be at least {_fmt(MIN_KILL_MARGIN_S)}s: "
                "the guard sends SIGKILL that long before the kill deadline, and the script's process "
                "group must be dead and reaped by the deadline, which takes a few ms even on an idle "
                f"host; use --kill-margin {_fmt(DEFAULT_KILL_MARGIN_S)} (the default) or more"
            )
        if not 0 <= self.drift_bound < 0.1:
            problems.append(f"clock drift bound must be in [0, 0.1) (got {self.drift_bound})")
        if problems:
            return problems
        if e < 5 * h:
            problems.append(
                f"--election-timeout ({_fmt(e)}s) must be at least 5 x --heartbeat-interval "
                f"({_fmt(h)}s), or a few lost heartbeats cause an election: use "
                f"--election-timeout {_fmt(5 * h)} or more, or --heartbeat-interval {_fmt(e / 5)} "
                "or less"
            )
        k = self.kill_margin_s
        need = g + k + MIN_ROUNDS_BEFORE_STOP * h
        if self.stop_begin_s < MIN_ROUNDS_BEFORE_STOP * h:
            scale = (1 + self.drift_bound) / (1 - self.drift_bound)
            # A smaller K is only worth naming if it is itself allowed.
            fixed_k = self.lease_kill_s - need + k
            smaller_k = (
                f", or --kill-margin {_fmt(fixed_k - 0.0005)} or less"
                if fixed_k >= MIN_KILL_MARGIN_S + 0.001
                else ""
            )
            problems.append(
                "unsafe timing: the master's script must be reaped within "
                f"L_kill = (1-rho)(E+D)/(1+rho) = {_fmt(self.lease_kill_s)}s of its last acknowledged "
                f"heartbeat, which must leave room for {MIN_ROUNDS_BEFORE_STOP} heartbeats "
                f"({_fmt(MIN_ROUNDS_BEFORE_STOP * h)}s) + --stop-timeout ({_fmt(g)}s) + "
                f"--kill-margin ({_fmt(k)}s) = {_fmt(need)}s. "
                f"Use --stop-timeout {_fmt(max(0.0, self.lease_kill_s - need + g))} or less, or "
                f"--election-timeout {_fmt(need * scale - d + 0.0005)} or more, or "
                f"--start-delay {_fmt(need * scale - e + 0.0005)} or more{smaller_k}"
            )
        return problems

    def describe(self) -> str:
        """One line for the start-up log: the guarantee these settings give."""
        return (
            f"heartbeat={_fmt(self.heartbeat_interval_s)}s election_timeout="
            f"{_fmt(self.election_timeout_s)}s stop_timeout={_fmt(self.stop_timeout_s)}s "
            f"start_delay={_fmt(self.start_delay_s)}s kill_margin={_fmt(self.kill_margin_s)}s "
            f"drift_bound={self.drift_bound:g} "
            f"lease_kill={_fmt(self.lease_kill_s)}s stop_begins_after={_fmt(self.stop_begin_s)}s "
            f"failover_bound={_fmt(self.failover_bound_s())}s"
        )
