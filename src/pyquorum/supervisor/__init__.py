"""The script's supervisor: one run at a time under a kill deadline, enforced by a guard process.

``ScriptSupervisor`` (supervisor.py) is what the daemon uses: ``prepare()``, ``start()``, ``renew()``,
``stop()``, ``aclose()``, and ``on_exit`` with a ``ScriptExit``. Inside: run.py, one guard process
and its run as a state machine; standby.py, the guard kept ready ahead of a start; guard.py, the
guard program itself (protocol.md §4.4), which imports nothing from pyquorum.
"""

from pyquorum.supervisor.run import GUARD_PATH, ScriptExit, ScriptStartError
from pyquorum.supervisor.supervisor import ScriptSupervisor

__all__ = ["GUARD_PATH", "ScriptExit", "ScriptStartError", "ScriptSupervisor"]
