"""The DeepSpeedEngine members real scripts call, on ztune's engine, each with DeepSpeed 0.19.8's meaning
(deepspeed/runtime/engine.py). `ztune.initialize` returns a `CompatEngine`.

The table MEMBERS (name -> what ztune does) is what docs/deepspeed-migration.md lists for the engine.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from ztune.config.schema import Precision
from ztune.config.validate import resolve_batch
from ztune.errors import UserError
from ztune.runtime.engine import Engine
from ztune.runtime.partition import views_of
from ztune.runtime.state.frozen import frozen_ids, write_frozen_slices

# Engine members a DeepSpeed script uses -> how ztune provides them (for the migration guide).
MEMBERS: dict[str, str] = {
    "forward / __call__": "runs the module (floating-point inputs cast to the compute dtype)",
    "backward(loss)": "backward of loss / gradient_accumulation_steps (x the fp16 loss scale), reducing gradients",
    "step(lr_kwargs=None)": "counts a micro-step; applies the optimizer at the accumulation boundary, then steps the "
                            "scheduler with lr_kwargs (e.g. {\"metrics\": val_loss} for ReduceLROnPlateau); returns "
                            "whether it applied a step",
    "is_gradient_accumulation_boundary()": "whether the next step() applies the optimizer",
    "set_gradient_accumulation_boundary(b)": "overrides the boundary until set back to None (DeepSpeed's "
                                              "call-step-once style)",
    "no_sync()": "context: backward accumulates without reducing (stages 0-1; DeepSpeed refuses 2-3, so does "
                 "ztune); step() inside it is an error",
    "was_step_applied()": "whether the last step() updated the parameters",
    "zero_grad()": "drops the gradients accumulated since the last optimizer step (stages 0-1; at stages 2-3, as "
                   "in DeepSpeed, the partitioned accumulation is kept and only .grad is cleared)",
    "get_lr()": "the optimizer's lr per parameter group (a list)",
    "get_global_grad_norm()": "the global gradient norm (unscaled, before clipping) of the last step at a "
                              "boundary; None before the first (DeepSpeed also gives None at stage 0 in fp32)",
    "train_batch_size()": "the derived global batch",
    "train_micro_batch_size_per_gpu()": "the derived micro-batch",
    "gradient_accumulation_steps()": "the derived accumulation steps",
    "gradient_clipping()": "the clipping norm (0 = off)",
    "fp16_enabled() / bfloat16_enabled()": "the precision",
    "zero_optimization_stage()": "the ZeRO stage",
    "optimizer_name()": "the optimizer type, lower-cased as DeepSpeed reports its own optimizers",
    "global_samples": "samples consumed by optimizer steps: steps x train_batch_size()",
    "global_steps / micro_steps / skipped_steps": "optimizer steps (skipped ones included), step() calls (as "
                                                  "in DeepSpeed, also where set_gradient_accumulation_boundary "
                                                  "forced a boundary), fp16-overflow skips",
    "local_rank / global_rank / world_size": "from the process group ($LOCAL_RANK for local_rank)",
    "device": "the training device",
    "module / optimizer / lr_scheduler": "the wrapped model, the sharded optimizer, the scheduler",
    "parameters() / named_parameters()": "the module's, names prefixed 'module.' as on DeepSpeed's engine (at "
                                         "stage 3 their storage is freed between uses, as DeepSpeed's are "
                                         "partitioned)",
    "state_dict() / load_state_dict()": "the module's state dict with keys prefixed 'module.' (DeepSpeed's engine "
                                        "is an nn.Module holding the model); load also updates the fp32 masters",
    "module_state_dict() / load_module_state_dict()": "the same without the prefix",
    "train() / eval()": "the module's mode",
}


class CompatEngine(Engine):
    """ztune's Engine with DeepSpeed's engine members (see MEMBERS)."""

    want_grad_norm = True  # DeepSpeed computes the global norm every step (get_global_grad_norm)

    def __init__(self, model, cfg, *args, device: torch.device, **kwargs):
        from ztune.runtime.compat.monitor import check_available

        check_available(cfg.monitor)  # every rank, before the engine's collectives
        super().__init__(model, cfg, *args, **kwargs)
        from ztune.runtime.compat.monitor import Monitor

        self.monitor = Monitor(self.config.monitor, rank=self.rank)
        self.device = device
        self._boundary_override: bool | None = None
        self._in_no_sync = False
        self._step_applied = False
        self._micro_steps_at_boundary = 0  # micro_steps after the last step() that applied the optimizer

    # -- ranks, batch, config -------------------------------------------------------------------------------
    @property
    def local_rank(self) -> int:
        return int(os.environ.get("LOCAL_RANK", "0"))

    @property
    def global_rank(self) -> int:
        return self.rank

    def _batch(self):
        return resolve_batch(self.config.batch, self.world_size)

    def train_batch_size(self) -> int:
        return self._batch().global_

    def train_micro_batch_size_per_gpu(self) -> int:
        return self._batch().micro

    def gradient_accumulation_steps(self) -> int:
        return self.grad_accum

    @property
    def global_samples(self) -> int:
        # DeepSpeed adds train_batch_size() at every optimizer step, skipped ones included (engine.py, step).
        return self.global_steps * self.train_batch_size()

    def gradient_clipping(self) -> float:
        return self.config.gradient_clipping

    def fp16_enabled(self) -> bool:
        return self.config.precision is Precision.FP16

    def bfloat16_enabled(self) -> bool:
        return self.config.precision is Precision.BF16

    def zero_optimization_stage(self) -> int:
        return self.config.zero.stage

    def optimizer_name(self) -> str:
        return self.optimizer_kind.value.lower()  # a client optimizer's kind, else the config's ("onebitadam")

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def get_global_grad_norm(self) -> float | None:
        return self.last_grad_norm

    # -- the module, seen as DeepSpeed's engine shows it --------------------------------------------------
    # DeepSpeedEngine is an nn.Module holding the model as its submodule `module`, so its parameter names and
    # state-dict keys carry a "module." prefix; module_state_dict() is the model's own.
    def parameters(self, recurse: bool = True):
        return self.module.parameters(recurse=recurse)

    def named_parameters(self, prefix: str = "", recurse: bool = True):
        return self.module.named_parameters(prefix=f"{prefix}.module" if prefix else "module", recurse=recurse)

    def state_dict(self, destination=None, prefix: str = "", keep_vars: bool = False):
        return self.module.state_dict(destination=destination, prefix=prefix + "module.", keep_vars=keep_vars)

    def module_state_dict(self, destination=None, prefix: str = "", keep_vars: bool = False):
        return self.module.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)

    def load_state_dict(self, state_dict, strict: bool = True):
        """Load `state_dict()`'s form (keys with the "module." prefix); see load_module_state_dict."""
        inner = {k[len("module."):]: v for k, v in state_dict.items() if k.startswith("module.")}
        unexpected = sorted(k for k in state_dict if not k.startswith("module."))
        if strict and unexpected:
            raise UserError(f"engine.load_state_dict: unexpected keys {unexpected} (the engine's keys start with "
                            "'module.'; use load_module_state_dict for the model's own keys)")
        result = self.load_module_state_dict(inner, strict=strict)
        return torch.nn.modules.module._IncompatibleKeys(["module." + k for k in result.missing_keys],
                                                         ["module." + k for k in result.unexpected_keys] + unexpected)

    def load_module_state_dict(self, state_dict, strict: bool = True):
        """Load a module state dict (keys as `state_dict()` gives them) into the module and into the fp32
        masters the optimizer steps. Every rank calls it with the same values (where stage 3's shards are in
        shared memory it is a barrier, so no rank reads a peer's shard half written). Returns the
        missing and unexpected keys, as torch does."""
        if self._offload is not None and self._offload.offload_params:
            raise UserError("engine.load_state_dict with zero_optimization.offload_param cpu is not supported; "
                            "load the weights into the model before ztune.initialize")
        names = {id(p): n for n, p in self.module.named_parameters(remove_duplicate=False)}
        flat = {names[id(p)] for g in self.groups for p in g.params}
        expected = set(self.module.state_dict().keys())
        missing = sorted(expected - set(state_dict))
        unexpected = sorted(set(state_dict) - expected)
        if strict and (missing or unexpected):
            raise UserError(f"engine.load_state_dict: missing keys {missing}, unexpected keys {unexpected}; "
                            "pass strict=False to load the rest")
        if any(n in missing for n in flat):
            raise UserError("engine.load_state_dict: every trained parameter needs a value; missing: "
                            + ", ".join(n for n in missing if n in flat))
        # Buffers and frozen parameters through the module; the flat (trained) parameters below, because at
        # stage 3 their storage is freed between uses.
        # Stage 3's frozen parameters: views of freed buffers, written into each rank's shard instead.
        sharded = frozen_ids(self)
        keys_of: dict[int, list[str]] = {}
        for n, p in self.module.named_parameters(remove_duplicate=False):
            keys_of.setdefault(id(p), []).append(n)
        skip = flat | {n for i in sharded for n in keys_of[i]}
        self.module.load_state_dict({k: v for k, v in state_dict.items() if k not in skip}, strict=False)
        if self._shared_shards:  # peers copy shared shards with no sync (Comm.gather_stable_shards)
            self.comm.shard_barrier()

        def value_of(p, start: int, end: int):
            key = next((k for k in keys_of[id(p)] if k in state_dict), None)
            return None if key is None else state_dict[key].detach().reshape(-1)[start:end]

        write_frozen_slices(self, value_of=value_of)
        for g in self.groups:
            full = torch.zeros(g.layout.padded_numel, dtype=torch.float32, device=g.param_shard.device)
            for p, view in zip(g.params, views_of(full, g.layout), strict=True):
                view.copy_(state_dict[names[id(p)]].reshape(view.shape))
            lo, hi = g.owned
            g.master.copy_(full[lo:hi])
            if g.param_shard.data_ptr() != g.master.data_ptr():
                g.param_shard.copy_(full[lo:hi])
            if g.gathered:
                g.param_full.copy_(full)
        if self._shared_shards:
            self.comm.shard_barrier()
        return torch.nn.modules.module._IncompatibleKeys(missing, unexpected)

    # -- accumulation boundary ------------------------------------------------------------------------------
    def is_gradient_accumulation_boundary(self) -> bool:
        if self._boundary_override is not None:
            return self._boundary_override
        return super().is_gradient_accumulation_boundary()

    def set_gradient_accumulation_boundary(self, is_boundary: bool | None) -> None:
        """Force the boundary state for the next backward/step calls (None: back to counting micro-steps)."""
        self._boundary_override = None if is_boundary is None else bool(is_boundary)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward inside accumulates gradients without reducing them (stages 0-1)."""
        if self.plan.gradients:
            raise UserError(f"engine.no_sync() cannot be used at ZeRO stage {self.config.zero.stage}: stages 2-3 "
                            "reduce every micro-step's gradients into shards (DeepSpeed refuses it too)")
        if self._in_no_sync:
            raise UserError("engine.no_sync() is already active: it cannot be nested")
        saved = self._boundary_override
        self._in_no_sync, self._boundary_override = True, False
        try:
            yield
        finally:
            self._in_no_sync, self._boundary_override = False, saved

    def step(self, lr_kwargs: dict | None = None) -> bool:
        if self._in_no_sync:
            raise UserError("engine.step() inside engine.no_sync(): leave the no_sync block first")
        if self._boundary_override is False:
            self.micro_steps += 1
            self._step_applied = False
            return False
        calls = self.micro_steps + 1
        if self._boundary_override is True:
            # Make this call the one that completes an accumulation window: DeepSpeed steps whenever the
            # boundary is set, however many micro-steps ran. Its counter still counts calls (engine.py, step:
            # micro_steps += 1), and once the boundary is back to None its windows end where
            # (micro_steps + 1) % gradient_accumulation_steps() == 0: restored below, so they end there here too.
            self.micro_steps = (self.micro_steps // self.grad_accum + 1) * self.grad_accum - 1
        steps_before = self.global_steps
        self._step_applied = super().step(lr_kwargs=lr_kwargs)
        self.micro_steps = calls
        if self.global_steps != steps_before:  # an accumulation boundary: DeepSpeed's monitor events
            self._micro_steps_at_boundary = calls
            self.monitor.after_step(self)
        return self._step_applied

    def save_checkpoint(self, save_dir, *args, **kwargs) -> bool:
        """As Engine.save_checkpoint. Right after a boundary forced by set_gradient_accumulation_boundary no
        gradients are pending even when micro_steps is not a multiple of gradient_accumulation_steps() (the
        checkpoint code refuses a save between the micro-steps of an accumulation by that count)."""
        calls = self.micro_steps
        if calls == self._micro_steps_at_boundary:
            self.micro_steps = self.global_steps * self.grad_accum
        try:
            return super().save_checkpoint(save_dir, *args, **kwargs)
        finally:
            self.micro_steps = calls

    def was_step_applied(self) -> bool:
        return self._step_applied

    def zero_grad(self) -> None:
        """Drop the gradients accumulated since the last optimizer step (see MEMBERS)."""
        if not self.plan.gradients:
            self._reducer.zero_grads()
        else:
            for p in self.module.parameters():
                p.grad = None
