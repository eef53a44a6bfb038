"""The optimizer over this rank's flat fp32 shards (one tensor per flat group).

Adam, AdamW and SGD act element-wise, so running them on a flat shard is the same math as running them on
the parameters it holds (torch.optim on the flat tensors matches a per-parameter torch.optim reference).
The returned object is a real torch.optim.Optimizer (an Adam / AdamW / SGD instance), so torch LR schedulers
and isinstance checks work on it unchanged.
`step_shards` is the one place the engine calls; it hides how gradients are unscaled:
- CPU-resident shards with Adam/AdamW (runtime/initialize.py decides, when the C++ kernel is built): the fused
  kernel (runtime/ops.py `adam_step_`) reads the 16-bit or fp32 gradient, divides it by the divisor, updates the
  fp32 master and both moments and writes the rounded 16-bit parameter shard, all in one pass over memory.
  On tiny-gpt (21M parameters, one thread) that is ~25 ms for bf16 against ~72 ms for upcast + scale + torch's
  fused AdamW + downcast.
- CUDA-resident shards with Adam/AdamW when ZTUNE_CUDA_ADAM=ztune: the same one-pass step through ztune's CUDA
  kernel (runtime/cuda_adam.py, csrc/cuda/adam.cu; torch's fused op if it cannot be built). Opt-in: whether it
  beats torch's fused AdamW is what `make gpu-check` measures (docs/gpu-check.md).
- Otherwise (CUDA shards by default, SGD) torch's fused optimizer, which takes the divisor as its `grad_scale`
  tensor (the hook torch.amp.GradScaler uses) and divides while it reads, so no separate scaling pass runs.
- Adam without bias correction (DeepSpeed's `bias_correction: false`, which torch.optim cannot express) on
  shards the kernels do not take: TorchOpsAdam, the kernel's torch-op fallback on any device.
Param groups: the optimizer gets one group per user param group (runtime/compat/optimizers.py), each with
its own lr / betas / eps / weight_decay / momentum and, for Adam, `bias_correction`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ztune import envvars
from ztune.config.schema import OptimizerType

# Which kernel steps Adam/AdamW on CUDA-resident shards: "torch" (default) or "ztune" (runtime/cuda_adam.py).
CUDA_ADAM_ENV = "ZTUNE_CUDA_ADAM"


def cuda_adam_choice() -> str:
    """$ZTUNE_CUDA_ADAM, "torch" when unset or empty; ConfigError (one line) for any other value."""
    return str(envvars.read(CUDA_ADAM_ENV))


class FusedCpuAdam(torch.optim.Adam):
    """Adam over flat fp32 shards via a fused one-pass kernel (FusedCpuAdamW: AdamW): runtime.ops.adam_step_ on
    CPU shards, runtime.cuda_adam.adam_step_ (kernel "ztune") on CUDA shards.

    A torch.optim.Adam for schedulers and isinstance checks, whose step() runs the fused kernel instead of
    torch's implementations; `amsgrad`, `maximize` and the other torch-only options stay at their defaults.
    Before `step()` the engine sets `grad_divisor` (grads are divided by it: world size x loss scale / clip
    coefficient), `grads` (id(master) -> gradient in any float dtype; torch only lets `.grad` hold the
    master's dtype) and `outs` (id(master) -> 16-bit parameter shard that receives the rounded update)."""

    adamw = False
    use_kernel = True  # False: the kernel's torch-op fallback, on any device (TorchOpsAdam)

    def __init__(self, params, *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                 bias_correction: bool = True):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.defaults["bias_correction"] = bias_correction
        for group in self.param_groups:
            group.setdefault("bias_correction", bias_correction)
        self.grad_divisor = 1.0
        self.grads: dict[int, torch.Tensor] = {}
        self.outs: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                grad = self.grads.get(id(p), p.grad)
                if grad is not None:
                    self._update(p, group, grad=grad, out=self.outs.get(id(p)))
        return None

    @torch.no_grad()
    def step_param(self, p: torch.Tensor, *, grad: torch.Tensor, out: torch.Tensor | None) -> None:
        """Update the one master `p` now (runtime/offload.py steps group by group, overlapping transfers);
        `grad` is divided by `grad_divisor`, `out` (16-bit, or None) receives the rounded parameter."""
        group = next(gr for gr in self.param_groups if any(q is p for q in gr["params"]))
        self._update(p, group, grad=grad, out=out)

    def _update(self, p: torch.Tensor, group: dict, *, grad: torch.Tensor, out: torch.Tensor | None) -> None:
        from ztune.runtime.ops import adam_step_, torch_adam_step

        on_cuda = self.use_kernel and p.is_cuda
        if on_cuda:  # build_shard_optimizer picks a kernel only with bias correction on (the CUDA ABI has no flag)
            from ztune.runtime.cuda_adam import adam_step_ as cuda_adam_step_

        beta1, beta2 = group["betas"]
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        # int(): torch.optim.Adam.load_state_dict (via __setstate__) turns a loaded step count into a tensor.
        state["step"] = int(state["step"]) + 1
        kw = dict(step=state["step"], lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                  weight_decay=group["weight_decay"], adamw=self.adamw, grad_scale=self.grad_divisor, out=out)
        if on_cuda:
            cuda_adam_step_(p, grad, state["exp_avg"], state["exp_avg_sq"], **kw)
            return
        step = adam_step_ if self.use_kernel else torch_adam_step
        step(p, grad, state["exp_avg"], state["exp_avg_sq"], bias_correction=group.get("bias_correction", True),
             **kw)


class FusedCpuAdamW(FusedCpuAdam, torch.optim.AdamW):
    """AdamW (decoupled weight decay) over flat fp32 CPU shards via runtime.ops.adam_step_."""

    adamw = True


class TorchOpsAdam(FusedCpuAdam):
    """FusedCpuAdam's math as torch ops on any device: for options torch.optim lacks (bias_correction)."""

    use_kernel = False


class TorchOpsAdamW(TorchOpsAdam, torch.optim.AdamW):
    adamw = True


# The dtypes whose shards the kernel writes itself, rounding the fp32 update (runtime/ops.py `out`).
_KERNEL_OUT_DTYPES = (torch.bfloat16, torch.float16)


def build_shard_optimizer(masters: Sequence[torch.Tensor], *, kind: OptimizerType, lr: float,
                          betas: tuple[float, float], eps: float, weight_decay: float, momentum: float,
                          fused_cpu: bool, bias_correction: bool = True,
                          param_groups: Sequence[dict] | None = None) -> torch.optim.Optimizer:
    """An optimizer over `masters` (flat fp32 shards). fused_cpu: use the fused CPU Adam kernel (Adam/AdamW on
    CPU tensors only). CUDA masters use ztune's CUDA Adam kernel when $ZTUNE_CUDA_ADAM is "ztune" (ConfigError
    for a value other than torch/ztune), with bias correction on. param_groups: torch-style groups over the
    masters with per-group hyper-parameters (default: one group of all masters with the keyword values)."""
    params = list(param_groups) if param_groups is not None else list(masters)
    if kind is not OptimizerType.SGD:
        groups = params if param_groups is not None else [{}]
        corrected = all(g.get("bias_correction", bias_correction) for g in groups)
        # The CPU kernel takes bias_correction per group; the CUDA kernel's ABI has no such flag.
        ztune_cuda = cuda_adam_choice() == "ztune" and bool(masters) and masters[0].is_cuda and corrected
        use_kernel = fused_cpu or ztune_cuda
        if use_kernel or not corrected:
            if kind is OptimizerType.ADAMW:
                cls = FusedCpuAdamW if use_kernel else TorchOpsAdamW
            else:
                cls = FusedCpuAdam if use_kernel else TorchOpsAdam
            return cls(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                       bias_correction=bias_correction)
    if kind is OptimizerType.SGD:
        cls, kw = torch.optim.SGD, dict(lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        cls = torch.optim.AdamW if kind is OptimizerType.ADAMW else torch.optim.Adam
        kw = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    try:
        # torch's fused kernels (CPU and CUDA, torch >= 2.4) read and write each element once per step
        # instead of once per op: ~8x faster than the per-op path on a 23M-element CPU shard.
        return cls(params, fused=True, **kw)
    except (RuntimeError, ValueError, TypeError):  # a device or dtype the fused kernel does not cover
        return cls(params, **kw)


def step_shards(optimizer: torch.optim.Optimizer, *, masters: Sequence[torch.Tensor],
                grads: Sequence[torch.Tensor], param_shards: Sequence[torch.Tensor], grad_divisor: float) -> None:
    """One update of every master from `grads` (compute dtype, summed and scaled: divided by `grad_divisor`
    here), then the compute-dtype `param_shards` refreshed from the masters (skipped where they alias).
    Grads are consumed: they may be overwritten."""
    if isinstance(optimizer, FusedCpuAdam):
        # The kernel writes 16-bit shards itself; an fp32 shard that is not the master (stage-3 parameter
        # offload without optimizer offload) is copied after the step.
        outs = {id(m): s for m, s in zip(masters, param_shards, strict=True)
                if s is not m and s.dtype in _KERNEL_OUT_DTYPES and s.device == m.device}
        optimizer.grad_divisor = grad_divisor
        optimizer.outs = outs
        optimizer.grads = {id(m): g for m, g in zip(masters, grads, strict=True)}
        try:
            optimizer.step()
        finally:
            optimizer.grads, optimizer.outs = {}, {}
        refresh = [(m, s) for m, s in zip(masters, param_shards, strict=True) if s is not m and id(m) not in outs]
    else:
        scale = None
        if grad_divisor != 1.0 and optimizer.defaults.get("fused"):
            # The fused kernels divide each gradient by `grad_scale` as they read it (torch.optim.adam /
            # sgd `_fused_*`, the hook GradScaler uses): one pass over the gradients fewer than mul_ first.
            scale = torch.full((), grad_divisor, dtype=torch.float32, device=masters[0].device)
        for m, g in zip(masters, grads, strict=True):
            g32 = g if g.dtype == torch.float32 else g.float()  # fp32 grads are scaled in place, no copy
            if grad_divisor != 1.0 and scale is None:
                g32.mul_(1.0 / grad_divisor)
            m.grad = g32
        optimizer.grad_scale = scale
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale
        refresh = [(m, s) for m, s in zip(masters, param_shards, strict=True) if s is not m]
    for m, s in refresh:
        s.copy_(m)
    for m in masters:
        m.grad = None


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
