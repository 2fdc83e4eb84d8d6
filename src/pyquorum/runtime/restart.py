"""What to do when the script ends by itself on the master: restart it, leave it, or resign.

What this module owns
---------------------
The restart policy (``--restart on-failure|always|never``), its backoff and its failure budget, as a
pure object: no clock (``now`` is an input), no process, no core. The daemon asks it after every end
of a run that it did not request, and after every start that failed, and carries out the answer.

The rules
---------
* ``never``: leave the script stopped; the node stays master (it still holds the role, and a new
  master would not do better). ``on-failure``: an exit with code 0 is left stopped too (the script
  finished its job); a non-zero code, a signal or a failed start is a **failure**. ``always``: every
  end is a failure (restarted with backoff, and counted).
* A failure is restarted after ``backoff_s``, doubling with each consecutive failure up to
  ``backoff_max_s``; a run that lasted longer than ``window_s`` ends the streak.
* ``max_failures`` failures within ``window_s`` mean this node is a bad place for the script: the
  answer is **resign**, so another node can try (protocol.md §3.7).
* Only failures of **this term's** runs count, and only a master resigns: a run of an earlier term
  (a start that failed after the core had already stepped down, while the node follows a new master)
  is no evidence about the current role, and resigning would be a request to a node that has nothing
  to give up (protocol.md §3.7: the core refuses it too). The caller says which term the run had.

Defaults and their reasons are in ``pyquorum.config`` (``DEFAULT_RESTART_BACKOFF_S`` and below).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Action", "Decision", "RestartPolicy"]


class Action(enum.Enum):
    RESTART = "restart"  # start it again after ``delay_s``, in this term
    LEAVE = "leave"  # leave it stopped for this term; stay master
    RESIGN = "resign"  # too many failures: stop being master so another node can try
    IGNORE = "ignore"  # a run of another term, or we are not master: nothing to decide


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    delay_s: float = 0.0
    failures: int = 0  # failures of this term within the window, this one included
    why: str = ""


class RestartPolicy:
    """Feed it every unrequested end of a run (``ended``) and every failed start (``start_failed``)."""

    def __init__(
        self,
        policy: str,
        *,
        backoff_s: float,
        backoff_max_s: float,
        max_failures: int,
        window_s: float,
    ) -> None:
        if policy not in ("on-failure", "always", "never"):
            raise ValueError(f"unknown restart policy {policy!r}")
        self.policy = policy
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.max_failures = max_failures
        self.window_s = window_s
        self._term = -1
        self._failures: list[float] = []  # times of this term's failures within the window
        self._streak = 0

    def ended(
        self,
        now: float,
        *,
        run_term: int,
        term: int,
        is_master: bool,
        returncode: int | None,
        ran_for_s: float,
    ) -> Decision:
        """The script ended by itself (not on our request) after ``ran_for_s`` seconds."""
        if not self._ours(run_term, term, is_master):
            return Decision(Action.IGNORE, why=f"a run of term {run_term}, now term {term}")
        if self.policy == "never":
            return Decision(Action.LEAVE, why="--restart never")
        if returncode == 0 and self.policy == "on-failure":
            return Decision(Action.LEAVE, why="exit code 0 with --restart on-failure")
        if ran_for_s > self.window_s:
            self._streak = 0
        return self._failure(now)

    def start_failed(self, now: float, *, run_term: int, term: int, is_master: bool) -> Decision:
        """The script could not be started (not executable, the deadline too close, the guard...)."""
        if not self._ours(run_term, term, is_master):
            return Decision(Action.IGNORE, why=f"a start for term {run_term}, now term {term}")
        if self.policy == "never":
            return Decision(Action.LEAVE, why="--restart never")
        return self._failure(now)

    def _ours(self, run_term: int, term: int, is_master: bool) -> bool:
        if term != self._term:  # a new term starts a new count
            self._term, self._failures, self._streak = term, [], 0
        return is_master and run_term == term

    def _failure(self, now: float) -> Decision:
        self._failures = [t for t in self._failures if now - t < self.window_s] + [now]
        self._streak += 1
        count = len(self._failures)
        if count >= self.max_failures:
            self._failures, self._streak = [], 0
            return Decision(Action.RESIGN, failures=count, why=f"{count} failures in {self.window_s:g}s")
        delay = min(self.backoff_max_s, self.backoff_s * 2 ** (self._streak - 1))
        return Decision(
            Action.RESTART, delay_s=delay, failures=count, why=f"failure {count} of {self.max_failures}"
        )
