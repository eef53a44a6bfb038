"""The launcher's line-oriented inputs are ASCII where they have structure (hostfile, --include/--exclude, host
names, .ztune_env, --ssh-option).

Python's str.split() and str.strip() also take U+00A0 NO-BREAK SPACE, U+2003 EM SPACE or U+3000 IDEOGRAPHIC SPACE
as a separator, and str.splitlines() ends a line at U+2028, U+0085 or a form feed: `node1<U+00A0>slots=2` was
read as node1 with 2 slots, and a host commented out before a U+2028 came back to life. Such a character is now
one line naming the input, the line and the character, escaped with its name, as the ASCII-digit messages do.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.cli import run_cli
from ztune.launch import LaunchRequest, plan_launch
from ztune.launch.command import LaunchError, parse_env_file
from ztune.launch.hostfile import Host, HostfileError, apply_filters, canonical_host, hosts_from_slurm, parse_hostfile
from ztune.launch.ssh import SshOptions, check_ssh_option

# Spaces a word processor or a chat client pastes, an invisible BOM, and ASCII controls that str.split() and
# str.splitlines() took for a space or a line end.
_SPACES = ["\u00a0", "\u2003", "\u3000", "\u2009", "\u202f", "\ufeff", "\x0c", "\x0b", "\x1f", "\x85"]


@pytest.mark.parametrize("char", _SPACES)
def test_a_hostfile_line_split_by_another_space_is_refused_naming_it(char) -> None:
    with pytest.raises(HostfileError) as info:
        parse_hostfile(f"node0 slots=1\nnode1{char}slots=2\n", source="hosts.txt")
    msg = str(info.value)
    assert msg.startswith("hosts.txt line 2: ") and ascii(char)[1:-1] in msg and f"U+{ord(char):04X}" in msg, msg
    assert "\n" not in msg and "ASCII" in msg


@pytest.mark.parametrize("line", ["n\u00f6de1 slots=1", "node1 slots=2\u00a0", "\u00a0node1 slots=2", "node\u200b1"])
def test_a_hostfile_field_is_ascii(line) -> None:
    with pytest.raises(HostfileError, match=r"hosts\.txt line 1: .*U\+"):
        parse_hostfile(line + "\n", source="hosts.txt")


def test_hostfile_lines_end_at_ascii_line_ends_only() -> None:
    # A comment may hold any text, and it runs to an ASCII line end: the host after U+2028 stays commented out.
    assert parse_hostfile("a slots=1\n# retired: b slots=2\u2028c slots=2\n# J\u00fcrgen's\x0cnode\n") == \
        [Host("a", (0,))]
    assert parse_hostfile("a\tslots=2\r\nb  slots=1 \t\r\nc\rd slots=1") == \
        [Host("a", (0, 1)), Host("b", (0,)), Host("c", (0,)), Host("d", (0,))]


@pytest.mark.parametrize("flag", ["include", "exclude"])
@pytest.mark.parametrize("spec", ["node1\u00a0@node2", "node1:0,\u30001", "node1@\u2003node2", "n\u00f6de1"])
def test_host_filters_are_ascii(flag, spec) -> None:
    hosts = parse_hostfile("node1 slots=2\nnode2 slots=2\nnode3 slots=1\n")
    with pytest.raises(HostfileError) as info:
        apply_filters(hosts, **{flag: spec})
    msg = str(info.value)
    assert msg.startswith(f"--{flag} ") and "U+" in msg and "ASCII" in msg, msg
    assert apply_filters(hosts, **{flag: " node1 @ node2 "}) == (
        [Host("node1", (0, 1)), Host("node2", (0, 1))] if flag == "include" else [Host("node3", (0,))])


@pytest.mark.parametrize("name", ["n\u00f6de", "node\u00a0", "\u3000node", "node\x7f"])
def test_host_names_are_printable_ascii_wherever_they_come_from(name) -> None:
    with pytest.raises(HostfileError, match="is not a host name: it holds .*U\\+"):
        canonical_host(name, where="--master-addr")
    with pytest.raises(HostfileError, match="^SLURM_JOB_NODELIST: .*is not a host name"):
        hosts_from_slurm({"SLURM_JOB_NODELIST": f"gpu01,{name}"})
    assert canonical_host("xn--nde-6qa", where="--master-addr") == "xn--nde-6qa"  # the IDNA spelling


@pytest.mark.parametrize("text", ["A=1\u00a0", "\u3000A=1", "A=1\x0c", "\ufeffA=1", "A=1\u200b"])
def test_env_file_lines_with_invisible_edges_are_refused(text) -> None:
    with pytest.raises(LaunchError) as info:
        parse_env_file(f"B=2\n{text}\n", source="/w/.ztune_env")
    assert str(info.value).startswith("/w/.ztune_env line 2: ") and "U+" in str(info.value), str(info.value)


def test_env_file_values_are_literal_up_to_an_ascii_line_end() -> None:
    # U+2028 and U+0085 ended the line: the value was cut, and its rest read as a line of its own.
    assert parse_env_file("A=x\u2028B=y\nC=caf\u00e9 \u00a0ol\u00e9\r\n  D=1\t\rE=\x85\u00e9") == \
        {"A": "x\u2028B=y", "C": "caf\u00e9 \u00a0ol\u00e9", "D": "1", "E": "\x85\u00e9"}


@pytest.mark.parametrize("option", ["StrictHostKeyChecking\u00a0no", "User=bob\u00a0", "Port=22\u3000",
                                    "User=bob\n", "User\u2003bob", "=bob", "bob"])
def test_ssh_options_ssh_would_misread_are_refused(option) -> None:
    with pytest.raises(LaunchError, match="^--ssh-option "):
        check_ssh_option(option)


@pytest.mark.parametrize("option", ["ConnectTimeout=5", "User bob", "User = bob", "ForwardX11=no",
                                    "ProxyCommand ssh -W %h:%p jump", "IdentityFile=/home/j\u00fcrgen/.ssh/id",
                                    "SendEnv=LANG LC_*"])
def test_ssh_options_as_ssh_reads_them_pass(option) -> None:
    check_ssh_option(option)


def test_the_launcher_checks_ssh_options_before_contacting_a_host(tmp_path) -> None:
    (tmp_path / "train.py").write_text("")
    (tmp_path / "hosts").write_text("node1 slots=1\nnode2 slots=1\n")
    req = LaunchRequest(script="train.py", hostfile=str(tmp_path / "hosts"), workdir=str(tmp_path),
                        master_addr="10.0.0.1", ssh=SshOptions(options=("User=bob\u00a0",)))
    with pytest.raises(LaunchError, match=r"'User=bob\\xa0' holds '\\xa0' \(U\+00A0 NO-BREAK SPACE\)"):
        plan_launch(req, environ={})


@pytest.mark.parametrize(("hosts", "extra", "says"), [
    ("node1\u00a0slots=2\n", [], "hosts line 1: 'node1\\xa0slots=2' holds '\\xa0' (U+00A0 NO-BREAK SPACE)"),
    ("node1\u3000slots=2\n", [], "hosts line 1: 'node1\\u3000slots=2' holds '\\u3000' (U+3000 IDEOGRAPHIC SPACE)"),
    ("node1 slots=2\n", ["--include", "node1\u2003"], "--include 'node1\\u2003' holds '\\u2003' (U+2003 EM SPACE)"),
    ("node1 slots=2\n", ["-o", "User=bob\u00a0"], "--ssh-option 'User=bob\\xa0' holds '\\xa0'"),
])
def test_launch_cli_is_one_line_exit_2(tmp_path, monkeypatch, capsys, hosts, extra, says) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SLURM_JOB_NODELIST", raising=False)
    Path("train.py").write_text("")
    Path("hosts").write_text(hosts, encoding="utf-8")
    code, out = run_cli(["launch", "-H", "hosts", *extra, "--master-addr", "10.0.0.1", "--dry-run", "train.py"],
                        capsys)
    assert code == 2 and out.count("\n") == 1 and says in out, out


def test_autotune_checks_ssh_options_before_any_trial(tmp_path, monkeypatch, capsys) -> None:
    """autotune -H passes -o on to `ztune launch` for every trial, which refused it there: each trial crashed."""
    monkeypatch.chdir(tmp_path)
    code, out = run_cli(["autotune", "-o", "User=bob\u00a0", "--export", "bogus"], capsys)
    assert code == 2 and out.count("\n") == 1 and "--ssh-option 'User=bob\\xa0' holds '\\xa0'" in out, out
