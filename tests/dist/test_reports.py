"""memory_report and comm_report against the cost model's formulas (DESIGN.md), every stage, 2 and 4 ranks.

Memory per rank for model states (ZeRO paper, section 3): stage 0 (2+2+K)Psi, 1: 4Psi + K Psi/n,
2: 2Psi + (2+K)Psi/n, 3: (4+K)Psi/n at bf16 with AdamW (K = 12), generalised by
ztune.cost.memory.state_bytes_per_param to fp32 (4 + 4 + K=8) and SGD. Traffic per rank per optimizer
step, ring accounting: 2(n-1)/n Psi elements at stages 0-2, 3(n-1)/n Psi at stage 3, with stage 2
reduce-scattering every micro-step and stage 3 gathering and reduce-scattering every micro-step
(ztune.cost.comm.zero_traffic_elements). The runtime pads each flat buffer to a multiple of
n x 8 elements; the 2% tolerance covers it, and the traffic is also checked exactly on the padded size.
"""

from __future__ import annotations

import pytest

from tests.helpers.spawn import run_ranks
from ztune.config.schema import OptimizerType, Precision
from ztune.cost.comm import zero_traffic_elements
from ztune.cost.memory import model_state_memory, state_bytes_per_param
from ztune.specs import Architecture, ModelSpec, zero3_units

pytestmark = pytest.mark.dist

SPEC = ModelSpec(name="report-gpt2", architecture=Architecture.GPT2, vocab_size=128, hidden_size=64,
                 num_layers=3, num_heads=4, num_kv_heads=4, intermediate_size=128, max_seq_len=16,
                 tied_embeddings=True)
MICRO, SEQ, STEPS = 1, 16, 2
CASES = [dict(stage=s, precision=p, accum=a, optimizer=o)
         for s in range(4)
         for p, a, o in (("bf16", 1, "AdamW"), ("bf16", 3, "AdamW"), ("fp32", 2, "SGD"))]


def measure(rank: int, world_size: int, cases: list[dict]) -> list[dict]:
    import torch

    import ztune
    from ztune.runtime.models import build_model

    out = []
    for c in cases:
        model = build_model(SPEC, seed=1)
        opt = {"type": c["optimizer"], "lr": 1e-3, "momentum": 0.9 if c["optimizer"] == "SGD" else 0.0}
        cfg = {"zero": {"stage": c["stage"], "reduce_bucket_numel": 20_000}, "precision": c["precision"],
               "batch": {"micro": MICRO, "grad_accum": c["accum"]}, "optimizer": opt}
        engine, *_ = ztune.initialize(model, cfg)
        gen = torch.Generator().manual_seed(rank)
        for _ in range(STEPS * c["accum"]):
            ids = torch.randint(0, SPEC.vocab_size, (MICRO, SEQ), generator=gen)
            engine.backward(engine(ids, labels=ids))
            engine.step()
        out.append({"memory": engine.memory_report(), "comm": engine.comm_report(),
                    "num_units": len(engine.groups)})
    return out


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"{n}ranks")
def reports(request):
    # Every collective through shared memory however small (runtime/comm/shm.py): its accounting must hold too.
    return request.param, run_ranks(measure, world_size=request.param, args=(CASES,), timeout_s=180,
                                    env={"ZTUNE_SHM_MIN_BYTES": "0"})


def _ids(c):
    return f"s{c['stage']}-{c['precision']}-acc{c['accum']}-{c['optimizer']}"


@pytest.mark.parametrize("index", range(len(CASES)), ids=[_ids(c) for c in CASES])
def test_memory_report_matches_zero_formulas(reports, index):
    n, results = reports
    c = CASES[index]
    for rank, per_rank in enumerate(results):
        r = per_rank[index]
        psi = r["comm"]["num_params"]
        per_param = state_bytes_per_param(precision=Precision(c["precision"]), optimizer=OptimizerType(c["optimizer"]),
                                          momentum=0.9 if c["optimizer"] == "SGD" else 0.0)
        want = model_state_memory(num_params=psi, world_size=n, stage=c["stage"], per_param=per_param)
        got = r["memory"]
        print(f"rank {rank} {_ids(c)} n={n}: measured/formula params {got['params'] / want.params_bytes:.4f} "
              f"grads {got['grads'] / want.grads_bytes:.4f} optimizer {got['optimizer'] / want.optimizer_bytes:.4f}")
        assert got["params"] == pytest.approx(want.params_bytes, rel=0.02)
        assert got["grads"] == pytest.approx(want.grads_bytes, rel=0.02)
        assert got["optimizer"] == pytest.approx(want.optimizer_bytes, rel=0.02)
        assert got["buffers"] == 0  # this model registers no buffers
        assert got["secondary_params"] == 0  # ZeRO++ hpZ only (tests/dist/test_zeropp.py)
        assert got["total"] == got["params"] + got["grads"] + got["optimizer"] + got["buffers"]


@pytest.mark.parametrize("index", range(len(CASES)), ids=[_ids(c) for c in CASES])
def test_comm_report_matches_traffic_formulas(reports, index):
    n, results = reports
    c = CASES[index]
    stage, accum = c["stage"], c["accum"]
    for per_rank in results:
        r = per_rank[index]["comm"]
        units = per_rank[index]["num_units"]
        assert r["steps"] == STEPS
        elements = r["bytes_sent_per_step"] / r["dtype_bytes"]
        want = zero_traffic_elements(r["num_params"], n, stage, accum)
        print(f"{_ids(c)} n={n}: measured/formula elements {elements / want:.4f}")
        assert elements == pytest.approx(want, rel=0.02)
        # Exactly, on the padded buffers the runtime really moves:
        assert elements == pytest.approx(zero_traffic_elements(r["padded_params"], n, stage, accum), rel=1e-12)
        if stage == 3:  # the cost model's unit count (launches) is the runtime's
            assert units == zero3_units(SPEC)
        calls = {op: v["calls"] // STEPS for op, v in r["ops"].items()}
        expected_calls = {
            0: {"all_reduce": units},
            1: {"reduce_scatter": units, "all_gather": units},
            2: {"reduce_scatter": units * accum, "all_gather": units},
            3: {"reduce_scatter": units * accum, "all_gather": 2 * units * accum},
        }[stage]
        assert calls == expected_calls


# An untied token embedding with at least a block's parameters is a stage-3 unit of its own, and a plain
# nn.Embedding unit is not gathered again for backward (runtime/param_gather.py): the cost model's traffic leaves it
# out of the backward all-gather (ztune/specs.py no_backward_gather_units). Every unit's size here is a multiple
# of 4 x 8 elements, so the runtime's padding adds nothing and the check is exact.
UNTIED = ModelSpec(name="report-llama-untied", architecture=Architecture.LLAMA, vocab_size=1024, hidden_size=64,
                   num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, max_seq_len=16,
                   tied_embeddings=False)


def measure_untied(rank: int, world_size: int) -> dict:
    import torch

    import ztune
    from ztune.runtime.models import build_model

    engine, *_ = ztune.initialize(build_model(UNTIED, seed=1), {
        "zero": {"stage": 3}, "precision": "bf16", "batch": {"micro": MICRO, "grad_accum": 2},
        "optimizer": {"type": "AdamW", "lr": 1e-3}})
    gen = torch.Generator().manual_seed(rank)
    for _ in range(STEPS * 2):
        ids = torch.randint(0, UNTIED.vocab_size, (MICRO, SEQ), generator=gen)
        engine.backward(engine(ids, labels=ids))
        engine.step()
    return {"comm": engine.comm_report(), "num_units": len(engine.groups)}


@pytest.mark.parametrize("n", [2, 4])
def test_stage3_traffic_leaves_the_embedding_out_of_the_backward_gather(n):
    from ztune.specs import count_params, no_backward_gather_units

    skipped = no_backward_gather_units(UNTIED)
    assert skipped == (1024 * 64,)
    for r in run_ranks(measure_untied, world_size=n, timeout_s=180):
        comm, units = r["comm"], r["num_units"]
        assert units == zero3_units(UNTIED) == 2 + 3  # blocks, embedding, head, root (the final norm)
        p = count_params(UNTIED).total
        assert comm["padded_params"] == comm["num_params"] == p  # no padding: the check below is exact
        elements = comm["bytes_sent_per_step"] / comm["dtype_bytes"]
        assert elements == pytest.approx(zero_traffic_elements(p, n, 3, 2, backward_gather_numel=p - sum(skipped)),
                                         rel=1e-12)
        # forward gathers every unit, backward all but the embedding's, per micro-step
        assert comm["ops"]["all_gather"]["calls"] // STEPS == 2 * (2 * units - len(skipped))
