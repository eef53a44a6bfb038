"""Training precision: the compute dtype, fp32 master weights, and loss scaling for fp16.

Mixed precision keeps an fp32 master copy of the weights the optimizer updates and casts it down after each
step (Micikevicius et al. 2018, "Mixed Precision Training", section 3.1). fp16 additionally scales the loss
so small gradients survive the 5-bit exponent (same paper, section 3.2). `LossScaler` follows DeepSpeed
0.19.8's fp16 semantics (deepspeed/runtime/fp16/loss_scaler.py `DynamicLossScaler.update_scale`, defaults
from deepspeed/runtime/precision_config.py), so a DeepSpeed `fp16` block means the same here:
- `loss_scale` > 0: a static scale. Overflowing steps are still detected and skipped; the scale never moves.
- `loss_scale` 0: dynamic, starting at 2 ** initial_scale_power (16). An overflowing step is skipped; if no
  hysteresis is left (`hysteresis` overflows, default 2, are absorbed first) the scale halves, floored at
  `min_loss_scale` (1), and an overflow while already at the floor is an error (LossScaleError). After an
  overflow, every `loss_scale_window` (1000) clean steps double the scale and refill the hysteresis;
  `consecutive_hysteresis` refills it after every clean step instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ztune.config.schema import LossScaleConfig, Precision

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


class LossScaleError(RuntimeError):
    """fp16 gradients overflow at the minimum dynamic loss scale: training cannot continue (DeepSpeed stops
    here too)."""


@dataclass
class LossScaler:
    """The fp16 loss scale (static 1.0 without overflow checks for fp32 and bf16).

    `scale` multiplies the loss before backward; `update(overflow=...)` is called once per optimizer step
    (boundary), after the overflow check. `checks_overflow`: whether the engine must test the gradients for
    inf/nan and skip the step (fp16, static or dynamic). State for checkpoints: state_dict/load_state_dict."""

    dynamic: bool
    scale: float = 1.0
    checks_overflow: bool = False
    window: int = 1000
    hysteresis: int = 2
    consecutive_hysteresis: bool = False
    min_scale: float = 1.0
    factor: float = 2.0
    # DeepSpeed's counters: update() calls so far, the call index of the last overflow, hysteresis left.
    iteration: int = 0
    last_overflow_iteration: int = -1
    hysteresis_left: int = field(default=-1)

    def __post_init__(self) -> None:
        if self.hysteresis_left < 0:
            self.hysteresis_left = self.hysteresis

    @classmethod
    def for_config(cls, precision: Precision, loss_scaling: LossScaleConfig | None = None) -> LossScaler:
        """The scaler for a run: fp16 per `loss_scaling` (DeepSpeed's fp16 keys), else a constant 1.0."""
        if precision is not Precision.FP16:
            return cls(dynamic=False)
        c = loss_scaling or LossScaleConfig()
        if c.loss_scale > 0:
            return cls(dynamic=False, scale=float(c.loss_scale), checks_overflow=True)
        return cls(dynamic=True, scale=2.0 ** c.initial_scale_power, checks_overflow=True, window=c.loss_scale_window,
                   hysteresis=c.hysteresis, consecutive_hysteresis=c.consecutive_hysteresis,
                   min_scale=float(c.min_loss_scale))

    @classmethod
    def for_precision(cls, precision: Precision) -> LossScaler:
        return cls.for_config(precision)

    def update(self, *, overflow: bool) -> None:
        """Account one optimizer step (DeepSpeed's DynamicLossScaler.update_scale). Raises LossScaleError
        when a dynamic scale overflows at its minimum with no hysteresis left."""
        if not self.dynamic:
            return
        if overflow:
            if self.hysteresis == 1 or self.hysteresis_left == 1:
                if self.scale == self.min_scale:
                    raise LossScaleError(
                        f"fp16 gradients overflow (inf/nan) at the minimum loss scale {self.min_scale:g}: the "
                        "loss scale cannot be lowered further. Lower fp16.min_loss_scale, lower the learning "
                        "rate, or train in bf16")
                self.scale = max(self.scale / self.factor, self.min_scale)
            else:
                self.hysteresis_left -= 1
            self.last_overflow_iteration = self.iteration
        else:
            if self.consecutive_hysteresis:
                self.hysteresis_left = self.hysteresis
            clean = self.iteration - self.last_overflow_iteration - 1
            if clean > 0 and clean % self.window == 0:
                if not self.consecutive_hysteresis:
                    self.hysteresis_left = self.hysteresis
                self.scale *= self.factor
        self.iteration += 1

    def state_dict(self) -> dict:
        return {"scale": self.scale, "iteration": self.iteration,
                "last_overflow_iteration": self.last_overflow_iteration, "hysteresis_left": self.hysteresis_left}

    def load_state_dict(self, state: dict) -> None:
        """Restore the counters saved by state_dict (the settings come from the config, as in DeepSpeed)."""
        self.scale = float(state["scale"])
        self.iteration = int(state["iteration"])
        self.last_overflow_iteration = int(state["last_overflow_iteration"])
        self.hysteresis_left = int(state["hysteresis_left"])
