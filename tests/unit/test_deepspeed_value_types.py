"""Every DeepSpeed key whose value ztune does not read as a setting (ignored and neutral keys, a disabled
precision block's keys) is still type-checked against DeepSpeed's type for it: a wrong type is one line naming
the key as written and the type expected, as DeepSpeed's pydantic models refuse it. Values DeepSpeed accepts
load, and ignored keys are listed."""

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
    MAPPING,
    NEUTRAL,
    NUMBER,
    STRING,
)
from ztune.errors import ConfigError

# A value of the wrong type for each kind, and the message DeepSpeed's type gives.
_WRONG = {BOOL: ("garbage", "expected true or false"), INT: ("garbage", "expected an integer"),
          COUNT: ("garbage", "expected an integer"), NUMBER: ("garbage", "expected a number"),
          FRACTION: ("garbage", "expected a number"), STRING: (3, "expected a string"),
          MAPPING: (3, "expected a mapping"), DTYPE: (3, "got 3; allowed: fp16, bf16, fp32")}
# A value of the right type for each kind (for an ignored key: listed as ignored).
_GOOD = {BOOL: True, INT: 1, COUNT: 1, NUMBER: 1.0, FRACTION: 0.5, STRING: "x", MAPPING: {}, DTYPE: "fp16"}

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
    for key in ("fp16.loss_scale", "fp16.hysteresis", "fp16.loss_scale_window", "fp16.min_loss_scale",
                "fp16.initial_scale_power", "fp16.consecutive_hysteresis", "bf16.check_grad_overflow"):
        assert KEYS[key].kind in KINDS, key


@pytest.mark.parametrize("key", UNREAD)
def test_a_wrong_type_is_refused_naming_the_key(key):
    value, message = _WRONG[_base(KEYS[key].kind)]
    with pytest.raises(ConfigError, match="^" + re.escape(f"{key}: {message}")):
        from_deepspeed(_doc(key, value))


@pytest.mark.parametrize("key", sorted(k for k in UNREAD if KEYS[k].status == IGNORED))
def test_an_ignored_key_of_the_right_type_is_listed(key):
    _, ignored = from_deepspeed(_doc(key, _GOOD[_base(KEYS[key].kind)]))
    assert key in ignored


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
    ({"zero_optimization": {"overlap_comm": "garbage"}}, "zero_optimization.overlap_comm: expected true or false"),
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
