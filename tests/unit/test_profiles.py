"""Profiles: every shipped model's parameter count equals transformers' own count (the model is built on the
meta device, so no weights are allocated), config.json import round-trips, --params shapes fit, hardware
profiles are sane, and every bad input is one ProfileError line that says what is wrong."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from importlib import resources

import pytest

from ztune.errors import ProfileError
from ztune.profiles import list_hardware, list_models, load_hardware, load_model, model_from_params
from ztune.specs import Architecture, Hardware, ModelSpec, count_params


@pytest.fixture(scope="module")
def hf():
    """transformers is imported lazily: collecting this file must not cost the import (~3 s)."""
    import torch
    import transformers

    return torch, transformers


def _hf_config(spec: ModelSpec, transformers):
    """The transformers config of the same shape as `spec`."""
    common = dict(vocab_size=spec.vocab_size, tie_word_embeddings=spec.tied_embeddings)
    if spec.architecture is Architecture.GPT2:
        return transformers.GPT2Config(
            n_embd=spec.hidden_size, n_layer=spec.num_layers, n_head=spec.num_heads,
            n_inner=spec.intermediate_size, n_positions=spec.max_seq_len, **common)
    common.update(
        hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_seq_len, head_dim=spec.head_size)
    if spec.architecture is Architecture.MIXTRAL:
        return transformers.MixtralConfig(
            num_local_experts=spec.num_experts, num_experts_per_tok=spec.top_k, **common)
    if spec.attention_bias and not spec.attention_out_bias:
        return transformers.Qwen2Config(**common)
    if spec.name.startswith("mistral"):
        return transformers.MistralConfig(**common)
    assert spec.attention_bias == spec.attention_out_bias, "llama has one flag for q/k/v/o bias"
    return transformers.LlamaConfig(attention_bias=spec.attention_bias, **common)


def _hf_numel(config, torch, transformers) -> int:
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    # parameters() yields a tied weight once, which is what count_params counts.
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list_models())
def test_param_count_matches_transformers(name, hf):
    torch, transformers = hf
    spec = load_model(name)
    assert spec.name == name and spec.source
    assert count_params(spec).total == _hf_numel(_hf_config(spec, transformers), torch, transformers)


def test_known_counts_literally():
    assert count_params(load_model("llama-2-7b")).total == 6_738_415_616
    assert count_params(load_model("llama-2-70b")).total == 68_976_648_192
    assert count_params(load_model("gpt2")).total == 124_439_808


def test_moe_active_params():
    counts = count_params(load_model("mixtral-8x7b"))
    assert counts.total == 46_702_792_704  # "47B" in the Mixtral paper
    assert 12.8e9 < counts.active_per_token < 13.0e9  # "13B active" in the paper
    assert counts.active_per_token < counts.total


def test_demo_models_are_small():
    assert 15e6 < count_params(load_model("tiny-gpt")).total < 25e6
    tiny_llama = load_model("tiny-llama")
    assert 25e6 < count_params(tiny_llama).total < 35e6
    assert tiny_llama.num_kv_heads < tiny_llama.num_heads  # GQA
    for name in ("tiny-gpt", "tiny-llama"):
        spec = load_model(name)
        assert (spec.vocab_size, spec.max_seq_len) == (8192, 256)


@pytest.mark.parametrize("name", ["gpt2", "llama-2-70b", "mistral-7b", "mixtral-8x7b", "qwen2.5-7b"])
def test_hf_config_json_round_trip(name, hf, tmp_path):
    torch, transformers = hf
    spec = load_model(name)
    config = _hf_config(spec, transformers)
    path = tmp_path / name / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(config.to_dict(), default=str))
    imported = load_model(str(path))
    assert imported.name == name and str(path) in imported.source
    assert dataclasses.replace(imported, name=spec.name, source=spec.source) == spec
    assert count_params(imported).total == _hf_numel(config, torch, transformers)


def test_hf_config_defaults(tmp_path):
    # A minimal llama config.json: no num_key_value_heads (-> MHA), no tie flag (-> untied).
    path = tmp_path / "my-llama.json"
    path.write_text(json.dumps({
        "model_type": "llama", "vocab_size": 1000, "hidden_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 688, "max_position_embeddings": 512}))
    spec = load_model(str(path))
    assert spec.name == "my-llama" and spec.num_kv_heads == 4 and not spec.tied_embeddings


@pytest.mark.parametrize("doc, key, message", [
    ({"model_type": "llama", "tie_word_embeddings": "yes"}, "tie_word_embeddings", "expected true or false"),
    ({"model_type": "llama", "num_hidden_layers": 100_000}, "num_hidden_layers", "above"),
    ({"model_type": "llama", "num_attention_heads": 3}, "num_attention_heads", "not divisible"),
    ({"model_type": "mixtral", "num_experts_per_tok": 9, "num_local_experts": 8}, "num_experts_per_tok", "exceeds"),
    ({"model_type": "gpt2", "n_layer": -1}, "n_layer", "positive"),
    ({"model_type": "gpt2", "n_head": 5}, "n_head", "not divisible"),
])
def test_hf_config_errors_name_the_config_json_key(tmp_path, doc, key, message):
    """An HF config.json's bad value is named by its own key, not by the ModelSpec field it maps to
    (tie_word_embeddings was reported as tied_embeddings, num_hidden_layers as num_layers)."""
    base = ({"vocab_size": 1000, "n_embd": 256, "n_layer": 2, "n_head": 4, "n_positions": 512}
            if doc["model_type"] == "gpt2" else
            {"vocab_size": 1000, "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 688, "max_position_embeddings": 512})
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**base, **doc}))
    with pytest.raises(ProfileError) as exc:
        load_model(str(path))
    text = str(exc.value)
    assert f": {key}" in text or f" {key} " in text, text
    assert message in text, text
    field = {"tie_word_embeddings": "tied_embeddings", "num_hidden_layers": "num_layers",
             "num_attention_heads": "num_heads", "num_experts_per_tok": "top_k", "n_layer": "num_layers",
             "n_head": "num_heads"}[key]
    assert field not in text, text


# A config.json of each family holding every key the import reads, each with a valid value.
_LLAMA_DOC = {"vocab_size": 1000, "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 688, "max_position_embeddings": 512, "head_dim": 32,
              "tie_word_embeddings": False, "mlp_bias": False}
HF_DOCS = {
    "gpt2": {"model_type": "gpt2", "vocab_size": 1000, "n_embd": 256, "n_layer": 2, "n_head": 4, "n_inner": 1024,
             "n_positions": 512, "tie_word_embeddings": True},
    "llama": {"model_type": "llama", **_LLAMA_DOC, "attention_bias": False},
    "mistral": {"model_type": "mistral", **_LLAMA_DOC},
    "mixtral": {"model_type": "mixtral", **_LLAMA_DOC, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2": {"model_type": "qwen2", **_LLAMA_DOC},
}


class _Reads(dict):
    """A config.json that records the keys the import reads."""

    def __init__(self, doc: dict) -> None:
        super().__init__(doc)
        self.read: set[str] = set()

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


@pytest.mark.parametrize("family", HF_DOCS)
def test_hf_docs_hold_every_key_the_import_reads(family):
    from ztune.profiles import _from_hf_config

    doc = _Reads(HF_DOCS[family])
    _from_hf_config(doc, origin="config.json", name=family)
    assert doc.read == set(HF_DOCS[family]), doc.read ^ set(HF_DOCS[family])


def _bad_values(good):
    """Values of the wrong JSON type for `good`'s field, as transformers' config classes refuse them."""
    if isinstance(good, bool):
        return [str(good).lower(), str(good), int(good), None], "expected true or false"
    return [str(good), f" {good} ", True, float(good), good + 0.5], "expected an integer"


@pytest.mark.parametrize("family, key", [(f, k) for f, doc in HF_DOCS.items() for k in doc if k != "model_type"])
def test_hf_config_fields_take_their_json_type_only(tmp_path, family, key):
    """A config.json value of another JSON type ("4" for num_hidden_layers, "false" for tie_word_embeddings, 4.0,
    true) is a broken file for transformers: one line naming the file's key and what it got, for every field
    the import reads ("4" was read as 4)."""
    path = tmp_path / "config.json"
    values, expected = _bad_values(HF_DOCS[family][key])
    for value in values:
        path.write_text(json.dumps({**HF_DOCS[family], key: value}))
        with pytest.raises(ProfileError) as info:
            load_model(str(path))
        shown = json.dumps(value)  # as the file spells it: true, null, "4" (Python's True, None, '4' were shown)
        assert str(info.value).startswith(f"{path}: {key}: {expected}, got {shown}"), (value, str(info.value))


@pytest.mark.parametrize(("value", "hint"), [("4", "(a string: write the number without quotes)"),
                                             (4.0, "(a float: write 4)"), (4.5, ""),
                                             (True, "(a boolean: write the number)")])
def test_hf_config_integer_errors_say_how_to_write_it(tmp_path, value, hint):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**HF_DOCS["llama"], "num_hidden_layers": value}))
    with pytest.raises(ProfileError) as info:
        load_model(str(path))
    assert str(info.value) == f"{path}: num_hidden_layers: expected an integer, got {json.dumps(value)} {hint}".rstrip()


SIZES = ["125M", "350m", "760M", "1.3B", "1.5B", "2.7B", "7B", "7b", "13B", "30B", "34B", "70B", "175B",
         "405B"]


@pytest.mark.parametrize("text", SIZES)
def test_model_from_params_within_3_percent(text):
    scale = {"m": 1e6, "b": 1e9}[text[-1].lower()]
    target = float(text[:-1]) * scale
    spec = model_from_params(text)
    assert abs(count_params(spec).total / target - 1) <= 0.03
    assert spec.name == f"generic-{text.upper()}" and text.upper() in spec.source
    assert spec.hidden_size % 128 == 0 and spec.head_size == 128
    assert spec.intermediate_size % 256 == 0 and spec.vocab_size == 32000
    assert spec.num_kv_heads == (8 if target >= 30e9 else spec.num_heads)
    assert 0.5 < spec.hidden_size / spec.num_layers / 128 < 2  # Llama-like width/depth


def test_model_from_params_is_llama_shaped_at_7b():
    spec = model_from_params("6.7B")
    assert (spec.hidden_size, spec.num_layers) == (4096, 32)  # Llama-2-7B's own shape


@pytest.mark.parametrize("text", ["", "seventy", "70X", "-7B", "7 B B", "1e9"])
def test_model_from_params_rejects_bad_text(text):
    with pytest.raises(ProfileError, match="bad --params value .*such as 70B"):
        model_from_params(text)


def test_model_from_params_rejects_out_of_range():
    with pytest.raises(ProfileError, match="10M to 1000T"):
        model_from_params("1M")


@pytest.mark.parametrize("name", list_hardware())
def test_hardware_profiles_load(name):
    hw = load_hardware(name)
    assert hw.name == name and hw.source
    for field in dataclasses.fields(Hardware):
        value = getattr(hw, field.name)
        if field.name in ("nics_per_node", "train_flops_efficiency", "optimizer_step_elements_per_s",
                          "onebit_step_elements_per_s", "inter_node_cpu_s_per_byte", "intra_node_cpu_s_per_byte",
                          "inter_node_reduce_cpu_s_per_byte", "inter_node_cpu_s_per_step",
                          "intra_node_cpu_s_per_step", "cpu_contention") \
                or field.name.startswith(("codec_", "runtime_")):
            assert 0 <= value, field.name  # 0 = not known: the cost model's generic value applies
        elif field.name not in ("name", "source"):
            assert isinstance(value, (int, float)) and value > 0, field.name
    assert 0 <= hw.train_flops_efficiency < 1
    if not hw.name.startswith("cpu"):  # GPU profiles carry a sourced achieved efficiency or none at all
        assert hw.train_flops_efficiency == 0 or 0.25 <= hw.train_flops_efficiency <= 0.7
    assert hw.peak_flops_bf16 >= hw.peak_flops_fp32
    assert hw.intra_node_bw_bytes_per_s >= hw.inter_node_bw_bytes_per_s


def test_expected_profiles_shipped():
    assert {"gpt2", "gpt2-xl", "llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3-8b", "llama-3-70b",
            "llama-3.1-405b", "mistral-7b", "mixtral-8x7b", "qwen2.5-7b", "tiny-gpt",
            "tiny-llama"} <= set(list_models())
    assert {"dgx-a100-80g", "dgx-h100", "h100-pcie-node", "a100-40g-node", "l4-node", "rtx4090-workstation",
            "cpu-local"} <= set(list_hardware())


def test_names_are_case_insensitive():
    assert load_model("Llama-2-70B") == load_model("llama-2-70b")
    assert load_hardware("DGX-H100").name == "dgx-h100"


GOOD = (
    "architecture: llama\nvocab_size: 1000\nhidden_size: 256\nnum_layers: 2\nnum_heads: 4\n"
    "num_kv_heads: 2\nintermediate_size: 688\nmax_seq_len: 512\n"
)


def test_model_yaml_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(GOOD)
    spec = load_model(str(path))
    assert spec.name == "mine" and spec.source == str(path) and spec.num_kv_heads == 2


def _error(tmp_path, text: str, *, suffix: str = ".yaml", loader=load_model) -> str:
    path = tmp_path / f"bad{suffix}"
    path.write_text(text)
    with pytest.raises(ProfileError) as info:
        loader(str(path))
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (GOOD + "hidden: 3\n", "unknown field 'hidden' (did you mean hidden_size?)"),
        (GOOD.replace("num_layers: 2\n", ""), "missing field 'num_layers'"),
        (GOOD.replace("num_layers: 2", "num_layers: two"), "num_layers: expected a number, got 'two'"),
        (GOOD.replace("num_layers: 2", "num_layers: 2.5"), "num_layers: expected an integer"),
        (GOOD + "tied_embeddings: yes please\n", "tied_embeddings: expected true or false"),
        (GOOD.replace("architecture: llama", "architecture: bert"), "allowed: gpt2, llama, mixtral"),
        (GOOD.replace("num_layers: 2", "num_layers: 0"), "num_layers must be a positive integer, got 0"),
        (GOOD.replace("hidden_size: 256", "hidden_size: 250"), "hidden_size 250 is not divisible by num_heads 4"),
        (GOOD.replace("num_kv_heads: 2", "num_kv_heads: 3"), "num_heads 4 is not divisible by num_kv_heads 3"),
        (GOOD + "num_experts: 4\n", "use architecture mixtral"),
        (GOOD + "vocab_size: [1\n", "YAML syntax error at line 10"),
        ("- just\n- a list\n", "expected a mapping of field: value, got a list"),
        ("# only a comment\n", "expected a mapping of field: value, got null"),
    ],
)
def test_model_yaml_errors(tmp_path, text, expected):
    assert expected in _error(tmp_path, text)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"model_type": "bert"}, "unsupported model_type 'bert'; supported: gpt2, llama, mistral, mixtral, qwen2"),
        ({"model_type": "llama", "hidden_size": 64}, "config.json has no 'num_attention_heads'"),
        ({"model_type": "llama", "mlp_bias": True}, "mlp_bias true is not supported"),
    ],
)
def test_hf_config_errors(tmp_path, config, expected):
    assert expected in _error(tmp_path, json.dumps(config), suffix=".json")


def test_hf_config_json_syntax_error(tmp_path):
    assert "JSON syntax error at line 2" in _error(tmp_path, '{"model_type": "llama",\n oops}', suffix=".json")


def test_unknown_names_suggest_close_matches():
    with pytest.raises(ProfileError, match=r"unknown model profile 'llama2-70b'; did you mean llama-2-70b"):
        load_model("llama2-70b")
    with pytest.raises(ProfileError, match=r"did you mean dgx-h100.*shipped profiles: .*cpu-local"):
        load_hardware("dgx-h10")
    with pytest.raises(ProfileError, match="--params 70B"):
        load_model("no-such-model")


def test_missing_files(tmp_path):
    for loader in (load_model, load_hardware):
        with pytest.raises(ProfileError, match="profile '.*nope.yaml' does not exist; check the path"):
            loader(str(tmp_path / "nope.yaml"))
    with pytest.raises(ProfileError, match="model profile '.*config.json' does not exist"):
        load_model(str(tmp_path / "config.json"))


def test_hardware_yaml_errors(tmp_path):
    text = (resources.files("ztune.profiles_data") / "hardware" / "cpu-local.yaml").read_text()
    negative = text.replace("peak_flops_fp32: 204.8e+9", "peak_flops_fp32: -1.0")
    assert "peak_flops_fp32 must be positive, got -1.0" in _error(tmp_path, negative, loader=load_hardware)
    # a rate too small for any hardware is a unit slip; 1e-300 used to overflow the step time (ZeroDivisionError)
    for field, value, message in (
            ("peak_flops_fp32", "204.8", "peak_flops_fp32 is 204.8, under 1e+06; write FLOP/s"),
            ("peak_flops_fp32", "1e-300", "peak_flops_fp32 is 1e-300, under 1e+06"),
            ("inter_node_bw_bytes_per_s", "100", "inter_node_bw_bytes_per_s is 100, under 100000; write bytes/s")):
        slipped = text.replace(_line(text, field), f"{field}: {value}")
        assert message in _error(tmp_path, slipped, loader=load_hardware)
    assert "unknown field 'gpu_mem'" in _error(tmp_path, text + "gpu_mem: 3\n", loader=load_hardware)
    # YAML 1.1 reads 989e12 as a string; the loader accepts it as the number it plainly is.
    path = tmp_path / "sci.yaml"
    path.write_text(text.replace("peak_flops_fp32: 204.8e+9", "peak_flops_fp32: 205e9"))
    assert load_hardware(str(path)).peak_flops_fp32 == 205e9


def test_loading_is_torch_free():
    """Loading profiles imports no torch (the CLI's estimate starts in ~60 ms). How fast it loads is the estimate
    benchmark's to measure (docs/bench/estimate.md, in-process estimate): a wall-clock bound here failed a full
    make test on a loaded 2-core machine (22 ms per load pair against 10 ms; ~0.8 ms idle)."""
    code = (
        "import sys\n"
        "from ztune.profiles import load_model, load_hardware\n"
        "load_model('llama-2-70b'); load_hardware('dgx-h100'); load_model('mixtral-8x7b')\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]\n"
    )
    subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)


@pytest.mark.parametrize("load", [load_hardware, load_model])
def test_profile_files_are_read_up_to_the_config_size_limit(load, tmp_path):
    """A device or a huge file given as a profile is one line (as a config is), not an unbounded read."""
    from ztune.inputs import MAX_FILE_BYTES

    big = tmp_path / "huge.yaml"
    big.write_bytes(b"#" * (MAX_FILE_BYTES + 1))
    for path in (big, "/dev/zero"):
        with pytest.raises(ProfileError, match="larger than 16 MiB; is it the right file"):
            load(str(path))


def _line(text: str, field: str) -> str:
    """The line of `text` that sets `field`."""
    return next(line for line in text.splitlines() if line.startswith(f"{field}:"))
