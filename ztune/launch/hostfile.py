"""Which hosts, and which slots on each: DeepSpeed-format hostfiles, include/exclude filters, Slurm nodelists.

All pure functions of strings. Hostnames are data: nothing here (or anywhere in the launcher) hands them to a
shell; ssh itself refuses names that contain shell metacharacters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ztune.errors import UserError


class HostfileError(UserError):
    """A hostfile, host filter or Slurm nodelist that cannot be parsed."""


@dataclass(frozen=True)
class Host:
    """One host and the local slots (GPU indices, or CPU ranks) the job may use on it."""

    name: str
    slots: tuple[int, ...]

    @property
    def num_slots(self) -> int:
        return len(self.slots)


_SLOTS_RE = re.compile(r"^slots=(\d+)$")


def parse_hostfile(text: str, *, source: str = "hostfile") -> list[Host]:
    """Parse DeepSpeed's hostfile format: `hostname slots=N` per line, `#` comments, blank lines.

    A bare `hostname` means one slot. Duplicate hosts, `slots=0` and stray tokens are errors.
    """
    hosts: list[Host] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        name = fields[0]
        where = f"{source} line {lineno}"
        if name.startswith("-"):
            raise HostfileError(f"{where}: hostname {name!r} starts with '-'; fix the hostname")
        if name.startswith("slots="):
            raise HostfileError(f"{where}: expected 'hostname slots=N', got {line!r}")
        if len(fields) > 2:
            raise HostfileError(f"{where}: expected 'hostname slots=N', got {line!r}")
        num_slots = 1
        if len(fields) == 2:
            m = _SLOTS_RE.match(fields[1])
            if m is None:
                raise HostfileError(f"{where}: expected 'slots=N' with an integer N, got {fields[1]!r}")
            num_slots = int(m.group(1))
            if num_slots < 1:
                raise HostfileError(f"{where}: slots must be at least 1, got {num_slots}")
        if name in seen:
            raise HostfileError(f"{where}: host {name!r} already listed on line {seen[name]}; list it once")
        seen[name] = lineno
        hosts.append(Host(name=name, slots=tuple(range(num_slots))))
    if not hosts:
        raise HostfileError(f"{source} lists no hosts; add lines of the form 'hostname slots=N'")
    return hosts


def _parse_filter(spec: str, *, flag: str) -> dict[str, tuple[int, ...] | None]:
    """`host1:0,1@host2` -> {host1: (0, 1), host2: None}; None means the whole host."""
    out: dict[str, tuple[int, ...] | None] = {}
    for part in spec.split("@"):
        part = part.strip()
        if not part:
            raise HostfileError(f"{flag} {spec!r}: empty host entry; use the form 'host1:0,1@host2'")
        name, sep, slot_text = part.partition(":")
        slots: tuple[int, ...] | None = None
        if sep:
            try:
                slots = tuple(int(s) for s in slot_text.split(","))
            except ValueError:
                raise HostfileError(
                    f"{flag} {spec!r}: slots of {name!r} must be integers like 'host:0,1'") from None
        if name in out:
            raise HostfileError(f"{flag} {spec!r}: host {name!r} given twice")
        out[name] = slots
    return out


def apply_filters(hosts: list[Host], *, include: str | None = None, exclude: str | None = None) -> list[Host]:
    """DeepSpeed's `--include` / `--exclude` (mutually exclusive): keep or drop whole hosts or some slots."""
    if include and exclude:
        raise HostfileError("--include and --exclude cannot be used together; pick one")
    by_name = {h.name: h for h in hosts}
    spec, flag = (include, "--include") if include else (exclude, "--exclude")
    if not spec:
        return list(hosts)
    wanted = _parse_filter(spec, flag=flag)
    for name, slots in wanted.items():
        if name not in by_name:
            raise HostfileError(f"{flag}: host {name!r} is not in the host list ({', '.join(by_name)})")
        bad = [s for s in slots or () if s not in by_name[name].slots]
        if bad:
            raise HostfileError(f"{flag}: host {name!r} has slots {list(by_name[name].slots)}, not {bad}")
    result: list[Host] = []
    for h in hosts:  # keep the hostfile's order: node ranks follow it
        if include:
            if h.name not in wanted:
                continue
            slots = wanted[h.name]
            result.append(Host(name=h.name, slots=h.slots if slots is None else tuple(sorted(set(slots)))))
        else:
            slots = wanted.get(h.name, ())
            if h.name in wanted and slots is None:
                continue
            keep = tuple(s for s in h.slots if s not in (slots or ()))
            if keep:
                result.append(Host(name=h.name, slots=keep))
    if not result:
        raise HostfileError(f"{flag} {spec!r} leaves no hosts to run on")
    return result


def limit_hosts(hosts: list[Host], *, num_nodes: int | None = None,
                nproc_per_node: int | None = None) -> list[Host]:
    """`--num-nodes` keeps the first N hosts; `--nproc-per-node` keeps the first K slots of each."""
    if num_nodes is not None:
        if num_nodes < 1:
            raise HostfileError(f"--num-nodes must be at least 1, got {num_nodes}")
        if num_nodes > len(hosts):
            raise HostfileError(f"--num-nodes {num_nodes}: only {len(hosts)} host(s) available")
        hosts = hosts[:num_nodes]
    if nproc_per_node is not None:
        if nproc_per_node < 1:
            raise HostfileError(f"--nproc-per-node must be at least 1, got {nproc_per_node}")
        # The count wins over the hostfile: a hostfile may count GPUs while a CPU run wants more ranks.
        hosts = [Host(name=h.name, slots=h.slots[:nproc_per_node] if h.num_slots >= nproc_per_node
                      else tuple(range(nproc_per_node))) for h in hosts]
    return hosts


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside [...]."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise HostfileError(f"SLURM_JOB_NODELIST {text!r}: unbalanced ']'")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise HostfileError(f"SLURM_JOB_NODELIST {text!r}: unbalanced '['")
    parts.append("".join(cur))
    return [p for p in parts if p]


def _expand_ranges(body: str, *, nodelist: str) -> list[str]:
    """`01-03,7` -> ['01', '02', '03', '7'] keeping zero padding, as Slurm writes it."""
    out = []
    for item in body.split(","):
        lo, sep, hi = item.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise HostfileError(f"SLURM_JOB_NODELIST {nodelist!r}: bad range {item!r}")
        if not sep:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise HostfileError(f"SLURM_JOB_NODELIST {nodelist!r}: range {item!r} runs backwards")
        width = len(lo)
        out.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm nodelist (`gpu[01-03,07],login1`, `a[1-2]b[3-4]`) into hostnames, in order."""
    names: list[str] = []
    for part in _split_top_level(nodelist.strip()):
        expanded = [""]
        for m in re.finditer(r"([^\[]*)(?:\[([^\]]*)\])?", part):
            prefix, body = m.group(1), m.group(2)
            if not prefix and body is None:
                continue
            choices = [prefix] if body is None else [prefix + x for x in _expand_ranges(body, nodelist=nodelist)]
            expanded = [e + c for e in expanded for c in choices]
        names.extend(expanded)
    if not names:
        raise HostfileError(f"SLURM_JOB_NODELIST {nodelist!r} names no hosts")
    return names


def hosts_from_slurm(env: dict[str, str]) -> list[Host] | None:
    """Hosts of the current Slurm allocation, or None outside one. Slots: SLURM_GPUS_ON_NODE, else 1."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        return None
    gpus = env.get("SLURM_GPUS_ON_NODE", "")
    num_slots = int(gpus) if gpus.isdigit() and int(gpus) > 0 else 1
    return [Host(name=n, slots=tuple(range(num_slots))) for n in expand_nodelist(nodelist)]
