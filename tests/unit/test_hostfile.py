"""Hostfile parsing, include/exclude filters, node/rank limits and Slurm nodelist expansion."""

from __future__ import annotations

import pytest

from ztune.errors import UserError
from ztune.launch.hostfile import (
    Host,
    HostfileError,
    apply_filters,
    expand_nodelist,
    hosts_from_slurm,
    limit_hosts,
    parse_hostfile,
)

TEXT = """
# a comment
worker-0 slots=4
worker-1 slots=4   # trailing comment

worker-2 slots=2
bare
"""


def test_parse_hostfile_deepspeed_format() -> None:
    hosts = parse_hostfile(TEXT)
    assert hosts == [Host("worker-0", (0, 1, 2, 3)), Host("worker-1", (0, 1, 2, 3)), Host("worker-2", (0, 1)),
                     Host("bare", (0,))]


@pytest.mark.parametrize("text, needle", [
    ("a slots=x\n", "slots=N"),
    ("a slots=0\n", "between 1 and 4096"),
    ("a slots=100000000\n", "between 1 and 4096"),
    ("a slots=99999999999999999999\n", "between 1 and 4096"),
    ("node:1 slots=1\n", "neither a hostname nor an IPv6 address"),
    ("a slots=2 extra\n", "hostname slots=N"),
    ("a slots=1\na slots=2\n", "already listed on line 1"),
    ("-oProxyCommand=x slots=1\n", "starts with '-'"),
    ("slots=2\n", "hostname slots=N"),
    ("# only comments\n\n", "no hosts"),
])
def test_parse_hostfile_errors_are_one_line_user_errors(text: str, needle: str) -> None:
    with pytest.raises(UserError) as info:
        parse_hostfile(text, source="hf")
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_include_hosts_and_slots_keeps_hostfile_order() -> None:
    hosts = parse_hostfile(TEXT)
    got = apply_filters(hosts, include="worker-2@worker-0:1,3")
    assert got == [Host("worker-0", (1, 3)), Host("worker-2", (0, 1))]


def test_exclude_whole_host_and_some_slots() -> None:
    hosts = parse_hostfile(TEXT)
    got = apply_filters(hosts, exclude="worker-1@worker-0:0,1@bare")
    assert got == [Host("worker-0", (2, 3)), Host("worker-2", (0, 1))]


@pytest.mark.parametrize("kwargs, needle", [
    ({"include": "nope"}, "not in the host list"),
    ({"include": "worker-0:7"}, "not [7]"),
    ({"include": "worker-0:a"}, "must be integers"),
    ({"include": "worker-0", "exclude": "worker-1"}, "cannot be used together"),
    ({"exclude": "worker-0@worker-1@worker-2@bare"}, "leaves no hosts"),
    ({"include": "worker-0@@bare"}, "empty host entry"),
])
def test_filter_errors(kwargs: dict, needle: str) -> None:
    with pytest.raises(HostfileError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        apply_filters(parse_hostfile(TEXT), **kwargs)


def test_limits_nodes_and_ranks() -> None:
    hosts = parse_hostfile(TEXT)
    assert [h.name for h in limit_hosts(hosts, num_nodes=2)] == ["worker-0", "worker-1"]
    got = limit_hosts(hosts, num_nodes=3, nproc_per_node=3)
    assert [h.slots for h in got] == [(0, 1, 2), (0, 1, 2), (0, 1, 2)]  # worker-2 (2 slots) takes 3: CPU ranks
    with pytest.raises(HostfileError, match="only 4 host"):
        limit_hosts(hosts, num_nodes=5)
    with pytest.raises(HostfileError, match="between 1 and"):
        limit_hosts(hosts, nproc_per_node=0)
    with pytest.raises(HostfileError, match="between 1 and"):
        limit_hosts(hosts, nproc_per_node=100_000_000)


@pytest.mark.parametrize("nodelist, expected", [
    ("node1", ["node1"]),
    ("gpu[01-03,07],login1", ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]),
    ("a[1-2]b[8-9]", ["a1b8", "a1b9", "a2b8", "a2b9"]),
    ("rack[9-11]-n", ["rack9-n", "rack10-n", "rack11-n"]),
    ("x[098-100]", ["x098", "x099", "x100"]),
])
def test_expand_slurm_nodelist(nodelist: str, expected: list[str]) -> None:
    assert expand_nodelist(nodelist) == expected


@pytest.mark.parametrize("bad", ["gpu[1-", "gpu1]", "gpu[3-1]", "gpu[a-b]"])
def test_bad_slurm_nodelist(bad: str) -> None:
    with pytest.raises(HostfileError):
        expand_nodelist(bad)


def test_hosts_from_slurm_environment() -> None:
    assert hosts_from_slurm({}) is None
    hosts = hosts_from_slurm({"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_GPUS_ON_NODE": "8"})
    assert hosts == [Host("n1", tuple(range(8))), Host("n2", tuple(range(8)))]


V6 = "# IPv6 hosts\nfd00::1 slots=2\nfd00::2 slots=2\n"


@pytest.mark.parametrize("spec, expected", [
    ("fd00::1", [Host("fd00::1", (0, 1))]),                        # bare address: the whole host
    ("[fd00::1]", [Host("fd00::1", (0, 1))]),
    ("[fd00::1]:0", [Host("fd00::1", (0,))]),
    ("[fd00::1]:1@fd00::2", [Host("fd00::1", (1,)), Host("fd00::2", (0, 1))]),
    ("[fd00:0:0::2]:0,1", [Host("fd00::2", (0, 1))]),              # any spelling of the same address
])
def test_include_ipv6_hosts(spec: str, expected: list[Host]) -> None:
    assert apply_filters(parse_hostfile(V6), include=spec) == expected


def test_exclude_ipv6_slot() -> None:
    assert apply_filters(parse_hostfile(V6), exclude="[fd00::2]:0") == [Host("fd00::1", (0, 1)),
                                                                         Host("fd00::2", (1,))]


@pytest.mark.parametrize("spec, needle", [
    ("fd00::1:0,1", "ambiguous; write the slots of an IPv6 host in brackets, e.g. '[fd00::1]:0,1'"),
    # A bare entry is an address in full: fd00::1:0 is another host, and the message says how to mean slot 0.
    ("fd00::1:0", "for slot 0 of fd00::1 write '[fd00::1]:0'"),
    ("[fd00::1", "write IPv6 hosts as"),
    ("[fd00::1]0", "write IPv6 hosts as"),
    ("[fd00::1]:x", "must be integers"),
    ("[fd00::1]:99999999999999999999", "must be integers"),
    ("[zz::1]:0", "neither a hostname nor an IPv6 address"),
])
def test_ipv6_filter_errors(spec: str, needle: str) -> None:
    with pytest.raises(HostfileError) as info:
        apply_filters(parse_hostfile(V6), include=spec)
    assert needle in str(info.value), str(info.value)


def test_hostfile_ipv6_spellings_are_one_host() -> None:
    assert parse_hostfile("[fd00::1] slots=1\n") == [Host("fd00::1", (0,))]
    with pytest.raises(HostfileError, match="already listed"):
        parse_hostfile("fd00::1\nfd00:0::1\n")


def test_slurm_sizes_are_bounded() -> None:
    with pytest.raises(HostfileError, match="more than 65536"):
        expand_nodelist("n[0-99999999999]")
    with pytest.raises(HostfileError, match="more than 65536"):
        expand_nodelist("a[0-999]b[0-999]")
    # A nonsense GPU count is not a slot count: one slot, as when it is missing.
    assert hosts_from_slurm({"SLURM_NODELIST": "n1", "SLURM_GPUS_ON_NODE": "99999999999999999999"}) == [
        Host("n1", (0,))]
