"""The cost model's published-cluster checks (benchmarks/validation_rows.yaml) and two kinds issue #14 fixed:
fp32 gradient reduction and offload gradient copies overlapping backward."""

import sys
from pathlib import Path

import pytest

from ztune.config.schema import BatchConfig, Offload, Precision, TrainConfig, ZeroConfig
from ztune.cost.comm import REDUCE_SCATTER
from ztune.cost.compute import offload_time, step_time
from ztune.cost.estimate import Framework, estimate
from ztune.profiles import load_hardware, load_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_validation  # noqa: E402

ROWS, SHAPES = bench_validation.load_rows()


@pytest.mark.parametrize("row", ROWS, ids=[r["id"] for r in ROWS])
def test_published_runs_are_predicted_to_fit(row):
    """Every row is a run that ran: the model must not say it does not fit, and where the source gives a
    parameter count, ztune's count of the same shape must equal it."""
    result = bench_validation.predict(row, SHAPES)
    assert result.fits, result.reason
    if "published_params" in row:
        assert result.params == row["published_params"]
    assert result.predicted > 0


def test_rows_name_their_source():
    assert len(ROWS) >= 15
    for row in ROWS:
        assert row["source"] and row["read"] and row["set"] in ("issue14", "own", "heldout"), row["id"]
    assert len({r["id"] for r in ROWS}) == len(ROWS)


def test_fp32_reduction_doubles_reduce_scatter_bytes():
    spec, hw = load_model("llama-3-8b"), load_hardware("dgx-h100")
    cfg = TrainConfig(zero=ZeroConfig(stage=3), precision=Precision.BF16, seq_len=4096,
                      batch=BatchConfig(micro=1, global_=32))
    bf16 = estimate(spec, hw, cfg, num_nodes=2)
    fp32 = estimate(spec, hw, cfg, num_nodes=2, framework=Framework(reduce_bytes=4))

    def rs_bytes(est):
        return sum(o.bytes_per_rank for o in est.comm.ops if o.op == REDUCE_SCATTER)

    assert rs_bytes(fp32) == pytest.approx(2 * rs_bytes(bf16))
    gathers = [o.bytes_per_rank for o in bf16.comm.ops if o.op != REDUCE_SCATTER]
    assert gathers == [o.bytes_per_rank for o in fp32.comm.ops if o.op != REDUCE_SCATTER]


def test_offloaded_gradient_copy_hides_behind_backward():
    off = offload_time(shard_numel=10**9, param_bytes=2, grad_bytes=2, optimizer_bytes=12, offload_optimizer=True,
                       offload_params=False, activation_host_bytes=0, grad_accum=1, gpus_per_node=1,
                       host_device_bw_bytes_per_s=1e10, host_memory_bw_bytes_per_s=1e11)
    assert off.grad_transfer_s == pytest.approx(0.2)  # 2 GB down
    assert off.optimizer_transfer_s == pytest.approx(0.2)  # 2 GB of parameters up, after the step
    kw = dict(grad_accum=1, comm_micro_s=0.0, comm_boundary_s=0.0, comm_after_step_s=0.0, offload=off)
    long = step_time(compute_s=3.0, overlap=1.0, **kw)  # backward (2 s) covers the 0.2 s copy
    assert long.offload_s == pytest.approx(off.serial_s)
    short = step_time(compute_s=0.15, overlap=1.0, **kw)  # backward 0.1 s: 0.1 s of the copy shows
    assert short.offload_s == pytest.approx(off.serial_s + 0.1)


def test_zero_offload_row_counts_the_cpu_step():
    row = next(r for r in ROWS if r["id"] == "zero-offload-10b")
    result = bench_validation.predict(row, SHAPES)
    assert row["offload_optimizer"] and result.fits
    cfg = bench_validation._config(row)
    assert cfg.zero.offload_optimizer is Offload.CPU
