"""The DeepSpeed config layer against DeepSpeed 0.19.8 itself: batch derivation for every combination of the
three batch keys on several world sizes (DeepSpeed's DeepSpeedConfig as the reference), keys DeepSpeed
accepts, legacy keys, "auto" values, the ztune block, and errors that name the key as the user wrote it."""

from __future__ import annotations

import itertools
import json
import re

import pytest

from tests.helpers.deepspeed_ref import ds_batch
from ztune.config import (
    DEEPSPEED_BATCH_KEYS,
    AutoContext,
    Checkpointing,
    Offload,
    Precision,
    from_deepspeed,
    load_detailed,
    resolve_batch,
)
from ztune.config.deepspeed import to_deepspeed
from ztune.config.deepspeed_keys import IGNORED, KEYS, NEUTRAL, REJECTED
from ztune.errors import ConfigError

TOTALS, MICROS, ACCUMS = (1, 6, 16, 32, 33, 48), (1, 2, 4, 16), (1, 2, 3)
WORLDS = (1, 2, 3, 4, 8)


def _combinations():
    keys = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
    grids = dict(zip(keys, (TOTALS, MICROS, ACCUMS), strict=True))
    for r in range(0, 4):
        for chosen in itertools.combinations(keys, r):
            for values in itertools.product(*(grids[k] for k in chosen)):
                yield dict(zip(chosen, values, strict=True))


def _ztune_batch(doc: dict, world_size: int) -> tuple[int, int, int] | str:
    try:
        cfg, _ = from_deepspeed(doc)
        b = resolve_batch(cfg.batch, world_size, keys=DEEPSPEED_BATCH_KEYS)
    except ConfigError:
        return "error"
    return b.global_, b.micro, b.grad_accum


def test_batch_derivation_equals_deepspeed_for_every_combination():
    docs = list(_combinations())
    combos = {tuple(sorted(d)) for d in docs}
    assert len(combos) == 8  # the 7 non-empty combinations and the empty one
    checked = errors = 0
    for doc, world in itertools.product(docs, WORLDS):
        want = ds_batch(doc, world)
        assert _ztune_batch(doc, world) == want, (doc, world)
        checked += 1
        errors += want == "error"
    assert 0 < errors < checked  # both outcomes are exercised


@pytest.mark.parametrize(("doc", "world", "want"), [
    ({"train_batch_size": 32}, 2, (32, 16, 1)),  # issue #11 input 1
    ({"train_batch_size": 16, "gradient_accumulation_steps": 2}, 2, (16, 4, 2)),  # input 2
    ({"train_batch_size": 256, "zero_optimization": {"stage": 3}, "optimizer": {"type": "AdamW"}}, 8, (256, 32, 1)),
])
def test_issue_inputs(doc, world, want):
    assert _ztune_batch(doc, world) == want == ds_batch(doc, world)


def test_batch_errors_name_deepspeed_keys():
    cfg, _ = from_deepspeed({"train_batch_size": 33, "train_micro_batch_size_per_gpu": 4})
    with pytest.raises(ConfigError, match="train_batch_size 33 is not divisible by train_micro_batch_size_per_gpu 4"):
        resolve_batch(cfg.batch, 2, keys=DEEPSPEED_BATCH_KEYS)
    with pytest.raises(ConfigError, match="^train_batch_size: got 0; must be > 0"):
        from_deepspeed({"train_batch_size": 0})
    with pytest.raises(ConfigError, match="^train_micro_batch_size_per_gpu: expected an integer"):
        from_deepspeed({"train_micro_batch_size_per_gpu": "four"})
    with pytest.raises(ConfigError, match="set train_batch_size or train_micro_batch_size_per_gpu"):
        from_deepspeed({"gradient_accumulation_steps": 2, "fp16": {"enabled": False}})


def test_legacy_cpu_offload_is_optimizer_offload():
    cfg, ignored = from_deepspeed({"train_batch_size": 8, "zero_optimization": {"stage": 2, "cpu_offload": True}})
    assert cfg.zero.offload_optimizer is Offload.CPU and ignored == []
    cfg, _ = from_deepspeed({"train_batch_size": 8, "zero_optimization": {"stage": 3, "cpu_offload_param": True,
                                                                           "cpu_offload": False}})
    assert cfg.zero.offload_params is Offload.CPU and cfg.zero.offload_optimizer is Offload.NONE
    with pytest.raises(ConfigError, match="zero_optimization.cpu_offload and zero_optimization.offload_optimizer"):
        from_deepspeed({"train_batch_size": 8, "zero_optimization": {"stage": 2, "cpu_offload": True,
                                                                      "offload_optimizer": {"device": "cpu"}}})


def test_offload_where_deepspeed_does_not_use_it_is_listed_as_ignored():
    cfg, ignored = from_deepspeed({"train_batch_size": 8, "zero_optimization": {
        "stage": 2, "offload_param": {"device": "cpu"}}})
    assert cfg.zero.offload_params is Offload.NONE and ignored == ["zero_optimization.offload_param"]
    cfg, ignored = from_deepspeed({"train_batch_size": 8, "zero_optimization": {"stage": 0, "cpu_offload": True}})
    assert cfg.zero.offload_optimizer is Offload.NONE and ignored == ["zero_optimization.cpu_offload"]


def test_precision_blocks_deepspeed_accepts_load():
    cfg, ignored = from_deepspeed({"train_batch_size": 8, "fp16": {"enabled": False,
                                                                    "fp16_master_weights_and_grads": False}})
    assert cfg.precision is Precision.FP32 and ignored == ["fp16.fp16_master_weights_and_grads"]
    cfg, ignored = from_deepspeed({"train_batch_size": 8, "bf16": {"enabled": True, "loss_scale": 0}})
    assert cfg.precision is Precision.BF16 and ignored == ["bf16.loss_scale"]
    cfg, ignored = from_deepspeed({"train_batch_size": 8, "bfloat16": {"enabled": True, "immediate_grad_update": 1}})
    assert cfg.precision is Precision.BF16 and ignored == ["bfloat16.immediate_grad_update"]


@pytest.mark.parametrize(("doc", "fragment"), [
    ({"fp16": {"enabled": True, "fp16_master_weights_and_grads": True}},
     "fp16.fp16_master_weights_and_grads: ztune keeps fp32 master weights"),
    ({"bf16": {"enabled": True, "loss_scale": 128}}, "bf16.loss_scale: bf16 is never loss-scaled"),
    ({"bf16": {"enabled": True, "bf16_optimizer_states": True}}, "bf16.bf16_optimizer_states"),
    ({"zero_optimization": {"stage": 3, "zero_quantized_gradients": True},
      "optimizer": {"type": "OneBitAdam", "params": {"lr": 1e-3}}},
     "zero_optimization.zero_quantized_gradients: ZeRO++ qgZ quantizes the gradient exchange itself"),
    ({"zero_optimization": {"stage": 3, "zero_hpz_partition_size": -1}}, "zero_optimization.zero_hpz_partition_size"),
    ({"zero_optimization": {"stage": 2, "zenflow": {}}}, "zero_optimization.zenflow: ZenFlow"),
    ({"zero_optimization": {"stage": 5}}, "zero_optimization.stage: got 5"),
    ({"zero_optimization": {"reduce_bucket_size": "big"}}, "zero_optimization.reduce_bucket_size: expected an integer"),
    ({"zero_optimization": {"reduce_bucket_size": 0}}, "zero_optimization.reduce_bucket_size: got 0"),
    ({"zero_optimization": {"overlap_com": True}}, "unknown key 'zero_optimization.overlap_com'"),
    ({"bf16": {"enabled": True, "bogus": 1}}, "unknown key 'bf16.bogus'; allowed here: "),
    ({"pipeline": {"stages": 2}}, "pipeline: pipeline parallelism is not implemented"),
    ({"amp": {"enabled": True}}, "amp: NVIDIA Apex AMP"),
    ({"scheduler": {"type": "StepLr", "params": {}}}, "scheduler.type: got 'StepLr'"),
    ({"scheduler": {"type": "LambdaLR", "params": {}}}, "scheduler.type: LambdaLR needs lr_lambda"),
    ({"managed_gradient_accumulation": False}, "managed_gradient_accumulation: DeepSpeed 0.19.8's unmanaged mode"),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_step": 10}}},
     "unknown key 'scheduler.params.warmup_num_step'"),
    ({"fp16": {"enabled": True, "hysteresis": 0}}, "fp16.hysteresis: got 0"),
    ({"sequence_parallel_size": 2}, "sequence_parallel_size: sequence parallelism"),
    ({"gradient_clipping": -1}, "gradient_clipping: got -1"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": -1.0}}}, "optimizer.params.lr: got -1.0"),
    ({"optimizer": {"params": {"lr": "auto"}}}, "optimizer.params.lr: \"auto\" is filled in by the Hugging Face"),
    ({"gradient_clipping": "auto"}, "gradient_clipping: \"auto\""),
    ({"zero_optimization": {"reduce_bucket_size": "auto"}}, "zero_optimization.reduce_bucket_size: \"auto\" is "
                                                            "hidden_size * hidden_size"),
    ({"ztune": {"activations": {"checkpointing": "most"}}}, "ztune.activations.checkpointing: got 'most'"),
    ({"ztune": {"activations": {"every": 0}}}, "ztune.activations.every: got 0"),
    ({"ztune": {"zero": {}}}, "unknown key 'ztune.zero'"),
    ({"train_batch_size": 10**9}, "train_batch_size: got 1000000000; at most"),
    ({"gradient_clipping": 0, "optimizer": {"type": "OneBitAdam", "params": {"freeze_step": 2}},
      "zero_optimization": {"stage": 3, "zero_quantized_gradients": True}},
     "zero_optimization.zero_quantized_gradients: ZeRO++ qgZ quantizes the gradient exchange itself; it does not "
     "combine with optimizer.type OneBitAdam"),
    ({"train_micro_batch_size_per_gpu": 10**8}, "train_micro_batch_size_per_gpu: got 100000000; at most"),
    ({"gradient_accumulation_steps": 10**8}, "gradient_accumulation_steps: got 100000000; at most"),
])
def test_errors_name_the_key_as_written(doc, fragment):
    with pytest.raises(ConfigError) as info:
        from_deepspeed({"train_batch_size": 8, **doc})
    assert fragment in str(info.value)
    assert "batch.micro" not in str(info.value) and "reduce_bucket_numel" not in str(info.value)


def test_disabled_rejected_features_load():
    """A disabled block of a feature ztune lacks and DeepSpeed 0.19.8 still has is listed as ignored; one DeepSpeed
    removed is refused even disabled, as DeepSpeed refuses it (amp was listed as ignored)."""
    _, ignored = from_deepspeed({"train_batch_size": 8, "torch_autocast": {"enabled": False},
                                 "gradient_allreduce_op": "mean", "sequence_parallel_size": 1})
    assert ignored == ["torch_autocast", "gradient_allreduce_op", "sequence_parallel_size"]
    with pytest.raises(ConfigError, match=r"^amp: NVIDIA Apex AMP was removed in DeepSpeed 0\.19\.8, .*use fp16 or "
                                          r"bf16; remove it$"):
        from_deepspeed({"train_batch_size": 8, "amp": {"enabled": False}})


def test_auto_values_are_derived_from_the_model_or_rejected():
    hf_zero3 = {
        "fp16": {"enabled": "auto", "loss_scale": 0, "initial_scale_power": 16},
        "bf16": {"enabled": "auto"},
        "zero_optimization": {"stage": 3, "overlap_comm": True, "reduce_bucket_size": "auto",
                              "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
                              "stage3_gather_16bit_weights_on_model_save": True},
        "gradient_accumulation_steps": "auto", "train_batch_size": "auto", "train_micro_batch_size_per_gpu": 4,
        "steps_per_print": 2000, "wall_clock_breakdown": False,
    }
    cfg, ignored = from_deepspeed(hf_zero3, context=AutoContext(hidden_size=64, precision=Precision.BF16))
    assert cfg.precision is Precision.BF16 and cfg.zero.reduce_bucket_numel == 64 * 64
    assert resolve_batch(cfg.batch, 2, keys=DEEPSPEED_BATCH_KEYS).global_ == 8  # micro 4 x accum 1 x 2
    assert "zero_optimization.stage3_prefetch_bucket_size" in ignored
    cfg, _ = from_deepspeed(hf_zero3, context=AutoContext(hidden_size=64, precision=Precision.FP32))
    assert cfg.precision is Precision.FP32
    with pytest.raises(ConfigError, match=r"^fp16.enabled: \"auto\" is derived from the model's parameter dtype"):
        from_deepspeed(hf_zero3, context=AutoContext(hidden_size=64))
    with pytest.raises(ConfigError, match=r"^train_micro_batch_size_per_gpu: \"auto\" cannot be derived"):
        from_deepspeed({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1})


def test_activation_checkpointing_block_and_ztune_block():
    doc = {"train_batch_size": 8,
           "activation_checkpointing": {"partition_activations": True, "cpu_checkpointing": True,
                                        "contiguous_memory_optimization": False, "number_checkpoints": 4,
                                        "synchronize_checkpoint_boundary": False, "profile": False},
           "ztune": {"activations": {"checkpointing": "full", "every": 2, "offload": "none"}}}
    cfg, ignored = from_deepspeed(doc)
    assert cfg.activations.checkpointing is Checkpointing.FULL and cfg.activations.every == 2
    assert ignored == [f"activation_checkpointing.{k}" for k in doc["activation_checkpointing"]]
    with pytest.raises(ConfigError, match="unknown key 'activation_checkpointing.partition'"):
        from_deepspeed({"train_batch_size": 8, "activation_checkpointing": {"partition": True}})


def test_ignored_keys_are_returned_by_load(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"train_batch_size": 8, "steps_per_print": 5, "zero_optimization": {"stage": 1, '
                    '"overlap_comm": true, "contiguous_gradients": true}}')
    loaded = load_detailed(path)
    assert loaded.deepspeed and loaded.ignored == ("steps_per_print", "zero_optimization.overlap_comm",
                                                   "zero_optimization.contiguous_gradients")
    assert loaded.batch_keys is DEEPSPEED_BATCH_KEYS


def test_key_table_covers_deepspeeds_config_models():
    """Every field of DeepSpeed 0.19.8's ZeRO, offload, fp16 and bf16 config models has a rule here."""
    from tests.helpers.deepspeed_ref import import_deepspeed

    import_deepspeed()
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from deepspeed.runtime.zero.offload_config import (
        DeepSpeedZeroOffloadOptimizerConfig,
        DeepSpeedZeroOffloadParamConfig,
    )

    for prefix, model in (("zero_optimization", DeepSpeedZeroConfig), ("fp16", DeepSpeedFP16Config),
                          ("bf16", DeepSpeedBF16Config),
                          ("zero_optimization.offload_optimizer", DeepSpeedZeroOffloadOptimizerConfig),
                          ("zero_optimization.offload_param", DeepSpeedZeroOffloadParamConfig)):
        for name, field in model.model_fields.items():
            # DeepSpeed accepts a field by its alias (stage3_max_live_parameters) and by its name
            # (max_live_parameters): DeepSpeedConfigModel sets populate_by_name=True.
            assert model.model_config.get("populate_by_name"), model
            for key in {f"{prefix}.{name}", f"{prefix}.{field.alias or name}"}:
                assert key in KEYS, key
    for key, r in KEYS.items():
        assert r.status in ("supported", IGNORED, NEUTRAL, REJECTED) and r.note, key


def test_keys_deepspeed_removed_are_rejected_as_deepspeed_rejects_them():
    """DeepSpeed 0.19.8 refuses the keys of its removed features (MiCS, sparse_gradients, ...) whatever their value
    and stage; ztune refuses them too, naming the key (zero_optimization.mics_shard_size was listed as ignored)."""
    from unittest import mock

    from tests.helpers.deepspeed_ref import import_deepspeed

    import_deepspeed()
    import deepspeed.runtime.config as ds_config

    removed = [*ds_config._REMOVED_TOP_LEVEL_CONFIG_KEYS,
               *(f"zero_optimization.{k}" for k in ds_config._REMOVED_ZERO_CONFIG_KEYS)]
    assert "zero_optimization.mics_shard_size" in removed and "sparse_gradients" in removed
    for key in removed:
        assert KEYS[key].status == REJECTED, key
        *block, name = key.split(".")
        for stage, value in ((3, 1), (1, False), (1, {"enabled": False})):
            zero = {"stage": stage}
            doc = {"train_batch_size": 8, "zero_optimization": zero}
            (zero if block else doc)[name] = value
            with mock.patch.object(ds_config.dist, "get_rank", lambda *a, **k: 0), \
                    mock.patch.object(ds_config.dist, "get_world_size", lambda *a, **k: 1), \
                    pytest.raises(ds_config.DeepSpeedConfigError):
                ds_config.DeepSpeedConfig(json.loads(json.dumps(doc)))
            with pytest.raises(ConfigError, match=f"^{re.escape(key)}: .*; remove it$"):
                from_deepspeed(doc)


def test_fp16_scaler_keys_read_with_deepspeeds_meaning():
    keys = {"enabled": True, "loss_scale": 0, "initial_scale_power": 8, "loss_scale_window": 500,
            "min_loss_scale": 1024, "hysteresis": 2, "consecutive_hysteresis": True}
    cfg, ignored = from_deepspeed({"train_batch_size": 8, "fp16": keys})
    assert cfg.precision is Precision.FP16 and ignored == []
    ls = cfg.loss_scaling
    assert (ls.loss_scale, ls.initial_scale_power, ls.loss_scale_window, ls.min_loss_scale, ls.hysteresis,
            ls.consecutive_hysteresis) == (0, 8, 500, 1024, 2, True)
    cfg, _ = from_deepspeed({"train_batch_size": 8, "fp16": {"enabled": True, "loss_scale": 128}})
    assert cfg.loss_scaling.loss_scale == 128
    # A disabled block's settings have no effect in DeepSpeed: listed as ignored, whatever their values.
    cfg, ignored = from_deepspeed({"train_batch_size": 8, "fp16": {**keys, "enabled": False, "loss_scale": 128}})
    assert cfg.precision is Precision.FP32 and "fp16.loss_scale" in ignored
    with pytest.raises(ConfigError, match="unknown key 'fp16.scale'"):
        from_deepspeed({"train_batch_size": 8, "fp16": {"enabled": False, "scale": 1}})


def test_zeropp_keys_map_at_stage_3_and_are_ignored_below():
    """DeepSpeed reads zero_quantized_weights / zero_hpz_partition_size in its stage-3 code only; hpZ is on for
    a size > 1 (0 and 1: off)."""
    def load(stage, qwz, hpz):
        return from_deepspeed({"train_batch_size": 8, "zero_optimization": {
            "stage": stage, "zero_quantized_weights": qwz, "zero_hpz_partition_size": hpz,
            "zero_quantized_gradients": qwz}})

    cfg, ignored = load(3, True, 8)
    z = cfg.zero
    assert z.quantized_weights and z.hpz_partition_size == 8 and z.quantized_gradients and ignored == []
    for stage, qwz, hpz in ((2, True, 8), (3, False, 1), (3, False, 0)):
        cfg, ignored = load(stage, qwz, hpz)
        z = cfg.zero
        assert not z.quantized_weights and z.hpz_partition_size == 1 and not z.quantized_gradients
        assert sorted(ignored) == ["zero_optimization.zero_hpz_partition_size",
                                   "zero_optimization.zero_quantized_gradients",
                                   "zero_optimization.zero_quantized_weights"]
    doc = to_deepspeed(load(3, True, 4)[0])["zero_optimization"]
    assert doc["zero_quantized_weights"] is True and doc["zero_quantized_gradients"] is True
    assert doc["zero_hpz_partition_size"] == 4


@pytest.mark.parametrize("doc", [{"train_batch_size": 8}, {"train_batch_size": 8, "gradient_clipping": 0},
                                 {"train_batch_size": 8, "gradient_clipping": 0.5}])
def test_gradient_clipping_default_is_deepspeeds(doc):
    """DeepSpeed 0.19.8 clips at 1.0 when the key is absent (its GRADIENT_CLIPPING_DEFAULT)."""
    from unittest import mock

    from tests.helpers.deepspeed_ref import import_deepspeed

    import_deepspeed()
    import deepspeed.runtime.config as ds_config

    with mock.patch.object(ds_config.dist, "get_rank", lambda *a, **k: 0), \
            mock.patch.object(ds_config.dist, "get_world_size", lambda *a, **k: 2):
        want = ds_config.DeepSpeedConfig(dict(doc)).gradient_clipping
    cfg, _ = from_deepspeed(dict(doc))
    assert cfg.gradient_clipping == want == doc.get("gradient_clipping", 1.0)


@pytest.mark.parametrize(("params", "want"), [
    ({"torch_adam": True}, 0.01),  # torch.optim.AdamW(lr=...) with torch's default weight_decay
    ({"torch_adam": True, "weight_decay": 0.0}, 0.0),
    ({"torch_adam": True, "adam_w_mode": False}, 0.0),  # torch.optim.Adam: default 0
    ({}, 0.0),  # DeepSpeed's own Adam: 0
])
def test_torch_adam_default_weight_decay_is_torchs(params, want):
    cfg, ignored = from_deepspeed({"train_batch_size": 8, "optimizer": {"type": "Adam", "params": params}})
    assert cfg.optimizer.weight_decay == want
    assert "optimizer.params.torch_adam" not in ignored


@pytest.mark.parametrize(("extra", "compression", "message"), [
    ({"communication_data_type": "bf16"}, "bf16", None),  # DeepSpeed casts to bf16 to reduce: ztune's bf16 wire
    ({"communication_data_type": "FP32"}, "none", None),  # the compute dtype, any case
    ({"communication_data_type": "bf16", "bf16": {"enabled": True}}, "none", None),
    ({"communication_data_type": None}, "none", None),  # null: decided by the precision, as in DeepSpeed
    ({"communication_data_type": "int3"}, None, "communication_data_type: got 'int3'; allowed: fp16, bf16, fp32"),
    ({"communication_data_type": "fp16"}, None, "communication_data_type: fp16 under fp32 training is not supported"),
    ({"communication_data_type": "fp32", "bf16": {"enabled": True}}, None,
     "communication_data_type: fp32 under bf16 training is not supported"),
])
def test_communication_data_type_is_honoured_or_refused(extra, compression, message):
    """DeepSpeed reduces gradients cast to communication_data_type; it was listed as ignored, so fp32 with bf16
    silently reduced in fp32 and bf16 training asked to reduce in fp32 silently reduced in bf16."""
    doc = {"train_batch_size": 8, **extra}
    if message is not None:
        with pytest.raises(ConfigError, match=message):
            from_deepspeed(doc)
        return
    cfg, ignored = from_deepspeed(doc)
    assert cfg.compression.method.value == compression and "communication_data_type" not in ignored
    back = to_deepspeed(cfg)
    assert back.get("communication_data_type") == ("bf16" if compression == "bf16" else None)
    assert from_deepspeed(back)[0].compression == cfg.compression


@pytest.mark.parametrize("path", ["aio.thread_count", "checkpoint.foo", "checkpoint.writer.foo",
                                  "checkpoint.parallel_write.foo", "flops_profiler.profile_steps", "timers.foo",
                                  "comms_logger.foo", "comet.foo", "tensorboard.foo", "timers.throughput.foo"])
def test_unknown_keys_inside_ignored_blocks_load_exactly_when_deepspeed_loads_them(path):
    """DeepSpeed 0.19.8 reads aio, checkpoint, flops_profiler and timers key by key and skips a key it does not
    know (aio.thread_count, from widely copied ZeRO-Infinity configs, was refused); its pydantic blocks
    (comms_logger, the monitors, timers.throughput) refuse one. ztune does as DeepSpeed does."""
    from unittest import mock

    from tests.helpers.deepspeed_ref import import_deepspeed

    import_deepspeed()
    import deepspeed.runtime.config as ds_config

    doc: dict = {"train_batch_size": 8}
    *blocks, name = path.split(".")
    inner = doc
    for b in blocks:
        inner = inner.setdefault(b, {})
    inner[name] = 1
    with mock.patch.object(ds_config.dist, "get_rank", lambda *a, **k: 0), \
            mock.patch.object(ds_config.dist, "get_world_size", lambda *a, **k: 1):
        try:
            ds_config.DeepSpeedConfig(json.loads(json.dumps(doc)))
            deepspeed_loads = True
        except Exception:  # noqa: BLE001 -- pydantic's ValidationError and DeepSpeed's own
            deepspeed_loads = False
    if deepspeed_loads:
        _, ignored = from_deepspeed(doc)
        assert blocks[0] in ignored
    else:
        with pytest.raises(ConfigError, match=f"unknown key '{re.escape(path)}'"):
            from_deepspeed(doc)
    assert deepspeed_loads == (".".join(blocks) in {"aio", "checkpoint", "checkpoint.writer",
                                                    "checkpoint.parallel_write", "flops_profiler", "timers"})


@pytest.mark.parametrize("doc", [{"x" * 10000: 1}, {"optimizer": {"type": "y" * 10000}},
                                 {"scheduler": {"type": "z" * 10000}},
                                 {"optimizer": {"type": "AdamW", "params": {"w" * 10000: 1}}},
                                 {"scheduler": {"type": "WarmupLR", "params": {"v" * 10000: 1}}},
                                 {"ztune": {"u" * 10000: 1}}, {"zero_optimization": {"t" * 10000: 1}},
                                 {"a.b\nc" * 2000: 1}, {"comms_logger": {"a\nb": 1}}])
def test_a_key_or_type_name_the_user_wrote_is_shown_cut_and_on_one_line(doc):
    """Unknown key names and optimizer/scheduler type names went into the message whole: a 10 kB key made a
    10 kB error, a key with a newline two lines (errors.shown_key, errors.describe)."""
    with pytest.raises(ConfigError) as info:
        from_deepspeed({"train_batch_size": 8, **doc})
    text = str(info.value)
    assert "\n" not in text and not any(c * 61 in text for c in "xyzwvut"), text[:500]
