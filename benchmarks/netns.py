"""Network namespaces wired through a bridge: the plumbing shared by the launch tests' ssh cluster
(tests/e2e/netns.py) and the cluster in a box (benchmarks/cluster_box.py).

    <prefix>sw      : the "switch", a namespace holding bridge br0 with one veth port per member
    <member ns>     : any namespace added with `add_member`, its end of the veth addressed in `subnet`

The root namespace gets `ip route add blackhole <subnet>`, so a packet for the test subnet can never leave
through the machine's real interfaces (it is removed again once no namespace named zt* is left, as other
ztune test clusters may share it). `close()` kills every process still inside the namespaces, deletes them
(which deletes their veths and qdiscs with them) and their /etc/netns files; it is idempotent.

A process killed with SIGKILL (the kernel's out-of-memory killer, a CI timeout) never reaches `close()`. So
every network keeps a record, /run/ztune-netns/<prefix>.json, of its owner (pid and start time) and
namespaces, and `start()` first removes the networks, with the processes inside them, of owners that are gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# Every namespace a ztune test or benchmark creates starts with this, so that leftovers are easy to find.
FAMILY_PREFIX = "zt"


def run(*argv: str, check: bool = True, timeout_s: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check, timeout=timeout_s)


def why_unavailable(tools: tuple[str, ...] = ("ip",)) -> str | None:
    """None if this machine can build namespaces (root, iproute2 and `tools` present), else the reason."""
    if os.geteuid() != 0:
        return "network-namespace tests need root (ip netns add)"
    for tool in ("ip", *tools):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    probe = f"{FAMILY_PREFIX}probe{os.getpid()}"
    res = run("ip", "netns", "add", probe, check=False)
    if res.returncode != 0:
        return f"cannot create network namespaces: {res.stderr.strip()}"
    run("ip", "netns", "del", probe, check=False)
    return None


def alive(pid: int) -> bool:
    """True for a live process (zombies count as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def ns_pids(ns: str) -> set[int]:
    """Pids of the processes inside network namespace `ns` (empty when it does not exist)."""
    out = run("ip", "netns", "pids", ns, check=False).stdout
    return {int(p) for p in out.split()}


def ssh_client_key(root: Path) -> Path:
    """A fresh passphrase-less ed25519 key pair `root/id_ed25519{,.pub}` for ssh into test hosts."""
    key = root / "id_ed25519"
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ztune-netns", "-f", str(key))
    return key


def sshd_files(d: Path, *, listen_addr: str, client_key: Path) -> tuple[Path, str]:
    """Host key, authorized_keys (`client_key`'s public half) and sshd_config for one test host in directory
    `d` (created), listening on `listen_addr`:22, root login by key only. Returns (sshd_config path, the host
    key as "type base64" for a known_hosts line). Start it with `sshd_argv`."""
    d.mkdir(parents=True, exist_ok=True)
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_key"))
    shutil.copy(f"{client_key}.pub", d / "authorized_keys")
    (d / "sshd_config").write_text("\n".join([
        f"ListenAddress {listen_addr}", "Port 22", f"HostKey {d / 'host_key'}",
        f"PidFile {d / 'sshd.pid'}", f"AuthorizedKeysFile {d / 'authorized_keys'}",
        "PermitRootLogin yes", "PubkeyAuthentication yes", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no", "PrintMotd no",
        "LogLevel ERROR", "MaxStartups 100", ""]))
    pub = (d / "host_key.pub").read_text().split()
    return d / "sshd_config", f"{pub[0]} {pub[1]}"


def sshd_argv(config: Path) -> list[str]:
    """sshd in the foreground with `config` (run it inside the host's namespace)."""
    return [shutil.which("sshd") or "/usr/sbin/sshd", "-D", "-e", "-f", str(config)]


def write_ssh_config(root: Path, *, client_key: Path, known_hosts: list[str]) -> Path:
    """`root/ssh_config` (and `root/known_hosts`, one "names type key" line per host) for `ssh -F`: root
    with `client_key`, host keys checked against those lines only."""
    (root / "known_hosts").write_text("\n".join(known_hosts) + "\n")
    path = root / "ssh_config"
    path.write_text("\n".join([
        "Host *", "  User root", f"  IdentityFile {client_key}", "  IdentitiesOnly yes",
        f"  UserKnownHostsFile {root / 'known_hosts'}", "  GlobalKnownHostsFile /dev/null",
        "  StrictHostKeyChecking yes", "  CheckHostIP no", ""]))
    return path


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22); None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


# One record per live network: who owns it and which namespaces it made (module docstring).
RECORDS = Path("/run/ztune-netns")


def reap_orphans(records: Path = RECORDS) -> list[str]:
    """Remove the networks whose owner process is gone: kill what runs inside their namespaces, delete the
    namespaces and their /etc/netns files and the record. Returns the namespaces removed. A record that cannot
    be read is left alone (its owner may be writing it)."""
    removed: list[str] = []
    for record in sorted(records.glob("*.json")) if records.is_dir() else []:
        try:
            owner = json.loads(record.read_text())
            pid, ticks, namespaces = int(owner["pid"]), owner["start_ticks"], list(owner["namespaces"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if alive(pid) and start_ticks(pid) == ticks:
            continue
        orphan = Network(prefix=owner.get("prefix", FAMILY_PREFIX), subnet=owner.get("subnet", ""),
                         namespaces=[n for n in namespaces if n.startswith(FAMILY_PREFIX)])
        orphan.close(record=False)
        removed += namespaces
        record.unlink(missing_ok=True)
    return removed


def family_namespaces() -> list[str]:
    """Every network namespace whose name starts with FAMILY_PREFIX (ours or another ztune test's)."""
    return [n for n in run("ip", "netns", "list").stdout.split() if n.startswith(FAMILY_PREFIX)]


def subnet_in_use(subnet: str, *, besides: Path | None = None, records: Path = RECORDS) -> bool:
    """Whether another network's owner record (not `besides`) names `subnet` and one of its namespaces still
    exists. A record that cannot be read counts as in use (its owner may be writing it)."""
    live = set(family_namespaces())
    for record in sorted(records.glob("*.json")) if records.is_dir() else []:
        if record == besides:
            continue
        try:
            owner = json.loads(record.read_text())
        except (OSError, ValueError):
            return True
        if owner.get("subnet") == subnet and live & set(owner.get("namespaces", ())):
            return True
    return False


@dataclass
class Network:
    """A bridge namespace and member namespaces on `subnet` (an IPv4 /24 such as "10.77.0.0/24").

    `prefix` must start with FAMILY_PREFIX and be unique per live network (it names every namespace and
    veth; veth names are at most 15 characters, so keep it under 10)."""

    prefix: str
    subnet: str
    namespaces: list[str] = field(default_factory=list)
    added_blackhole: bool = False

    @property
    def switch(self) -> str:
        return f"{self.prefix}sw"

    def addr(self, last_octet: int) -> str:
        return self.subnet.rsplit(".", 1)[0] + f".{last_octet}"

    def start(self) -> None:
        """The blackhole route and the switch namespace with its bridge."""
        if not self.prefix.startswith(FAMILY_PREFIX):
            raise ValueError(f"namespace prefix {self.prefix!r} must start with {FAMILY_PREFIX!r}")
        if removed := reap_orphans():
            print(f"netns: removed {len(removed)} namespace(s) of killed earlier runs: {' '.join(removed)}",
                  file=sys.stderr)
        if self.subnet not in run("ip", "route", "show", "type", "blackhole").stdout:
            run("ip", "route", "add", "blackhole", self.subnet)
            self.added_blackhole = True
        self.add_namespace(self.switch)
        run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.switch, "link", "set", "br0", "up")

    def add_namespace(self, ns: str) -> None:
        run("ip", "netns", "del", ns, check=False)  # a leftover of a killed earlier run with our pid
        run("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        self._write_record()
        run("ip", "-n", ns, "link", "set", "lo", "up")

    def add_member(self, ns: str, addr: str, index: int) -> tuple[str, str]:
        """A new namespace `ns` whose veth (`<prefix>i<index>`, addressed `addr`/24) is plugged into the
        bridge through port `<prefix>o<index>` in the switch namespace. Returns (inner, port) names."""
        self.add_namespace(ns)
        inner, port = f"{self.prefix}i{index}", f"{self.prefix}o{index}"
        run("ip", "link", "add", inner, "netns", ns, "type", "veth", "peer", "name", port, "netns", self.switch)
        run("ip", "-n", self.switch, "link", "set", port, "master", "br0", "up")
        run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", inner)
        run("ip", "-n", ns, "link", "set", inner, "up")
        return inner, port

    @staticmethod
    def write_etc(ns: str, name: str, text: str) -> None:
        """/etc/netns/<ns>/<name>: `ip netns exec` bind-mounts it over /etc/<name> (e.g. hosts)."""
        d = Path("/etc/netns") / ns
        d.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(text)

    def kill_all(self, *, wait_s: float = 5.0) -> None:
        """SIGKILL every process inside any of the namespaces, and wait (bounded) until they are gone."""
        pids: set[int] = set()
        for ns in self.namespaces:
            pids |= ns_pids(ns)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + wait_s
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)

    @property
    def record(self) -> Path:
        return RECORDS / f"{self.prefix}.json"

    def _write_record(self) -> None:
        """Who owns this network and what it made (module docstring); written whole, then renamed."""
        RECORDS.mkdir(parents=True, exist_ok=True)
        tmp = self.record.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "start_ticks": start_ticks(os.getpid()),
                                   "prefix": self.prefix, "subnet": self.subnet, "namespaces": self.namespaces}))
        os.replace(tmp, self.record)

    def close(self, *, record: bool = True) -> None:
        """Kill, delete the namespaces and their files, drop the blackhole unless another live network is on the
        same subnet; with `record`, remove this network's owner record too."""
        self.kill_all()
        for ns in self.namespaces:
            run("ip", "netns", "del", ns, check=False)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        self.namespaces = []
        if record:
            self.record.unlink(missing_ok=True)
        # Whoever added the route: once no live network is on the subnet, nothing is behind it (a killed run's
        # route too, which its owner never removed). Networks on other subnets do not keep it: the launch tests'
        # cluster lives for a whole pytest session, beside the box's and the reap test's networks.
        if self.subnet and not subnet_in_use(self.subnet, besides=self.record):
            run("ip", "route", "del", "blackhole", self.subnet, check=False)
            self.added_blackhole = False
