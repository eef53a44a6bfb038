"""Absurd sizes are refused where they are read, each against a documented bound, in one line naming the file and
field (or the flag): a hardware profile's counts, memories, rates and latencies, a model's dimensions and total
parameters, --memory-cap and --inter-node-gbps. The shipped profiles stay inside every bound."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ztune.cli import main as cli_main
from ztune.cli.autotune import MIN_MEMORY_CAP_BYTES
from ztune.cli.autotune import parse_size as memory_cap_bytes
from ztune.errors import ProfileError, UserError
from ztune.profiles import list_hardware, list_models, load_hardware, load_model

PROFILES = Path(__file__).resolve().parents[2] / "profiles"


def _with(tmp_path: Path, kind: str, base: str, field: str, value: str) -> Path:
    text = (PROFILES / kind / f"{base}.yaml").read_text()
    text, n = re.subn(rf"(?m)^{field}:.*$", f"{field}: {value}", text)
    if n == 0:
        text += f"{field}: {value}\n"
    path = tmp_path / f"{field}.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("field", "value"), [
    ("gpus_per_node", "1e15"), ("gpus_per_node", "5000"), ("nics_per_node", "1e6"), ("cpu_cores", "1e9"),
    ("gpu_memory_bytes", "1e17"), ("host_memory_bytes", "1e17"), ("peak_flops_bf16", "1e18"),
    ("intra_node_bw_bytes_per_s", "1e16"), ("inter_node_latency_s", "5"), ("intra_node_latency_s", "100")])
def test_hardware_sizes_have_a_ceiling(tmp_path, field, value) -> None:
    path = _with(tmp_path, "hardware", "cpu-local", field, value)
    with pytest.raises(ProfileError, match=f"^{re.escape(str(path))}: {field} is .* above the .* allowed; ") as info:
        load_hardware(str(path))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("field", ["num_layers", "hidden_size", "num_heads", "num_kv_heads", "vocab_size",
                                   "max_seq_len", "intermediate_size"])
def test_model_dimensions_have_a_ceiling(tmp_path, field) -> None:
    path = _with(tmp_path, "models", "tiny-llama", field, "1e15")
    with pytest.raises(ProfileError, match=f"^{re.escape(str(path))}: {field} is 1,000,000,000,000,000, above "):
        load_model(str(path))


def test_model_head_dim_and_experts_have_a_ceiling(tmp_path) -> None:
    path = _with(tmp_path, "models", "tiny-llama", "head_dim", "100000")
    with pytest.raises(ProfileError, match="head_dim is 100,000, above 16,384"):
        load_model(str(path))
    text = (PROFILES / "models" / "mixtral-8x7b.yaml").read_text()
    path = tmp_path / "moe.yaml"
    path.write_text(re.sub(r"(?m)^num_experts:.*$", "num_experts: 1000000", text))
    with pytest.raises(ProfileError, match="num_experts is 1,000,000, above 16,384"):
        load_model(str(path))


def test_model_total_parameters_have_a_ceiling(tmp_path) -> None:
    # every dimension under its own bound, the product beyond the --params range (1e15)
    text = (PROFILES / "models" / "tiny-llama.yaml").read_text()
    for field, value in (("num_layers", 16000), ("hidden_size", 200000), ("intermediate_size", 800000),
                         ("num_heads", 1000), ("num_kv_heads", 1000)):
        text = re.sub(rf"(?m)^{field}:.*$", f"{field}: {value}", text)
    path = tmp_path / "huge.yaml"
    path.write_text(text)
    with pytest.raises(ProfileError, match="parameters, above 1e\\+15"):
        load_model(str(path))


def test_hf_config_import_is_bounded_too(tmp_path) -> None:
    cfg = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "num_hidden_layers": 10**15,
           "num_attention_heads": 32, "intermediate_size": 11008, "max_position_embeddings": 4096}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ProfileError, match="num_hidden_layers is .* above 16,384"):  # the file's key
        load_model(str(path))


def test_shipped_profiles_are_inside_every_bound() -> None:
    for name in list_models():
        load_model(name)
    for name in list_hardware():
        load_hardware(name)


@pytest.mark.parametrize("text", ["1", "2", "64", "128MiB", "255MiB", "0.1G"])
def test_memory_cap_has_a_floor(text) -> None:
    with pytest.raises(UserError, match=r"under the 256 MiB .*a bare number is bytes"):
        memory_cap_bytes(text)


def test_memory_cap_keeps_real_sizes() -> None:
    assert memory_cap_bytes("256MiB") == MIN_MEMORY_CAP_BYTES
    assert memory_cap_bytes("560MiB") == 560 << 20 and memory_cap_bytes("2GiB") == 2 << 30


@pytest.mark.parametrize("value", ["inf", "1e300", "0", "1e-9"])
def test_probe_inter_node_gbps_is_bounded_before_measuring(tmp_path, monkeypatch, capsys, value) -> None:
    monkeypatch.chdir(tmp_path)
    try:
        # an --output in a missing folder: should the rate pass, the probe stops there, before measuring
        cli_main(["probe", "--inter-node-gbps", value, "--output", "missing/hw.yaml"])
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    assert code == 2 and out.err.count("\n") == 1 and "--inter-node-gbps" in out.err, out
    assert list(tmp_path.iterdir()) == []
