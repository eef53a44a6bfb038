"""zero_init and MetaInit on one process: what is built on meta, how each module is initialised and seeded,
and the errors for what cannot be materialised."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ztune
from ztune.runtime.construct.materialize import MetaInit, MetaInitError, seed_for

CONFIG = {"zero": {"stage": 3}, "precision": "fp32", "batch": {"micro": 1},
          "optimizer": {"type": "SGD", "lr": 0.1}}


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.register_buffer("scale", torch.arange(4.0))

    def forward(self, x):
        return self.fc(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, ids):
        x = self.emb(ids)
        for b in self.blocks:
            x = b(x)
        return self.head(x).logsumexp(-1).mean()


def test_seed_is_a_stable_function_of_base_and_name():
    assert seed_for(0, "blocks.1") == seed_for(0, "blocks.1")
    assert len({seed_for(0, "blocks.1"), seed_for(0, "blocks.2"), seed_for(1, "blocks.1")}) == 3
    assert 0 <= seed_for(123, "") < 2**63


def test_zero_init_puts_parameters_on_meta_and_keeps_buffers_real():
    register = nn.Module.register_parameter
    with ztune.zero_init():
        net = Net()
    assert nn.Module.register_parameter is register
    assert all(p.is_meta for p in net.parameters())
    assert net.head.weight is net.emb.weight
    assert torch.equal(net.blocks[0].scale, torch.arange(4.0))
    with pytest.raises(RuntimeError, match="boom"), ztune.zero_init():
        raise RuntimeError("boom")
    assert nn.Module.register_parameter is register


def test_units_materialise_to_the_eager_init_per_module_seed():
    """Each unit's values: the module's reset_parameters under its own seed, same whichever unit comes first."""
    with ztune.zero_init():
        net = Net()
    meta = MetaInit(net, units=list(net.blocks), device=torch.device("cpu"), seed=4)
    assert all(not p.is_meta and p.untyped_storage().nbytes() == 0 for p in net.parameters())
    assert net.head.weight is net.emb.weight
    meta.materialize(net.blocks[2])
    got = net.blocks[2].fc.weight.detach().clone()
    assert net.blocks[1].fc.weight.untyped_storage().nbytes() == 0  # other units stay unmaterialised
    meta.release(net.blocks[2])
    assert net.blocks[2].fc.weight.untyped_storage().nbytes() == 0
    want = nn.Linear(8, 8)
    torch.manual_seed(seed_for(4, "blocks.2.fc"))
    want.reset_parameters()
    assert torch.equal(got, want.weight.detach())


def test_init_fn_replaces_the_modules_init():
    with ztune.zero_init():
        net = Net()

    def init_fn(module):
        for p in module.parameters(recurse=False):
            nn.init.constant_(p, 0.5)

    engine, _, _, _ = ztune.initialize(net, CONFIG, init_fn=init_fn)
    state = engine.full_state_dict()
    assert all(torch.equal(v, torch.full_like(v, 0.5)) for k, v in state.items() if "scale" not in k)


class Bare(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.empty(4))

    def forward(self, x):
        return (x * self.w).sum()


def test_a_parameter_no_init_sets_is_an_error_naming_it():
    with ztune.zero_init():
        net = nn.Sequential(nn.Linear(4, 4), Bare())
    with pytest.raises(MetaInitError, match=r"no initialiser set 1\.w .*init_fn="):
        ztune.initialize(net, CONFIG)
