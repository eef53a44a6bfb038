"""Comm keeps the tensors of gloo collectives referenced after they complete (runtime/comm/collectives.py, "tensor
lifetimes"): until the call after the one that first sees the collective completed, or until `settle()`.
tests/dist/test_exit.py shows what this prevents; here the policy itself is checked, call by call."""

from __future__ import annotations

import gc
import weakref

import torch

from ztune.runtime.comm import Comm


class FakeWork:
    def __init__(self) -> None:
        self.done = False

    def is_completed(self) -> bool:
        return self.done


def _held(ref: weakref.ref) -> bool:
    gc.collect()
    return ref() is not None


def test_tensors_outlive_their_collective_by_one_call() -> None:
    comm = Comm(group=None, rank=0, world_size=1)
    work = FakeWork()
    t = torch.ones(4)
    ref = weakref.ref(t)
    comm._hold(work, t)
    del t
    assert _held(ref)
    comm._hold(FakeWork(), torch.ones(1))  # still in flight: kept
    assert _held(ref)
    work.done = True
    comm._hold(FakeWork(), torch.ones(1))  # seen completed now: kept for one more call
    assert _held(ref)
    comm._hold(FakeWork(), torch.ones(1))
    assert not _held(ref)


def test_settle_lets_go_of_completed_collectives_only() -> None:
    comm = Comm(group=None, rank=0, world_size=1)
    done, running = FakeWork(), FakeWork()
    a, b = torch.ones(4), torch.ones(4)
    ref_a, ref_b = weakref.ref(a), weakref.ref(b)
    comm._hold(done, a)
    comm._hold(running, b)
    del a, b
    done.done = True
    comm.settle()
    assert not _held(ref_a)
    assert _held(ref_b)
