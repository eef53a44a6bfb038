"""`ztune estimate`: will it fit, and how fast? The flags, for typer; the work is estimate_run.run_estimate.

The cost model, the profiles and the config loader are imported when the command runs, so that
`ztune --help` and the other commands do not pay for them; nothing here imports torch. `ztune.cli.main`
usually skips typer for this command (estimate_run.parse_fast); this signature and estimate_run's flag table
are kept equal by tests/cli/test_estimate_fast.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ztune.cli.estimate_run import parse_trainable, row_dict, run_estimate

__all__ = ["COMMAND_SETTINGS", "estimate", "parse_trainable", "row_dict"]

COMMAND_SETTINGS = {"help": "Memory, communication and step time per GPU for every ZeRO configuration."}


def estimate(
    hardware: Annotated[str | None, typer.Option("--hardware", help="Hardware profile name or YAML path "
                                                                    "(required).")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Model profile, YAML or HF config.json.")] = None,
    params: Annotated[str | None, typer.Option("--params", help="Derive a Llama-like shape from a size, "
                                                                 "e.g. 70B.")] = None,
    nodes: Annotated[int, typer.Option("--nodes", help="Number of nodes.")] = 1,
    seq: Annotated[int | None, typer.Option("--seq", help="Sequence length (default: min(model max, "
                                                          "4096)).")] = None,
    micro_batch: Annotated[int | None, typer.Option("--micro-batch", help="Micro-batch per GPU (default: "
                                                                          "largest that fits).")] = None,
    global_batch: Annotated[int | None, typer.Option("--global-batch", help="Samples per optimizer "
                                                                            "step.")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="Estimate this ztune YAML or DeepSpeed "
                                                                 "JSON config only.")] = None,
    stage: Annotated[int | None, typer.Option("--stage", help="Only this ZeRO stage.")] = None,
    precision: Annotated[str | None, typer.Option("--precision", help="bf16, fp16 or fp32 (default: the "
                                                                      "config's, else bf16).")] = None,
    compression: Annotated[bool, typer.Option("--compression", help="Also sweep gradient compression (its "
                                              "codec's compute is charged at the profile's measured codec rates; "
                                              "rows without one are not recommended).")] = False,
    zeropp: Annotated[bool | None, typer.Option("--zeropp/--no-zeropp", help="Also sweep ZeRO++ at stage 3 "
                                                "(qwZ int8 weight all-gather + hpZ inside each node + qgZ int4 "
                                                "gradients; default: on with --nodes > 1).",
                                                show_default=False)] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a PNG of memory per GPU by "
                                                             "category.")] = None,
    check: Annotated[bool, typer.Option("--check", help="Exit 1 if --config does not fit.")] = False,
    selective_policy: Annotated[str, typer.Option("--selective-policy", help="What selective checkpointing "
                                                  "recomputes: attention (ztune, Megatron) or op "
                                                  "(torchtitan).")] = "attention",
    reduce_fp32: Annotated[bool, typer.Option("--reduce-fp32", help="Gradients are reduced in fp32 (FSDP "
                                                                  "reduce_dtype=float32).")] = False,
    loss: Annotated[str, typer.Option("--loss", help="Cross-entropy: upcast (logits.float()), fused, or "
                                                     "chunked (with --loss-chunk).")] = "upcast",
    loss_chunk: Annotated[int, typer.Option("--loss-chunk", help="Tokens per chunk of a chunked loss.")] = 0,
    trainable: Annotated[str | None, typer.Option("--trainable", help="Partial fine-tune: share of the "
                                                  "parameters that train, e.g. 2% or 0.02 (the rest "
                                                  "frozen).")] = None,
    lora_rank: Annotated[int | None, typer.Option("--lora-rank", help="LoRA fine-tune at this rank on PEFT's "
                                                  "default targets (q_proj+v_proj; GPT-2 c_attn), base "
                                                  "frozen.")] = None,
    init: Annotated[str, typer.Option("--init", help="How the model is built, for stage 3's init peak: meta "
                                                     "(ztune.zero_init) or eager (built whole, then "
                                                     "sharded).")] = "meta",
) -> None:
    """Estimate memory per GPU and host, communication, step time and MFU; recommend a configuration."""
    code = run_estimate(**locals())  # first statement: locals() holds exactly the flags
    if code:
        raise typer.Exit(code)
