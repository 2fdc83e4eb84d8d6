"""The named timing profiles of the tests and benchmarks: one name, one meaning, defined here only.

- ``DEFAULT``: the daemon's defaults (h = 0.1 s, E = 1 s, G = 0.5 s).
- ``TUNED``: the README's profile for a quiet LAN, ``--heartbeat-interval 0.02 --election-timeout 0.2
  --stop-timeout 0.1`` (failover bound 0.38 s, protocol.md §5.1). The simulation and the benchmarks
  measure it.
- ``TEST_TIMING``: what the real-process tests use where the timing is not the point: ten times faster
  than the defaults, yet with E = 0.5 s of slack for a loaded 2-core CI machine that runs other suites
  beside them (``TUNED`` there would turn scheduling delays into spurious elections).
- ``SLOW_START``: ``TEST_TIMING`` with E = 1.6 s, for tests of which node is elected *first* (by
  priority, protocol.md §3.10). That goes by the proposal order only among nodes that became due within
  one slot ``S = E/4`` of each other (§3.3), and a loaded CI machine has started three Python daemons
  spawned within 11 ms up to 156 ms apart: with E = 0.5 s (S = 125 ms) the node that started first
  proposed first. S = 0.4 s leaves that margin more than twice over.
"""

from __future__ import annotations

from pyquorum.core.lease import Timing

DEFAULT = Timing()
TUNED = Timing(heartbeat_interval_s=0.02, election_timeout_s=0.2, stop_timeout_s=0.1)
TEST_TIMING = Timing(heartbeat_interval_s=0.05, election_timeout_s=0.5, stop_timeout_s=0.2)
SLOW_START = Timing(heartbeat_interval_s=0.05, election_timeout_s=1.6, stop_timeout_s=0.2)
