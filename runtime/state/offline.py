"""Checkpoint tools that need no process group: inspect a save directory, consolidate a tag into Hugging Face
`model.safetensors`. Memory stays at about one tensor: parameters are assembled one at a time from the rank
files' ranges (runtime/state/files.py TensorFile) and streamed out (`write_tensor_stream`).

Output layout follows transformers' conventions (a fact of its loader, modeling_utils): one
`model.safetensors`, or above the size limit `model-00001-of-0000N.safetensors` files plus
`model.safetensors.index.json` = {"metadata": {"total_size": bytes}, "weight_map": {key: file}}; the
safetensors header carries {"format": "pt"}.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ztune.errors import UserError
from ztune.inputs import ascii_number, shown
from ztune.runtime.state import tags
from ztune.runtime.state.files import CheckpointError, replace_atomic, write_tensor_stream
from ztune.runtime.state.reader import TagReader, resolve

OUT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' save_pretrained default ("5GB")
MAX_SHARD_BYTES = 1 << 60  # 1 EiB: above any model; keeps int() of the size finite
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _tag_summary(path: Path, *, verify: bool) -> dict:
    row: dict = {"tag": path.name, "ok": True, "error": None}
    try:
        with TagReader(path) as reader:
            m = reader.meta0
            row.update(step=reader.counters["global_steps"], world_size=reader.world_size, stage=reader.stage,
                       precision=m["precision"], ztune_version=m["ztune_version"],
                       bytes_per_rank=reader.bytes_per_rank())
            reader.verify(checksum_ranks=None if verify else set())
    except UserError as exc:
        row.update(ok=False, error=str(exc))
    return row


def inspect(load_dir: str | Path, *, verify: bool = False) -> dict:
    """Tags in `load_dir` (oldest first) with step, world size, stage and bytes per rank, what `latest` names,
    and staging folders a crash left. Metadata checksums and file sizes are always checked; `verify` also
    checks every file's sha256. Raises UserError if `load_dir` is not a checkpoint directory."""
    load_dir = Path(load_dir)
    tags.check_save_dir(load_dir, must_exist=True)
    latest = tags.read_latest(load_dir)
    names = sorted(e.name for e in load_dir.iterdir() if e.is_dir() and (e / tags.rank_meta_name(0)).exists()
                   and not e.name.startswith("."))
    staging = sorted(e.name for e in load_dir.iterdir() if e.is_dir() and e.name.startswith(tags.TMP_PREFIX))
    if not names and latest is None:
        raise UserError(f"{load_dir} holds no ztune checkpoint (no tag folders, no 'latest' file)")
    rows = [_tag_summary(load_dir / n, verify=verify) for n in names]
    if latest is not None and latest not in names:
        # What a load would read (a missing folder, a DeepSpeed tag, or the `.old-` copy of a crashed re-save):
        # listed with its status, so that a directory no load can use is not an empty table and exit 0.
        rows.append(_tag_summary(resolve(load_dir, latest), verify=verify))
    rows.sort(key=lambda r: (r.get("step", -1), r["tag"]))
    return {"dir": str(load_dir), "latest": latest, "tags": rows, "incomplete": staging}


def _plan_items(reader: TagReader, dtype: torch.dtype) -> list[tuple[str, torch.dtype, tuple[int, ...], object]]:
    """(state_dict key, dtype, shape, producer) in the model's state_dict order; tied tensors once."""
    shapes = reader.param_shapes()
    module = reader.meta0["module"]
    untrained = module["untrained"]
    items, seen = [], set()
    for key, name in module["state_dict_keys"]:
        if name in seen:
            continue
        seen.add(name)
        if name in shapes:
            shape = shapes[name]

            def produce(name=name, shape=shape):
                numel = 1
                for d in shape:
                    numel *= d
                full = torch.empty(numel, dtype=torch.float32)
                reader.read_param(name, 0, numel, key="master", out=full)
                return full.view(shape)

            items.append((key, dtype, tuple(shape), produce))
        elif name in untrained:
            saved_dtype = getattr(torch, untrained[name][0])
            out = dtype if saved_dtype.is_floating_point else saved_dtype
            f = reader.module_file()
            items.append((key, out, tuple(untrained[name][1]),
                          lambda name=name, f=f: f.read(name).reshape(f.shape(name))))
        else:
            raise CheckpointError(f"checkpoint {reader.path} lists state_dict key {key!r} but holds no values "
                                  "for it: its metadata is inconsistent")
    return items


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


def consolidate(load_dir: str | Path, *, out_dir: str | Path, tag: str | None = None, dtype: str = "fp32",
                max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[Path]:
    """Write the tag's full model (trainable parameters from the fp32 masters, frozen parameters and
    persistent buffers) as Hugging Face safetensors in `out_dir`, cast to `dtype` (fp32 | bf16 | fp16;
    integer buffers keep theirs). Returns the files written (the index last, when sharded).
    Raises UserError / CheckpointError (naming the file) for bad arguments or a damaged checkpoint."""
    if dtype not in OUT_DTYPES:
        raise UserError(f"--dtype {dtype!r} is not supported; use one of {', '.join(OUT_DTYPES)}")
    if max_shard_bytes <= 0:
        raise UserError(f"--max-shard-size must be > 0 bytes, got {max_shard_bytes}")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    tags.check_save_dir(Path(load_dir), must_exist=True)  # else a missing folder reads as "no 'latest' file"
    path = resolve(load_dir, tag)
    if path is None:
        raise UserError(f"{load_dir} has no 'latest' file; pass --tag (see `ztune checkpoint inspect {load_dir}`)")
    with TagReader(path) as reader:
        reader.verify()
        items = _plan_items(reader, OUT_DTYPES[dtype])
        shards: list[list] = [[]]
        size = 0
        for item in items:
            nbytes = _nbytes(item[1], item[2])
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(item)
            size += nbytes
        out_dir.mkdir(parents=True, exist_ok=True)
        meta = {"format": "pt"}
        if len(shards) == 1:
            write_tensor_stream(out_dir / SINGLE_FILE, shards[0], metadata=meta)
            return [out_dir / SINGLE_FILE]
        written, weight_map = [], {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            write_tensor_stream(out_dir / name, shard, metadata=meta)
            written.append(out_dir / name)
            weight_map.update({item[0]: name for item in shard})
        total = sum(_nbytes(item[1], item[2]) for item in items)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        replace_atomic(out_dir / INDEX_FILE, (json.dumps(index, indent=2) + "\n").encode())
        return written + [out_dir / INDEX_FILE]


def _check_out_dir(out_dir: Path) -> None:
    """Refuse an --out that is a file, or a folder already holding weights: overwriting them would lose what was
    written there before, and a stale `model.safetensors` beside new shards is what from_pretrained would load
    (it prefers the single file to the index)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file; give a folder (it is created if missing)")
    if not out_dir.is_dir():
        return
    existing = sorted(p.name for p in out_dir.iterdir()
                      if p.name in (SINGLE_FILE, INDEX_FILE) or (p.name.startswith("model-")
                                                                  and p.name.endswith(".safetensors")))
    if existing:
        shown = ", ".join(existing[:3]) + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
        raise UserError(f"--out {out_dir} already holds {shown}; choose an empty folder or remove them first")


def parse_size(text: str) -> int:
    """Bytes from '500MB', '2GiB', '1e9', '123' (decimal units kB/MB/GB, binary KiB/MiB/GiB)."""
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
             "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "b": 1}
    s = text.strip(" ").lower()
    unit = next((u for u in units if s.endswith(u)), "")
    number, factor = s[: len(s) - len(unit)].strip(" "), units.get(unit, 1)
    # ASCII only (float() also reads '５', '1_0', 'inf' and 'nan'; int(inf) would raise OverflowError).
    value = ascii_number(number)
    if value is None:
        raise UserError(f"--max-shard-size {shown(text)} is not a size; use e.g. 500MB, 2GiB or 1000000 (ASCII "
                        "digits)")
    if not 0 < value * factor <= MAX_SHARD_BYTES:
        raise UserError(f"--max-shard-size must be more than 0 bytes and at most 1 EiB, got {shown(text)}")
    return int(value * factor)
