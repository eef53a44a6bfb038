"""Peak memory per rank while building, initialising and training a transformers Llama at ZeRO stage 3 on CPU ranks.

    python benchmarks/bench_zero_init.py [--hidden 1024] [--layers 21] [--ranks 2,4] [--precisions bf16]
                                         [--systems ztune-meta,deepspeed-zero-init,fsdp2-meta]

Systems, each on the same model config and data:
- ztune-meta: `with ztune.zero_init(): model = LlamaForCausalLM(cfg)`, then `ztune.initialize` (each rank
  materialises one unit at a time and keeps its shards; runtime/construct/);
- ztune-eager: the model built in full on every rank, then `ztune.initialize` (broadcast from rank 0 one unit
  at a time, no full fp32 master);
- deepspeed-zero-init: DeepSpeed 0.19.8 as its docs describe: `with deepspeed.zero.Init(config_dict_or_path=
  ds_config, dtype=...)`: model = LlamaForCausalLM(cfg)` (each parameter partitioned as its module's __init__
  returns), then `deepspeed.initialize` with a client torch AdamW (benchmarks/peers.py says why);
- fsdp2-meta: PyTorch FSDP2 as its docs describe: model on the meta device, `fully_shard` per decoder layer and
  the root, `to_empty(device="cpu")`, then the model's init (`model.apply(model._init_weights)`) on the DTensors.
Per rank and phase (after construction, after initialisation, after 3 training steps, seq 64, micro-batch 1):
the process's peak resident set (getrusage ru_maxrss, a high-water mark), minus the baseline measured after
imports (torch, transformers, and the system's own package). Shared memory is switched off (ZTUNE_SHM=0) so that
no rank's RSS counts pages its peers own.

Each invocation adds its rows to docs/bench/zero_init.json (keyed by model, precision, ranks, system), so the
systems can be run one at a time on a machine without the memory for all of them at once, and then writes
docs/bench/zero_init.md from every stored row of the current model.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SEQ, MICRO, STEPS = 64, 1, 3
JSON_PATH = ROOT / "docs" / "bench" / "zero_init.json"
MD_PATH = ROOT / "docs" / "bench" / "zero_init.md"
SYSTEMS = ("ztune-meta", "ztune-eager", "deepspeed-zero-init", "fsdp2-meta")


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _config(*, hidden: int, layers: int):
    import transformers

    return transformers.LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3),
                                    num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                                    num_key_value_heads=max(1, hidden // 64), max_position_embeddings=SEQ,
                                    use_cache=False, tie_word_embeddings=False)


def _sizes(cfg) -> dict:
    """Parameter counts of the untied Llama `cfg` (transformers' modeling_llama layout, no biases)."""
    h, v, inter = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
    kv = h // cfg.num_attention_heads * cfg.num_key_value_heads
    layer = 2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h  # q,o + k,v + gate/up/down + two RMSNorms
    embed = v * h  # embed_tokens; lm_head (untied) is as large
    # ztune's units (runtime/param_gather.py): one per decoder layer, the untied embed_tokens and lm_head each
    # a unit of their own, and the root (the final norm); the largest is what construction holds whole at once
    return {"params": cfg.num_hidden_layers * layer + 2 * embed + h, "layer": layer, "embed": embed}


def _ds_config(precision: str) -> dict:
    from benchmarks.peers import DS_BUCKET_NUMEL

    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
            "zero_optimization": {"stage": 3, "reduce_bucket_size": DS_BUCKET_NUMEL},
            "bf16": {"enabled": precision == "bf16"}, "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False}


def measure(rank: int, world_size: int, system: str, precision: str, hidden: int, layers: int) -> dict:
    import torch
    import transformers

    if system == "deepspeed-zero-init":
        from benchmarks.peers import import_deepspeed

        deepspeed = import_deepspeed()
    else:
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
    elif system == "deepspeed-zero-init":
        ds_config = _ds_config(precision)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        # Resolve transformers' lazy import (it pulls in torch._dynamo) before zero.Init patches tensor
        # creation: importing dynamo under zero.Init fails with a signature mismatch (DeepSpeed 0.19.8).
        llama = transformers.LlamaForCausalLM
        with deepspeed.zero.Init(config_dict_or_path=ds_config, dtype=dtype):
            model = llama(cfg)
        built = _peak_mib()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        inited = _peak_mib()
        for _ in range(STEPS):
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
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
    return {"baseline": base, "built": built - base, "inited": inited - base, "trained": trained - base}


def _load_rows() -> dict:
    return json.loads(JSON_PATH.read_text()) if JSON_PATH.exists() else {}


def _render(rows: dict, *, model_key: str, sizes: dict) -> list[str]:
    psi = sizes["params"]
    largest = max(sizes["layer"], sizes["embed"])
    unit_mib = largest * 4 / 2**20  # materialised in the construction dtype, fp32
    unit_name = "the embedding or the head" if sizes["embed"] >= sizes["layer"] else "a decoder layer"
    lines = [
        "## ZeRO-3 construction: peak memory per rank", "",
        f"transformers Llama {model_key}, {psi / 1e6:.0f}M parameters (fp32 model {psi * 4 / 2**20:.0f} MiB; one "
        f"decoder layer {sizes['layer'] * 4 / 2**20:.0f} MiB, the embedding and the (untied) head "
        f"{sizes['embed'] * 4 / 2**20:.0f} MiB each in fp32, each a unit of its own in ztune), stage 3, "
        f"{STEPS} AdamW steps at seq {SEQ}, micro-batch "
        f"{MICRO}, CPU ranks over gloo (ZTUNE_SHM=0). Peak RSS above the process baseline (ru_maxrss, a high-water "
        "mark, so each column includes the earlier phases; the baseline is the RSS after importing torch, "
        "transformers and the system), worst rank, MiB. Target (DESIGN.md, stage-3 init): init peak ≤ 16Ψ/n + the "
        f"largest unit ({unit_mib:.0f} MiB, {unit_name} in fp32) + the baseline; whole-run peak ≤ FSDP2's. "
        "16Ψ/n is the steady-state model-state bound of mixed-precision Adam at stage 3 (ZeRO paper).", "",
        "| precision | ranks | system | baseline | construction | + initialise | + 3 steps | init target "
        "16Ψ/n + unit | init ≤ target | when, load average |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted((k for k in rows if k.startswith(model_key + "|")),
                  key=lambda k: (k.split("|")[1], int(k.split("|")[2]), SYSTEMS.index(k.split("|")[3])))
    for key in keys:
        _, precision, world, system = key.split("|")
        row = rows[key]
        target = 16 * psi / int(world) / 2**20 + unit_mib
        lines.append(f"| {precision} | {world} | {system} | {row['baseline']:.0f} | {row['built']:.0f} | "
                     f"{row['inited']:.0f} | {row['trained']:.0f} | {target:.0f} | "
                     f"{'yes' if row['inited'] <= target else 'no'} | {row['when']}, {row['load']:.1f} |")
    commands = sorted({rows[k]["command"] for k in keys})
    lines += ["", "Commands (one framework per run, so that the 4-rank runs fit the machine's free memory):", ""]
    lines += [f"    {c}" for c in commands]
    machines = sorted({rows[k]["machine"] for k in keys})
    lines += ["", "Machine: " + "; ".join(machines) + "."]
    return lines


def main(argv: list[str]) -> int:
    import psutil

    from tests.helpers.spawn import run_ranks

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=21)
    parser.add_argument("--ranks", default="2,4")
    parser.add_argument("--precisions", default="bf16")
    parser.add_argument("--systems", default="ztune-meta,deepspeed-zero-init,fsdp2-meta")
    args = parser.parse_args(argv)
    systems = args.systems.split(",")
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        print(f"error: unknown system {unknown[0]!r} (choose from {', '.join(SYSTEMS)})", file=sys.stderr)
        return 2
    cfg = _config(hidden=args.hidden, layers=args.layers)
    sizes = _sizes(cfg)
    model_key = f"hidden {args.hidden}, {args.layers} layers"
    command = f"python benchmarks/bench_zero_init.py --hidden {args.hidden} --layers {args.layers} " \
              f"--ranks {args.ranks} --precisions {args.precisions} --systems {args.systems}"
    machine = f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, " \
              f"{platform.system()} {platform.release()}"
    rows = _load_rows()
    for precision in args.precisions.split(","):
        for world in [int(x) for x in args.ranks.split(",")]:
            for system in systems:
                load = os.getloadavg()[0]
                out = run_ranks(measure, world_size=world, args=(system, precision, args.hidden, args.layers),
                                timeout_s=3600, env={"ZTUNE_SHM": "0"})
                worst = {k: max(o[k] for o in out) for k in ("baseline", "built", "inited", "trained")}
                load = max(load, os.getloadavg()[0])
                worst.update(when=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), load=load,
                             command=command, machine=machine)
                rows[f"{model_key}|{precision}|{world}|{system}"] = worst
                JSON_PATH.write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")
                print(precision, world, system, {k: round(worst[k]) for k in ("baseline", "built", "inited",
                                                                              "trained")}, flush=True)
    MD_PATH.write_text("\n".join(_render(rows, model_key=model_key, sizes=sizes)) + "\n")
    print(f"wrote {MD_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
