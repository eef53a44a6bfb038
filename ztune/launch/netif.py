"""Which network interface gloo and NCCL should use on a host: the one that routes to the head.

gloo, left alone, binds to the address the machine's hostname resolves to; on many distributions that is
127.0.1.1 or 127.0.0.1, and the other hosts then cannot connect. Asking the kernel how it would reach the head
(`ip -o route get <head ip>`) gives the right interface on every host. The commands run on the host (in the
preflight); the parsing here is pure.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

_DEV_RE = re.compile(r"\bdev\s+(\S+)")
_SRC_RE = re.compile(r"\bsrc\s+(\S+)")
_ADDR_RE = re.compile(r"^\d+:\s+(\S+)\s+inet6?\s+([0-9A-Fa-f.:]+)/\d+")


@dataclass(frozen=True)
class Interface:
    """The interface a host should use for collectives, and this host's address on it."""

    name: str
    addr: str | None


def parse_addresses(addr_output: str) -> list[tuple[str, str]]:
    """`ip -o addr show` -> [(ifname, address)] in the order listed."""
    out = []
    for line in addr_output.splitlines():
        m = _ADDR_RE.match(line.strip())
        if m:
            out.append((m.group(1), m.group(2)))
    return out


def choose_interface(*, route_output: str, addr_output: str, head_addr: str) -> Interface | None:
    """The interface to reach `head_addr`, from this host's `ip -o route get` and `ip -o addr show` output.

    On the head itself the route is a `local` one through `lo`; the interface that owns the head's address is
    the one the other hosts reach, so that is returned instead (unless the head address is loopback).
    """
    addrs = parse_addresses(addr_output)
    line = route_output.strip().splitlines()[0] if route_output.strip() else ""
    dev = _DEV_RE.search(line)
    src = _SRC_RE.search(line)
    if line.startswith("local") or (dev and dev.group(1) == "lo"):
        if _is_loopback(head_addr):
            return Interface(name="lo", addr=head_addr)
        owner = [name for name, addr in addrs if addr == head_addr]
        if owner:
            return Interface(name=owner[0], addr=head_addr)
        return None
    if dev is None:
        return None
    name = dev.group(1)
    addr = src.group(1) if src else next((a for n, a in addrs if n == name), None)
    return Interface(name=name, addr=addr)


def _is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return addr == "localhost"
