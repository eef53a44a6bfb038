"""Activation checkpointing (full or selective) and activation offload to host memory.

What each mode keeps is counted in `ztune/cost/activations.py`:
- full: every k-th block runs under non-reentrant torch.utils.checkpoint; it keeps its inputs and rebuilds
  the rest during backward (one extra forward of the block).
- selective: every k-th block's `attention_core(q, k, v)` is checkpointed; the block keeps q, k, v and the
  attention output, the kernel's own saved tensors are rebuilt (Korthikanti et al. 2022, sec. 5).
- offload: `offload_activations(True)` moves every tensor saved for backward to host memory (pinned when
  CUDA is present) and copies it back when backward needs it.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ztune.config.schema import Checkpointing
from ztune.errors import ConfigError

_APPLIED = "_ztune_checkpointing"


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks: `model.blocks` if present, else (Hugging Face models,
    whose list sits at model.model.layers, transformer.h, ...) the ModuleList of same-class modules that
    holds the most parameters."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.ModuleList):
        return blocks
    best, best_numel = None, 0
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        numel = sum(p.numel() for p in module.parameters())
        if numel > best_numel:
            best, best_numel = module, numel
    if best is None:
        raise ConfigError(
            f"cannot find the transformer blocks of {type(model).__name__}: expected a `blocks` ModuleList "
            "or a ModuleList of identical layers; set activations.checkpointing: none"
        )
    return best


def _checkpointed(fn):
    @functools.wraps(fn)
    def run(*args, **kwargs):
        # Non-reentrant: works with inputs that do not require grad, keyword arguments and nested hooks.
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)

    return run


def apply_activation_checkpointing(model: nn.Module, *, mode: Checkpointing, every: int = 1) -> nn.Module:
    """Checkpoint blocks 0, k, 2k, ... (k = `every`) of `model` in place; returns `model`.

    The wrapped call replaces the block's (or its attention_core's) bound method on the instance, so
    parameter names and state_dict keys do not change. Forward hooks on a block itself run once (they
    wrap the checkpointed call); hooks on its submodules run again during the recomputation.
    """
    mode = Checkpointing(mode)
    if every < 1:
        raise ConfigError(f"activations.every must be >= 1, got {every}")
    if mode is Checkpointing.NONE:
        return model
    if getattr(model, _APPLIED, None) is not None:
        raise ConfigError(f"activation checkpointing is already applied to this model ({getattr(model, _APPLIED)})")
    blocks = find_blocks(model)
    for i, block in enumerate(blocks):
        if i % every:
            continue
        if mode is Checkpointing.FULL:
            block.forward = _checkpointed(block.forward)
        else:
            core = getattr(block, "attention_core", None)
            if core is None:
                raise ConfigError(
                    f"selective checkpointing needs blocks with an attention_core(q, k, v) method; "
                    f"{type(block).__name__} has none: use activations.checkpointing: full"
                )
            block.attention_core = _checkpointed(core)
    setattr(model, _APPLIED, f"{mode.value}, every {every}")
    return model


class _HostStash:
    """Saved-tensor hooks that copy activations to host memory and back, one storage at a time.

    Ops often save different views of one storage (q, k, v of one c_attn output; the attention output as
    (b, heads, s, d) and as the next matmul's (b*s, h)): each storage is copied once, whole, and views are
    rebuilt with as_strided on the way back. Parameters (leaves that require grad, or views of them, as the
    transposed weight a matmul saves) stay where they are: they live on the device anyway.
    """

    def __init__(self) -> None:
        self.pin = torch.cuda.is_available()
        self.host_bytes = 0
        # (storage address, version) -> weak refs to (the view root on the device, the host copy). A live
        # root proves the address still holds that storage and not a later one reusing the memory.
        self._to_host: dict[tuple, tuple[weakref.ref, weakref.ref]] = {}
        # id(host copy) -> weak ref to its device copy during backward, shared by the views unpacked from it.
        self._to_device: dict[int, weakref.ref] = {}

    def pack(self, t: torch.Tensor):
        root = t if t._base is None else t._base
        if root.is_leaf and root.requires_grad:
            return t
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes(), t.dtype, t._version)
        hit = self._to_host.get(key)
        host = hit[1]() if hit is not None and hit[0]() is not None else None
        if host is None:
            whole = torch.empty(0, dtype=t.dtype, device=t.device).set_(storage)
            host = torch.empty(whole.shape, dtype=t.dtype, pin_memory=self.pin)
            # Async into pinned memory; the device memory is reused only by work queued after this copy.
            host.copy_(whole, non_blocking=self.pin)
            self.host_bytes += host.nbytes
            self._to_host[key] = (weakref.ref(root), weakref.ref(host))
        return t.device, host, t.size(), t.stride(), t.storage_offset()

    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host, size, stride, offset = packed
        ref = self._to_device.get(id(host))
        whole = ref() if ref is not None else None
        if whole is None:
            whole = host.to(device, non_blocking=True)
            self._to_device[id(host)] = weakref.ref(whole)
        return whole.as_strided(size, stride, offset)


@contextlib.contextmanager
def offload_activations(enabled: bool) -> Iterator[_HostStash | None]:
    """Within this context, tensors autograd saves for backward live in host memory.

    Wrap forward and loss: `with offload_activations(True): loss = model(x, labels=y)`, then call
    backward anywhere. On a CPU-only machine the same path runs (each saved tensor is copied into a new
    host tensor and copied back), which costs memory instead of saving it but tests the mechanism.
    Yields the stash (its `host_bytes` counts what was copied) or None when disabled. Tensors saved inside a
    checkpointed region are not offloaded: the checkpoint's own hooks take precedence there.
    """
    if not enabled:
        yield None
        return
    stash = _HostStash()
    with torch.autograd.graph.saved_tensors_hooks(stash.pack, stash.unpack):
        yield stash
