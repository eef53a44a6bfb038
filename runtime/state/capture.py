"""Pieces of training state other than the flat shards: RNG streams, optimizer hyperparameters and step
counts, the module's frozen parameters and buffers, and the pickled objects (scheduler, client_state).

Each has a `capture_*` returning plain JSON data and/or CPU tensors, and a `restore_*` taking them back.
"""

from __future__ import annotations

import io
import random

import torch
from torch import nn

from ztune.errors import UserError

# Optimizer param_group keys that are configuration of the optimizer object (kernel choice, flags), not
# training state a scheduler changes: never overwritten from a checkpoint.
_STRUCTURAL_KEYS = frozenset({"params", "fused", "foreach", "capturable", "differentiable", "maximize",
                              "amsgrad", "nesterov", "decoupled_weight_decay"})


# -- RNG ---------------------------------------------------------------------------------------------------
def capture_rng() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's RNG states: (tensors for the shard file, JSON for the metadata).
    torch CPU, the current CUDA device (when CUDA is initialised), python `random`, numpy (when importable)."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    version, internal, gauss = random.getstate()
    meta: dict = {"python": [version, list(internal), gauss]}
    try:
        import numpy as np
    except ImportError:
        return tensors, meta
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    meta["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in meta:
        try:
            import numpy as np
        except ImportError:
            return
        kind, keys, pos, has_gauss, cached = meta["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# -- optimizer ---------------------------------------------------------------------------------------------
def _group_hyper(group: dict) -> dict:
    out = {}
    for key, value in group.items():
        if key in _STRUCTURAL_KEYS or isinstance(value, bool):
            continue
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, float)) or (isinstance(value, (list, tuple))
                                                and all(isinstance(v, (int, float)) for v in value)):
            out[key] = list(value) if isinstance(value, (list, tuple)) else value
    return out


def capture_hyper(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Each param group's numeric hyperparameters (lr as a scheduler left it, betas, ...), in group order
    (model_parameters groups, runtime/compat/optimizers.py, each keep their own lr and weight decay)."""
    return [_group_hyper(group) for group in optimizer.param_groups]


def hyper_groups(hyper: dict | list, *, where: str, groups: int) -> list[dict]:
    """The saved hyperparameters as one dict per param group. A checkpoint from before per-group saving holds
    one dict (one group). Raises CheckpointError when the saved group count is not `groups`."""
    from ztune.runtime.state.files import CheckpointError

    saved = [hyper] if isinstance(hyper, dict) else list(hyper)
    if len(saved) != groups:
        raise CheckpointError(f"checkpoint {where} was saved with {len(saved)} optimizer param group(s), this run "
                              f"has {groups}; pass the same model_parameters groups, or load_optimizer_states=False")
    return saved


def restore_hyper(optimizer: torch.optim.Optimizer, hyper: dict | list, *, where: str = "") -> None:
    """Put the saved hyperparameters back, group by group (see hyper_groups for the errors)."""
    saved = hyper_groups(hyper, where=where, groups=len(optimizer.param_groups))
    for group, values in zip(optimizer.param_groups, saved, strict=True):
        for key, value in values.items():
            if key in group and isinstance(group[key], torch.Tensor):
                group[key].fill_(value)
            elif key in group or key == "initial_lr":
                group[key] = tuple(value) if isinstance(group.get(key), tuple) else value


# State that differs from rank to rank (1-bit Adam's error-feedback residuals and, with local_momentum, its own
# momentum; runtime/onebit_adam.py): not a shard of a replicated or sharded vector, so each rank saves its own
# whole tensors (rank_local_state).
RANK_LOCAL_KEYS = frozenset({"worker_error", "server_error", "local_momentum"})


def shard_state_keys(optimizer: torch.optim.Optimizer, master: torch.Tensor) -> list[str]:
    """Per-element state tensors of `master` (Adam's exp_avg / exp_avg_sq, SGD's momentum_buffer), sorted."""
    state = optimizer.state.get(master, {})
    return sorted(k for k, v in state.items() if k != "step" and k not in RANK_LOCAL_KEYS
                  and isinstance(v, torch.Tensor) and v.shape == master.shape)


def rank_local_state(optimizer: torch.optim.Optimizer, master: torch.Tensor) -> dict[str, torch.Tensor]:
    """This rank's own state tensors of `master` (RANK_LOCAL_KEYS present), by key."""
    state = optimizer.state.get(master, {})
    return {k: v for k, v in sorted(state.items()) if k in RANK_LOCAL_KEYS and isinstance(v, torch.Tensor)}


def step_count(optimizer: torch.optim.Optimizer, master: torch.Tensor) -> float | None:
    step = optimizer.state.get(master, {}).get("step")
    return None if step is None else float(step)


def restore_optimizer(optimizer: torch.optim.Optimizer, *, masters: list[torch.Tensor],
                      states: list[dict[str, torch.Tensor]], steps: list[float | None], hyper: dict | list,
                      where: str = "") -> None:
    """Install per-master state tensors and step counts through Optimizer.load_state_dict (which gives `step`
    the type and device the optimizer's own kernels use), then the saved hyperparameters."""
    current = optimizer.state_dict()
    index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    state = {}
    for m, tensors, step in zip(masters, states, steps, strict=True):
        if step is None and not tensors:
            continue
        entry = dict(tensors)
        if step is not None:
            entry["step"] = torch.tensor(step, dtype=torch.float32)
        state[index[id(m)]] = entry
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})
    restore_hyper(optimizer, hyper, where=where)


# -- module ------------------------------------------------------------------------------------------------
def canonical_names(module: nn.Module) -> dict[int, str]:
    """id(tensor) -> its first name among the module's parameters and buffers (tied tensors: one name)."""
    names: dict[int, str] = {}
    for name, p in module.named_parameters():
        names.setdefault(id(p), name)
    for name, b in module.named_buffers():
        names.setdefault(id(b), name)
    return names


def state_dict_keys(module: nn.Module) -> list[list[str]]:
    """[state_dict key, canonical name] for every entry of module.state_dict() (persistent buffers only)."""
    names = canonical_names(module)
    return [[key, names.get(id(t), key)] for key, t in module.state_dict(keep_vars=True).items()]


def capture_untrained(module: nn.Module, *, trainable_ids: set[int], exclude_frozen: bool = False
                      ) -> dict[str, torch.Tensor]:
    """Frozen parameters (unless exclude_frozen) and persistent buffers by canonical name, cloned to CPU
    (written once, by rank 0)."""
    names = canonical_names(module)
    params = {id(p) for p in module.parameters()}
    out: dict[str, torch.Tensor] = {}
    for t in module.state_dict(keep_vars=True).values():
        if id(t) in trainable_ids or id(t) not in names or names[id(t)] in out:
            continue
        if exclude_frozen and id(t) in params:
            continue
        out[names[id(t)]] = t.detach().to("cpu", copy=True).contiguous()
    return out


# -- pickled objects ---------------------------------------------------------------------------------------
def objects_bytes(objects: dict) -> bytes:
    """`objects` (client_state, scheduler state) serialised with torch.save, checked to load back with
    torch.load(weights_only=True): only tensors, numbers, strings, lists, tuples and dicts of them."""
    buf = io.BytesIO()
    torch.save(objects, buf)
    data = buf.getvalue()
    try:
        torch.load(io.BytesIO(data), weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- torch raises UnpicklingError or others for unsafe types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise UserError("save_checkpoint: client_state (or the lr scheduler's state) holds objects that "
                        "torch.load(weights_only=True) refuses; keep it to tensors, numbers, strings, lists "
                        f"and dicts ({first[:160]})") from None
    return data


def load_objects(data: bytes) -> dict:
    return torch.load(io.BytesIO(data), weights_only=True)
