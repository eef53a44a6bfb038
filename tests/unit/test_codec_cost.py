"""cost/codec.py's element counts against the runtime's own code paths, and the codec term in the estimate.

The runtime paths run in one process over a stand-in communicator that plays every peer (each peer "sends" what
this rank sends: the codec calls do not depend on the values). The codec functions are wrapped to count the
elements each call encodes or decodes; a change to the runtime's path (an extra decode, a gather dropped, a
stage exchanging every micro-step) changes the counts and fails these tests.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ztune.config.schema import Compression, TrainConfig
from ztune.cost import codec as cc
from ztune.cost.estimate import estimate, recommend, sweep
from ztune.profiles import load_hardware, load_model
from ztune.runtime.comm import compress
from ztune.runtime.grad_reduce import CompressedExchange, GradReducer
from ztune.runtime.partition import FlatGroup, build_layout


class _Done:
    def wait(self) -> None:
        pass


class PeerComm:
    """`world_size` ranks in one process: every peer sends what this rank sends."""

    def __init__(self, world_size: int, rank: int = 0):
        self.world_size, self.rank = world_size, rank

    def all_to_all(self, output, input, *, async_op=False):
        output.copy_(input)
        return _Done() if async_op else None

    def all_gather(self, output, shard, *, async_op=False, group=None):
        output.view(self.world_size, -1).copy_(shard.clone().view(1, -1).expand(self.world_size, -1))
        return _Done() if async_op else None


@pytest.fixture
def counted(monkeypatch):
    """Counts {"ef": elements through ErrorFeedback.compress, "decode": through Codec.decode and
    Codec.decode_into (all of them, the ones inside ErrorFeedback.compress included)}."""
    counts = {"ef": 0, "decode": 0}
    ef, dec, dec_into = compress.ErrorFeedback.compress, compress.Codec.decode, compress.Codec.decode_into

    def ef_counted(self, x, *, pieces=1):
        counts["ef"] += x.numel()
        return ef(self, x, pieces=pieces)

    def dec_counted(self, buf, *, numel):
        counts["decode"] += numel
        return dec(self, buf, numel=numel)

    monkeypatch.setattr(compress.ErrorFeedback, "compress", ef_counted)
    def dec_into_counted(self, buf, out, *, mode=0):
        counts["decode"] += out.numel()
        return dec_into(self, buf, out, mode=mode)

    monkeypatch.setattr(compress.Codec, "decode", dec_counted)
    monkeypatch.setattr(compress.Codec, "decode_into", dec_into_counted)
    return counts


def _check(counts: dict, work: cc.CodecWork) -> None:
    # ErrorFeedback.compress decodes what it encoded (its residual update): part of `encode`, not of `decode`.
    assert counts["ef"] == work.encode_numel
    assert counts["decode"] - counts["ef"] == work.decode_numel


@pytest.mark.parametrize("method", [Compression.INT8, Compression.ONEBIT, Compression.TOPK])
@pytest.mark.parametrize("n,gather", [(2, True), (4, True), (4, False)])
def test_compressed_exchange_counts(counted, method, n, gather):
    numel = 4096 * n
    ex = CompressedExchange(compress.Codec(method), comm=PeerComm(n), padded_numel=numel, device=torch.device("cpu"))
    work, recv = ex.start(torch.randn(numel))
    work.wait()
    reduced = ex.reduce(recv)
    if gather:
        ex.gather(reduced, torch.empty(numel))
    _check(counted, cc.compressed_exchange_work(method=method, padded_numel=numel, world_size=n, gather=gather))


@pytest.mark.parametrize("stage,accum", [(0, 1), (0, 3), (1, 2), (2, 1), (2, 3)])
def test_grad_reducer_counts_per_stage(counted, stage, accum):
    """GradReducer over one flat group, `accum` micro-steps then a step: the count of
    gradient_compression_work (stages 0/1 exchange at the boundary only, 0 alone with the gather; 2/3 every
    micro-step)."""
    n = 2
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32, bias=False)
    params = list(lin.parameters())
    layout = build_layout([p.shape for p in params], world_size=n)
    shard_states, shard_grads = stage >= 1, stage >= 2
    group = FlatGroup(params, layout=layout, master_full=torch.cat([p.detach().reshape(-1) for p in params] + [
        torch.zeros(layout.padded_numel - layout.numel)]), rank=0, dtype=torch.float32, shard_states=shard_states,
        shard_grads=shard_grads, shard_params=False)
    reducer = GradReducer([group], comm=PeerComm(n), shard_states=shard_states, shard_grads=shard_grads,
                          compression=Compression.ONEBIT)
    for micro in range(accum):
        reducer.begin(boundary=micro == accum - 1)
        lin(torch.randn(4, 64)).square().sum().backward()
        reducer.finish()
    reducer.zero_grads()
    work = cc.gradient_compression_work(method=Compression.ONEBIT, trainable_params=layout.padded_numel,
                                        world_size=n, stage=stage, grad_accum=accum)
    _check(counted, work)


def test_onebit_adam_counts_after_freeze_only(counted):
    from ztune.runtime.onebit_adam import OneBitAdam

    n, numel = 4, 4096
    master = torch.nn.Parameter(torch.randn(numel))
    opt = OneBitAdam([master], comm=PeerComm(n), freeze_step=2)
    for step in range(3):
        master.grad = torch.randn(numel)
        opt.step()
        if step < 2:  # warm-up: plain Adam, the engine all-reduces: no codec
            assert counted == {"ef": 0, "decode": 0}
    _check(counted, cc.onebit_adam_work(trainable_params=numel, world_size=n))


def test_qwz_counts_per_gather(monkeypatch):
    from ztune.runtime import zeropp

    counts = {"encode": 0, "decode": 0}
    quantize, dequantize = zeropp.quantize_shard, zeropp.dequantize_pieces

    def q(shard, out):
        counts["encode"] += shard.numel()
        return quantize(shard, out)

    def dq(gathered, out, *, num_pieces):
        counts["decode"] += out.numel()
        return dequantize(gathered, out, num_pieces=num_pieces)

    monkeypatch.setattr(zeropp, "quantize_shard", q)
    monkeypatch.setattr(zeropp, "dequantize_pieces", dq)
    n, numel = 4, 8192
    pp = zeropp.ZeroPlusPlus([], comm=PeerComm(n), quantized_weights=True, hpz_comm=None)
    unit = type("Unit", (), {"param_full": torch.empty(numel)})()
    for _ in range(2):  # one micro-step without hpZ: the forward gather and the backward gather
        work, finish = pp.start_quantized(unit, shard=torch.randn(numel // n))
        work.wait()
        finish()
    work = cc.qwz_work(num_params=numel, world_size=n, grad_accum=1, hpz=False)
    assert (counts["encode"], counts["decode"]) == (work.encode_numel, work.decode_numel)
    assert cc.qwz_work(num_params=numel, world_size=n, grad_accum=1, hpz=True).encode_numel == numel // n


@pytest.mark.parametrize("ell,nodes", [(2, 2), (4, 2), (2, 3)])
def test_qgz_counts(monkeypatch, ell, nodes):
    from ztune.runtime import qgz

    counts = {"encode": 0, "decode": 0}
    quantize, dequantize = qgz.quantize_int4, qgz.dequantize_int4

    def q(x, out):
        counts["encode"] += x.numel()
        return quantize(x, out)

    def dq(buf, *, numel, add_to=None):
        counts["decode"] += numel
        return dequantize(buf, numel=numel, add_to=add_to)

    monkeypatch.setattr(qgz, "quantize_int4", q)
    monkeypatch.setattr(qgz, "dequantize_int4", dq)
    numel = 2048 * ell * nodes
    ex = qgz.QgzExchange(intra=PeerComm(ell), inter=PeerComm(nodes), padded_numel=numel)
    work, recv = ex.start(torch.randn(numel))
    work.wait()
    ex.reduce(recv)
    want = cc.qgz_work(trainable_params=numel, ranks_per_node=ell, grad_accum=1)
    assert (counts["encode"], counts["decode"]) == (want.encode_numel, want.decode_numel)


# ---------------------------------------------------------------------------------------- the estimate
RATES = {name: 1e8 for name in cc.RATE_FIELDS}


def test_codec_time_is_work_over_rate_and_unknown_when_zero():
    work = [cc.CodecWork("int8", 3e8, 1e8), cc.CodecWork("qwz", 1e8, 0)]
    assert cc.codec_time(work, rates=RATES).seconds == pytest.approx(5.0)
    partial = dict(RATES, codec_qwz_encode_elements_per_s=0.0)
    t = cc.codec_time(work, rates=partial)
    assert t.unknown == ("qwz",) and t.seconds == pytest.approx(4.0)


def test_step_codec_work_follows_the_runtime_choices():
    kw = dict(trainable_params=1000, num_params=1000, world_size=4, ranks_per_node=2, grad_accum=2,
              quantized_weights=False, hpz=False, quantized_gradients=False)
    assert cc.step_codec_work(method=Compression.NONE, onebit_adam=False, stage=0, **kw) == []
    assert cc.step_codec_work(method=Compression.BF16, onebit_adam=False, stage=0, **kw) == []
    onebit = cc.step_codec_work(method=Compression.ONEBIT, onebit_adam=True, stage=0, **kw)
    assert onebit == [cc.onebit_adam_work(trainable_params=1000, world_size=4)]  # not also gradient compression
    pp = cc.step_codec_work(method=Compression.NONE, onebit_adam=False, stage=3,
                            **dict(kw, quantized_weights=True, hpz=True, quantized_gradients=True))
    assert [w.fmt for w in pp] == ["qgz", "qwz"]


def _cpu_profile(**rates):
    return dataclasses.replace(load_hardware("cpu-local"), **rates)


def test_estimate_charges_codec_time_serially():
    hw, model = _cpu_profile(**RATES), load_model("tiny-gpt")
    base = TrainConfig()
    plain = estimate(model, hw, base, num_nodes=1)
    int8 = estimate(model, hw, dataclasses.replace(base, compression=dataclasses.replace(
        base.compression, method=Compression.INT8)), num_nodes=1)
    assert plain.codec is None and plain.step.codec_s == 0
    want = cc.codec_time(cc.step_codec_work(
        method=Compression.INT8, onebit_adam=False, stage=base.zero.stage, trainable_params=int8.trainable_params,
        num_params=int8.num_params, world_size=2, ranks_per_node=2, grad_accum=int8.grad_accum,
        quantized_weights=False, hpz=False, quantized_gradients=False), rates=RATES).seconds
    assert int8.step.codec_s == pytest.approx(want) and want > 0
    s = int8.step
    assert s.step_s == pytest.approx(s.compute_s + s.codec_s + s.exposed_comm_s + s.offload_s)


def test_unknown_codec_rate_is_not_recommended_and_said():
    """dgx-h100 has no codec rates: compression rows are shown but not recommended (before, top-k won on one
    DGX node because its codec was free), and the assumptions say why."""
    model, hw = load_model("gpt2"), load_hardware("dgx-h100")
    z = TrainConfig().zero
    rows = sweep(model, hw, num_nodes=1, seq_len=1024, global_batch=None, micro_batch=8, stages=(0, 3),
                 checkpointing=(TrainConfig().activations.checkpointing,),
                 offload=((z.offload_optimizer, z.offload_params),), compression=tuple(Compression))
    best, why = recommend(rows)
    assert best.config.compression.method is Compression.NONE and best.codec is None
    assert "not considered" in why
    topk = next(r for r in rows if r.config.compression.method is Compression.TOPK)
    assert topk.codec_unknown and any(n.startswith("codec time unknown") for n in topk.notes)


def test_measured_rates_price_compression_on_the_cpu_profile():
    """cpu-local has measured codec rates: int8 compression of tiny-gpt at stage 0 (docs/bench/compression.md's
    setup) costs more codec time than it saves on the wire, so it is slower than no compression."""
    model, hw = load_model("tiny-gpt"), load_hardware("cpu-local")
    cfg = dataclasses.replace(TrainConfig(), seq_len=64)
    plain = estimate(model, hw, cfg, num_nodes=1)
    int8 = estimate(model, hw, dataclasses.replace(cfg, compression=dataclasses.replace(
        cfg.compression, method=Compression.INT8)), num_nodes=1)
    assert not int8.codec_unknown and int8.step.codec_s > 0
    assert int8.step_time_s > plain.step_time_s
