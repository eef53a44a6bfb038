"""docs/deepspeed-migration.md is what the generator makes from the code's tables (so it cannot drift), and
it covers every key of the table and every engine member."""

from ztune.config.deepspeed_keys import KEYS
from ztune.runtime.compat.engine_api import MEMBERS
from ztune.runtime.compat.migration_doc import DOC_PATH, render


def test_committed_guide_equals_the_generated_one():
    assert DOC_PATH.read_text() == render(), "run: python -m ztune.runtime.compat.migration_doc"


def test_guide_lists_every_key_and_member():
    text = render()
    for key in KEYS:
        assert f"| `{key}` |" in text
    for member in MEMBERS:
        assert f"| `{member}` |" in text
    for member in ("local_rank", "global_rank", "device", "parameters()", "named_parameters()", "state_dict()",
                   "load_state_dict()", "train_micro_batch_size_per_gpu()", "gradient_accumulation_steps()",
                   "train_batch_size()", "get_lr()", "get_global_grad_norm()", "zero_grad()", "fp16_enabled()",
                   "bfloat16_enabled()", "zero_optimization_stage()", "optimizer_name()", "gradient_clipping()",
                   "global_samples", "was_step_applied()", "no_sync()", "set_gradient_accumulation_boundary(b)"):
        assert any(member in m for m in MEMBERS), member
