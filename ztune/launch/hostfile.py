"""Which hosts, and which slots on each: DeepSpeed-format hostfiles, include/exclude filters, Slurm nodelists.

All pure functions of strings. Hostnames are data: nothing here (or anywhere in the launcher) hands them to a
shell; ssh itself refuses names that contain shell metacharacters.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from ztune.errors import UserError
from ztune.inputs import MAX_RANKS_PER_HOST, ascii_int, ascii_lines, describe_char, first_unprintable, shown


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


# Slots per host: far above any real node (GPUs, or CPU ranks), low enough that a typo such as
# slots=100000000 is an error instead of a 100-million-element tuple.
MAX_SLOTS = MAX_RANKS_PER_HOST
MAX_HOSTS = 65536  # hosts in one hostfile or Slurm nodelist
_FIELD_SEP = re.compile(r"[ \t]+")


def canonical_host(name: str, *, where: str) -> str:
    """A host as the launcher keeps it: IPv6 literals without brackets and in compressed form (so that
    `fd00:0::1` and `[fd00::1]` name the same host), hostnames unchanged.

    A name is printable ASCII (DNS names are; an internationalised one is written in its xn-- form) without
    spaces, and no leading '-' (ssh would read it as an option). A name with a ':' must be an IPv6 address: a
    hostname cannot hold one. Raises HostfileError naming `where`.
    """
    bad = next((c for c in name if not "!" <= c <= "~"), None)  # printable ASCII, space excluded
    if bad is not None:
        raise HostfileError(f"{where}: {shown(name)} is not a host name: it holds {describe_char(bad)} (a host "
                            "name is printable ASCII, without spaces)")
    if name.startswith("-"):
        raise HostfileError(f"{where}: {name!r} is not a host name (no leading '-': ssh would read it as an "
                            "option)")
    bare = name[1:-1] if name.startswith("[") and name.endswith("]") else name
    if ":" not in bare and bare == name:
        return name
    try:
        return str(ipaddress.IPv6Address(bare))
    except ValueError:
        raise HostfileError(f"{where}: {name!r} is neither a hostname nor an IPv6 address (IPv6 may be written "
                            "bare or in brackets: fd00::1 or [fd00::1])") from None


def _canonical_or_none(name: str) -> str | None:
    try:
        return canonical_host(name, where="")
    except HostfileError:
        return None


def format_endpoint(addr: str, port: int) -> str:
    """`host:port`, with IPv6 literals bracketed (`[fd00::1]:29500`) as torchrun and URLs expect."""
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def parse_hostfile(text: str, *, source: str = "hostfile") -> list[Host]:
    """Parse DeepSpeed's hostfile format: `hostname slots=N` per line, `#` comments, blank lines.

    A bare `hostname` means one slot. Duplicate hosts, `slots=0` and stray tokens are errors. Lines end at
    ASCII line ends and their fields are ASCII, separated by spaces or tabs; a comment may hold any text.
    """
    hosts: list[Host] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(ascii_lines(text), start=1):
        line = raw.split("#", 1)[0].strip(" \t")
        if not line:
            continue
        fields = _FIELD_SEP.split(line)
        where = f"{source} line {lineno}"
        for field in fields:
            bad = first_unprintable(field)
            if bad is not None:
                raise HostfileError(f"{where}: {shown(field)} holds {describe_char(bad)}; write the host name and "
                                    "slots=N in ASCII, separated by plain spaces")
        name = fields[0]
        if name.startswith("-"):
            raise HostfileError(f"{where}: hostname {name!r} starts with '-'; fix the hostname")
        if name.startswith("slots="):
            raise HostfileError(f"{where}: expected 'hostname slots=N', got {line!r}")
        if len(fields) > 2:
            raise HostfileError(f"{where}: expected 'hostname slots=N', got {line!r}")
        name = canonical_host(name, where=where)
        num_slots = 1
        if len(fields) == 2:
            key, _, text = fields[1].partition("=")
            value = ascii_int(text) if key == "slots" else None
            if value is None:
                raise HostfileError(f"{where}: expected 'slots=N' with N in ASCII digits 0-9, got {shown(fields[1])}")
            if not 1 <= value <= MAX_SLOTS:
                raise HostfileError(f"{where}: slots must be between 1 and {MAX_SLOTS}, got {text[:24]}")
            num_slots = value
        if name in seen:
            raise HostfileError(f"{where}: host {name!r} already listed on line {seen[name]}; list it once")
        seen[name] = lineno
        hosts.append(Host(name=name, slots=tuple(range(num_slots))))
    if not hosts:
        raise HostfileError(f"{source} lists no hosts; add lines of the form 'hostname slots=N'")
    return hosts


def _split_entry(part: str, *, spec: str, flag: str) -> tuple[str, str | None]:
    """One filter entry -> (host, slot text or None).

    `host`, `host:0,1`; IPv6: `[fd00::1]`, `[fd00::1]:0,1`, or a bare `fd00::1` (the whole host). A bare
    entry with two or more ':' is read as an address in full, never as address + slots: `fd00::1:0` is the
    address fd00::1:0 -- slots of an IPv6 host need the brackets.
    """
    if part.startswith("["):
        addr, close, rest = part[1:].partition("]")
        if not close or (rest and not rest.startswith(":")):
            raise HostfileError(f"{flag} {spec!r}: bad entry {part!r}; write IPv6 hosts as '[fd00::1]' or "
                                "'[fd00::1]:0,1'")
        return f"[{addr}]", rest[1:] if rest else None
    if part.count(":") >= 2:
        if "," in part:
            raise HostfileError(f"{flag} {spec!r}: {part!r} is ambiguous; write the slots of an IPv6 host "
                                "in brackets, e.g. '[fd00::1]:0,1'")
        return part, None
    name, sep, slot_text = part.partition(":")
    return name, slot_text if sep else None


def _parse_slots(text: str, *, name: str, spec: str, flag: str) -> tuple[int, ...]:
    items = text.split(",")
    slots = [ascii_int(s.strip(" ")) if len(s.strip(" ")) <= 6 else None for s in items]
    if len(items) > MAX_SLOTS or None in slots:
        raise HostfileError(f"{flag} {shown(spec)}: slots of {name!r} must be integers in ASCII digits 0-9, like "
                            "'host:0,1'")
    return tuple(slots)


def _parse_filter(spec: str, *, flag: str) -> dict[str, tuple[int, ...] | None]:
    """`host1:0,1@host2` -> {host1: (0, 1), host2: None}; None means the whole host. IPv6 hosts are
    canonical (see `canonical_host`)."""
    out: dict[str, tuple[int, ...] | None] = {}
    bad = first_unprintable(spec, allow="\t")
    if bad is not None:
        raise HostfileError(f"{flag} {shown(spec)} holds {describe_char(bad)}; write hosts and slots in ASCII, "
                            "e.g. 'node1:0,1@node2'")
    for part in spec.split("@"):
        part = part.strip(" \t")
        if not part:
            raise HostfileError(f"{flag} {spec!r}: empty host entry; use the form 'host1:0,1@host2'")
        raw_name, slot_text = _split_entry(part, spec=spec, flag=flag)
        name = canonical_host(raw_name, where=f"{flag} {spec!r}")
        slots = None if slot_text is None else _parse_slots(slot_text, name=name, spec=spec, flag=flag)
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
            hint = ""
            head, _, tail = name.rpartition(":")
            if ":" in name and ascii_int(tail) is not None and _canonical_or_none(head) in by_name:
                hint = f"; for slot {tail} of {head} write '[{head}]:{tail}'"
            raise HostfileError(f"{flag}: host {name!r} is not in the host list ({', '.join(by_name)}){hint}")
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
        if not 1 <= nproc_per_node <= MAX_SLOTS:
            raise HostfileError(f"--nproc-per-node must be between 1 and {MAX_SLOTS}, got {nproc_per_node}")
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
        if ascii_int(lo) is None or (sep and ascii_int(hi) is None):
            raise HostfileError(f"SLURM_JOB_NODELIST {shown(nodelist)}: bad range {shown(item)} (ASCII digits 0-9)")
        if not sep:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise HostfileError(f"SLURM_JOB_NODELIST {nodelist!r}: range {item!r} runs backwards")
        if int(hi) - int(lo) >= MAX_HOSTS:
            raise HostfileError(f"SLURM_JOB_NODELIST {nodelist!r}: range {item!r} has more than {MAX_HOSTS} hosts")
        width = len(lo)
        out.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm nodelist (`gpu[01-03,07],login1`, `a[1-2]b[3-4]`) into hostnames, in order."""
    names: list[str] = []
    for part in _split_top_level(nodelist.strip(" \t\r\n")):  # ASCII only: a host name is (canonical_host)
        expanded = [""]
        for m in re.finditer(r"([^\[]*)(?:\[([^\]]*)\])?", part):
            prefix, body = m.group(1), m.group(2)
            if not prefix and body is None:
                continue
            choices = [prefix] if body is None else [prefix + x for x in _expand_ranges(body, nodelist=nodelist)]
            if len(expanded) * len(choices) + len(names) > MAX_HOSTS:
                raise HostfileError(f"SLURM_JOB_NODELIST {nodelist!r} names more than {MAX_HOSTS} hosts")
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
    gpus = ascii_int(env.get("SLURM_GPUS_ON_NODE", ""))
    num_slots = gpus if gpus is not None and 0 < gpus <= MAX_SLOTS else 1
    where = "SLURM_JOB_NODELIST" if env.get("SLURM_JOB_NODELIST") else "SLURM_NODELIST"
    return [Host(name=canonical_host(n, where=where), slots=tuple(range(num_slots))) for n in expand_nodelist(nodelist)]
