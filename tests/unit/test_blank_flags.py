"""A flag that names a host, address, path or name, given as "" or only spaces, is refused with one line naming
the flag (exit 2): never read as "not given" (--master-addr "" fell back to the first host, --hostfile "" to
this host alone, --include "" to every host) nor, for a path, as the current folder ("" became Path("."))."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.cli import run_cli
from ztune.errors import UserError
from ztune.launch import LaunchRequest, plan_launch, resolve_hosts
from ztune.launch.ssh import SshOptions

_LAUNCH = ["--hostfile", "--include", "--exclude", "--master-addr", "--config", "--workdir", "--python", "--ifname",
           "--ssh-config", "--ssh-option", "--log-dir", "--preflight-cache"]
_AUTOTUNE = ["--model", "--hardware", "--config", "--script", "--out", "--memory-cap", "--hostfile", "--include",
             "--exclude", "--workdir", "--python", "--ssh-config", "--ssh-option"]
_PROBE = ["--output", "--inter-node-master", "--model"]




def _cases() -> list:
    cases = [("launch", flag, [flag, "{v}", "--dry-run", "train.py"]) for flag in _LAUNCH]
    # --export bogus / --ranks 0: should the blank flag pass, the command stops on them, before any work.
    cases += [("autotune", flag, [flag, "{v}", "--export", "bogus"]) for flag in _AUTOTUNE]
    cases += [("probe", flag, [flag, "{v}", "--ranks", "0"]) for flag in _PROBE]
    cases += [("checkpoint", "DIRECTORY", ["inspect", "{v}"]),
              ("checkpoint", "--out", ["consolidate", "notes.txt", "--out", "{v}"])]
    return cases


@pytest.mark.parametrize("value", ["", "   "])
@pytest.mark.parametrize(("command", "flag", "argv"), _cases(), ids=lambda x: x if isinstance(x, str) else "")
def test_blank_flag_is_one_line_naming_it(tmp_path, monkeypatch, capsys, command, flag, argv, value) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SLURM_JOB_NODELIST", raising=False)
    monkeypatch.delenv("SLURM_NODELIST", raising=False)
    Path("train.py").write_text("print('hi')\n")
    Path("notes.txt").write_text("keep\n")
    code, out = run_cli([command, *(value if a == "{v}" else a for a in argv)], capsys)
    assert code == 2, out
    assert out.count("\n") == 1 and "Traceback" not in out, out
    assert f"{flag} {value!r} is blank" in out, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "train.py"]  # nothing written
    assert Path("notes.txt").read_text() == "keep\n"


@pytest.mark.parametrize("field", ["hostfile", "include", "exclude", "master_addr", "config", "workdir", "python",
                                   "ifname"])
def test_launch_library_refuses_blank_fields(tmp_path, field) -> None:
    (tmp_path / "train.py").write_text("print('hi')\n")
    fields = {"workdir": str(tmp_path), field: " " if field == "workdir" else ""}
    req = LaunchRequest(script="train.py", **fields)
    with pytest.raises(UserError, match="is blank"):
        plan_launch(req, environ={})


def test_autotune_host_resolution_refuses_blank_ssh_values() -> None:
    # autotune -H resolves hosts through resolve_hosts without plan_launch
    for ssh in (SshOptions(config_file=""), SshOptions(options=("",))):
        with pytest.raises(UserError, match="--ssh-(config|option) '' is blank"):
            resolve_hosts(LaunchRequest(script="", ssh=ssh), {})


def _full_host_trials():
    """HostTrials with every text field given, so launch_flags passes each on."""
    import dataclasses

    from ztune.tune.hosts import HostTrials

    values = {}
    for f in dataclasses.fields(HostTrials):
        if f.type in ("str | None", "str"):
            values[f.name] = f"<{f.name}>"
        elif f.type == "tuple[str, ...]":
            values[f.name] = (f"<{f.name}>",)
    assert len(values) >= 6, values  # hostfile, include, exclude, ssh_config, ssh_options, workdir, python
    return HostTrials(**values), values


def test_every_text_flag_autotune_passes_to_launch_is_in_the_launchers_table() -> None:
    """autotune -H passes its host flags on to `ztune launch` (tune/hosts.py launch_flags) and checks them with the
    launcher's table (launch.TEXT_FLAGS): a text field added to HostTrials is passed on, and so checked."""
    from ztune.launch import TEXT_FLAGS
    from ztune.tune.hosts import launch_flags

    hosts, values = _full_host_trials()
    flags = launch_flags(hosts)
    passed = {value for _, value in flags}
    assert {v if isinstance(v, str) else v[0] for v in values.values()} <= passed
    assert {flag for flag, _ in flags} <= set(TEXT_FLAGS)


def _shared_flags() -> list[str]:
    from ztune.tune.hosts import launch_flags

    return sorted({"--config", *(flag for flag, _ in launch_flags(_full_host_trials()[0]))})


@pytest.mark.parametrize("flag", _shared_flags())
def test_a_flag_both_commands_have_gets_the_same_message(tmp_path, monkeypatch, capsys, flag) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SLURM_JOB_NODELIST", raising=False)
    monkeypatch.delenv("SLURM_NODELIST", raising=False)
    Path("train.py").write_text("")
    said = {}
    for command, rest in (("launch", ["--dry-run", "train.py"]), ("autotune", ["--export", "bogus"])):
        code, out = run_cli([command, flag, " ", *rest], capsys)
        assert code == 2 and out.count("\n") == 1, out
        said[command] = out.split(":", 1)[1]  # after "error:"
    assert said["launch"] == said["autotune"] and f"{flag} ' ' is blank" in said["launch"], said
