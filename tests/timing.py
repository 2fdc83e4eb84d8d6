"""The named timing profiles of the tests and benchmarks: one name, one meaning, defined here only.

- ``DEFAULT``: the daemon's defaults (h = 0.1 s, E = 1 s, G = 0.5 s).
- ``TUNED``: the README's profile for a quiet LAN, ``--heartbeat-interval 0.02 --election-timeout 0.2
  --stop-timeout 0.1`` (failover bound 0.38 s, protocol.md §5.1). The simulation and the benchmarks
  measure it.
- ``TEST_TIMING``: what the real-process tests use where the timing is not the point: ten times faster
  than the defaults, yet with E = 0.5 s of slack for a loaded 2-core CI machine that runs other suites
  beside them (``TUNED`` there would turn scheduling delays into spurious elections).
"""

from __future__ import annotations

from pyquorum.core.lease import Timing

DEFAULT = Timing()
TUNED = Timing(heartbeat_interval_s=0.02, election_timeout_s=0.2, stop_timeout_s=0.1)
TEST_TIMING = Timing(heartbeat_interval_s=0.05, election_timeout_s=0.5, stop_timeout_s=0.2)
