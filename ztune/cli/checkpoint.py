"""`ztune checkpoint inspect DIR` / `ztune checkpoint consolidate DIR --out OUT`: offline checkpoint tools.

Parse flags, call runtime/state/offline.py, render. No process group; torch is imported when a command runs.
Exit codes: 0 done; 1 `inspect` found a damaged tag; 2 bad input or a checkpoint that cannot be read.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer

from ztune.errors import UserError

COMMAND_SETTINGS = {"help": "Inspect a checkpoint directory, or consolidate a tag into Hugging Face safetensors."}


class Action(str, enum.Enum):
    INSPECT = "inspect"
    CONSOLIDATE = "consolidate"


def _render_inspect(report: dict) -> None:
    from ztune.console import console, human_bytes, table

    rows = []
    for r in report["tags"]:
        per_rank = r.get("bytes_per_rank") or []
        rows.append([r["tag"] + (" (latest)" if r["tag"] == report["latest"] else ""), r.get("step", "?"),
                     r.get("world_size", "?"), r.get("stage", "?"), r.get("precision", "?"),
                     human_bytes(max(per_rank)) if per_rank else "?",
                     human_bytes(sum(per_rank)) if per_rank else "?", "ok" if r["ok"] else r["error"]])
    console.print(table(f"checkpoints in {report['dir']}",
                        ["tag", "step", "ranks", "stage", "precision", "max/rank", "total", "status"], rows,
                        justify_right=["step", "ranks", "stage", "max/rank", "total"]))
    if report["incomplete"]:
        console.print(f"unfinished saves (ignored, removed by the next save of that tag): "
                      f"{', '.join(report['incomplete'])}")


def checkpoint(
    action: Annotated[Action, typer.Argument(help="inspect: list tags; consolidate: write model.safetensors.")],
    # str, not Path: typer turns "" into Path("."), the current folder.
    directory: Annotated[str, typer.Argument(help="The save directory (holds `latest` and tag folders).")],
    tag: Annotated[str | None, typer.Option("--tag", help="consolidate: the tag (default: the one `latest` "
                                                         "names).")] = None,
    out: Annotated[str | None, typer.Option("--out", help="consolidate: output folder (required).")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="consolidate: fp32, bf16 or fp16.")] = "fp32",
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="consolidate: split into files of at "
                                                                         "most this size (e.g. 5GB, "
                                                                         "500MiB).")] = "5GB",
    verify: Annotated[bool, typer.Option("--verify", help="inspect: also check every file's sha256 (reads "
                                                          "everything).")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Inspect a checkpoint directory or consolidate one tag into Hugging Face model.safetensors."""
    from ztune.console import console, emit_json
    from ztune.inputs import text_flag
    from ztune.runtime.state import offline

    text_flag("DIRECTORY", directory, what="the save directory (it holds 'latest' and tag folders)",
              required=True)
    text_flag("--out", out, what="a folder for the safetensors files")

    if action is Action.INSPECT:
        if out is not None or tag is not None:
            raise UserError("checkpoint inspect takes no --out or --tag (it lists every tag); drop them")
        report = offline.inspect(directory, verify=verify)
        if json_out:
            emit_json(report)
        else:
            _render_inspect(report)
        if not all(r["ok"] for r in report["tags"]):
            raise typer.Exit(1)
        return
    if out is None:
        raise UserError("checkpoint consolidate needs --out FOLDER (where model.safetensors goes)")
    files = offline.consolidate(directory, out_dir=Path(out), tag=tag, dtype=dtype,
                                max_shard_bytes=offline.parse_size(max_shard_size))
    if json_out:
        emit_json({"files": [str(f) for f in files]})
    else:
        console.print(f"wrote {len(files)} file(s) to {out}: {', '.join(f.name for f in files)}")
