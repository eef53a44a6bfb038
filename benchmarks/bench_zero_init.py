"""Peak memory per rank while building, initialising and training a transformers Llama at ZeRO stage 3 on CPU ranks.

    python benchmarks/bench_zero_init.py [--hidden 768] [--layers 12] [--ranks 2,4] [--precisions fp32,bf16]

Systems, each on the same model config and data:
- ztune-meta: `with ztune.zero_init(): model = LlamaForCausalLM(cfg)`, then `ztune.initialize` (each rank
  materialises one unit at a time and keeps its shards; runtime/construct/);
- ztune-eager: the model built in full on every rank, then `ztune.initialize` (broadcast from rank 0 one unit
  at a time, no full fp32 master);
- fsdp2-meta: PyTorch FSDP2 as its docs describe: model on the meta device, `fully_shard` per decoder layer and
  the root, `to_empty(device="cpu")`, then the model's init (`model.apply(model._init_weights)`) on the DTensors.
Per rank and phase (after construction, after initialisation, after 3 training steps, seq 64, micro-batch 1):
the process's peak resident set (getrusage ru_maxrss, a high-water mark), minus the baseline measured after
imports. Shared memory is switched off (ZTUNE_SHM=0) so that no rank's RSS counts pages its peers own.
DeepSpeed zero.Init is not measured here (not run on this machine within this script's budget).
Writes docs/bench/zero_init.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import resource
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SEQ, MICRO, STEPS = 64, 1, 3


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _config(*, hidden: int, layers: int):
    import transformers

    return transformers.LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3),
                                    num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                                    num_key_value_heads=max(1, hidden // 64), max_position_embeddings=SEQ,
                                    use_cache=False, tie_word_embeddings=False)


def measure(rank: int, world_size: int, system: str, precision: str, hidden: int, layers: int) -> dict:
    import torch
    import transformers

    import ztune

    base = _peak_mib()
    cfg = _config(hidden=hidden, layers=layers)
    ids = torch.randint(0, cfg.vocab_size, (MICRO, SEQ), generator=torch.Generator().manual_seed(rank))
    if system == "fsdp2-meta":
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(cfg)
        built = _peak_mib()
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if precision == "bf16" else None)
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        model.to_empty(device="cpu")
        with torch.no_grad():
            model.apply(model._init_weights)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        inited = _peak_mib()
        for _ in range(STEPS):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    else:
        if system == "ztune-meta":
            with ztune.zero_init():
                model = transformers.LlamaForCausalLM(cfg)
        else:
            model = transformers.LlamaForCausalLM(cfg)
        built = _peak_mib()
        engine, _, _, _ = ztune.initialize(model, {"zero": {"stage": 3}, "precision": precision,
                                                   "batch": {"micro": MICRO},
                                                   "optimizer": {"type": "AdamW", "lr": 1e-4}})
        inited = _peak_mib()
        for _ in range(STEPS):
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
    trained = _peak_mib()
    return {"built": built - base, "inited": inited - base, "trained": trained - base,
            "params": sum(p.numel() for p in model.parameters()) if system != "ztune-meta" else None}


def main(argv: list[str]) -> int:
    from tests.helpers.spawn import run_ranks

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--ranks", default="2,4")
    parser.add_argument("--precisions", default="fp32")
    parser.add_argument("--systems", default="ztune-meta,ztune-eager,fsdp2-meta")
    args = parser.parse_args(argv)
    cfg = _config(hidden=args.hidden, layers=args.layers)
    h, v, n_layers = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    num_params = 2 * v * h + n_layers * (4 * h * h + 3 * h * cfg.intermediate_size + 2 * h) + h
    layer_mib = (4 * h * h + 3 * h * cfg.intermediate_size) * 4 / 2**20
    rows = []
    for precision in args.precisions.split(","):
        for world in [int(x) for x in args.ranks.split(",")]:
            for system in args.systems.split(","):
                out = run_ranks(measure, world_size=world, args=(system, precision, args.hidden, args.layers),
                                timeout_s=1800, env={"ZTUNE_SHM": "0"})
                worst = {k: max(o[k] for o in out) for k in ("built", "inited", "trained")}
                rows.append((precision, world, system, worst))
                print(precision, world, system, {k: round(x) for k, x in worst.items()}, flush=True)
    psi_mib = num_params * 4 / 2**20
    lines = [
        "## ZeRO-3 construction: peak memory per rank", "",
        f"`python benchmarks/bench_zero_init.py --hidden {args.hidden} --layers {args.layers} --ranks {args.ranks} "
        f"--precisions {args.precisions}` on {dt.date.today().isoformat()}, load average "
        f"{os.getloadavg()[0]:.1f}.", "",
        f"transformers Llama, {num_params / 1e6:.0f}M parameters (fp32 model {psi_mib:.0f} MiB; one decoder "
        f"layer {layer_mib:.0f} MiB, the embedding and head {2 * v * h * 4 / 2**20:.0f} MiB), stage 3, "
        f"{STEPS} AdamW steps at seq {SEQ}, micro-batch {MICRO}. Peak RSS above the post-import baseline "
        "(ru_maxrss, a high-water mark, so each column includes the earlier phases), worst rank, MiB. "
        "16Ψ/n is the steady-state model-state bound of mixed-precision Adam at stage 3.", "",
        "| precision | ranks | system | construction | + initialise | + 3 steps | 16Ψ/n |",
        "|---|---|---|---|---|---|---|",
    ]
    for precision, world, system, worst in rows:
        lines.append(f"| {precision} | {world} | {system} | {worst['built']:.0f} | {worst['inited']:.0f} | "
                     f"{worst['trained']:.0f} | {4 * psi_mib / world:.0f} |")
    out_path = ROOT / "docs" / "bench" / "zero_init.md"
    out_path.write_text("\n".join(lines) + "\n")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
