"""Before anything starts: every host reachable, same Python/torch/ztune as here, working directory and script
present, rendezvous port free on the head, and the interface that routes to the head. All hosts in parallel,
each bounded by a time limit.
"""

from __future__ import annotations

import json
import platform
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata

from ztune.launch.lifeline import die_with_parent
from ztune.launch.netif import Interface, choose_interface
from ztune.launch.ssh import SshOptions, ssh_argv

# Runs on each host with its own Python; must work without ztune installed there (it reports that instead),
# and does not import torch (seconds) -- the installed distribution's version is what we compare.
_PROBE = r"""
import json, os, socket, subprocess, sys, platform
from importlib import metadata
a = json.loads(sys.argv[1])
def ver(name):
    try:
        return metadata.version(name)
    except Exception:
        return None
def run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=3).stdout
    except Exception as exc:
        return ""
out = {"python": platform.python_version(), "torch": ver("torch"), "ztune": ver("ztune"),
       "workdir_ok": os.path.isdir(a["workdir"]),
       "script_ok": os.path.isfile(os.path.join(a["workdir"], a["script"])),
       "ssh_connection": os.environ.get("SSH_CONNECTION", ""), "port_free": None}
if a["port"]:
    s = socket.socket(socket.AF_INET6 if ":" in a["bind"] else socket.AF_INET)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((a["bind"], a["port"]))
        out["port_free"] = True
    except OSError:
        out["port_free"] = False
    finally:
        s.close()
if a["head_addr"]:
    out["route"] = run(["ip", "-o", "route", "get", a["head_addr"]])
    out["addrs"] = run(["ip", "-o", "addr", "show"])
print(json.dumps(out))
"""


@dataclass(frozen=True)
class HostReport:
    """What the probe found on one host (`error` set when the probe itself could not run)."""

    host: str
    error: str | None = None
    python: str | None = None
    torch: str | None = None
    ztune: str | None = None
    workdir_ok: bool = False
    script_ok: bool = False
    port_free: bool | None = None
    interface: Interface | None = None
    elapsed_s: float = 0.0


@dataclass(frozen=True)
class Failure:
    host: str
    check: str
    detail: str


def local_versions() -> dict[str, str | None]:
    """The head's (this process's) versions, which every host must match."""
    def ver(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None
    return {"python": platform.python_version(), "torch": ver("torch"), "ztune": ver("ztune")}


def probe_argv(*, python: str, workdir: str, script: str, port: int | None, head_addr: str | None) -> list[str]:
    """The probe command, as an argv list (the arguments travel as one JSON word)."""
    bind = "::" if head_addr and ":" in head_addr else ""
    args = {"workdir": workdir, "script": script, "port": port, "bind": bind, "head_addr": head_addr}
    return [python, "-c", _PROBE, json.dumps(args)]


def _parse_probe(host: str, stdout: str, *, head_addr: str | None, elapsed_s: float) -> HostReport:
    try:
        doc = json.loads(stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return HostReport(host=host, error=f"probe printed no result: {stdout.strip()[-200:]!r}",
                          elapsed_s=elapsed_s)
    iface = None
    if head_addr and doc.get("route") is not None:
        iface = choose_interface(route_output=doc.get("route", ""), addr_output=doc.get("addrs", ""),
                                 head_addr=head_addr)
    return HostReport(host=host, python=doc.get("python"), torch=doc.get("torch"), ztune=doc.get("ztune"),
                      workdir_ok=bool(doc.get("workdir_ok")), script_ok=bool(doc.get("script_ok")),
                      port_free=doc.get("port_free"), interface=iface, elapsed_s=elapsed_s)


def probe_host(*, host: str, argv: Sequence[str], timeout_s: float, head_addr: str | None) -> HostReport:
    """Run the probe argv (ssh ..., or a local python) with a hard time limit."""
    import time

    t0 = time.monotonic()
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s,
                              stdin=subprocess.DEVNULL, start_new_session=True,
                              preexec_fn=die_with_parent(signal.SIGTERM))
    except subprocess.TimeoutExpired:
        return HostReport(host=host, error=f"no answer within {timeout_s:g} s", elapsed_s=timeout_s)
    except FileNotFoundError as exc:
        return HostReport(host=host, error=f"cannot run {exc.filename!r}", elapsed_s=time.monotonic() - t0)
    elapsed_s = time.monotonic() - t0
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        what = "ssh failed" if proc.returncode == 255 else f"probe failed (exit {proc.returncode})"
        return HostReport(host=host, error=f"{what}: {last}", elapsed_s=elapsed_s)
    return _parse_probe(host, proc.stdout, head_addr=head_addr, elapsed_s=elapsed_s)


def run_preflight(*, hosts: Sequence[str], local: bool, python: str, workdir: str, script: str, port: int,
                  head_addr: str | None, ssh: SshOptions, timeout_s: float) -> list[HostReport]:
    """Probe every host in parallel; host 0 (the rendezvous head) also checks the port. Order kept."""
    reports: list[HostReport | None] = [None] * len(hosts)

    def one(i: int, host: str) -> None:
        argv = probe_argv(python=python, workdir=workdir, script=script, port=port if i == 0 else None,
                          head_addr=head_addr)
        if not local:
            argv = ssh_argv(host=host, remote_command=shlex.join(argv), opts=ssh)
        reports[i] = probe_host(host=host, argv=argv, timeout_s=timeout_s, head_addr=head_addr)

    threads = [threading.Thread(target=one, args=(i, h), daemon=True) for i, h in enumerate(hosts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s + 5.0)
    return [r or HostReport(host=h, error="probe thread did not finish") for r, h in zip(reports, hosts, strict=True)]


def find_failures(reports: Sequence[HostReport], *, expected: dict[str, str | None], workdir: str,
                  script: str, port: int, python: str, need_interface: bool) -> list[Failure]:
    """Every check that failed, as (host, check, detail) rows. Empty means go."""
    out: list[Failure] = []
    for i, r in enumerate(reports):
        if r.error:
            out.append(Failure(r.host, "reachable", r.error))
            continue
        for key in ("python", "torch", "ztune"):
            got = getattr(r, key)
            if got != expected[key]:
                out.append(Failure(r.host, f"{key} version",
                                   f"{got or 'not installed'} with {python}, head has {expected[key]}"))
        if not r.workdir_ok:
            out.append(Failure(r.host, "working directory", f"{workdir} does not exist"))
        elif not r.script_ok:
            out.append(Failure(r.host, "script", f"{script} not found in {workdir}"))
        if i == 0 and r.port_free is False:
            out.append(Failure(r.host, "rendezvous port", f"port {port} is in use; pick another --master-port"))
        if need_interface and r.interface is None:
            out.append(Failure(r.host, "network interface",
                               "no route to the head found with 'ip route get'; pass --ifname"))
    return out


def python_default() -> str:
    return sys.executable
