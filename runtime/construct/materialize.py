"""Models built on the meta device, materialised one unit at a time.

`with ztune.zero_init(): model = Model(cfg)` builds the model with every *parameter* on the meta device (no
memory, no init compute) while buffers are computed on the real device as the module's __init__ defines them
(rotary tables, causal masks: values a later init may not know how to rebuild). A model whose buffers are on
meta too (built under `torch.device("meta")`) works when its init rebuilds them (transformers' `_init_weights`
recomputes rotary `inv_freq`); a value nothing initialises is an error naming it.

`MetaInit` replaces each meta parameter by a same-shaped parameter on the training device whose storage is
released (size 0), so the engine can lay out flat buffers from shapes alone. `materialize(unit)` then gives one
unit's parameters full-size storage and runs the module's own init on every module of the unit, children
before parents (the order of `nn.Module.apply`, which transformers' `post_init` uses): `init_fn(module)` when
given, else transformers' `model._init_weights(module)` when the model has one, else
`module.reset_parameters()`. The engine copies this rank's slice out and `release(unit)` frees the storage, so
no rank holds more than its shards plus one unit.

Initial values do not depend on the world size or the stage: before each module's init the default generator is
seeded with `seed_for(base_seed, qualified_module_name)` (the first 8 bytes of SHA-256 of "seed/name", an
integer below 2^63), so each module's values are a function of the base seed, its name and its init alone.
They differ from an eager build of the same model with `torch.manual_seed(base_seed)` (which draws from one
stream in construction order). Parameters and float buffers are filled with NaN before the init, and any NaN
left after it is an error naming the tensor (nothing initialised it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ztune.errors import ConfigError
from ztune.runtime.partition import free_storage_

META = torch.device("meta")


class MetaInitError(ConfigError):
    """A meta-device model that cannot be materialised as asked (no initialiser, wrong device, ...)."""


def seed_for(base_seed: int, name: str) -> int:
    """The generator seed of module `name` (its qualified name, "" for the root): deterministic across
    processes (Python's hash() is salted per process), < 2^63."""
    digest = hashlib.sha256(f"{base_seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def has_meta_tensors(model: nn.Module) -> bool:
    return any(t.is_meta for t in model.parameters()) or any(t.is_meta for t in model.buffers())


@contextmanager
def zero_init(config=None) -> Iterator[None]:
    """Build modules with parameters on the meta device and buffers on the default device.

    `config` (optional: what `ztune.initialize` accepts) is loaded and validated now, so a bad config fails
    before construction; it does not change construction. Parameters registered inside the context (any
    `module.x = nn.Parameter(...)` or `register_parameter`) are replaced by a meta parameter of the same shape,
    dtype and requires_grad; a parameter already on meta (tied weights) is registered as is."""
    if config is not None:
        from ztune.config import load

        load(config)
    original = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.detach().to(META), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _post_order(module: nn.Module, *, skip: set[int]) -> Iterator[nn.Module]:
    """`module`'s subtree children first (nn.Module.apply's order), not descending into ids in `skip`."""
    for child in module.children():
        if id(child) not in skip:
            yield from _post_order(child, skip=skip)
    yield module


def _empty_like_on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device=device)


def _fill_unset(t: torch.Tensor) -> None:
    if t.is_floating_point() or t.is_complex():
        t.fill_(float("nan"))


def _unset(t: torch.Tensor) -> bool:
    return (t.is_floating_point() or t.is_complex()) and bool(torch.isnan(t).any())


class MetaInit:
    """Materialises a meta-device model unit by unit (see the module docstring).

    units: the stage-3 units (the root unit is everything outside them); device: the training device;
    seed: the base seed; init_fn: called as init_fn(module) for every module, instead of the model's own init."""

    def __init__(self, model: nn.Module, *, units: Sequence[nn.Module], device: torch.device, seed: int = 0,
                 init_fn: Callable[[nn.Module], None] | None = None):
        self.model = model
        self.units = list(units)
        self.device = torch.device(device)
        self.seed = seed
        self.init_fn = init_fn
        self.names = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
        self.replaced: dict[int, nn.Parameter] = {}  # id(meta parameter) -> its placeholder
        self._placeholders: set[int] = set()
        # id(unit) -> (storages to free on release, ids of the parameters they belong to)
        self._live: dict[int, tuple[list[torch.UntypedStorage], list[int]]] = {}
        self._swap_parameters()

    # -- placeholders -------------------------------------------------------------------------------------
    def _swap_parameters(self) -> None:
        """Every meta parameter becomes a placeholder on the device: right shape and dtype, storage of size 0
        (the engine's flat layout needs shapes only). A tied parameter maps to one placeholder everywhere."""
        for module in self.model.modules():
            for name, p in list(module._parameters.items()):
                if p is None or not p.is_meta:
                    continue
                new = self.replaced.get(id(p))
                if new is None:
                    data = _empty_like_on(p, self.device)
                    free_storage_(data)
                    new = nn.Parameter(data, requires_grad=p.requires_grad)
                    self.replaced[id(p)] = new
                    self._placeholders.add(id(new))
                module._parameters[name] = new

    def remap(self, params: Sequence[nn.Parameter]) -> list[nn.Parameter]:
        """`params` with each meta parameter replaced by its placeholder (for model_parameters / trainable)."""
        return [self.replaced.get(id(p), p) for p in params]

    def is_pending(self, p: torch.Tensor) -> bool:
        return id(p) in self._placeholders

    # -- one unit -----------------------------------------------------------------------------------------
    def modules_of(self, unit: nn.Module) -> list[nn.Module]:
        """The modules whose init builds `unit`: its subtree, or for the root (the model) every module outside
        the units' subtrees; children first."""
        if unit is self.model:
            return list(_post_order(self.model, skip={id(u) for u in self.units}))
        return list(_post_order(unit, skip=set()))

    @torch.no_grad()
    def materialize(self, unit: nn.Module) -> None:
        """Give `unit`'s placeholder parameters full storage and initialise them, with the unit's meta buffers
        (which stay materialised). Raises MetaInitError naming a tensor the init left unset."""
        modules = self.modules_of(unit)
        storages: list[torch.UntypedStorage] = []
        ids: list[int] = []
        fresh: list[tuple[str, torch.Tensor]] = []
        for module in modules:
            prefix = self.names.get(id(module), "")
            for name, p in module._parameters.items():
                if p is not None and self.is_pending(p) and p.untyped_storage().nbytes() == 0:
                    p.untyped_storage().resize_(p.numel() * p.element_size())
                    _fill_unset(p)
                    storages.append(p.untyped_storage())
                    ids.append(id(p))
                    fresh.append((f"{prefix}.{name}".lstrip("."), p))
            for name, b in list(module._buffers.items()):
                if b is not None and b.is_meta:
                    real = _empty_like_on(b, self.device)
                    _fill_unset(real)
                    module._buffers[name] = real
                    fresh.append((f"{prefix}.{name}".lstrip("."), real))
        self._live[id(unit)] = (storages, ids)
        for module in modules:
            self._init_module(module)
        unset = [name for name, t in fresh if _unset(t)]
        if unset:
            raise MetaInitError(
                f"no initialiser set {', '.join(unset[:8])}{' ...' if len(unset) > 8 else ''} (built on the meta "
                "device): give the module a reset_parameters(), pass init_fn= to ztune.initialize, or load "
                "weights= for it")

    def _init_module(self, module: nn.Module) -> None:
        hf_init = getattr(self.model, "_init_weights", None)
        if self.init_fn is not None:
            init = self.init_fn
        elif callable(hf_init):
            init = hf_init
        elif callable(getattr(module, "reset_parameters", None)):
            def init(m: nn.Module) -> None:
                m.reset_parameters()
        else:
            return
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed_for(self.seed, self.names.get(id(module), "")))
            try:
                init(module)
            except RuntimeError as exc:
                if "out of bounds for storage of size 0" not in str(exc):
                    raise
                raise MetaInitError(
                    f"the init of {self.names.get(id(module)) or type(module).__name__} writes parameters outside "
                    "its own stage-3 unit; pass units= so that the module and the parameters it initialises are "
                    "in one unit") from exc

    def release(self, unit: nn.Module) -> None:
        """Free the storage `materialize(unit)` allocated (parameters the engine has re-pointed at flat buffers
        are unaffected: their old storage is what is freed)."""
        storages, ids = self._live.pop(id(unit), ([], []))
        for storage in storages:
            storage.resize_(0)
        self._placeholders.difference_update(ids)

    def materialize_all(self) -> None:
        """Materialise every unit in full and keep it (stages 0-2, which hold full parameters)."""
        for unit in [self.model, *self.units]:
            self.materialize(unit)
            self._live.pop(id(unit), None)
        self._placeholders.clear()
