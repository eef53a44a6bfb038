"""Numbers read from user text (hostfiles, Slurm variables, host filters, profiles, size flags) are written in
ASCII only. Python's int() and float() also take any Unicode decimal digit ('２' is 2), '_' between digits and
surrounding whitespace: such a value is refused with one line naming the file, line (or key) and the value,
its non-ASCII characters escaped so the reader sees why."""

from __future__ import annotations

from pathlib import Path

import pytest

from ztune.cli import main as cli_main
from ztune.cli.autotune import parse_size as memory_cap_bytes
from ztune.errors import ProfileError, UserError
from ztune.inputs import ascii_int, ascii_number
from ztune.launch.hostfile import HostfileError, apply_filters, expand_nodelist, hosts_from_slurm, parse_hostfile
from ztune.profiles import load_hardware, load_model, model_from_params
from ztune.runtime.state.offline import parse_size as shard_bytes

PROFILES = Path(__file__).resolve().parents[2] / "profiles"
# FULLWIDTH DIGIT TWO, ARABIC-INDIC DIGIT TWO, DEVANAGARI DIGIT TWO: int() reads each as 2.
_NOT_ASCII = ["\uff12", "\u0662", "\u0968"]


def test_helpers_take_ascii_only() -> None:
    assert ascii_int("12") == 12 and ascii_number("989e12") == 989e12 and ascii_number("-.5") == -0.5
    for text in [*_NOT_ASCII, "1_0", " 2", "2 ", "+2", "", "\u00b2"]:
        assert ascii_int(text) is None, text
    for text in [*_NOT_ASCII, "1_0", " 2", "inf", "nan", "1e", ""]:
        assert ascii_number(text) is None, text
    assert ascii_number("1_000e9", yaml_grouping=True) == 1e12  # YAML 1.1 groups digits with '_'


@pytest.mark.parametrize("value", [*_NOT_ASCII, "1_0", "\u00b2"])
def test_hostfile_slots_in_ascii_only(value) -> None:
    with pytest.raises(HostfileError) as info:
        parse_hostfile(f"host0 slots=1\nhost1 slots={value}\n", source="hosts.txt")
    msg = str(info.value)
    assert msg.startswith("hosts.txt line 2: ") and ascii(f"slots={value}") in msg and "ASCII" in msg, msg


def test_hostfile_slots_cli_is_one_line(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    Path("train.py").write_text("")
    Path("hosts").write_text("host1 slots=\uff12\n", encoding="utf-8")
    try:
        cli_main(["launch", "-H", "hosts", "--dry-run", "train.py"])
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    assert code == 2 and out.err.count("\n") == 1 and "hosts line 1" in out.err and "\\uff12" in out.err, out


@pytest.mark.parametrize("spec", ["host1:\uff11", "host1:0,\u00b9", "host1:\u0661"])
def test_filter_slots_in_ascii_only(spec) -> None:
    hosts = parse_hostfile("host1 slots=2\n")
    for kind in ("include", "exclude"):  # '\u00b9' was a ValueError traceback (isdigit() yes, int() no)
        with pytest.raises(HostfileError, match="ASCII"):
            apply_filters(hosts, **{kind: spec})


@pytest.mark.parametrize("nodelist", ["gpu[\uff11-3]", "gpu[1-\u00b3]", "gpu[\u0661]"])
def test_slurm_ranges_in_ascii_only(nodelist) -> None:
    with pytest.raises(HostfileError, match="ASCII"):
        expand_nodelist(nodelist)


@pytest.mark.parametrize("gpus", ["\uff14", "\u00b2", "4_0"])
def test_slurm_gpus_on_node_in_ascii_only(gpus) -> None:
    # not a count: the documented fallback of one slot per node, not 4 (nor a ValueError from int('\u00b2'))
    hosts = hosts_from_slurm({"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_GPUS_ON_NODE": gpus})
    assert [h.num_slots for h in hosts] == [1, 1]


@pytest.mark.parametrize("value", ['"\uff12"', '"\u0662"', '" 2"', '"2 "'])
def test_profile_numbers_in_ascii_only(tmp_path, value) -> None:
    text = (PROFILES / "hardware" / "cpu-local.yaml").read_text()
    path = tmp_path / "hw.yaml"
    path.write_text(text.replace("gpus_per_node: 2 ", f"gpus_per_node: {value} ", 1), encoding="utf-8")
    with pytest.raises(ProfileError, match=f"^{path}: gpus_per_node: ") as info:
        load_hardware(str(path))
    assert "\n" not in str(info.value)
    model = (PROFILES / "models" / "tiny-llama.yaml").read_text()
    mpath = tmp_path / "m.yaml"
    mpath.write_text(model.replace("num_layers: 8", f"num_layers: {value}", 1), encoding="utf-8")
    with pytest.raises(ProfileError, match=f"^{mpath}: num_layers: "):
        load_model(str(mpath))


def test_profile_exponent_strings_still_read(tmp_path) -> None:
    # YAML 1.1 leaves 989e12 and 2.5e12 as strings: they stay numbers
    text = (PROFILES / "hardware" / "cpu-local.yaml").read_text()
    path = tmp_path / "hw.yaml"
    path.write_text(text.replace("peak_flops_fp32: 204.8e+9", "peak_flops_fp32: 2048e8", 1))
    assert load_hardware(str(path)).peak_flops_fp32 == 2048e8


@pytest.mark.parametrize("parse", [memory_cap_bytes, shard_bytes, model_from_params])
@pytest.mark.parametrize("text", ["\uff12GiB", "\u0662G", "\uff17\uff10B"])
def test_size_flags_in_ascii_only(parse, text) -> None:
    with pytest.raises(UserError):
        parse(text)


@pytest.mark.parametrize("text", ["inf", "1e308GB", "nan", "1_0GB"])
def test_shard_size_refuses_non_sizes_in_one_line(text) -> None:
    with pytest.raises(UserError):  # 'inf' and '1e308GB' were an OverflowError traceback
        shard_bytes(text)
