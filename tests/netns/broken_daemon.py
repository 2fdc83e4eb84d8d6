"""A deliberately broken pyquorum daemon, to test the tester on real hosts (STYLE.md: "a deliberately
broken rule must be caught").

Run as ``python broken_daemon.py <pyquorum arguments>`` with ``PQT_BROKEN`` a comma-separated list of
``no_quorum_check`` (the core's rules with a master that never steps down without acks, as in
tests/sim/variants.py) and ``no_guard_deadline``: the guard is given deadlines an hour late, so it
cannot stop a script the core forgot to stop. Together they let an isolated master run its script on
beside the new one: the checker must report the overlap and the missed minority deadline. Production
code is untouched; this only wraps it. Standalone on purpose: it imports nothing from tests/.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
from typing import Any

from pyquorum.core import node as core_node
from pyquorum.core.lease import Timing
from pyquorum.core.rules import RULES
from pyquorum.supervisor import ScriptSupervisor

GUARD_DELAY_S = 3600.0


def _never_stop(timing: Timing) -> float:
    return float("inf")


def _install(variants: frozenset[str]) -> None:
    if "no_quorum_check" in variants:
        original_init = core_node.Node.__init__
        rules = dataclasses.replace(RULES, stop_begin_s=_never_stop)

        def init(self: core_node.Node, *args: Any, **kwargs: Any) -> None:
            kwargs["rules"] = rules
            original_init(self, *args, **kwargs)

        core_node.Node.__init__ = init  # type: ignore[method-assign]
    if "no_guard_deadline" in variants:
        start, renew = ScriptSupervisor.start, ScriptSupervisor.renew

        def late_start(self: ScriptSupervisor, deadline: float, env: dict[str, str]) -> asyncio.Task[None]:
            return start(self, deadline + GUARD_DELAY_S, env)

        def late_renew(self: ScriptSupervisor, deadline: float) -> None:
            renew(self, deadline + GUARD_DELAY_S)

        ScriptSupervisor.start = late_start  # type: ignore[method-assign]
        ScriptSupervisor.renew = late_renew  # type: ignore[method-assign]


def main() -> int:
    _install(frozenset(v for v in os.environ.get("PQT_BROKEN", "").split(",") if v))
    from pyquorum.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
