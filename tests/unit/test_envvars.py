"""ZTUNE_* environment variables (ztune/envvars.py): every one ztune parses is declared once, a bad value is one
line naming the variable, the value and the form expected (an EnvVarError in a rank, exit 2 from the CLI),
and every reader in ztune/ and runtime/ goes through the one helper.

The class: `int(os.environ.get(...))` and friends scattered over the code, each with its own (or no) check;
`ZTUNE_TRIAL_STEPS=abc` was a ValueError traceback, `ZTUNE_DISABLE_CPP_ADAM=false` disabled the kernel.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ztune import envvars
from ztune.cli import main
from ztune.errors import ConfigError, EnvVarError

REPO = Path(__file__).resolve().parents[2]
TORCHRUN_KEYS = {f'"{k}"' for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT")}

# (variable, bad values, (good value, parsed))
CASES = [
    ("ZTUNE_TRIAL_WARMUP", ["abc", "-1", "1.5", "1e3"], ("0", 0)),
    # other scripts' digits and '_' (int() and float() take them: '\uff12' was read as 2)
    ("ZTUNE_TRIAL_STEPS", ["abc", "0", "three", "\uff12", "1_0", "\u0663"], (" 7 ", 7)),
    ("ZTUNE_TRIAL_EXIT", ["maybe", "2"], ("0", False)),
    ("ZTUNE_GATHER_TIMEOUT_S", ["soon", "0", "-1", "nan", "inf", "1e30", "1_0", "\uff12.5", "Infinity"],
     ("2.5", 2.5)),
    ("ZTUNE_SHM", ["maybe", "enabled"], ("Off", False)),
    ("ZTUNE_SHM_MIN_BYTES", ["lots", "-1", "64KiB"], ("0", 0)),
    ("ZTUNE_LOCAL_WORLD_SIZE", ["x", "0", "2.0"], ("2", 2)),
    ("ZTUNE_CUDA_ADAM", ["fast", "Torch"], ("ztune", "ztune")),
    ("ZTUNE_DISABLE_CPP_ADAM", ["please", "-"], ("false", False)),
    ("ZTUNE_DISABLE_CUDA_ADAM", ["please"], ("YES", True)),
    ("ZTUNE_DISABLE_CPP_CODEC", ["please"], ("on", True)),
    ("ZTUNE_DISABLE_CPP_ONEBIT_ADAM", ["please", "2"], ("yes", True)),
]
BAD = [(name, bad) for name, bads, _ in CASES for bad in bads]


def test_every_declared_variable_is_tested():
    assert {name for name, _, _ in CASES} == set(envvars.VARS)


@pytest.mark.parametrize(("name", "bad"), BAD, ids=[f"{n}={b}" for n, b in BAD])
def test_bad_value_is_one_line_naming_variable_value_and_form(name, bad):
    with pytest.raises(EnvVarError) as exc:
        envvars.read(name, environ={name: bad})
    message = str(exc.value)
    assert message.startswith(f"{name}={bad!r}: expected {envvars.VARS[name].expected()}"), message
    assert "\n" not in message and "unset it" in message
    assert isinstance(exc.value, ConfigError)  # the CLI's exit 2; ValueError for older callers


@pytest.mark.parametrize(("name", "good"), [(n, g) for n, _, g in CASES], ids=[n for n, _, _ in CASES])
def test_good_empty_and_unset(name, good):
    text, value = good
    assert envvars.read(name, environ={name: text}) == value
    default = envvars.VARS[name].default
    assert envvars.read(name, environ={}) == default
    assert envvars.read(name, environ={name: "  "}) == default
    assert envvars.read(name, environ={}, default=123) == 123


def test_message_shows_the_default_that_applies():
    with pytest.raises(EnvVarError, match=r"\(default: 3\)$"):
        envvars.read("ZTUNE_TRIAL_STEPS", environ={"ZTUNE_TRIAL_STEPS": "abc"})
    with pytest.raises(EnvVarError, match=r"\(default: 262144\)$"):
        envvars.read("ZTUNE_SHM_MIN_BYTES", environ={"ZTUNE_SHM_MIN_BYTES": "x"}, default=262144)
    long = "9" * 100 + "x"
    with pytest.raises(EnvVarError) as exc:
        envvars.read("ZTUNE_TRIAL_STEPS", environ={"ZTUNE_TRIAL_STEPS": long})
    assert len(str(exc.value)) < 160


def test_readers_use_the_helper(monkeypatch, tmp_path):
    """Each place that reads a variable raises the helper's error (not a ValueError traceback of int())."""
    from ztune.runtime import kernel_loader, lockstep, optim_shard
    from ztune.runtime.comm import shm, topology
    from ztune.runtime.trial_report import TrialReporter

    monkeypatch.setenv("ZTUNE_TRIAL_REPORT", str(tmp_path / "r.jsonl"))
    monkeypatch.setenv("ZTUNE_TRIAL_STEPS", "abc")
    with pytest.raises(EnvVarError, match="ZTUNE_TRIAL_STEPS='abc'"):
        TrialReporter.from_env(rank=0, world_size=1)
    monkeypatch.setenv("ZTUNE_TRIAL_STEPS", "5")
    monkeypatch.setenv("ZTUNE_TRIAL_EXIT", "no")
    rep = TrialReporter.from_env(rank=0, world_size=1)
    assert rep.measured_steps == 5 and rep.warmup_steps == 1 and rep.exit_when_done is False

    monkeypatch.setenv("ZTUNE_GATHER_TIMEOUT_S", "soon")
    with pytest.raises(EnvVarError, match="ZTUNE_GATHER_TIMEOUT_S"):
        lockstep.timeout_from_env()
    monkeypatch.delenv("ZTUNE_GATHER_TIMEOUT_S")
    assert lockstep.timeout_from_env() == lockstep.DEFAULT_TIMEOUT_S

    monkeypatch.setenv("ZTUNE_SHM", "maybe")
    with pytest.raises(EnvVarError, match="ZTUNE_SHM='maybe'"):
        shm.enabled_by_env()
    monkeypatch.setenv("ZTUNE_SHM", "no")
    assert shm.enabled_by_env() is False
    monkeypatch.delenv("ZTUNE_SHM_MIN_BYTES", raising=False)
    assert shm._min_bytes_from_env() == shm.MIN_BYTES

    monkeypatch.setenv("ZTUNE_CUDA_ADAM", "fast")
    with pytest.raises(EnvVarError, match="expected torch or ztune"):
        optim_shard.cuda_adam_choice()

    with pytest.raises(EnvVarError, match="must be a positive divisor"):
        topology.layout_from_env(world_size=4, environ={"ZTUNE_LOCAL_WORLD_SIZE": "3"})

    # "false" means false (it used to disable the kernel: anything but "" or "0" did); a typo is an error.
    built = []
    loader = kernel_loader.LazyBackend(lambda: built.append(1) or "lib", disable_env="ZTUNE_DISABLE_CPP_ADAM",
                                       warning=UserWarning, kernel="k", fallback="f")
    monkeypatch.setenv("ZTUNE_DISABLE_CPP_ADAM", "false")
    assert loader.get().lib == "lib" and built == [1]
    loader.reset()
    monkeypatch.setenv("ZTUNE_DISABLE_CPP_ADAM", "please")
    with pytest.raises(EnvVarError, match="ZTUNE_DISABLE_CPP_ADAM='please'"):
        loader.get()


def test_no_ztune_variable_is_parsed_outside_the_helper():
    """Every ZTUNE_* name in ztune/ and runtime/ is declared in VARS or is a path/name nobody parses; and no
    code converts an environment value with int()/float() itself."""
    not_parsed = {"ZTUNE_CONFIG", "ZTUNE_TRIAL_REPORT", "ZTUNE_EXT_DIR", "ZTUNE_NVCC", "ZTUNE_LAUNCH_TAG",
                  "ZTUNE_LIFELINE_PARENT", "ZTUNE_BATCH_KEYS"}  # the last is a Python name, not a variable
    seen = set()
    for path in [*(REPO / "ztune").rglob("*.py"), *(REPO / "runtime").rglob("*.py")]:
        text = path.read_text()
        seen |= set(re.findall(r"\bZTUNE_[A-Z][A-Z0-9_]*[A-Z0-9]\b", text))
        # int(os.environ.get(KEY ...)) and the like: only for what torchrun sets (and validates) itself
        # (ztune.inputs.ascii_int, which refuses what int() would take wrongly, is not int()).
        keys = re.findall(r"\b(?:int|float)\(\s*(?:os\.)?env(?:iron)?(?:\.get\(|\[)\s*([^,)\]]+)", text)
        assert set(keys) <= TORCHRUN_KEYS, (path, keys)
    assert seen - not_parsed <= set(envvars.VARS), seen - not_parsed - set(envvars.VARS)
    assert set(envvars.VARS) <= seen


@pytest.mark.parametrize("argv", [["probe", "--quick"], ["autotune", "--smoke"]])
def test_cli_commands_that_start_ranks_check_the_environment_first(argv, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("ZTUNE_SHM", "maybe")
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out" if argv[0] == "autotune" else "--output", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "ZTUNE_SHM='maybe': expected 1 or 0" in err, err
    assert not (tmp_path / "x").exists()


def test_launch_checks_env_assignments_too(monkeypatch, capsys):
    monkeypatch.delenv("ZTUNE_GATHER_TIMEOUT_S", raising=False)
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exc:
        main(["launch", "--env", "ZTUNE_GATHER_TIMEOUT_S=soon", "--dry-run", "examples/train_tiny.py"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "ZTUNE_GATHER_TIMEOUT_S='soon': expected seconds > 0" in err, err


@pytest.mark.parametrize(("raw", "threads"), [("4", 4), ("", 1), ("abc", 1), ("4,2", 1), ("0", 1), ("-3", 1),
                                              ("\u00b2", 1), ("\uff14", 1)])  # was: a ValueError traceback / 4
def test_omp_num_threads_for_trials(raw, threads):
    assert envvars.omp_num_threads({"OMP_NUM_THREADS": raw}) == threads


def test_environment_doc_is_generated_from_the_table():
    from ztune.runtime.comm import shm

    text = (REPO / "docs" / "environment.md").read_text()
    assert envvars.markdown_table() in text
    assert f"`ZTUNE_SHM_MIN_BYTES` defaults to {shm.MIN_BYTES} " in text
