"""Training precision: the compute dtype, fp32 master weights, and dynamic loss scaling for fp16.

Mixed precision keeps an fp32 master copy of the weights the optimizer updates and casts it down after each
step (Micikevicius et al. 2018, "Mixed Precision Training", section 3.1). fp16 additionally scales the loss
so small gradients survive the 5-bit exponent, lowering the scale on overflow and skipping that step, and
raising it again after a window of clean steps (same paper, section 3.2; DeepSpeed's defaults: initial
scale 2**16, window 1000, factor 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ztune.config.schema import Precision

_DTYPES = {Precision.FP32: torch.float32, Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}


def compute_dtype(precision: Precision) -> torch.dtype:
    return _DTYPES[precision]


def dtype_supported(dtype: torch.dtype, *, device: torch.device) -> bool:
    """Whether `device` can run a matmul and its backward in `dtype` (tried, not looked up)."""
    try:
        a = torch.ones(4, 4, dtype=dtype, device=device, requires_grad=True)
        (a @ a).sum().backward()
        return bool(torch.isfinite(a.grad).all())
    except (RuntimeError, TypeError):
        return False


@dataclass
class LossScaler:
    """Dynamic loss scale (static 1.0 when `dynamic` is False, as for fp32 and bf16)."""

    dynamic: bool
    scale: float = 1.0
    growth_interval: int = 1000
    factor: float = 2.0
    min_scale: float = 1.0
    _clean_steps: int = 0

    @classmethod
    def for_precision(cls, precision: Precision) -> LossScaler:
        if precision is Precision.FP16:
            return cls(dynamic=True, scale=2.0**16)
        return cls(dynamic=False)

    def update(self, *, overflow: bool) -> None:
        if not self.dynamic:
            return
        if overflow:
            self.scale = max(self.scale / self.factor, self.min_scale)
            self._clean_steps = 0
            return
        self._clean_steps += 1
        if self._clean_steps >= self.growth_interval:
            self.scale *= self.factor
            self._clean_steps = 0

    def state_dict(self) -> dict:
        """The scaler's state as plain numbers (saved in checkpoints, runtime/state/)."""
        return {"dynamic": self.dynamic, "scale": self.scale, "clean_steps": self._clean_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self._clean_steps = int(state["clean_steps"])
