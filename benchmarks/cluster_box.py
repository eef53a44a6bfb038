"""A cluster in a box: 2-4 "hosts" on one machine, each a network namespace behind a shaped link.

    with ClusterBox(num_hosts=2, rate_mbit=1000) as box:
        box.popen(0, ["torchrun", "--nnodes", "2", "--node-rank", "0", "--master-addr", box.hosts[0].addr, ...])
        box.popen(1, [... "--node-rank", "1" ...])
        box.set_rate(10_000)                 # tc qdisc replace: 10 Gbit/s from here on
        box.uplink_tx_bytes()                # bytes each host has sent to the others so far
        ssh_config = box.start_sshd(tmp)     # sshd on every host: `ztune launch -H` / `autotune -H` from host 0

Wiring (benchmarks/netns.py, the same bridge namespace, veths and blackhole route as the launch tests'
ssh cluster in tests/e2e/netns.py): hosts `<prefix>h0..` at 10.78.0.11, .12, ... plugged into bridge br0 of
namespace `<prefix>sw`; `ip route add blackhole 10.78.0.0/24` in the root namespace. Every host's link is
shaped in both directions with a token bucket (`tc qdisc ... tbf`; netem is not available on this kernel):
on the host's own veth (what it sends) and on its bridge port (what it receives), so each host has a
full-duplex "NIC" of `rate_mbit`. The inter-host traffic of a host is exactly the traffic of its veth:
a host reaches its own address over `lo`, so ranks of one host talking to each other never touch it.

What makes a namespace a *host*, and not just an address: network namespaces alone share /dev/shm and
the hostname with the machine, so runtime/comm/shm.py, which decides that ranks share a host when every
rank can read every other rank's probe file in /dev/shm, would let ranks on different "hosts" exchange
buffers through memory and no byte would cross the shaped link. So every host also gets, as a real
machine has, its own mount namespace with a private tmpfs on /dev/shm and its own UTS namespace with its
own hostname, which resolves (through /etc/netns/<ns>/hosts, bind-mounted over /etc/hosts by
`ip netns exec`) to the host's address as on a real cluster, where gloo finds its interface from the
hostname. A keeper process (`ip netns exec <ns> unshare --mount --uts ... sleep infinity`) holds the three
namespaces; every command for the host runs inside all three (`nsenter --target <keeper> --net --mount
--uts`), so all processes of one host see one /dev/shm and ranks on one host still use shared memory.
The pid namespace and the rest of the filesystem stay shared (the repository, /tmp, the venv): what the
box simulates is separate machines on one network, not separate installs.

Teardown is guaranteed: `close()` (also from `__exit__`, atexit, and SIGTERM/SIGHUP, whose previous
handlers are restored and re-run) kills every process inside the namespaces, including the keepers, so the
private /dev/shm mounts go with them, then deletes the namespaces (and with them veths and qdiscs), their
/etc/netns files and the blackhole route. `leftovers()` lists whatever of it still exists.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks import netns as net

SUBNET = "10.78.0.0/24"  # not the launch tests' 10.77.0.0/24, so both can be up at once
FIRST_HOST_OCTET = 11
MAX_HOSTS = 4
SHM_SIZE = "4g"  # tmpfs caps are reservations, not allocations; bigger than the runtime's buffers need
# tbf's bucket: ~2 ms of traffic at the shaped rate, and never below one 64 KiB GSO super-packet that a
# veth hands over whole (tc-tbf(8): burst must cover the largest packet). Queue: 20 ms of latency.
BURST_S = 0.002
MIN_BURST_BYTES = 64 * 1024
TBF_LATENCY = "20ms"
# After one node of a job fails, how long the others get to notice (gloo errors) before being killed.
FAIL_GRACE_S = 20.0


@dataclass(frozen=True)
class JobResult:
    """One host's share of a `ClusterBox.torchrun` job: torchrun's exit code and its (and its ranks') output."""

    host: int
    returncode: int
    output: str


@dataclass
class BoxHost:
    """One host: its network namespace, address, hostname, veth (`uplink`), bridge port, keeper pid."""

    index: int
    ns: str
    addr: str
    hostname: str
    uplink: str
    port: str
    keeper: subprocess.Popen | None = None


class ClusterBox:
    """`num_hosts` (2-4) hosts on one bridge, links shaped to `rate_mbit` Mbit/s (None: not shaped).

    Raises RuntimeError (with the reason) when the machine cannot build it: see `why_unavailable`."""

    def __init__(self, *, num_hosts: int = 2, rate_mbit: int | None = 1000, prefix: str | None = None) -> None:
        if not 2 <= num_hosts <= MAX_HOSTS:
            raise ValueError(f"num_hosts must be 2..{MAX_HOSTS}, got {num_hosts}")
        self.num_hosts = num_hosts
        self.rate_mbit = rate_mbit
        self.network = net.Network(prefix=prefix or f"{net.FAMILY_PREFIX}b{os.getpid() % 100000}", subnet=SUBNET)
        self.hosts: list[BoxHost] = []
        self._closed = False
        self._lock = threading.Lock()
        self._old_handlers: dict[int, object] = {}
        self.sshd: list[subprocess.Popen] = []  # listeners started by start_sshd

    # ------------------------------------------------------------------ build
    def __enter__(self) -> ClusterBox:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> ClusterBox:
        reason = why_unavailable()
        if reason is not None:
            raise RuntimeError(f"cannot build the cluster in a box: {reason}")
        atexit.register(self.close)
        self._install_signal_handlers()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        net_ = self.network
        net_.start()
        prefix = net_.prefix
        for i in range(self.num_hosts):
            ns = f"{prefix}h{i}"
            addr = net_.addr(FIRST_HOST_OCTET + i)
            uplink, port = net_.add_member(ns, addr, i)
            self.hosts.append(BoxHost(i, ns, addr, f"{prefix}-host{i}", uplink, port))
        names = "\n".join(f"{h.addr} {h.hostname}" for h in self.hosts)
        for h in self.hosts:
            net.Network.write_etc(h.ns, "hosts", f"127.0.0.1 localhost\n{names}\n")
        for h in self.hosts:
            h.keeper = self._start_keeper(h)
        self.set_rate(self.rate_mbit)

    @staticmethod
    def _start_keeper(h: BoxHost) -> subprocess.Popen:
        # The tmpfs and the hostname are set up by the keeper itself, after unshare: they can only land in
        # the new namespaces. It prints "ready" once both are in place, then becomes `sleep infinity`.
        script = 'mount -t tmpfs -o "size=$1,mode=1777" ztbox-shm /dev/shm && hostname "$2" && echo ready ' \
                 '&& exec sleep infinity'
        proc = subprocess.Popen(
            ["ip", "netns", "exec", h.ns, "unshare", "--mount", "--uts", "--propagation", "private", "--",
             "sh", "-c", script, "keeper", SHM_SIZE, h.hostname],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = proc.stdout.readline().strip()
        if line != "ready":
            proc.kill()
            err = proc.stderr.read().strip()
            raise RuntimeError(f"host {h.ns}: could not set up its /dev/shm and hostname: {err or line!r}")
        return proc

    def set_rate(self, rate_mbit: int | None) -> None:
        """Shape every host's link (both directions) to `rate_mbit` Mbit/s with tbf, or unshape (None)."""
        for h in self.hosts:
            for ns, dev in ((h.ns, h.uplink), (self.network.switch, h.port)):
                if rate_mbit is None:
                    net.run("tc", "-n", ns, "qdisc", "del", "dev", dev, "root", check=False)
                    continue
                burst = max(MIN_BURST_BYTES, int(rate_mbit * 1e6 / 8 * BURST_S))
                net.run("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{rate_mbit}mbit",
                        "burst", str(burst), "latency", TBF_LATENCY)
        self.rate_mbit = rate_mbit

    def qdiscs(self) -> list[str]:
        """`tc qdisc show` lines of every box link (for checks and reports)."""
        out = []
        for h in self.hosts:
            for ns, dev in ((h.ns, h.uplink), (self.network.switch, h.port)):
                out += net.run("tc", "-n", ns, "qdisc", "show", "dev", dev, check=False).stdout.splitlines()
        return out

    def start_sshd(self, root: Path, *, timeout_s: float = 30.0) -> Path:
        """sshd on every host (inside its namespaces, listening on its address), so that `ztune launch -H` and
        `ztune autotune -H` reach the hosts over ssh as on a real cluster, by their hostnames. Keys and configs
        go under `root`; returns the ssh config for `ssh -F`/`-F`. The listeners are box services
        (`service_pids`) like the keepers; `close()` ends them with everything else."""
        root.mkdir(parents=True, exist_ok=True)
        key = net.ssh_client_key(root)
        known = []
        for h in self.hosts:
            config, host_key = net.sshd_files(root / h.hostname, listen_addr=h.addr, client_key=key)
            known.append(f"{h.hostname},{h.addr} {host_key}")
            self.sshd.append(self.popen(h.index, net.sshd_argv(config), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        ssh_config = net.write_ssh_config(root, client_key=key, known_hosts=known)
        deadline = time.monotonic() + timeout_s
        for h in self.hosts:  # from host 0, as the tuner and launcher will
            while True:
                res = self.run(0, ["ssh", "-F", str(ssh_config), "-o", "BatchMode=yes", "-o", "ConnectTimeout=2",
                                   h.hostname, "true"], check=False, timeout_s=timeout_s)
                if res.returncode == 0:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"sshd on {h.hostname} did not come up: {res.stderr.strip()}")
                time.sleep(0.2)
        return ssh_config

    def service_pids(self) -> set[int]:
        """The box's own processes: the keepers and the sshd listeners. Anything else in it belongs to a job."""
        return {h.keeper.pid for h in self.hosts if h.keeper is not None} | {p.pid for p in self.sshd}

    # ------------------------------------------------------------------ use
    def host_argv(self, i: int, argv: list[str], *, cwd: str | os.PathLike | None = None) -> list[str]:
        """`argv` as run on host i: inside its network, mount (/dev/shm) and UTS (hostname) namespaces."""
        keeper = self.hosts[i].keeper
        if keeper is None or keeper.poll() is not None:
            raise RuntimeError(f"host {i} of the box is not running")
        return ["nsenter", "--target", str(keeper.pid), "--net", "--mount", "--uts",
                f"--wd={Path(cwd or os.getcwd()).resolve()}", "--", *argv]

    def run(self, i: int, argv: list[str], *, timeout_s: float = 60, check: bool = True, **kwargs
            ) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.host_argv(i, argv, cwd=kwargs.pop("cwd", None)), timeout=timeout_s, check=check,
                              **kwargs)

    def popen(self, i: int, argv: list[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.host_argv(i, argv, cwd=kwargs.pop("cwd", None)), **kwargs)

    def torchrun(self, script_argv: list[str], *, nproc_per_node: int, hosts: list[int] | None = None,
                 env: dict | None = None, timeout_s: float = 600, master_port: int = 29500) -> list[JobResult]:
        """Run `torchrun --nnodes N --node-rank k --nproc-per-node P --master-addr <first host> ...` on each of
        `hosts` (default: all), as one would on a cluster, and wait for all. On a timeout or once any node
        fails, the others get `FAIL_GRACE_S` to finish, then everything still running in the box is killed
        (the keepers excepted). Returns each node's exit code and output, in `hosts` order."""
        hosts = list(range(self.num_hosts)) if hosts is None else hosts
        from ztune.envvars import CPU_ALLOCATOR_DEFAULTS

        env = {**CPU_ALLOCATOR_DEFAULTS, **os.environ, **(env or {})}  # as `ztune launch` gives its ranks
        env.pop("ZTUNE_LOCAL_WORLD_SIZE", None)  # the box's hosts are real: torchrun's LOCAL_WORLD_SIZE holds
        master = self.hosts[hosts[0]].addr
        procs = []
        for k, i in enumerate(hosts):
            argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(len(hosts)), "--node-rank", str(k),
                    "--nproc-per-node", str(nproc_per_node), "--master-addr", master, "--master-port",
                    str(master_port), *script_argv]
            out = tempfile.TemporaryFile(mode="w+")
            procs.append((i, out, self.popen(i, argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL)))
        deadline = time.monotonic() + timeout_s
        failed_at = None
        while any(p.poll() is None for _, _, p in procs):
            now = time.monotonic()
            if failed_at is None and any(p.poll() not in (None, 0) for _, _, p in procs):
                failed_at = now
            if now > deadline or (failed_at is not None and now - failed_at > FAIL_GRACE_S):
                self.kill_jobs()
                break
            time.sleep(0.2)
        results = []
        for i, out, p in procs:
            p.wait(timeout=30)
            out.seek(0)
            results.append(JobResult(host=i, returncode=p.returncode, output=out.read()))
            out.close()
        return results

    def measure_transfer_mbit(self, src: int, dst: int, *, num_bytes: int = 4 << 20, timeout_s: float = 60) -> float:
        """Send `num_bytes` over one TCP connection from host `src` to host `dst`; the receiver's rate in
        Mbit/s (payload bits from its first byte to its last, so connection set-up is not counted)."""
        port = 5201
        receiver = self.popen(dst, [sys.executable, "-c", _RECEIVER, self.hosts[dst].addr, str(port), str(num_bytes)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            if receiver.stdout.readline().strip() != "listening":
                raise RuntimeError(f"transfer receiver on host {dst} failed: {receiver.stderr.read().strip()}")
            self.run(src, [sys.executable, "-c", _SENDER, self.hosts[dst].addr, str(port), str(num_bytes)],
                     timeout_s=timeout_s)
            out, err = receiver.communicate(timeout=timeout_s)
        finally:
            if receiver.poll() is None:
                receiver.kill()
                receiver.wait()
        if receiver.returncode != 0:
            raise RuntimeError(f"transfer receiver on host {dst} failed: {err.strip()}")
        return num_bytes * 8 / float(out.strip()) / 1e6

    def kill_jobs(self) -> None:
        """SIGKILL every process in the box but its services (keepers, which hold the hosts' namespaces, and
        sshd listeners)."""
        for pid in self.pids() - self.service_pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def uplink_tx_bytes(self) -> list[int]:
        """Bytes each host has sent out of its veth since the box was built (the kernel's interface counter,
        IP headers included): the traffic that crossed to other hosts."""
        out = []
        for h in self.hosts:
            info = json.loads(net.run("ip", "-n", h.ns, "-j", "-s", "link", "show", "dev", h.uplink).stdout)
            out.append(int(info[0]["stats64"]["tx"]["bytes"]))
        return out

    def pids(self) -> set[int]:
        """Live processes inside the box's namespaces (keepers included)."""
        return {p for ns in self.network.namespaces for p in net.ns_pids(ns) if net.alive(p)}

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        """Idempotent; safe from atexit and signal handlers (see the module docstring)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.network.close()
        for p in self.sshd:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
        for h in self.hosts:
            if h.keeper is not None:
                if h.keeper.poll() is None:  # the keeper is `sleep` itself (ip, unshare and sh all exec)
                    h.keeper.kill()
                h.keeper.wait(timeout=10)
                h.keeper.stdout.close()
                h.keeper.stderr.close()
        self._restore_signal_handlers()
        atexit.unregister(self.close)

    def leftovers(self) -> list[str]:
        """What of the box still exists after `close()`: namespaces, /etc/netns dirs, processes, the blackhole
        route (when no other ztune namespace explains it), interfaces in the root namespace. Empty if clean."""
        prefix = self.network.prefix
        left = [f"namespace {n}" for n in net.family_namespaces() if n.startswith(prefix)]
        left += [f"/etc/netns/{p.name}" for p in Path("/etc/netns").glob(f"{prefix}*")]
        left += [f"process {h.keeper.pid} (keeper of {h.ns})" for h in self.hosts
                 if h.keeper is not None and net.alive(h.keeper.pid)]
        links = json.loads(net.run("ip", "-j", "link", "show").stdout)
        left += [f"interface {link['ifname']}" for link in links if link["ifname"].startswith(prefix)]
        if not net.family_namespaces() and SUBNET in net.run("ip", "route", "show", "type", "blackhole").stdout:
            left.append(f"blackhole route {SUBNET}")
        return left

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread; atexit and __exit__ still hold
        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)

    def _restore_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers = {}

    def _on_signal(self, signum, frame) -> None:
        old = self._old_handlers.get(signum, signal.SIG_DFL)
        self.close()  # restores the old handlers
        if callable(old):
            old(signum, frame)
        elif old == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)


# The two ends of `measure_transfer_mbit`: argv = address, port, bytes. The receiver prints "listening",
# then the seconds from its first received byte to its last.
_RECEIVER = """
import socket, sys, time
addr, port, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
srv = socket.create_server((addr, port))
print("listening", flush=True)
conn, _ = srv.accept()
got, start = 0, None
while got < total:
    chunk = conn.recv(1 << 20)
    if not chunk:
        sys.exit("sender closed early")
    start = start or time.perf_counter()
    got += len(chunk)
print(time.perf_counter() - start)
"""
_SENDER = """
import socket, sys
addr, port, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with socket.create_connection((addr, port), timeout=30) as s:
    s.sendall(bytes(total))
"""


def rates_for_cli(text: str, *, prog: str) -> list[int] | None:
    """A benchmark's --rates (Mbit/s, comma-separated integers) once this machine can build a box; None after
    printing one line on stderr saying which of the two is wrong (the caller exits 2)."""
    try:
        rates = [int(r) for r in text.split(",")]
    except ValueError:
        print(f"--rates {text!r}: give Mbit/s as integers, e.g. 1000,10000", file=sys.stderr)
        return None
    if (reason := why_unavailable()) is not None:
        print(f"{prog}: cannot build the cluster in a box: {reason}", file=sys.stderr)
        return None
    return rates


def why_unavailable() -> str | None:
    """None when this machine can build a box (root, iproute2, tc, unshare, nsenter), else the reason."""
    return net.why_unavailable(("tc", "unshare", "nsenter"))


if __name__ == "__main__":  # a manual look: build a box, print its state, tear it down
    with ClusterBox(num_hosts=int(sys.argv[1]) if len(sys.argv) > 1 else 2) as b:
        for h in b.hosts:
            print(h.ns, h.addr, b.run(h.index, ["hostname"]).stdout.strip(),
                  b.run(h.index, ["sh", "-c", "ls /dev/shm | wc -l"]).stdout.strip())
        print("\n".join(b.qdiscs()))
    print("leftovers:", b.leftovers())
