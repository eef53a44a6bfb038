"""TrainConfig: strict loading, cross-key checks, batch arithmetic, YAML and DeepSpeed JSON round trips."""

import json

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from ztune.config import (
    Checkpointing,
    Compression,
    Offload,
    OptimizerType,
    Precision,
    TrainConfig,
    from_deepspeed,
    from_dict,
    load,
    resolve_batch,
    save,
    to_deepspeed,
    to_dict,
)
from ztune.config.schema import BatchConfig
from ztune.errors import ConfigError

FULL = {
    "zero": {"stage": 3, "offload_optimizer": "cpu", "offload_params": "cpu", "reduce_bucket_numel": 1000,
             "allgather_bucket_numel": 2000, "prefetch_units": 2},
    "precision": "bf16",
    "batch": {"micro": 2, "grad_accum": 4, "global": 64},
    "seq_len": 1024,
    "activations": {"checkpointing": "selective", "every": 2, "offload": "cpu"},
    "compression": {"method": "topk", "topk_ratio": 0.05},
    "optimizer": {"type": "AdamW", "lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1,
                  "momentum": 0.0},
    "gradient_clipping": 1.0,
}


def test_full_yaml_document_loads_into_typed_tree():
    cfg = from_dict(FULL)
    assert cfg.zero.stage == 3 and cfg.zero.offload_params is Offload.CPU
    assert cfg.precision is Precision.BF16
    assert cfg.activations.checkpointing is Checkpointing.SELECTIVE and cfg.activations.every == 2
    assert cfg.compression.method is Compression.TOPK and cfg.compression.topk_ratio == 0.05
    assert cfg.optimizer.betas == (0.9, 0.95)
    assert cfg.batch == BatchConfig(micro=2, grad_accum=4, global_=64)


def test_defaults_when_empty():
    assert from_dict({}) == TrainConfig() == load(None)


def test_yaml_file_round_trip(tmp_path):
    cfg = from_dict(FULL)
    path = save(cfg, tmp_path / "cfg.yaml")
    assert load(path) == cfg
    assert yaml.safe_load(path.read_text())["batch"]["global"] == 64


def test_deepspeed_example_from_issue_loads():
    cfg = from_dict({"train_batch_size": 256, "zero_optimization": {"stage": 3}, "optimizer": {"type": "AdamW"}})
    assert cfg.zero.stage == 3 and cfg.optimizer.type is OptimizerType.ADAMW
    # DeepSpeed's rule for train_batch_size alone: accumulation 1, micro = global / world.
    assert resolve_batch(cfg.batch, 8) == BatchConfig(micro=32, grad_accum=1, global_=256)


def test_deepspeed_full_document_and_ignored_knobs():
    doc = {
        "train_batch_size": 64, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4,
        "gradient_clipping": 0.5, "bf16": {"enabled": True},
        "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                              "overlap_comm": True, "reduce_bucket_size": 5e7},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.8, 0.9], "weight_decay": 0.0}},
        "steps_per_print": 10,
    }
    cfg, ignored = from_deepspeed(doc)
    assert cfg.zero.stage == 2 and cfg.zero.offload_optimizer is Offload.CPU
    assert cfg.zero.reduce_bucket_numel == 50_000_000
    assert cfg.precision is Precision.BF16 and cfg.gradient_clipping == 0.5
    assert cfg.optimizer.lr == 1e-4 and cfg.optimizer.betas == (0.8, 0.9)
    assert set(ignored) == {"zero_optimization.offload_optimizer.pin_memory", "zero_optimization.overlap_comm",
                            "steps_per_print"}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_yaml_to_deepspeed_to_yaml_round_trip(stage, precision, tmp_path):
    doc = json.loads(json.dumps(FULL))
    doc["zero"]["stage"] = stage
    doc["zero"]["offload_params"] = "cpu" if stage == 3 else "none"
    doc["zero"]["offload_optimizer"] = "cpu" if stage else "none"
    doc["precision"] = precision
    doc["compression"] = {"method": "none", "topk_ratio": 0.01}
    cfg = from_dict(doc)
    path = save(cfg, tmp_path / "ds.json", fmt="deepspeed")
    back = load(path)
    # Shared keys survive; ztune-only keys (seq_len, activations, compression, prefetch) take defaults.
    assert back.zero.stage == cfg.zero.stage
    assert back.zero.offload_optimizer == cfg.zero.offload_optimizer
    assert back.zero.offload_params == cfg.zero.offload_params
    assert back.zero.reduce_bucket_numel == cfg.zero.reduce_bucket_numel
    assert back.precision == cfg.precision and back.batch == cfg.batch
    assert back.optimizer == cfg.optimizer and back.gradient_clipping == cfg.gradient_clipping
    assert to_deepspeed(back) == to_deepspeed(cfg)


def test_onebit_adam_maps_to_compression():
    cfg = from_dict({"train_batch_size": 8, "optimizer": {"type": "OneBitAdam", "params": {"lr": 1e-3}}})
    assert cfg.optimizer.type is OptimizerType.ONEBIT_ADAM and cfg.optimizer.freeze_step == 100_000
    assert cfg.compression.method is Compression.ONEBIT
    assert to_deepspeed(cfg)["optimizer"]["type"] == "OneBitAdam"
    # DeepSpeed's absent-key clipping default (1.0) cannot apply to 1-bit Adam: off, and said so.
    _, ignored = from_deepspeed({"train_batch_size": 8, "optimizer": {"type": "OneBitAdam"}})
    assert cfg.gradient_clipping == 0.0 and any(k.startswith("gradient_clipping") for k in ignored)


@pytest.mark.parametrize(
    ("doc", "fragment"),
    [
        ({"zer": {}}, "unknown key 'zer'"),
        ({"zero": {"stage": 4}}, "zero.stage: got 4"),
        ({"zero": {"stag": 1}}, "unknown key 'zero.stag'"),
        ({"zero": {"stage": "two"}}, "zero.stage: expected an integer"),
        ({"zero": {"stage": 2, "offload_params": "cpu"}}, "offload_params: cpu needs zero.stage 3"),
        ({"zero": {"stage": 0, "offload_optimizer": "cpu"}}, "offload_optimizer: cpu needs zero.stage 1, 2 or 3"),
        ({"zero": {"stage": 2, "quantized_weights": True}}, "zero.quantized_weights: ZeRO++ needs zero.stage 3"),
        ({"zero": {"stage": 3, "hpz_partition_size": 0}}, "zero.hpz_partition_size: got 0"),
        ({"zero": {"stage": 3, "quantized_weights": True, "offload_params": "cpu"}},
         "zero.quantized_weights: ZeRO++ does not combine with zero.offload_params: cpu"),
        ({"zero": {"stage": 3, "hpz_partition_size": 2, "offload_params": "cpu"}},
         "zero.hpz_partition_size: ZeRO++ does not combine with zero.offload_params: cpu"),
        ({"train_batch_size": 8, "zero_optimization": {"stage": 3, "zero_quantized_weights": True,
                                                       "offload_param": {"device": "cpu"}}},
         "zero_optimization.zero_quantized_weights: ZeRO++ does not combine with zero_optimization.offload_param: cpu"),
        ({"zero": {"stage": 2, "quantized_gradients": True}}, "zero.quantized_gradients: ZeRO++ needs zero.stage 3"),
        ({"zero": {"stage": 3, "quantized_gradients": True}, "compression": {"method": "int8"}},
         "does not combine with compression.method int8"),
        ({"precision": "int4"}, "precision: got 'int4'; allowed: bf16, fp16, fp32"),
        ({"batch": {"micro": 0}}, "batch.micro: got 0"),
        ({"batch": {"micro": 3, "grad_accum": 2, "global": 16}}, "not a multiple of micro 3 x grad_accum 2"),
        ({"optimizer": {"betas": [0.9]}}, "optimizer.betas: expected a list of 2"),
        ({"optimizer": {"betas": [0.9, 1.5]}}, "optimizer.betas[1]"),
        ({"compression": {"method": "topk", "topk_ratio": 2}}, "topk_ratio"),
        ({"seq_len": True}, "seq_len: expected an integer"),
        ({"gradient_clipping": float("nan")}, "finite"),
        (["not", "a", "mapping"], "expected a mapping"),
        ({"train_batch_size": 8, "zero_optimization": {"offload_param": {"device": "nvme"}}}, "nvme"),
        ({"train_batch_size": 8, "bf16": {"enabled": True}, "fp16": {"enabled": True}}, "both true"),
        ({"train_batch_size": 8, "optimizer": {"type": "Lion"}}, "optimizer.type: got 'Lion'"),
        ({"train_batch_size": 8, "mystery": 1}, "unknown DeepSpeed key 'mystery'"),
    ],
)
def test_bad_documents_name_the_key(doc, fragment):
    with pytest.raises(ConfigError) as info:
        from_dict(doc)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_batch_resolution_per_world_size():
    assert resolve_batch(BatchConfig(micro=2), 4) == BatchConfig(micro=2, grad_accum=1, global_=8)
    assert resolve_batch(BatchConfig(micro=2, global_=32), 4) == BatchConfig(micro=2, grad_accum=4, global_=32)
    with pytest.raises(ConfigError, match="batch.global 32 is not divisible by batch.micro 2 x 3 ranks"):
        resolve_batch(BatchConfig(micro=2, global_=32), 3)
    with pytest.raises(ConfigError, match="do not multiply out"):
        resolve_batch(BatchConfig(micro=2, grad_accum=2, global_=32), 4)


def test_file_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("zero: {stage: 2\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load(bad)
    badj = tmp_path / "bad.json"
    badj.write_text('{"train_batch_size": }')
    with pytest.raises(ConfigError, match="not valid JSON at line 1"):
        load(badj)


def test_save_is_atomic_and_keeps_old_file_on_error(tmp_path):
    path = save(from_dict(FULL), tmp_path / "cfg.yaml")
    before = path.read_text()
    with pytest.raises(ConfigError):
        save(from_dict(FULL), path, fmt="toml")
    assert path.read_text() == before


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**9), st.floats(allow_nan=True),
                     st.text(max_size=8), st.sampled_from(["cpu", "none", "bf16", "full", "AdamW", "topk"]))
_keys = st.one_of(st.sampled_from(sorted(FULL) + ["train_batch_size", "zero_optimization", "bf16", "optimizer",
                                                   "stage", "micro", "global", "params", "device", "type"]),
                  st.text(max_size=6))
_docs = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(_keys, inner, max_size=4)), max_leaves=12)


@settings(max_examples=400, deadline=None)
@given(_docs)
def test_loader_never_raises_anything_but_config_error(doc):
    try:
        cfg = from_dict(doc)
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc)
    else:
        assert isinstance(cfg, TrainConfig)
        assert from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize(("doc", "message"), [
    ({"optimizer": {"type": "SGD", "betas": [0.8, 0.9]}}, "optimizer.betas: SGD has no betas"),
    ({"optimizer": {"type": "SGD", "eps": 1e-6}}, "optimizer.eps: SGD has no eps"),
    ({"optimizer": {"type": "SGD", "bias_correction": False}}, "optimizer.bias_correction: SGD has no"),
    ({"optimizer": {"type": "AdamW", "momentum": 0.9}}, "optimizer.momentum: AdamW has no momentum"),
])
def test_settings_the_run_would_not_use_are_errors(doc, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(doc)


def test_deepspeed_sgd_with_adam_only_params_names_the_key_as_written():
    with pytest.raises(ConfigError, match=r"^optimizer\.params\.betas: SGD has no betas"):
        from_deepspeed({"train_batch_size": 8,
                        "optimizer": {"type": "SGD", "params": {"lr": 0.1, "betas": [0.9, 0.99]}}})
    cfg, _ = from_deepspeed({"train_batch_size": 8,
                             "optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}}})
    assert cfg.optimizer.momentum == 0.9


_LONG = "x" * 10_000


@pytest.mark.parametrize("doc", [
    {"train_batch_size": 8, "zero_optimization": {"stage": 1, "offload_optimizer": {"device": _LONG}}},
    {"train_batch_size": 8, "zero_optimization": {"stage": 1, "offload_optimizer": [_LONG]}},
    {"train_batch_size": 8, "communication_data_type": _LONG},
    {"train_batch_size": 8, "bf16": {"enabled": _LONG}},
    {"train_batch_size": 8, "optimizer": {"type": "Adam", "params": {"adam_w_mode": _LONG}}},
    {"train_batch_size": 8, "optimizer": {"type": "AdamW", "params": {"torch_adam": _LONG}}},
    {"train_batch_size": 8, "gradient_clipping": _LONG},
    {"train_batch_size": 8, "scheduler": {"type": "WarmupLR", "params": {"warmup_type": _LONG}}},
    {"train_batch_size": 8, "flops_profiler": {"profile_step": _LONG}},
    {"zero": {"stage": _LONG}},
    {"optimizer": {"type": "OneBitAdam", "onebit_scale": _LONG}},
])
def test_a_long_value_is_shown_cut(doc):
    """Every message that shows a config value shows it through one helper (errors.describe), cut to 60
    characters: a 10 kB value was printed whole by the DeepSpeed importer's own checks."""
    with pytest.raises(ConfigError) as info:
        from_dict(doc)
    text = str(info.value)
    assert "xxx..." in text and len(text) < 300, text[:300]


@pytest.mark.parametrize("doc", [{"x" * 10000: 1}, {"zero": {"y" * 10000: 1}}, {"a\nb": 1}])
def test_ztune_yaml_unknown_keys_are_shown_cut_and_on_one_line(doc):
    with pytest.raises(ConfigError) as info:
        load(doc)
    assert "\n" not in str(info.value) and "x" * 61 not in str(info.value) and "y" * 61 not in str(info.value)
