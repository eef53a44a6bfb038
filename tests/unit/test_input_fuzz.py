"""Bad input anywhere ztune reads input ends in the reader's one-line error (and, in the CLI, exit 2 and no
traceback): property-based tests per reader (configs, hostfiles and filters, .ztune_env, model and hardware
profiles, CLI flags), plus the concrete inputs of issue 10.7 with their right outcome."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers.cli import run_cli
from ztune.config.io import load
from ztune.config.schema import TrainConfig
from ztune.errors import ConfigError, ProfileError, UserError
from ztune.launch import LaunchRequest, merged_env
from ztune.launch.command import LaunchError, parse_env_assignment, parse_env_file
from ztune.launch.hostfile import MAX_SLOTS, HostfileError, apply_filters, parse_hostfile
from ztune.profiles import load_hardware, load_model

PROFILES = Path(__file__).resolve().parents[2] / "profiles"
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])

# Values that break naive readers: non-finite and huge numbers, wrong types, odd strings.
_nasty = st.one_of(
    st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e300, -1e300, 10**20, -(10**20), 2**63, 0, -1,
                     0.5, True, None, "", "auto", "NaN", "1e999", "\x00", "\udc80"[:0] + "\u202e"]),
    st.integers(), st.floats(), st.text(max_size=6), st.lists(st.integers(-2, 2), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


def _mutations(doc: dict) -> st.SearchStrategy:
    """`doc` with one to three leaves (at any depth) replaced by nasty values, or keys added."""
    paths: list[tuple] = []

    def walk(x, path):
        if isinstance(x, dict):
            for k, v in x.items():
                paths.append((*path, k))
                walk(v, (*path, k))
        elif isinstance(x, list):
            for i, v in enumerate(x):
                paths.append((*path, i))
                walk(v, (*path, i))
    walk(doc, ())

    def apply(changes):
        out = json.loads(json.dumps(doc))
        for path, value in changes:
            target = out
            try:  # an earlier change may have replaced a parent of this path: then skip it
                for k in path[:-1]:
                    target = target[k]
                target[path[-1]] = value
            except (KeyError, IndexError, TypeError):
                continue
        return out
    return st.lists(st.tuples(st.sampled_from(paths), _nasty), min_size=1, max_size=3).map(apply)


def _expect_only(error: type[UserError], fn, *args):
    """Run fn; the only exception allowed is `error`, with a one-line message."""
    try:
        return fn(*args)
    except error as exc:
        assert str(exc) and "\n" not in str(exc), repr(str(exc))
        return None


# ------------------------------------------------------------------------------------------------ configs
DS = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
      "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.99], "eps": 1e-8}},
      "zero_optimization": {"stage": 2, "reduce_bucket_size": 5e8, "offload_optimizer": {"device": "cpu"}},
      "gradient_clipping": 1.0, "bf16": {"enabled": True}}
ZT = {"zero": {"stage": 2, "reduce_bucket_numel": 1000}, "batch": {"micro": 2, "grad_accum": 2, "global": 8},
      "optimizer": {"type": "adamw", "lr": 0.001, "betas": [0.9, 0.99]}, "seq_len": 64, "gradient_clipping": 1.0}


def _load_file(path: Path) -> None:
    cfg = load(path)
    assert isinstance(cfg, TrainConfig)
    cfg.grad_accum_for(2)  # what every consumer does next


@FUZZ
@given(doc=st.one_of(_mutations(DS), _mutations(ZT)), fmt=st.sampled_from(["json", "yaml"]))
def test_config_files_fail_only_with_config_error(tmp_path_factory, doc, fmt) -> None:
    path = tmp_path_factory.mktemp("cfg") / f"c.{fmt}"
    # json.dumps writes NaN/Infinity tokens (Python's reader accepts them); YAML writes .nan/.inf.
    path.write_text(json.dumps(doc) if fmt == "json" else yaml.safe_dump(doc))
    _expect_only(ConfigError, _load_file, path)


@FUZZ
@given(data=st.binary(max_size=64), suffix=st.sampled_from([".json", ".yaml"]))
def test_config_bytes_fail_only_with_config_error(tmp_path_factory, data, suffix) -> None:
    path = tmp_path_factory.mktemp("cfg") / f"c{suffix}"
    path.write_bytes(b'{"zero": {"stage": 1}, "x": "' + data + b'"}' if suffix == ".json" else data)
    _expect_only(ConfigError, _load_file, path)


@pytest.mark.parametrize("text, key", [
    ('{"train_batch_size": 8, "gradient_accumulation_steps": NaN}', "gradient_accumulation_steps: NaN"),
    ('{"train_batch_size": Infinity}', "train_batch_size: Infinity"),
    ('{"train_batch_size": 8, "optimizer": {"params": {"lr": -Infinity}}}', "optimizer.params.lr: -Infinity"),
    ('{"train_batch_size": 1e999}', "train_batch_size: 1e999"),
    ('{"train_batch_size": 99999999999999999999999}', "train_batch_size: 99999999999999999999999 is out of range"),
    ('{"zero_optimization": {"stage": 2, "reduce_bucket_size": [1, NaN]}}', "reduce_bucket_size[1]: NaN"),
])
def test_deepspeed_json_non_finite_is_refused_by_key(tmp_path, text, key) -> None:
    path = tmp_path / "ds.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert key in str(info.value), str(info.value)


def test_yaml_nan_and_non_utf8_are_refused(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("optimizer:\n  lr: .nan\n")
    with pytest.raises(ConfigError, match=r"optimizer\.lr: nan is not a finite number"):
        load(path)
    path.write_bytes(b"seq_len: 64\nname: caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8 text .*line 2"):
        load(path)
    path.write_text("seq_len: 2024-02-30\n")  # the safe loader's date constructor raises ValueError
    with pytest.raises(ConfigError, match="not usable YAML"):
        load(path)
    path.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError):
        load(path)


# ------------------------------------------------------------------------------------ hostfiles, filters
_host = st.one_of(st.sampled_from(["node1", "node2", "fd00::1", "[fd00::2]", "-x", "a:b", "[zz::1]", "n\x00",
                                   "slots=2", "[", "]", "#c"]), st.text(max_size=6))
_slots = st.one_of(st.integers(-3, 10**25).map(lambda n: f"slots={n}"),
                   st.sampled_from(["slots=", "slots=x", "slots=100000000", "slots=99999999999999999999",
                                    "slots=4096", "slots=0007"]), st.text(max_size=5))
_lines = st.lists(st.tuples(_host, st.lists(_slots, max_size=2)).map(lambda t: " ".join([t[0], *t[1]])),
                  max_size=5).map("\n".join)


_specs = st.one_of(st.none(), st.text(max_size=16),
                  st.sampled_from(["node1:0", "[fd00::1]:0,1", "fd00::1:0,1", "node1:99999999999999999"]))


@FUZZ
@given(text=_lines, spec=_specs, include=st.booleans())
def test_hostfiles_and_filters_fail_only_with_hostfile_error(text, spec, include) -> None:
    hosts = _expect_only(HostfileError, parse_hostfile, text)
    if hosts is None:
        return
    assert all(1 <= h.num_slots <= MAX_SLOTS and h.name.isprintable() for h in hosts)
    kwargs = {"include": spec} if include else {"exclude": spec}
    _expect_only(HostfileError, lambda: apply_filters(hosts, **kwargs))


@pytest.mark.parametrize("line", ["node1 slots=99999999999999999999", "node1 slots=100000000"])
def test_absurd_slot_counts_exit_2_in_therun_cli(tmp_path, monkeypatch, capsys, line) -> None:
    (tmp_path / "t.py").write_text("")
    (tmp_path / "hosts").write_text(line + "\n")
    monkeypatch.chdir(tmp_path)
    code, out = run_cli(["launch", "-H", "hosts", "--dry-run", "t.py"], capsys)
    assert code == 2 and "slots must be between 1 and 4096" in out and len(out.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------- .ztune_env
@FUZZ
@given(text=st.text(max_size=40), data=st.binary(max_size=24))
def test_env_files_fail_only_with_launch_error(tmp_path_factory, text, data) -> None:
    env = _expect_only(LaunchError, parse_env_file, text)
    for key, value in (env or {}).items():
        assert key.isidentifier() and key.isascii() and "\0" not in value
    work = tmp_path_factory.mktemp("work")
    (work / "t.py").write_text("")
    (work / ".ztune_env").write_bytes(data)
    _expect_only(LaunchError, lambda: merged_env(LaunchRequest(script="t.py"), {}, workdir=str(work)))


def test_env_assignment_edge_cases() -> None:
    for bad in ("A\n=1", "A=\0", "A B=1", "\u00e9=1"):
        with pytest.raises(LaunchError):
            parse_env_assignment(bad)


# ---------------------------------------------------------------------------------------------- profiles
MODEL = yaml.safe_load((PROFILES / "models" / "tiny-llama.yaml").read_text())
HARDWARE = yaml.safe_load((PROFILES / "hardware" / "cpu-local.yaml").read_text())


@FUZZ
@given(doc=st.one_of(_mutations(MODEL), _mutations(HARDWARE)), fmt=st.sampled_from(["yaml", "json-hf"]))
def test_profiles_fail_only_with_profile_error(tmp_path_factory, doc, fmt) -> None:
    d = tmp_path_factory.mktemp("prof")
    if "gpus_per_node" in doc:
        path = d / "hw.yaml"
        path.write_text(yaml.safe_dump(doc))
        _expect_only(ProfileError, load_hardware, str(path))
        return
    if fmt == "yaml":
        path = d / "m.yaml"
        path.write_text(yaml.safe_dump(doc))
    else:  # the same numbers as a Hugging Face config.json, NaN/Infinity tokens included
        hf = {"model_type": "llama", "vocab_size": doc.get("vocab_size"), "hidden_size": doc.get("hidden_size"),
              "num_hidden_layers": doc.get("num_layers"), "num_attention_heads": doc.get("num_heads"),
              "num_key_value_heads": doc.get("num_kv_heads"), "intermediate_size": doc.get("intermediate_size"),
              "max_position_embeddings": doc.get("max_seq_len"), "head_dim": doc.get("head_dim")}
        path = d / "config.json"
        path.write_text(json.dumps(hf))
    spec = _expect_only(ProfileError, load_model, str(path))
    if spec is not None:
        from ztune.specs import count_params

        assert math.isfinite(float(count_params(spec).total))


@FUZZ
@given(data=st.binary(max_size=48))
def test_profile_bytes_fail_only_with_profile_error(tmp_path_factory, data) -> None:
    path = tmp_path_factory.mktemp("prof") / "m.yaml"
    path.write_bytes(data)
    _expect_only(ProfileError, load_model, str(path))
    _expect_only(ProfileError, load_hardware, str(path))


# ---------------------------------------------------------------------------------------------- CLI flags


_values = st.one_of(st.sampled_from(["nan", "inf", "-inf", "-1", "0", "1e999", "99999999999999999999", "abc", "",
                                     "1.5", "2", "1e18", "-0", "4,2", "0,9", "\u202e", "[fd00::1]:0"]),
                    st.integers(-5, 10**22).map(str))
_FLAGS = {
    "autotune": ["--nproc", "--global-batch", "--seq", "--stages", "--micro", "--max-micro", "--steps", "--warmup",
                 "--trial-timeout", "--stall-timeout", "--time-budget", "--min-trials", "--threshold",
                 "--memory-margin", "--memory-cap", "--precision", "--vary", "--model", "--hardware", "--export",
                 "--confirm", "--confirm-top", "--confirm-margin"],
    "estimate": ["--nodes", "--seq", "--micro-batch", "--global-batch", "--stage", "--params", "--precision",
                 "--model", "--hardware"],
    "launch": ["--num-nodes", "--nproc-per-node", "--master-port", "--grace", "--preflight-timeout", "--include",
               "--exclude", "--master-addr", "--env"],
}


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), command=st.sampled_from(sorted(_FLAGS)))
def test_cli_flags_exit_2_with_one_line(tmp_path, monkeypatch, capsys, data, command) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SLURM_JOB_NODELIST", raising=False)
    monkeypatch.delenv("SLURM_NODELIST", raising=False)
    (tmp_path / "t.py").write_text("")
    (tmp_path / "hosts").write_text("n1 slots=2\nfd00::1 slots=2\n")
    flags = data.draw(st.lists(st.sampled_from(_FLAGS[command]), min_size=1, max_size=2, unique=True))
    argv = [command]
    for flag in flags:
        argv += [flag, data.draw(_values)]
    if command == "autotune":  # --max-trials 0: everything up to the first trial, and no trial
        argv += ["--max-trials", "0", "--out", str(tmp_path / "out"), "--no-plot"]
    elif command == "estimate" and "--model" not in flags and "--params" not in flags:
        argv += ["--model", "tiny-gpt"] + ([] if "--hardware" in flags else ["--hardware", "cpu-local"])
    elif command == "launch":
        argv += ["-H", "hosts", "--master-addr", "10.0.0.1", "--dry-run", "t.py"] if "--master-addr" not in flags \
            else ["-H", "hosts", "--dry-run", "t.py"]
    code, out = run_cli(argv, capsys)
    assert code in (0, 1, 2), (argv, code, out[-500:])
    assert "Traceback" not in out, (argv, out[-2000:])
    if code == 2 and "Usage:" not in out:  # typer's own usage errors are its multi-line box
        assert len(out.strip().splitlines()) == 1, (argv, out)


@pytest.mark.parametrize("argv", [
    [b"launch", b"-H", b"hosts", b"--include", b"n\x80", b"--dry-run", b"t.py"],
    [b"launch", b"-H", b"hosts-latin1", b"--dry-run", b"t.py"],
    [b"autotune", b"--precision", b"\xff", b"--max-trials", b"0"],
    [b"estimate", b"--model", b"tiny\xff", b"--hardware", b"cpu-local"],
])
def test_non_utf8_arguments_and_files_exit_2_with_one_line(tmp_path, argv) -> None:
    import subprocess
    import sys

    (tmp_path / "t.py").write_text("")
    (tmp_path / "hosts").write_text("n1 slots=2\n")
    (tmp_path / "hosts-latin1").write_bytes(b"n\xe9 slots=1\n")
    proc = subprocess.run([sys.executable.encode(), b"-m", b"ztune", *argv], cwd=tmp_path, capture_output=True,
                          timeout=120)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("doc, needle", [
    ({"batch": {"micro": 10**17}}, "batch.micro: got 100000000000000000; at most 16777216"),
    ({"seq_len": 10**9}, "seq_len: got 1000000000; at most 16777216"),
    ({"batch": {"micro": 1, "global": 2**25}}, "batch.global: got 33554432"),
])
def test_batch_and_sequence_sizes_have_sane_bounds(doc, needle) -> None:
    from ztune.config.io import from_dict

    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        from_dict(doc)
