"""Real hosts on one machine: network namespaces on a bridge, and nftables rules that break the network.

What this owns. ``Network(run, n)`` creates, for one test run:

- a namespace ``pqt-<run>-n<n>-br`` holding only a Linux bridge ``br0``;
- ``n`` host namespaces ``pqt-<run>-n<n>-h<i>``, each with loopback up and a veth ``eth0`` whose peer ``h<i>``
  sits on the bridge; host ``i`` has address ``10.99.0.<i>/24``;
- in each host namespace an nftables table ``inet pqt`` with an ``input`` and an ``output`` chain.

Every veth is created inside the namespaces (``ip -n``), so nothing, not even for a moment, is added to
the root namespace's network, and traffic can only go between the namespaces of this run. The range
10.99.0.0/24 exists only inside them.

Faults are declarative: ``cut(a, b)`` means "b does not hear a" and is one rule in b's input chain
(``ip saddr A counter drop``): the sender's ``sendto`` succeeds, as on a real network. ``isolate(x)``
cuts both directions and also drops x's outgoing traffic in x's own output chain (a host whose own
firewall or interface is broken: its ``sendto`` fails with EPERM). ``loss(p)`` adds
``numgen random mod 100 < p counter drop`` to every host's input chain. ``apply()`` replaces each
host's table atomically (one ``nft -f`` batch per host); before that it reads the rules' counters, so
``dropped()`` says how many packets the faults really dropped: the evidence that a fault was injected.

Clusters on these hosts run one at a time on a machine, under ``exclusive()`` (a file lock shared by
every test run), so that timing is not turned into noise by two clusters sharing the CPU.

Cleanup. ``destroy()`` deletes every namespace of the run (deleting a namespace deletes its veths,
bridge and nft table). ``sweep()`` removes what an earlier run left behind when it was killed: the
namespaces ``pqt-<run>-*`` whose ``<run>`` names a process that no longer exists (the run id starts
with the pid of the test process that created it), so a concurrent run is never touched.
"""

from __future__ import annotations

import contextlib
import faulthandler
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from tests.harness.procfs import alive

PREFIX = "pqt-"
SUBNET = "10.99.0"
SUBNET_CIDR = f"{SUBNET}.0/24"
TABLE = "pqt"
_IP = "ip"
_NFT = "nft"
LOCK_PATH = Path("/run/lock" if os.path.isdir("/run/lock") else tempfile.gettempdir()) / "pyquorum-netns.lock"


class HostError(RuntimeError):
    """A namespace or nftables command failed; the message has the command and its stderr."""


def _run(args: list[str], *, input_text: str | None = None, check: bool = True) -> str:
    proc = subprocess.run(args, input=input_text, capture_output=True, text=True, timeout=30, check=False)
    if check and proc.returncode != 0:
        raise HostError(f"{' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def run_id() -> str:
    """A run id that starts with this process's pid, so ``sweep`` can tell a dead run from a live one."""
    return f"{os.getpid()}x{os.urandom(2).hex()}"


def _run_owner(namespace: str) -> int | None:
    # pqt-<pid>x<hex>-<host>
    rest = namespace[len(PREFIX) :]
    pid = rest.split("x", 1)[0]
    return int(pid) if pid.isdigit() else None


@contextlib.contextmanager
def exclusive() -> Iterator[None]:
    """One cluster on real hosts at a time on this machine (a file lock shared by every test run), so
    that two clusters never compete for the CPU. While waiting, pytest's faulthandler_timeout must not
    count: a worker may wait for another's nemesis."""
    with open(LOCK_PATH, "a") as lock:
        faulthandler.cancel_dump_traceback_later()
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def namespaces() -> list[str]:
    """The names of all network namespaces (``ip netns list``)."""
    out = _run([_IP, "netns", "list"], check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def why_unavailable() -> str | None:
    """None if this machine can run the suite, else one line saying why not."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "not root (network namespaces and nftables need root)"
    for tool, package in ((_IP, "iproute2"), (_NFT, "nftables")):
        if shutil.which(tool) is None:
            return f"no '{tool}' command (apt-get install -y {package})"
    probe = f"{PREFIX}{run_id()}-probe"
    try:
        _run([_IP, "netns", "add", probe])
    except (HostError, OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot create a network namespace ({str(exc).strip()[:160]})"
    try:
        _run([_IP, "netns", "exec", probe, _NFT, "add", "table", "inet", TABLE])
        _run(
            [_IP, "netns", "exec", probe, _NFT, "-f", "-"],
            input_text=_table_text([], []),
        )
    except (HostError, OSError, subprocess.TimeoutExpired) as exc:
        return f"nftables does not work in a network namespace ({str(exc).strip()[:160]})"
    finally:
        _run([_IP, "netns", "del", probe], check=False)
    return None


def sweep() -> list[str]:
    """Delete the namespaces of earlier runs whose test process is gone; return their names. The
    processes those runs left are killed by ``procfs.sweep_stale`` first."""
    removed = []
    for ns in namespaces():
        if not ns.startswith(PREFIX):
            continue
        owner = _run_owner(ns)
        if owner is not None and alive(owner):
            continue
        _run([_IP, "netns", "del", ns], check=False)
        removed.append(ns)
    return removed


def _table_text(rules_in: list[str], rules_out: list[str]) -> str:
    # "table ... {}" then "delete table" makes the batch work whether or not the table exists; the
    # whole batch is one transaction, so there is no moment without the table's new rules.
    lines = [f"table inet {TABLE} {{}}", f"delete table inet {TABLE}", f"table inet {TABLE} {{"]
    lines.append("  chain input {")
    lines.append("    type filter hook input priority 0; policy accept;")
    lines += [f"    {rule}" for rule in rules_in]
    lines.append("  }")
    lines.append("  chain output {")
    lines.append("    type filter hook output priority 0; policy accept;")
    lines += [f"    {rule}" for rule in rules_out]
    lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


class Network:
    """The namespaces of one run; hosts are numbered 1..n."""

    def __init__(self, run: str, n: int) -> None:
        self.run = run
        self.n = n
        # one run may have several networks (3 and 5 hosts): the size is part of every name
        self.base = f"{PREFIX}{run}-n{n}"
        self.bridge_ns = f"{self.base}-br"
        self.created: list[str] = []
        # directed cuts (src, dst): dst does not hear src
        self.cuts: set[tuple[int, int]] = set()
        self.isolated: set[int] = set()
        self.loss_percent = 0
        self._dropped = 0

    # ---- names --------------------------------------------------------------------------------------

    @property
    def hosts(self) -> list[int]:
        return list(range(1, self.n + 1))

    def ns(self, host: int) -> str:
        return f"{self.base}-h{host}"

    @staticmethod
    def ip(host: int) -> str:
        return f"{SUBNET}.{host}"

    # ---- life cycle ---------------------------------------------------------------------------------

    def create(self) -> None:
        """Create the bridge and the hosts. On failure, whatever was created is deleted again."""
        try:
            self._add_ns(self.bridge_ns)
            br = [_IP, "-n", self.bridge_ns]
            _run([*br, "link", "add", "br0", "type", "bridge"])
            _run([*br, "link", "set", "br0", "up"])
            _run([*br, "link", "set", "lo", "up"])
            for h in self.hosts:
                ns = self.ns(h)
                self._add_ns(ns)
                hn = [_IP, "-n", ns]
                # the veth is born inside the namespaces: nothing appears in the root namespace
                veth = [
                    "link",
                    "add",
                    "eth0",
                    "type",
                    "veth",
                    "peer",
                    "name",
                    f"h{h}",
                    "netns",
                    self.bridge_ns,
                ]
                _run([*hn, *veth])
                _run([*br, "link", "set", f"h{h}", "master", "br0"])
                _run([*br, "link", "set", f"h{h}", "up"])
                _run([*hn, "link", "set", "lo", "up"])
                _run([*hn, "addr", "add", f"{self.ip(h)}/24", "dev", "eth0"])
                _run([*hn, "link", "set", "eth0", "up"])
                # only the test's own IPv4 traffic on the bridge: no IPv6 autoconfiguration chatter
                for key in ("all", "default", "eth0"):
                    with contextlib.suppress(OSError):
                        _run(
                            [_IP, "netns", "exec", ns, "sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1"]
                        )
            self.apply()
        except BaseException:
            self.destroy()
            raise

    def _add_ns(self, name: str) -> None:
        _run([_IP, "netns", "add", name])
        self.created.append(name)

    def destroy(self) -> None:
        """Delete every namespace this run created (its veths, bridge and tables go with them)."""
        for name in reversed(self.created):
            _run([_IP, "netns", "del", name], check=False)
        self.created.clear()

    # ---- faults -------------------------------------------------------------------------------------

    def cut(self, src: int, dst: int) -> None:
        """From the next ``apply()``: ``dst`` does not hear ``src`` (one direction only)."""
        if src != dst:
            self.cuts.add((src, dst))

    def cut_both(self, a: int, b: int) -> None:
        self.cut(a, b)
        self.cut(b, a)

    def partition(self, *groups: Iterable[int]) -> None:
        """Cut every link between hosts of different groups (hosts in no group keep their links)."""
        sets = [set(g) for g in groups]
        for i, ga in enumerate(sets):
            for gb in sets[i + 1 :]:
                for a in ga:
                    for b in gb:
                        self.cut_both(a, b)

    def isolate(self, host: int) -> None:
        """Cut ``host`` off in both directions, dropping its own output too (sendto gets EPERM)."""
        self.isolated.add(host)
        for other in self.hosts:
            self.cut_both(host, other)

    def loss(self, percent: int) -> None:
        """Drop each datagram arriving at any host with probability ``percent``/100."""
        if not 0 <= percent <= 100:
            raise ValueError(f"loss must be 0..100 percent, not {percent}")
        self.loss_percent = percent

    def heal(self) -> None:
        """Forget every cut and every loss (from the next ``apply()``)."""
        self.cuts.clear()
        self.isolated.clear()
        self.loss_percent = 0

    def apply(self) -> None:
        """Make every host's nft table say what the faults say: one atomic batch per host."""
        self._dropped += self._read_counters()
        for h in self.hosts:
            rules_in = [f"ip saddr {self.ip(src)} counter drop" for src, dst in sorted(self.cuts) if dst == h]
            if self.loss_percent:
                rules_in.append(
                    f"ip saddr {SUBNET_CIDR} numgen random mod 100 < {self.loss_percent} counter drop"
                )
            rules_out = []
            if h in self.isolated:
                rules_out = [f"ip daddr {self.ip(o)} counter drop" for o in self.hosts if o != h]
            _run(
                [_IP, "netns", "exec", self.ns(h), _NFT, "-f", "-"],
                input_text=_table_text(rules_in, rules_out),
            )

    def dropped(self) -> int:
        """Packets dropped by fault rules so far (including the rules in force now)."""
        return self._dropped + self._read_counters()

    def _read_counters(self) -> int:
        total = 0
        for h in self.hosts:
            out = _run(
                [_IP, "netns", "exec", self.ns(h), _NFT, "-j", "list", "table", "inet", TABLE], check=False
            )
            if not out.strip():
                continue
            for item in json.loads(out).get("nftables", []):
                for expr in item.get("rule", {}).get("expr", []):
                    if isinstance(expr, dict) and "counter" in expr:
                        total += int(expr["counter"].get("packets", 0))
        return total

    def connected(self, a: int, b: int) -> bool:
        """True if a and b hear each other under the faults in force (loss aside)."""
        return (a, b) not in self.cuts and (b, a) not in self.cuts
