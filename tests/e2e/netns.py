"""A private cluster in network namespaces: a launcher namespace plus N "hosts", each running its own sshd.

Layout (SUBNET 10.77.0.0/24, invisible outside the namespaces):
    <p>sw   : bridge br0, one veth port per namespace below
    <p>ctl  : 10.77.0.1   where `ztune launch` runs (ip netns exec)
    <p>n1.. : 10.77.0.11, 10.77.0.12, ...  sshd on port 22, host keys and authorized_keys in a tmp dir
The root namespace gets `blackhole 10.77.0.0/24`, so no test packet can leave through the machine's real
interfaces. Names resolve through /etc/netns/<ns>/hosts (which `ip netns exec` bind-mounts over /etc/hosts):
in the launcher namespace node1 -> 10.77.0.11; on every host its own name *and* the machine's hostname resolve
to 127.0.0.1, the case that breaks gloo without GLOO_SOCKET_IFNAME. Everything is torn down by `close()`,
which kills every process still inside the namespaces. The bridge, veth and blackhole plumbing is
benchmarks/netns.py's, shared with the cluster in a box (benchmarks/cluster_box.py).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import netns as net
from benchmarks.netns import alive as _alive

SUBNET = "10.77.0.0/24"
CTL_ADDR = "10.77.0.1"
UNREACHABLE_ADDR = "10.77.0.99"  # in the subnet, but nothing answers ARP there
_run = net.run


def why_unavailable() -> str | None:
    """None if this machine can build the cluster, else the reason (for a skip message)."""
    reason = net.why_unavailable(("ssh", "ssh-keygen"))
    if reason is not None:
        return reason if "not installed" not in reason else f"{reason} (apt-get install iproute2 openssh-client)"
    if not (shutil.which("sshd") or os.path.exists("/usr/sbin/sshd")):
        return "sshd not installed (apt-get install openssh-server)"
    return None


@dataclass
class Cluster:
    """Handles to the namespaces and files; `hostnames[i]` is the name of host i in the ssh config."""

    root: Path
    num_hosts: int
    prefix: str = field(default_factory=lambda: f"zt{os.getpid() % 100000}")
    hostnames: list[str] = field(default_factory=list)
    sshd: list[subprocess.Popen] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    network: net.Network | None = None

    @property
    def ctl(self) -> str:
        return f"{self.prefix}ctl"

    @property
    def ssh_config(self) -> Path:
        return self.root / "ssh_config"

    def host_ns(self, i: int) -> str:
        return f"{self.prefix}n{i + 1}"

    def host_addr(self, i: int) -> str:
        return f"10.77.0.{11 + i}"

    # ------------------------------------------------------------------ build
    def start(self) -> Cluster:
        self.root.mkdir(parents=True, exist_ok=True)
        self.network = net.Network(prefix=self.prefix, subnet=SUBNET)
        self.network.start()
        self.hostnames = [f"node{i + 1}" for i in range(self.num_hosts)]
        members = [(self.ctl, CTL_ADDR)] + [(self.host_ns(i), self.host_addr(i)) for i in range(self.num_hosts)]
        for k, (ns, addr) in enumerate(members):
            self.network.add_member(ns, addr, k)
        self.namespaces = list(self.network.namespaces)
        self._write_hosts_files()
        self._keys_and_sshd()
        return self

    def _write_hosts_files(self) -> None:
        me = socket.gethostname()
        ctl_lines = ["127.0.0.1 localhost"] + [f"{self.host_addr(i)} {h}" for i, h in enumerate(self.hostnames)]
        ctl_lines.append(f"{UNREACHABLE_ADDR} unreachable")
        self._etc(self.ctl, "\n".join(ctl_lines) + "\n")
        for i, h in enumerate(self.hostnames):
            lines = [f"127.0.0.1 localhost {h} {me}"]
            lines += [f"{self.host_addr(j)} {o}" for j, o in enumerate(self.hostnames) if j != i]
            self._etc(self.host_ns(i), "\n".join(lines) + "\n")

    @staticmethod
    def _etc(ns: str, hosts_text: str) -> None:
        net.Network.write_etc(ns, "hosts", hosts_text)

    def _keys_and_sshd(self) -> None:
        key = net.ssh_client_key(self.root)
        known = []
        for i, name in enumerate(self.hostnames):
            config, host_key = net.sshd_files(self.root / name, listen_addr=self.host_addr(i), client_key=key)
            known.append(f"{name},{self.host_addr(i)} {host_key}")
            self.sshd.append(subprocess.Popen(
                ["ip", "netns", "exec", self.host_ns(i), *net.sshd_argv(config)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        net.write_ssh_config(self.root, client_key=key, known_hosts=known)
        self._wait_for_sshd()

    def _wait_for_sshd(self, timeout_s: float = 15.0) -> None:
        deadline = time.monotonic() + timeout_s
        for i in range(self.num_hosts):
            while True:
                res = self.exec_ctl(["ssh", "-F", str(self.ssh_config), "-o", "BatchMode=yes", "-o",
                                     "ConnectTimeout=2", self.hostnames[i], "true"], check=False)
                if res.returncode == 0:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"sshd on {self.hostnames[i]} did not come up: {res.stderr.strip()}")
                time.sleep(0.2)

    # ------------------------------------------------------------------ use
    def ctl_argv(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ctl, *argv]

    def exec_ctl(self, argv: list[str], *, check: bool = True, timeout_s: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(self.ctl_argv(argv), capture_output=True, text=True, check=check, timeout=timeout_s)

    def ns_pids(self, ns: str) -> set[int]:
        return net.ns_pids(ns)

    def stray_pids(self) -> dict[str, set[int]]:
        """Processes in the launcher and host namespaces other than the sshd listeners: after a clean
        teardown, none. (Everything a launch starts lives in these namespaces, and only there.)"""
        listeners = {p.pid for p in self.sshd}
        out = {}
        for ns in [self.ctl] + [self.host_ns(i) for i in range(self.num_hosts)]:
            pids = {p for p in self.ns_pids(ns) if p not in listeners and _alive(p)}
            if pids:
                out[ns] = pids
        return out

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        for p in self.sshd:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
        if self.network is not None:
            self.network.close()  # kills what is left in the namespaces, deletes them and the blackhole
        for p in self.sshd:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
