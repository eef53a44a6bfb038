"""Recomputation FLOPs of full activation checkpointing: ztune/cost/activations.py against measurement.

Measurement: torch.utils.flop_counter.FlopCounterMode around forward + backward of the tiny-gpt and
tiny-llama profiles on CPU, with and without full checkpointing (runtime/checkpointing.py, non-reentrant
torch.utils.checkpoint); the difference is what backward re-ran. The counter counts matmuls; it has no
formula for CPU scaled_dot_product_attention, so the attention core's recomputation (4*s*q FLOPs per token
per block, re-run under either implementation) is added from the formula. Non-reentrant checkpointing stops
recomputing after the block's last saved tensor (early stop), so the MLP down projection is never re-run;
reentrant checkpointing (DeepSpeed's, Megatron's) re-runs the whole block.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

from ztune.config.schema import Checkpointing
from ztune.cost.activations import activation_memory
from ztune.errors import UserError
from ztune.profiles import load_model
from ztune.runtime.checkpointing import apply_activation_checkpointing, find_blocks
from ztune.runtime.models import build_model
from ztune.specs import count_params

MICRO_BATCH, SEQ_LEN = 2, 64


def _reentrant(model: torch.nn.Module) -> None:
    for block in find_blocks(model):
        fwd = block.forward
        block.forward = functools.wraps(fwd)(lambda *a, _f=fwd, **k: checkpoint(_f, *a, use_reentrant=True, **k))


def _step_flops(name: str, how: str) -> int:
    spec = load_model(name)
    model = build_model(spec, seed=0)
    if how == "non_reentrant":
        apply_activation_checkpointing(model, mode=Checkpointing.FULL)
    elif how == "reentrant":
        _reentrant(model)
    ids = torch.randint(0, spec.vocab_size, (MICRO_BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        model(ids, labels=ids).backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("impl", ["non_reentrant", "reentrant"])
@pytest.mark.parametrize("name", ["tiny-gpt", "tiny-llama"])
def test_full_recompute_flops_match_measurement(name, impl):
    spec = load_model(name)
    tokens = MICRO_BATCH * SEQ_LEN
    core = 4 * SEQ_LEN * spec.num_heads * spec.head_size  # attention core per token, not counted on CPU
    measured = _step_flops(name, impl) - _step_flops(name, "none") + tokens * spec.num_layers * core
    c = count_params(spec)
    block_forward = 2 * (c.active_per_token - c.embedding - c.lm_head - c.final_norm) + spec.num_layers * core
    act = activation_memory(spec, micro_batch=MICRO_BATCH, seq_len=SEQ_LEN, checkpointing=Checkpointing.FULL,
                            checkpoint_impl=impl)
    predicted = act.recompute_fraction * block_forward * tokens
    print(f"\n{name} {impl}: recompute fraction {act.recompute_fraction:.4f}, predicted/measured "
          f"{predicted / measured:.5f}")
    # The formula's 2 FLOPs per parameter include biases and norm weights, which the counter does not count.
    assert predicted == pytest.approx(measured, rel=0.01)
    if impl == "reentrant":
        assert act.recompute_fraction == 1.0
    else:  # the down projection (GPT-2: 8h^2 of 24h^2 + core per token) is skipped
        assert 0.6 < act.recompute_fraction < 0.8


def test_checkpoint_impl_is_checked():
    with pytest.raises(UserError, match="checkpoint implementation 'lazy'"):
        activation_memory(load_model("tiny-gpt"), micro_batch=1, seq_len=8, checkpointing=Checkpointing.FULL,
                          checkpoint_impl="lazy")
