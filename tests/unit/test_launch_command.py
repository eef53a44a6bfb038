"""Per-host commands as argv lists: quoting, environment filtering, ssh options, interface choice, preflight
verdicts, and the CLI's bad-input paths (exit 2, one line)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest

from ztune.cli import main as cli_main
from ztune.launch.command import (
    LaunchError,
    build_command,
    filter_env,
    left_behind,
    parse_env_assignment,
    parse_env_file,
    remote_shell_command,
)
from ztune.launch.netif import Interface, choose_interface
from ztune.launch.preflight import HostReport, find_failures
from ztune.launch.ssh import SshOptions, ssh_argv

EVIL = "x; touch /tmp/ztune-pwned $(id) `id` 'sq' \"dq\" $HOME \\ | & > <"


def _cmd(**over):
    kw = dict(python="/venv/bin/python", host="node2", node_rank=1, num_nodes=2, nproc_per_node=2,
              master_addr="10.0.0.1", master_port=29500, run_id="ztune-x", workdir="/w d", run_root="/tmp/r",
              script="train.py", script_args=["--lr", "3"], env={"NCCL_DEBUG": "INFO"})
    kw.update(over)
    return build_command(**kw)


def test_torchrun_arguments_for_a_node() -> None:
    cmd = _cmd(ifname="eth1", local_addr="10.0.0.2", config_suffix=".json", visible_devices=[2, 3])
    argv = list(cmd.argv)
    run = argv[argv.index("torch.distributed.run") - 2:]
    assert run[:3] == ["/venv/bin/python", "-m", "torch.distributed.run"]
    for flag in ("--nnodes=2", "--node-rank=1", "--nproc-per-node=2", "--rdzv-backend=c10d",
                 "--rdzv-endpoint=10.0.0.1:29500", "--rdzv-id=ztune-x", "--rdzv-conf=is_host=0",
                 "--max-restarts=0", "--local-addr=10.0.0.2"):
        assert flag in run
    assert run[-3:] == ["train.py", "--lr", "3"]
    env = dict(a.split("=", 1) for a in argv[argv.index("env") + 1:argv.index("/venv/bin/python", 1)])
    assert env["GLOO_SOCKET_IFNAME"] == env["NCCL_SOCKET_IFNAME"] == "eth1"
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3" and env["NCCL_DEBUG"] == "INFO"
    assert env["ZTUNE_CONFIG"] == cmd.config_path == "/tmp/r/ztune-x/node1/config.json"
    assert argv[:4] == ["/venv/bin/python", "-m", "ztune.launch.ssh", "run"]
    assert "--rdzv-conf=is_host=1" in _cmd(node_rank=0).argv
    assert "--max-restarts=3" in _cmd(max_restarts=3).argv and "--max-restarts=0" not in _cmd(max_restarts=3).argv


def _node_env(cmd) -> dict[str, str]:
    argv = list(cmd.argv)
    return dict(a.split("=", 1) for a in argv[argv.index("env") + 1:argv.index("/venv/bin/python", 1)])


def test_ranks_get_torchs_huge_page_allocator_unless_the_user_says_otherwise() -> None:
    # torch reads THP_MEM_ALLOC_ENABLE at a process's first allocation: it must be in the rank's environment.
    assert _node_env(_cmd())["THP_MEM_ALLOC_ENABLE"] == "1"
    sent = filter_env({"THP_MEM_ALLOC_ENABLE": "0", "HOME": "/root"})
    assert sent == {"THP_MEM_ALLOC_ENABLE": "0"}  # the launcher's own setting travels, as --env would
    assert _node_env(_cmd(env=sent))["THP_MEM_ALLOC_ENABLE"] == "0"


def test_hostile_values_survive_the_remote_shell_literally(tmp_path) -> None:
    """What ssh hands to the remote login shell, run by a real sh: every word arrives unchanged."""
    probe = [sys.executable, "-c", "import sys, json, os; print(json.dumps([sys.argv[1:], os.getcwd()]))",
             EVIL, f"--name={EVIL}", "", "-"]
    work = tmp_path / EVIL.replace("/", "_")
    work.mkdir()
    line = remote_shell_command(workdir=str(work), argv=probe)
    out = subprocess.run(["sh", "-c", line], capture_output=True, text=True, check=True).stdout
    args, cwd = json.loads(out)
    assert args == [EVIL, f"--name={EVIL}", "", "-"] and cwd == str(work)
    env_cmd = _cmd(env={"ZTUNE_X": EVIL}, script_args=[EVIL])
    assert f"ZTUNE_X={EVIL}" in env_cmd.argv and env_cmd.argv[-1] == EVIL
    assert shlex.split(remote_shell_command(workdir="/w", argv=env_cmd.argv))[4:] == list(env_cmd.argv)


def test_env_filter_file_and_assignments() -> None:
    environ = {"NCCL_IB_HCA": "mlx5", "GLOO_X": "1", "CUDA_HOME": "/c", "PYTHONPATH": "/p", "ZTUNE_A": "b",
               "HOME": "/root", "SSH_AUTH_SOCK": "/s", "LD_LIBRARY_PATH": "/l", "ZTUNE_LAUNCH_TAG": "t"}
    assert sorted(filter_env(environ)) == ["CUDA_HOME", "GLOO_X", "NCCL_IB_HCA", "PYTHONPATH", "ZTUNE_A"]
    torch_vars = {"TORCH_DISTRIBUTED_DEBUG": "DETAIL", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    assert filter_env(torch_vars) == torch_vars  # torch's own variables travel too
    assert filter_env({"ZTUNE_LIFELINE_PARENT": "1"}) == {}  # this machine's process bookkeeping
    assert parse_env_assignment("K=a=b;$(c)") == ("K", "a=b;$(c)")
    assert parse_env_file("# c\n\nA=1\nB= two words \n") == {"A": "1", "B": " two words"}
    for bad in ("NOEQUALS", "1X=2", "A-B=3", "=v"):
        with pytest.raises(LaunchError):
            parse_env_assignment(bad)
    with pytest.raises(LaunchError, match="line 2"):
        parse_env_file("A=1\nbad line\n")


def test_ssh_argv_keeps_host_keys_checked_and_hostname_as_data() -> None:
    argv = ssh_argv(host="-oProxyCommand=x", remote_command="true", opts=SshOptions(config_file="/cfg"))
    assert argv[argv.index("--") + 1] == "-oProxyCommand=x"  # after "--": never an option
    assert "BatchMode=yes" in argv and "-F" in argv
    assert not any("StrictHostKeyChecking" in a for a in argv)
    user = ssh_argv(host="h", remote_command="true", opts=SshOptions(options=("BatchMode=no",),
                                                                     insecure_no_host_key_check=True))
    assert user.index("BatchMode=no") < user.index("BatchMode=yes")  # ssh keeps the first value: the user's
    assert "StrictHostKeyChecking=no" in user


ROUTE_REMOTE = "10.77.0.11 dev veth2 src 10.77.0.12 uid 0 \\    cache "
ROUTE_LOCAL = "local 10.77.0.11 dev lo src 10.77.0.11 uid 0 \\    cache <local> "
ADDRS = ("1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever\n"
         "2: veth1    inet 10.77.0.11/24 scope global veth1\\       valid_lft forever preferred_lft forever\n")


def test_interface_is_the_route_to_the_head() -> None:
    assert choose_interface(route_output=ROUTE_REMOTE, addr_output="", head_addr="10.77.0.11") == \
        Interface("veth2", "10.77.0.12")
    # On the head itself the route goes through lo; the interface owning the address is what others reach.
    assert choose_interface(route_output=ROUTE_LOCAL, addr_output=ADDRS, head_addr="10.77.0.11") == \
        Interface("veth1", "10.77.0.11")
    assert choose_interface(route_output="", addr_output=ADDRS, head_addr="10.77.0.11") is None
    assert choose_interface(route_output="local 127.0.0.1 dev lo", addr_output=ADDRS,
                            head_addr="127.0.0.1") == Interface("lo", "127.0.0.1")


def test_preflight_failures_table() -> None:
    good = HostReport(host="a", python="3.11.7", torch="2.13.0", ztune="0.1.0", workdir_ok=True, script_ok=True,
                      port_free=False, interface=Interface("eth0", "10.0.0.1"))
    bad = HostReport(host="b", python="3.10.1", torch=None, ztune="0.1.0", workdir_ok=False)
    gone = HostReport(host="c", error="ssh failed: Connection timed out")
    expected = {"python": "3.11.7", "torch": "2.13.0", "ztune": "0.1.0"}
    rows = find_failures([good, bad, gone], expected=expected, workdir="/w", script="t.py", port=29500,
                         python="/py", need_interface=True)
    assert [(f.host, f.check) for f in rows] == [
        ("a", "rendezvous port"), ("b", "python version"), ("b", "torch version"), ("b", "working directory"),
        ("b", "network interface"), ("c", "reachable")]
    assert "not installed" in rows[2].detail


def _cli(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        cli_main(argv)
    cap = capsys.readouterr()
    return info.value.code, cap.out + cap.err


@pytest.mark.parametrize("extra, needle", [
    (["--env", "NOPE", "s.py"], "KEY=VALUE"),
    (["missing.py"], "not found"),
    (["--include", "ghost", "s.py"], "not in the host list"),
    (["--hostfile", "/nonexistent/hosts", "s.py"], "does not exist"),
    (["--master-port", "70000", "s.py"], "not a TCP port"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, monkeypatch, capsys, extra, needle) -> None:
    (tmp_path / "s.py").write_text("print('hi')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SLURM_JOB_NODELIST", raising=False)
    monkeypatch.delenv("SLURM_NODELIST", raising=False)
    code, out = _cli(["launch", *extra], capsys)
    assert code == 2 and needle in out and len(out.strip().splitlines()) == 1, out


def test_dry_run_prints_each_hosts_command(tmp_path, monkeypatch, capsys) -> None:
    (tmp_path / "t.py").write_text("")
    (tmp_path / "hosts").write_text("n1 slots=2\nn2 slots=2\n")
    monkeypatch.chdir(tmp_path)
    code, out = _cli(["launch", "-H", "hosts", "--master-addr", "10.9.9.9", "--dry-run", "--nproc-per-node", "1",
                      "t.py", "--", "--lr", EVIL], capsys)
    assert code == 0
    lines = [shlex.split(line) for line in out.splitlines() if line.startswith("ssh ")]
    assert [a[a.index("--") + 1] for a in lines] == ["n1", "n2"]
    remote = shlex.split(lines[1][-1])  # the remote shell line, itself quoted word by word
    assert remote[-3:] == ["t.py", "--lr", EVIL] and "--node-rank=1" in remote
    assert "--rdzv-endpoint=10.9.9.9:29500" in remote


def test_every_node_rendezvous_on_the_head_even_when_unresolved(tmp_path) -> None:
    # Regression: with a head name this machine cannot resolve (dry run, no DNS), node 1 used to point the
    # rendezvous at itself. Every node must name host 0.
    from ztune.launch import LaunchRequest, node_commands, plan_launch

    (tmp_path / "train.py").write_text("")
    hostfile = tmp_path / "hosts"
    hostfile.write_text("head-unresolvable.invalid slots=1\nworker-unresolvable.invalid slots=1\n")
    plan = plan_launch(LaunchRequest(script="train.py", hostfile=str(hostfile), workdir=str(tmp_path)), environ={})
    cmds = node_commands(plan, interfaces=[(None, None)] * 2)
    for cmd in cmds:
        assert any(a == "--rdzv-endpoint=head-unresolvable.invalid:29500" for a in cmd.argv), cmd.argv


def test_dry_run_with_ipv6_hosts_brackets_every_endpoint(tmp_path, monkeypatch, capsys) -> None:
    (tmp_path / "t.py").write_text("")
    (tmp_path / "hosts").write_text("fd00::1 slots=2\nfd00::2 slots=2\n")
    monkeypatch.chdir(tmp_path)
    code, out = _cli(["launch", "-H", "hosts", "--include", "[fd00::1]:0,1@fd00::2", "--dry-run", "t.py"], capsys)
    assert code == 0, out
    header = out.splitlines()[0]
    assert "rendezvous [fd00::1]:29500," in header, header
    lines = [shlex.split(line) for line in out.splitlines() if line.startswith("ssh ")]
    assert [a[a.index("--") + 1] for a in lines] == ["fd00::1", "fd00::2"]  # ssh takes the bare address
    for line in lines:
        remote = shlex.split(line[-1])
        assert "--rdzv-endpoint=[fd00::1]:29500" in remote, remote
    # --master-addr may be given bracketed or bare.
    code, out = _cli(["launch", "-H", "hosts", "--master-addr", "[fd00::9]", "--dry-run", "t.py"], capsys)
    assert code == 0 and "rendezvous [fd00::9]:29500," in out.splitlines()[0]
    assert "--rdzv-endpoint=[fd00::9]:29500" in out


@pytest.mark.parametrize("include", ["fd00::1", "[fd00::1]:0", "[fd00::1]:0,1"])
def test_ipv6_include_forms_run(tmp_path, monkeypatch, capsys, include) -> None:
    (tmp_path / "t.py").write_text("")
    (tmp_path / "hosts").write_text("fd00::1 slots=2\nfd00::2 slots=2\n")
    monkeypatch.chdir(tmp_path)
    code, out = _cli(["launch", "-H", "hosts", "--include", include, "--dry-run", "t.py"], capsys)
    assert code == 0 and "slots of" not in out, out


SECRET = "hf_s3cr3t-VALUE-never-printed"


def test_left_behind_names_notable_variables_not_sent() -> None:
    environ = {"HF_HOME": "/data/hf", "HF_TOKEN": SECRET, "WANDB_API_KEY": SECRET, "LD_LIBRARY_PATH": "/x",
               "OMP_NUM_THREADS": "1", "HOME": "/root", "TORCH_DISTRIBUTED_DEBUG": "INFO", "MKL_NUM_THREADS": "4"}
    sent = {"HF_HOME": "/data/hf", "TORCH_DISTRIBUTED_DEBUG": "INFO"}  # e.g. from .ztune_env
    # OMP_NUM_THREADS=1 is what every rank gets anyway; HOME is not a training variable.
    assert left_behind(environ, sent) == ["HF_TOKEN", "LD_LIBRARY_PATH", "MKL_NUM_THREADS", "WANDB_API_KEY"]
    assert left_behind(environ, {**sent, "HF_TOKEN": "other"})[0] == "HF_TOKEN"  # sent, but not as set here


def test_launch_warns_once_about_variables_left_behind_without_values(tmp_path, monkeypatch, capsys) -> None:
    (tmp_path / "t.py").write_text("")
    (tmp_path / "hosts").write_text("n1 slots=1\nn2 slots=1\n")
    (tmp_path / ".ztune_env").write_text("HF_HOME=/data/hf\n")
    monkeypatch.chdir(tmp_path)
    for key, value in {"HF_HOME": "/data/hf", "HF_TOKEN": SECRET, "WANDB_API_KEY": SECRET + "2",
                       "LD_LIBRARY_PATH": "/opt/lib", "TORCH_NCCL_BLOCKING_WAIT": "1"}.items():
        monkeypatch.setenv(key, value)
    code, out = _cli(["launch", "-H", "hosts", "--master-addr", "10.0.0.1", "--env", "LD_LIBRARY_PATH=/opt/lib",
                      "--dry-run", "t.py"], capsys)
    assert code == 0
    warnings = [line for line in out.splitlines() if "not sent to the other hosts" in line]
    assert len(warnings) == 1, out
    assert "HF_TOKEN, WANDB_API_KEY;" in warnings[0] and ".ztune_env" in warnings[0] and "--env" in warnings[0]
    assert "HF_HOME" not in warnings[0] and "LD_LIBRARY_PATH" not in warnings[0]  # sent by the file / --env
    assert SECRET not in out  # never a value, neither in the warning nor in the commands
    assert "TORCH_NCCL_BLOCKING_WAIT=1" in out  # TORCH_* travels


def test_local_launch_does_not_warn(tmp_path, monkeypatch, capsys) -> None:
    (tmp_path / "t.py").write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SLURM_JOB_NODELIST", raising=False)
    monkeypatch.delenv("SLURM_NODELIST", raising=False)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    code, out = _cli(["launch", "--dry-run", "t.py"], capsys)
    assert code == 0 and "not sent" not in out and SECRET not in out


def test_ambiguous_ipv6_filter_is_one_line_with_the_bracketed_form(tmp_path, monkeypatch, capsys) -> None:
    (tmp_path / "t.py").write_text("")
    (tmp_path / "hosts").write_text("fd00::1 slots=2\nfd00::2 slots=2\n")
    monkeypatch.chdir(tmp_path)
    code, out = _cli(["launch", "-H", "hosts", "--include", "fd00::1:0,1", "--dry-run", "t.py"], capsys)
    assert code == 2 and len(out.strip().splitlines()) == 1 and "'[fd00::1]:0,1'" in out, out


@pytest.mark.parametrize("hosts", [None, "n1 slots=1\nn2 slots=1\n"])
def test_dry_run_never_prints_credentials(tmp_path, monkeypatch, capsys, hosts) -> None:
    # Values of variables named like credentials (from --env, .ztune_env or the forwarded environment) are
    # shown as <redacted>, locally and inside the ssh remote command; other values are shown as sent.
    (tmp_path / "t.py").write_text("")
    (tmp_path / ".ztune_env").write_text("WANDB_API_KEY=wandb-s3cret\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ZTUNE_AUTH_TOKEN", "env-s3cret")
    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    args = ["launch", "--dry-run", "--env", "HF_TOKEN=flag-s3cret", "--env", "MY_LR=0.5", "t.py"]
    if hosts:
        (tmp_path / "hosts").write_text(hosts)
        args[1:1] = ["-H", "hosts"]
    code, out = _cli(args, capsys)
    assert code == 0, out
    assert "s3cret" not in out
    carried = [line for line in out.splitlines() if line.startswith("# stdin of each command also carries")]
    assert carried and all(n in carried[0] for n in ("HF_TOKEN", "WANDB_API_KEY", "ZTUNE_AUTH_TOKEN")), out
    assert "MY_LR=0.5" in out and "NCCL_DEBUG=INFO" in out


def test_credentials_travel_in_the_stdin_header_not_argv(tmp_path) -> None:
    # argv is readable by every user of a host (ps): credentials go in the node wrapper's stdin header.
    from ztune.launch import LaunchRequest, header_line, node_commands, plan_launch

    (tmp_path / "train.py").write_text("")
    (tmp_path / "hosts").write_text("n1 slots=1\nn2 slots=1\n")
    req = LaunchRequest(script="train.py", hostfile=str(tmp_path / "hosts"), workdir=str(tmp_path),
                        env=("HF_TOKEN=tok-1",))
    plan = plan_launch(req, environ={"ZTUNE_HUB_TOKEN": "k-2", "NCCL_DEBUG": "INFO"})
    for cmd in node_commands(plan, interfaces=[(None, None)] * 2):
        assert not any("tok-1" in a or "k-2" in a for a in cmd.argv), cmd.argv
        assert "NCCL_DEBUG=INFO" in cmd.argv
    header = json.loads(header_line(plan))
    assert header["env"] == {"HF_TOKEN": "tok-1", "ZTUNE_HUB_TOKEN": "k-2"}


def test_redact_argv_only_touches_credential_assignments() -> None:
    from ztune.launch.command import redact_argv

    argv = ["env", "AWS_SECRET_ACCESS_KEY=x", "PASSWORD=y", "OMP_NUM_THREADS=1", "--token=z", "a=b=c"]
    assert redact_argv(argv) == ["env", "AWS_SECRET_ACCESS_KEY=<redacted>", "PASSWORD=<redacted>",
                                 "OMP_NUM_THREADS=1", "--token=z", "a=b=c"]
