"""Reading one checkpoint tag without a process group: metadata, checks, and parameter ranges.

Used by engine.load_checkpoint (each rank reads the ranges its new shards need) and by the offline tools
(`ztune checkpoint inspect / consolidate`, which read one whole parameter at a time).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ztune.runtime.state import tags
from ztune.runtime.state.files import CheckpointError, TensorFile, read_checked_json, verify_file
from ztune.runtime.state.layout import Fragment, index_fragments, plan_reads

# File names DeepSpeed's engine writes into a tag folder (runtime/engine.py: _get_ckpt_name, _get_zero_ckpt_name).
_DEEPSPEED_FILE_PATTERNS = ("mp_rank_*_model_states.pt", "*_optim_states.pt", "zero_pp_rank_*_model_states.pt")


def _refuse_deepspeed_tag(path: Path) -> None:
    """A DeepSpeed tag folder (e.g. a save_dir reused after moving a script to ztune) is named as such, instead of
    being reported as a ztune checkpoint with missing files."""
    if (path / tags.rank_meta_name(0)).exists():
        return
    found = next((p.name for pattern in _DEEPSPEED_FILE_PATTERNS for p in sorted(path.glob(pattern))), None)
    if found is not None:
        raise CheckpointError(f"checkpoint {path} was written by DeepSpeed ({found}), not by ztune; ztune cannot "
                              "resume it: export its weights with DeepSpeed's zero_to_fp32.py "
                              "(--safe_serialization) and load them with ztune.load_pretrained, or use another "
                              "save directory")


class TagReader:
    """One tag folder. Construction reads and checks every rank's metadata (checksums, format, consistency);
    `verify` checks the data files' sizes and sha256; the read methods then fetch only the bytes asked for.
    Every failure is a CheckpointError naming the file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise CheckpointError(f"checkpoint {self.path} is a file, not a tag folder; pass the save directory "
                                  f"that holds the tag folders ({self.path.parent}) and the tag's name")
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint {self.path} does not exist (no such tag folder)")
        _refuse_deepspeed_tag(self.path)
        self.meta0 = read_checked_json(self.path / tags.rank_meta_name(0))
        if self.meta0.get("format") != tags.FORMAT or self.meta0.get("format_version") != tags.FORMAT_VERSION:
            raise CheckpointError(f"checkpoint file {self.path / tags.rank_meta_name(0)} is not a ztune checkpoint "
                                  f"of format version {tags.FORMAT_VERSION}")
        self.world_size = int(self.meta0["world_size"])
        self.metas = [self.meta0]
        for r in range(1, self.world_size):
            meta = read_checked_json(self.path / tags.rank_meta_name(r))
            if meta.get("rank") != r or meta.get("world_size") != self.world_size or meta.get("tag") != self.meta0[
                    "tag"]:
                raise CheckpointError(f"checkpoint file {self.path / tags.rank_meta_name(r)} belongs to another "
                                      "save (rank, world size or tag differ from rank 0's)")
            self.metas.append(meta)
        self.index = index_fragments([Fragment.from_json(row, rank=m["rank"]) for m in self.metas
                                      for g in m["groups"] for row in g["fragments"]])
        self._open: dict[str, TensorFile] = {}

    # -- summary ------------------------------------------------------------------------------------------
    @property
    def tag(self) -> str:
        return self.meta0["tag"]

    @property
    def stage(self) -> int:
        return int(self.meta0["stage"])

    @property
    def counters(self) -> dict:
        return self.meta0["counters"]

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Trainable parameter name -> shape, in the order rank 0 stored them."""
        return {name: tuple(shape) for g in self.meta0["groups"] for name, shape in g["params"]}

    def state_keys(self) -> list[str]:
        keys = {k for m in self.metas for g in m["groups"] for k in g["state_keys"]}
        return sorted(keys)

    def step(self) -> float | None:
        steps = {g["step"] for m in self.metas for g in m["groups"] if g["step"] is not None}
        if len(steps) > 1:
            raise CheckpointError(f"checkpoint {self.path} holds different optimizer step counts {sorted(steps)}: "
                                  "its metadata is inconsistent")
        return steps.pop() if steps else None

    def files_of(self, rank: int) -> dict[str, dict]:
        return self.metas[rank]["files"]

    def bytes_per_rank(self) -> list[int]:
        return [sum(f["bytes"] for f in m["files"].values()) for m in self.metas]

    # -- checks -------------------------------------------------------------------------------------------
    def verify(self, *, checksum_ranks=None) -> None:
        """Every data file exists with its recorded size; the sha256 of rank 0's shared files and of the
        shards of `checksum_ranks` (default: all) is checked too."""
        ranks = set(range(self.world_size)) if checksum_ranks is None else set(checksum_ranks)
        for meta in self.metas:
            for name, info in meta["files"].items():
                full = meta["rank"] in ranks or name in (tags.MODULE_FILE, tags.OBJECTS_FILE)
                verify_file(self.path / name, nbytes=info["bytes"], sha256=info["sha256"] if full else None)

    # -- reading ------------------------------------------------------------------------------------------
    def _file(self, name: str) -> TensorFile:
        if name not in self._open:
            self._open[name] = TensorFile(self.path / name)
        return self._open[name]

    def shard_file(self, rank: int) -> TensorFile:
        return self._file(tags.rank_tensors_name(rank))

    def module_file(self) -> TensorFile:
        return self._file(tags.MODULE_FILE)

    def read_param(self, name: str, start: int, end: int, *, key: str, out: torch.Tensor) -> None:
        """Elements [start, end) of parameter `name`'s `key` state ("master", "exp_avg", ...) into 1-D CPU
        `out` (end - start elements, fp32)."""
        for rd in plan_reads(self.index, name=name, start=start, end=end, dst_offset=0, where=str(self.path)):
            f = self.shard_file(rd.rank)
            f.read(f"g{rd.group}.{key}", rd.src_offset, rd.src_offset + rd.length,
                   out=out[rd.dst_offset:rd.dst_offset + rd.length])

    def objects(self) -> dict:
        from ztune.runtime.state.capture import load_objects

        path = self.path / tags.OBJECTS_FILE
        try:
            return load_objects(path.read_bytes())
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint file {path} is missing: the checkpoint is incomplete") from None
        except Exception as exc:  # noqa: BLE001 -- torch.load raises many kinds on a damaged file
            raise CheckpointError(f"checkpoint file {path} is corrupted ({exc.__class__.__name__}); "
                                  "load an earlier tag") from None

    def rng_tensors(self, rank: int) -> dict[str, torch.Tensor]:
        f = self.shard_file(rank)
        return {n: f.read(n).reshape(f.shape(n)) for n in f.names() if n.startswith("rng.")}

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()

    def __enter__(self) -> TagReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def resolve(load_dir: str | Path, tag: str | None) -> Path | None:
    """The tag folder to load: `tag`, else the one `latest` names; None when neither exists (nothing saved)."""
    load_dir = Path(load_dir)
    tags.check_save_dir(load_dir, must_exist=False)  # missing: nothing saved yet; a file: a wrong path
    if tag is None:
        tag = tags.read_latest(load_dir)
        if tag is None:
            return None
    path = load_dir / tags.check_tag(str(tag))
    previous = load_dir / f"{tags.OLD_PREFIX}{tag}"
    if not path.is_dir() and previous.is_dir():
        return previous  # a crash while a re-save of `tag` swapped folders (tags.commit): its complete old copy
    return path
