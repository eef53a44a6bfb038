"""Stage 3's backward re-gather as the runtime does it: a unit that is a plain nn.Embedding (an untied token
embedding holding at least a block's parameters, runtime/param_gather.py find_units) is gathered for forward only,
so the cost model's bytes, launches and qwZ codec work leave it out of the backward all-gather.
tests/dist/test_reports.py checks the same against the runtime's comm_report."""

from __future__ import annotations

import dataclasses

import pytest

from ztune.config.schema import Checkpointing, Precision, TrainConfig, ZeroConfig
from ztune.cost.codec import qwz_work
from ztune.cost.comm import ALL_GATHER, Link, comm_estimate, zero_traffic_elements
from ztune.cost.estimate import estimate
from ztune.cost.zeropp import zeropp_comm_estimate, zeropp_traffic
from ztune.profiles import load_hardware, load_model
from ztune.specs import Architecture, ModelSpec, count_params, no_backward_gather_units, zero3_units

LLAMA = ModelSpec(name="t-llama", architecture=Architecture.LLAMA, vocab_size=1024, hidden_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, intermediate_size=128, max_seq_len=16, tied_embeddings=False)


def test_which_units_backward_does_not_gather():
    # tiny-llama: 8192 x 512 untied embedding (4.2M) against 2.8M per block: its own unit, not re-gathered
    assert no_backward_gather_units(load_model("tiny-llama")) == (8192 * 512,)
    # its units, as the runtime forms them: root (final norm), embedding, 8 blocks, head
    assert zero3_units(load_model("tiny-llama")) == 11
    assert zero3_units(dataclasses.replace(LLAMA, tied_embeddings=True)) == 2 + 1  # blocks + root
    assert no_backward_gather_units(LLAMA) == (1024 * 64,)
    # tied: the embedding's weight is the head's too, so it stays in the root unit (gathered for backward)
    assert no_backward_gather_units(dataclasses.replace(LLAMA, tied_embeddings=True)) == ()
    # smaller than a block: part of the root unit
    small = dataclasses.replace(LLAMA, vocab_size=128)
    assert 128 * 64 < count_params(small).per_layer
    assert no_backward_gather_units(small) == ()
    # GPT-2's position embedding counts too when it reaches a block's size
    gpt2 = ModelSpec(name="t-gpt2", architecture=Architecture.GPT2, vocab_size=1024, hidden_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=4, intermediate_size=128, max_seq_len=1024, tied_embeddings=True)
    assert count_params(gpt2).per_layer <= 1024 * 64
    assert no_backward_gather_units(gpt2) == (1024 * 64,)


@pytest.mark.parametrize("accum", [1, 3])
def test_stage3_traffic_without_the_skipped_units(accum):
    p, n, skipped = 10_000, 4, 3_000
    ring = (n - 1) / n
    got = zero_traffic_elements(p, n, 3, accum, backward_gather_numel=p - skipped)
    assert got == pytest.approx(accum * ring * (p + (p - skipped) + p), rel=1e-12)
    assert zero_traffic_elements(p, n, 0, accum, backward_gather_numel=p - skipped) == \
        zero_traffic_elements(p, n, 0, accum)  # only stage 3 re-gathers


def test_comm_estimate_drops_the_skipped_units_bytes_and_launches():
    link = Link(bw_bytes_per_s=1e9, latency_s=1e-5)
    kw = dict(num_params=10_000, world_size=4, stage=3, grad_accum=2, link=link, param_bytes=2, grad_bytes=2,
              reduce_bucket_numel=10**9, allgather_bucket_numel=10**9, num_units=5)
    plain = comm_estimate(**kw)
    skip = comm_estimate(**kw, no_backward_gather=(3_000,))
    gathers = [o for o in plain.ops if o.op == ALL_GATHER]
    gathers_skip = [o for o in skip.ops if o.op == ALL_GATHER]
    assert [o.calls for o in gathers] == [10, 10] and [o.calls for o in gathers_skip] == [10, 8]
    assert plain.bytes_per_rank - skip.bytes_per_rank == pytest.approx(2 * 3_000 * 2 * 0.75)


def test_zeropp_leaves_the_skipped_units_out_of_the_backward_gather():
    p, skipped = 10_000, 3_000
    kw = dict(num_params=p, num_nodes=2, ranks_per_node=2, grad_accum=1)
    for extra in ({}, {"quantized_weights": True}, {"hpz_partition_size": 2}):
        plain, skip = zeropp_traffic(**kw, **extra), zeropp_traffic(**kw, **extra, backward_gather_numel=p - skipped)
        saved = (plain.cross_host_bytes + plain.intra_host_bytes) - (skip.cross_host_bytes + skip.intra_host_bytes)
        per_elem = {"quantized_weights": plain.param_gather_cross_bytes / (2 * 0.75 * p)}.get(
            next(iter(extra), ""), 2.0)
        share = 0.5 if "hpz_partition_size" in extra else 0.75  # (k-1)/k in the host, (n-1)/n across
        assert saved == pytest.approx(skipped * per_elem * share), extra
    link = Link(bw_bytes_per_s=1e9, latency_s=1e-5, num_nodes=2, gpus_per_node=2)
    est = zeropp_comm_estimate(**{k: v for k, v in kw.items()}, link=link, intra_link=link, param_bytes=2,
                               grad_bytes=2, num_units=5, quantized_weights=False, hpz_partition_size=2,
                               no_backward_gather=(skipped,))
    assert [o.calls for o in est.ops if o.op == ALL_GATHER] == [5, 4]  # forward flat; backward in the host


def test_qwz_codec_work_counts_backward_gathers_as_the_runtime_does():
    w = qwz_work(num_params=1000, world_size=4, grad_accum=2, hpz=False, backward_gather_numel=700)
    assert (w.encode_numel, w.decode_numel) == (pytest.approx(2 * 1700 / 4), pytest.approx(2 * 1700))
    assert qwz_work(num_params=1000, world_size=4, grad_accum=2, hpz=True, backward_gather_numel=700) == \
        qwz_work(num_params=1000, world_size=4, grad_accum=2, hpz=True)  # hpZ: backward gathers unquantized


def test_estimate_of_tiny_llama_stage3_bytes():
    model, hw = load_model("tiny-llama"), load_hardware("cpu-local")
    cfg = TrainConfig(zero=ZeroConfig(stage=3), precision=Precision.BF16, seq_len=128)
    cfg = dataclasses.replace(cfg, activations=dataclasses.replace(cfg.activations,
                                                                   checkpointing=Checkpointing.NONE))
    e = estimate(model, hw, cfg, num_nodes=1)
    p, n = e.num_params, e.world_size
    want = 2 * zero_traffic_elements(p, n, 3, e.grad_accum, backward_gather_numel=p - 8192 * 512)
    assert e.comm_bytes_per_step == pytest.approx(want, rel=1e-12)
    assert e.comm_bytes_per_step < 2 * zero_traffic_elements(p, n, 3, e.grad_accum)
