"""Node addresses: parsing, canonical text form, and the protocol's total order (protocol.md §1).

An address is an IP address (IPv4 or IPv6) and a UDP port. Its canonical text is ``10.0.0.1:51621`` or
``[fd00::1]:51621``; that text is the node's identity in messages and logs. The order compares IPv4
before IPv6, then the address numerically, then the port: "the lowest address proposes first".
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_PORT = 51621


@dataclass(frozen=True, slots=True, order=False)
class NodeAddress:
    ip: IPAddress
    port: int

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is out of range 1-65535")

    @property
    def sort_key(self) -> tuple[int, int, int]:
        return (self.ip.version, int(self.ip), self.port)

    def __lt__(self, other: NodeAddress) -> bool:
        return self.sort_key < other.sort_key

    def __str__(self) -> str:
        if self.ip.version == 6:
            return f"[{self.ip}]:{self.port}"
        return f"{self.ip}:{self.port}"

    @classmethod
    def parse(cls, text: str, default_port: int = DEFAULT_PORT) -> NodeAddress:
        """Parse ``1.2.3.4``, ``1.2.3.4:6000``, ``::1``, ``[::1]`` or ``[::1]:6000``.

        Raises ``ValueError`` with a message fit for an operator. Host names are resolved by the
        caller (the CLI), never here.
        """
        host, port = split_host_port(text, default_port)
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{text!r} is not an IP address (optionally with :port)") from None
        return cls(ip, port)


def split_host_port(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """Split ``host[:port]`` / ``[v6][:port]`` / bare IPv6 into (host, port)."""
    text = text.strip()
    if not text:
        raise ValueError("empty address")
    port_text = ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: missing ']'")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{text!r}: expected ':port' after ']'")
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host = text  # a bare IPv6 address or a name without a port
    port = default_port
    if port_text:
        if not port_text.isdigit():
            raise ValueError(f"{text!r}: port {port_text!r} is not a number")
        port = int(port_text)
        if not 1 <= port <= 65535:
            raise ValueError(f"{text!r}: port {port} is out of range 1-65535")
    if not host:
        raise ValueError(f"{text!r}: empty host")
    return host, port


def sort_nodes(nodes: list[str] | tuple[str, ...] | set[str] | frozenset[str]) -> list[str]:
    """Canonical node ids in protocol order (lowest first)."""
    return sorted(nodes, key=lambda n: NodeAddress.parse(n).sort_key)
