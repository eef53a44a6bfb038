"""autotune -H pieces without hosts: the launcher argv, the report relayed over stdout, CLI refusals."""

from __future__ import annotations

import io
import json

import pytest

from ztune.cli import main as cli_main
from ztune.runtime import trial_report as tr
from ztune.tune.bench import _reason_from_output
from ztune.tune.hosts import HostTrials, _relay, launch_argv


def test_launch_argv_keeps_every_value_one_element(tmp_path) -> None:
    hosts = HostTrials(hostfile="hosts", include="n1@n2", ssh_options=("Port=2222",), base_port=29600)
    argv = launch_argv(hosts, config_path=tmp_path / "c.yaml", script="/w/train.py", script_args=["--x", "a b"],
                       env={"ZTUNE_TRIAL_REPORT": "-"}, port=29603, preflight_cache=tmp_path / "p.json")
    assert argv[1:4] == ["-m", "ztune", "launch"]
    assert argv[argv.index("--master-port") + 1] == "29603"
    assert argv[argv.index("--include") + 1] == "n1@n2"
    assert argv[argv.index("--ssh-option") + 1] == "Port=2222"
    assert argv[argv.index("--env") + 1] == "ZTUNE_TRIAL_REPORT=-"
    assert argv[-4:] == ["/w/train.py", "--", "--x", "a b"]


def test_stdout_report_lines_become_the_tuners_report(tmp_path, capsys) -> None:
    # Rank 0 with ZTUNE_TRIAL_REPORT=- prints marked lines; the launcher prefixes them with [host:rank];
    # the relay writes them to the local report, which read_report parses like a local trial's file.
    rep = tr.TrialReporter(path=tr.STDOUT_PATH, warmup_steps=0, measured_steps=1, exit_when_done=False)
    rep.record_step(loss=2.5)
    printed = capsys.readouterr().out.splitlines()
    assert printed and all(line.startswith(tr.STDOUT_MARKER) for line in printed)
    relayed = "".join(f"[node1:0] {line}\n" for line in printed) + "[node2:1] ordinary output\n"
    log, report = io.BytesIO(), tmp_path / "r.jsonl"
    _relay(io.BytesIO(relayed.encode()), log, report, tr.STDOUT_MARKER)
    parsed = tr.read_report(report)
    assert parsed["start"] is not None and len(parsed["steps"]) == 1 and parsed["done"]["last_loss"] == 2.5
    assert log.getvalue().decode() == relayed  # the log keeps everything, prefixes included
    json.loads(report.read_text().splitlines()[0])


def test_failure_reason_seen_through_the_launchers_prefix() -> None:
    out = "[node2:1] Traceback (most recent call last):\n[node2:1]   File \"x.py\", line 1\n" \
          "[node2:1] RuntimeError: boom on node2\n[ztune] node2 exited with code 1 (a rank failed)\n"
    assert _reason_from_output(out) == "RuntimeError: boom on node2"


@pytest.mark.parametrize(("hosts", "extra", "needle"), [
    ("a slots=2\nb slots=1\n", [], "same number of slots"),
    ("a slots=1\nb slots=1\n", ["--memory-cap", "1GiB"], "--memory-cap"),
    ("a slots=1\nb slots=1\n", ["--nproc", "2"], "--nproc 2"),
    (None, ["--include", "a"], "--include/--exclude"),
])
def test_host_flag_errors_are_one_line(tmp_path, capsys, hosts, extra, needle) -> None:
    args = ["autotune", "--out", str(tmp_path / "o"), *extra]
    if hosts is not None:
        (tmp_path / "hosts").write_text(hosts)
        args += ["-H", str(tmp_path / "hosts")]
    with pytest.raises(SystemExit) as exc:
        cli_main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_slurm_allocation_of_several_nodes_means_host_trials(monkeypatch) -> None:
    from ztune.cli.autotune import _host_trials

    flags = HostTrials(hostfile=None)
    monkeypatch.delenv("SLURM_NODELIST", raising=False)
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[01-03]")
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "4")
    trials, per_host, nodes = _host_trials(flags, nproc=None, memory_cap=None)
    assert trials is flags and (per_host, nodes) == (4, 3)
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu01")  # one node: local trials, as without Slurm
    assert _host_trials(flags, nproc=None, memory_cap=None) == (None, None, 1)
