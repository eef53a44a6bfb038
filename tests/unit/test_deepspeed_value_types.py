"""Every DeepSpeed key whose value ztune does not read as a setting (ignored and neutral keys, a disabled
precision block's keys) is still type-checked against DeepSpeed's type for it: a wrong type is one line naming
the key as written and the type expected, as DeepSpeed's pydantic models refuse it. Values DeepSpeed accepts
load, and ignored keys are listed."""

import json
import re

import pytest

from ztune.config import from_deepspeed
from ztune.config.deepspeed_keys import (
    BOOL,
    COUNT,
    DTYPE,
    FRACTION,
    IGNORED,
    INT,
    KEYS,
    KINDS,
    LIST,
    MAPPING,
    NEUTRAL,
    NUMBER,
    STRING,
    STRINGS,
    children,
)
from ztune.errors import ConfigError

# A value of the wrong type for each kind, and the message DeepSpeed's type gives.
_WRONG = {BOOL: ("garbage", "expected true or false"), INT: ("garbage", "expected an integer"),
          COUNT: ("garbage", "expected an integer"), NUMBER: ("garbage", "expected a number"),
          FRACTION: ("garbage", "expected a number"), STRING: (3, "expected a string"),
          MAPPING: (3, "expected a mapping"), DTYPE: (3, "got 3; allowed: fp16, bf16, fp32"),
          LIST: ("x", "expected a list"), STRINGS: ([1], "expected a list of strings")}
# A value of the right type for each kind (for an ignored key: listed as ignored).
_GOOD = {BOOL: True, INT: 1, COUNT: 1, NUMBER: 1.0, FRACTION: 0.5, STRING: "x", MAPPING: {}, DTYPE: "fp16",
         LIST: [], STRINGS: ["x"]}

UNREAD = sorted(k for k, r in KEYS.items() if r.status in (IGNORED, NEUTRAL))


def _doc(key: str, value) -> dict:
    """A DeepSpeed config holding `value` at dotted `key` (enclosing blocks made valid to reach it)."""
    doc: dict = {"train_batch_size": 8}
    *blocks, last = key.split(".")
    node = doc
    for name in blocks:
        node = node.setdefault(name, {})
        if name in ("fp16", "bf16"):
            node["enabled"] = True
        if name in ("offload_optimizer", "offload_param"):
            node["device"] = "none"
    node[last] = value
    return doc


def _base(kind: str) -> str:
    return kind.partition(" or ")[0]


def test_every_unread_key_has_deepspeeds_type():
    for key in UNREAD:
        assert KEYS[key].kind in KINDS, key
    for kind in KINDS:  # check_kind reads "X or null" as X, null allowed: no other " or " in a kind's name
        assert kind.partition(" or ")[2] in ("", "null"), kind
    for key in ("fp16.loss_scale", "fp16.hysteresis", "fp16.loss_scale_window", "fp16.min_loss_scale",
                "fp16.initial_scale_power", "fp16.consecutive_hysteresis", "bf16.check_grad_overflow"):
        assert KEYS[key].kind in KINDS, key


@pytest.mark.parametrize("key", UNREAD)
def test_a_wrong_type_is_refused_naming_the_key(key):
    value, message = _WRONG[_base(KEYS[key].kind)]
    if KEYS[key].kind.endswith(" or null"):  # the message says that null is allowed too
        message = ("expected true, false or null" if message == "expected true or false"
                   else message + " or null" if message.startswith("expected ") else message)  # "...), or null"
    with pytest.raises(ConfigError, match="^" + re.escape(f"{key}: {message}")):
        from_deepspeed(_doc(key, value))


@pytest.mark.parametrize("key", sorted(k for k in UNREAD if KEYS[k].status == IGNORED))
def test_an_ignored_key_of_the_right_type_is_listed(key):
    good = KEYS[key].choices[0].lower() if KEYS[key].choices else _GOOD[_base(KEYS[key].kind)]
    _, ignored = from_deepspeed(_doc(key, good))
    # the key itself, or the ignored block that holds it (flops_profiler for flops_profiler.enabled)
    parts = key.split(".")
    listed = next(p for p in (".".join(parts[:n]) for n in range(1, len(parts) + 1))
                  if KEYS.get(p) and KEYS[p].status == IGNORED)
    assert listed in ignored


@pytest.mark.parametrize("key, value", [
    # the reported case: a quoted boolean on a neutral key is a type error, not "not implemented"
    ("zero_optimization.zero_quantized_nontrainable_weights", "false"),
    ("managed_gradient_accumulation", "true"),
    ("fp16.fp16_master_weights_and_grads", 0),
    ("bf16.bf16_optimizer_states", "false"),
    ("sequence_parallel_size", True),  # True == 1 in Python: still no integer
    ("sequence_parallel_size", "1"),
    ("gradient_allreduce_op", 1),
])
def test_a_neutral_key_of_the_wrong_type_says_what_type(key, value):
    with pytest.raises(ConfigError) as info:
        from_deepspeed(_doc(key, value))
    text = str(info.value)
    assert text.startswith(f"{key}: expected ") and "not implemented" not in text, text


def test_ignored_keys_take_what_deepspeed_takes():
    """DeepSpeed's pydantic fields coerce 1 / "true" to a boolean, integral floats and numeric strings to an
    integer; an Optional field takes null; "auto" is dropped before validation."""
    zero = {"stage": 3, "overlap_comm": None, "contiguous_gradients": 1, "reduce_scatter": "true",
            "stage3_max_live_parameters": 1e9, "sub_group_size": "100", "stage3_prefetch_bucket_size": "auto",
            "offload_optimizer": {"device": "cpu", "ratio": 1, "nvme_path": None}}
    _, ignored = from_deepspeed({"train_batch_size": 8, "zero_optimization": zero, "steps_per_print": None,
                                 "seq_parallel_communication_data_type": "BF16"})
    assert {"zero_optimization.overlap_comm", "zero_optimization.reduce_scatter",
            "zero_optimization.stage3_prefetch_bucket_size", "zero_optimization.offload_optimizer.ratio",
            "steps_per_print", "seq_parallel_communication_data_type"} <= set(ignored)


@pytest.mark.parametrize("doc, message", [
    ({"zero_optimization": {"overlap_comm": "garbage"}},
     "zero_optimization.overlap_comm: expected true, false or null"),
    ({"zero_optimization": {"sub_group_size": -1}}, "zero_optimization.sub_group_size: got -1; must be >= 0"),
    ({"zero_optimization": {"stage3_max_live_parameters": 1.5}}, "stage3_max_live_parameters: expected an integer"),
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu", "ratio": 2}}},
     "zero_optimization.offload_optimizer.ratio: got 2; must be in [0, 1]"),
    ({"seq_parallel_communication_data_type": "int8"}, "seq_parallel_communication_data_type: got 'int8'"),
    ({"flops_profiler": True}, "flops_profiler: expected a mapping"),
    ({"bfloat16": {"enabled": True, "immediate_grad_update": "sometimes"}},
     "bfloat16.immediate_grad_update: expected true or false"),  # the key as written, not as canonical
    # a disabled block's keys: DeepSpeed builds its model all the same
    ({"fp16": {"enabled": False, "hysteresis": "x"}}, "fp16.hysteresis: expected an integer"),
    ({"bf16": {"enabled": False, "immediate_grad_update": "x"}}, "bf16.immediate_grad_update: expected true"),
    ({"optimizer": {"type": "AdamW", "params": {"fused": "yes please"}}}, "optimizer.params.fused: expected true"),
    ({"optimizer": {"type": "OneBitAdam", "params": {"comm_backend_name": 1}}},
     "optimizer.params.comm_backend_name: expected a string"),
    ({"optimizer": {"type": "AdamW", "params": {"amsgrad": "false"}}}, "optimizer.params.amsgrad: expected true"),
])
def test_wrong_types_are_one_line_naming_the_key(doc, message):
    with pytest.raises(ConfigError) as info:
        from_deepspeed({"train_batch_size": 8, **doc})
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


# The samples each ignored block's keys are tried with against DeepSpeed (its lax pydantic reading included).
_SAMPLES = [True, False, 0, 1, 2, -3, 1.5, 8.0, "true", "off", "garbage", "8", " 8 ", "8.0", "1e3", "", "auto",
            "warn", "Fast", None, [], ["a"], [1], ("a",), {}, {"a": 1}]


def _deepspeed_accepts(doc: dict) -> bool:
    from unittest import mock

    from tests.helpers.deepspeed_ref import import_deepspeed

    import_deepspeed()
    import deepspeed.runtime.config as ds_config
    import pydantic

    with mock.patch.object(ds_config.dist, "get_rank", lambda *a, **k: 0), \
            mock.patch.object(ds_config.dist, "get_world_size", lambda *a, **k: 1):
        try:
            ds_config.DeepSpeedConfig(doc)
        except (pydantic.ValidationError, TypeError, AttributeError, AssertionError, ds_config.DeepSpeedConfigError):
            return False
    return True


def _ztune_accepts(doc: dict) -> bool:
    try:
        from_deepspeed(doc)
    except ConfigError:
        return False
    return True


def _pydantic_blocks() -> dict:
    """The ignored blocks DeepSpeed 0.19.8 reads through a pydantic model, with the model."""
    from tests.helpers.deepspeed_ref import import_deepspeed

    import_deepspeed()
    from deepspeed.comm.config import CommsLoggerConfig
    from deepspeed.monitor.config import CometConfig
    from deepspeed.runtime.zero.leaf_module_config import DeepSpeedZeroLeafModuleConfig
    from deepspeed.utils.config import DeepSpeedThroughputTimerConfig

    return {"comms_logger": CommsLoggerConfig, "comet": CometConfig,
            "timers.throughput": DeepSpeedThroughputTimerConfig,
            "zero_optimization.leaf_module": DeepSpeedZeroLeafModuleConfig}


@pytest.mark.parametrize("block", ["comms_logger", "comet", "timers.throughput", "zero_optimization.leaf_module"])
def test_ignored_blocks_take_what_deepspeeds_model_takes(block):
    """The keys of an ignored block that DeepSpeed reads through a pydantic model are the model's fields, and each
    value (and the block itself) loads in ztune exactly when it loads in DeepSpeed 0.19.8: "garbage" for
    comms_logger.enabled or an unknown comet.bogus is refused naming the key (the block was only checked to be a
    mapping)."""
    model = _pydantic_blocks()[block]
    assert set(children(block)) == set(model.model_fields), block
    mismatches = []
    for value in _SAMPLES:
        for key in (block, *(f"{block}.{name}" for name in model.model_fields), f"{block}.bogus"):
            doc = _doc(key, value)
            ours = _ztune_accepts(doc)
            if value == "auto" and key in (block, f"{block}.bogus"):
                # "auto" stands for a value the Trainer fills: ztune refuses it for a block and for an unknown
                # key, also where DeepSpeed's pydantic parent drops it unread (comet, leaf_module)
                assert not ours, key
            elif ours != _deepspeed_accepts(json.loads(json.dumps(doc))):
                mismatches.append((key, value))
    assert not mismatches


def _deepspeed_readers() -> dict[str, dict]:
    """The ignored blocks DeepSpeed 0.19.8 reads without a model, each as a block of the keys its reader reads
    (their names from DeepSpeed's constants) holding their defaults."""
    from tests.helpers.deepspeed_ref import import_deepspeed

    import_deepspeed()
    import deepspeed.profiling.constants as flops
    import deepspeed.runtime.constants as runtime
    import deepspeed.runtime.model_checkpointing.constants as ckpt
    from deepspeed.runtime.swap_tensor.aio_config import AIO_DEFAULT_DICT

    def block(module, prefix: str) -> dict:
        names = vars(module)
        return {names[k]: names[k + "_DEFAULT"] for k in names
                if k.startswith(prefix) and k + "_DEFAULT" in names and k not in ("CHECKPOINT_WRITER",)}

    writer = block(ckpt, "CHECKPOINT_")
    checkpoint = {k: writer.pop(k) for k in (ckpt.CHECKPOINT_TAG_VALIDATION, ckpt.CHECKPOINT_SERIALIZATION)}
    checkpoint.update({runtime.LOAD_UNIVERSAL_CHECKPOINT: runtime.LOAD_UNIVERSAL_CHECKPOINT_DEFAULT,
                       runtime.USE_NODE_LOCAL_STORAGE_CHECKPOINT: runtime.USE_NODE_LOCAL_STORAGE_CHECKPOINT_DEFAULT,
                       runtime.CHECKPOINT_PARALLEL_WRITE: {runtime.CHECKPOINT_PARALLEL_WRITE_PIPELINE_STAGE:
                                                           runtime.CHECKPOINT_PARALLEL_WRITE_PIPELINE_STAGE_DEFAULT},
                       ckpt.CHECKPOINT_WRITER: writer})
    return {"flops_profiler": block(flops, "FLOPS_PROFILER_"), "aio": dict(AIO_DEFAULT_DICT), "checkpoint": checkpoint}


def test_ignored_blocks_without_a_model_have_the_keys_deepspeed_reads():
    """flops_profiler, aio and checkpoint: DeepSpeed reads them key by key (get_scalar_param), so the table has
    exactly those keys, DeepSpeed's defaults load, and the choices are DeepSpeed's."""
    import deepspeed.runtime.model_checkpointing.constants as ckpt

    for name, block in _deepspeed_readers().items():
        def walk(prefix: str, value: dict) -> None:
            assert set(children(prefix)) == set(value), prefix
            for k, v in value.items():
                if isinstance(v, dict):
                    walk(f"{prefix}.{k}", v)

        walk(name, block)
        _, ignored = from_deepspeed(json.loads(json.dumps({"train_batch_size": 8, name: block})))
        assert ignored == [name]
    assert KEYS["checkpoint.tag_validation"].choices == tuple(ckpt.CHECKPOINT_TAG_VALIDATION_MODES)
    assert KEYS["checkpoint.writer.type"].choices == tuple(ckpt.CHECKPOINT_WRITER_TYPES)
    assert KEYS["checkpoint.writer.data_parallel"].choices == tuple(ckpt.CHECKPOINT_DATA_PARALLEL_UNITS)


@pytest.mark.parametrize("doc, message", [
    ({"flops_profiler": {"profile_step": "x"}}, "flops_profiler.profile_step: expected an integer, got 'x'"),
    # (an unknown key inside flops_profiler / aio / checkpoint loads, as DeepSpeed skips it: test_deepspeed_config.py)
    ({"comms_logger": {"prof_op": ["all_reduce"]}}, "unknown key 'comms_logger.prof_op'; allowed here: debug, "),
    ({"aio": {"queue_depth": -8}}, "aio.queue_depth: got -8; must be >= 0"),
    ({"aio": {"use_gds": "maybe"}}, "aio.use_gds: expected true or false, got 'maybe'"),
    ({"checkpoint": {"tag_validation": "strict"}},
     "checkpoint.tag_validation: got 'strict'; allowed: WARN, IGNORE, FAIL"),
    ({"checkpoint": {"tag_validation": 3}}, "checkpoint.tag_validation: expected a string, got 3"),
    ({"checkpoint": {"writer": {"type": "rust"}}}, "checkpoint.writer.type: got 'rust'; allowed: MOCK, PYTHON, FAST"),
    ({"checkpoint": {"parallel_write": {"pipeline_stage": "x"}}}, "checkpoint.parallel_write.pipeline_stage: expected"),
    ({"timers": {"throughput": {"synchronize": True}}}, "unknown key 'timers.throughput.synchronize'; allowed here: "),
    ({"comms_logger": {"prof_ops": "all_reduce"}}, "comms_logger.prof_ops: expected a list, got 'all_reduce'"),
    ({"timers": {"throughput": {"enabled": "sometimes"}}}, "timers.throughput.enabled: expected true or false"),
    ({"zero_optimization": {"leaf_module": {"names": [1]}}}, "zero_optimization.leaf_module.names: expected a list of "
                                                              "strings"),
])
def test_ignored_block_keys_are_checked_naming_the_key_path(doc, message):
    with pytest.raises(ConfigError) as info:
        from_deepspeed({"train_batch_size": 8, **doc})
    assert str(info.value).startswith(message), str(info.value)


def test_ignored_blocks_deepspeed_runs_still_load_and_are_listed_once():
    doc = {"train_batch_size": 8, "flops_profiler": {"enabled": True, "profile_step": 2, "module_depth": -1,
                                                     "output_file": None},
           "checkpoint": {"tag_validation": "Fail", "writer": None}, "aio": None,
           "comms_logger": {"enabled": "true", "prof_ops": ["all_reduce"]},
           "zero_optimization": {"stage": 3, "leaf_module": {"names": "mlp"}}}
    _, ignored = from_deepspeed(doc)
    assert ignored == ["flops_profiler", "checkpoint", "aio", "comms_logger", "zero_optimization.leaf_module"]
