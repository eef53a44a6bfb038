"""Holding process groups without keeping them alive past `dist.destroy_process_group()`.

`destroy_process_group()` drops torch's own references to every group; the last reference going destroys
the group, and gloo's destructor (called with the GIL released) joins its worker threads. A group that
something else still references outlives the call, and so do its worker threads, into interpreter shutdown.
There a worker that drops the last reference to a collective's tensor (e.g. the tensors of the script's
final `dist.all_gather_object`, which the worker releases after `wait()` returned) needs the GIL, which a
finalizing interpreter refuses by ending the thread inside a destructor: SIGABRT, "terminate called without
an active exception" (core of an aborted rank of benchmarks/cluster_worker.py, 4 ranks, stage 3: main thread
in Py_FinalizeEx's gc, the gloo worker in ~AsyncAllgatherWork -> TensorImpl::decref_pyobject -> take_gil
-> pthread_exit). runtime/comm/collectives.py's docstring covers the same abort for ztune's own tensors.

Two things kept the default group alive in a ztune run:
- ztune's objects (Comm, the shared-memory transport, Lockstep) held the group; `GroupRef` holds the default
  group as "whatever the default group is now" and any other group weakly (torch's registry owns it);
- torch.distributed.nn.functional binds `group=group.WORLD` as a default argument at import time, and it is
  imported lazily (torch 2.13: the first `torch.optim.Optimizer` imports torch._dynamo, which imports
  torch.distributed.fsdp -> _shard -> torch.distributed.nn). Imported after init_process_group, as it is when
  ztune builds the optimizer, its functions' defaults hold the default group for good.
  `unpin_default_group` imports it (so a later import finds it loaded) and replaces such defaults with None,
  which those functions pass on to torch.distributed, where None means the default group (same meaning).
"""

from __future__ import annotations

import importlib
import types
import weakref

import torch.distributed as dist

# The torch module whose functions bind `dist.group.WORLD` as a default argument at import time and that
# torch imports lazily on its own (torch 2.13 sources: `def broadcast(tensor, src, group=group.WORLD)` etc.).
_PINNING_MODULE = "torch.distributed.nn.functional"


class GroupRef:
    """A process group held without owning it: None stays None; the default group is looked up at each
    `get()` (None once destroyed); any other group is a weak reference (None once torch dropped it)."""

    def __init__(self, group: dist.ProcessGroup | None):
        self._none = group is None
        self._default = not self._none and dist.is_initialized() and group is dist.group.WORLD
        self._ref = None if self._none or self._default else weakref.ref(group)

    def get(self) -> dist.ProcessGroup | None:
        if self._none:
            return None
        if self._default:
            return dist.group.WORLD if dist.is_initialized() else None
        return self._ref()


def unpin_default_group() -> int:
    """Replace default arguments that hold the current default group, in torch's modules that bind it at
    import time (module docstring), with None. Imports torch.distributed.nn.functional first. Returns how
    many defaults were replaced. Call it after init_process_group, before building optimizers."""
    if not dist.is_available() or not dist.is_initialized():
        return 0
    try:
        module = importlib.import_module(_PINNING_MODULE)
    except ImportError:  # a torch build without it: nothing binds the group there
        return 0
    world = dist.group.WORLD
    replaced = 0
    for fn in list(vars(module).values()):
        if not isinstance(fn, types.FunctionType) or fn.__module__ != _PINNING_MODULE:
            continue
        if fn.__defaults__ and any(d is world for d in fn.__defaults__):
            fn.__defaults__ = tuple(None if d is world else d for d in fn.__defaults__)
            replaced += 1
        if fn.__kwdefaults__ and any(d is world for d in fn.__kwdefaults__.values()):
            fn.__kwdefaults__ = {k: None if d is world else d for k, d in fn.__kwdefaults__.items()}
            replaced += 1
    return replaced
